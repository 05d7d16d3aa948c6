//! Helpers for end-to-end tests of the `haic-pipe` binary.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_haic-pipe")
}

/// A throw-away project folder with a pipeline file.
pub struct Project {
    pub dir: tempfile::TempDir,
}

impl Project {
    pub fn new(pipeline: &str) -> Project {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("pipeline.yaml"), pipeline).expect("write pipeline");
        Project { dir }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn pipeline(&self) -> PathBuf {
        self.path("pipeline.yaml")
    }

    pub fn write(&self, rel: &str, text: &str) {
        let p = self.path(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(p, text).expect("write");
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin());
        c.args(args)
            .current_dir(self.dir.path())
            .env_remove("HAIC_WORKSPACE");
        c
    }

    /// Runs `haic-pipe ARGS` in the project folder.
    pub fn haic(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("running haic-pipe")
    }

    pub fn run(&self, extra: &[&str]) -> Output {
        let mut args = vec!["run", "pipeline.yaml"];
        args.extend_from_slice(extra);
        self.haic(&args)
    }

    /// Rows of a registry query as JSON objects.
    pub fn query(&self, sql: &str) -> Vec<Value> {
        self.try_query(sql)
            .unwrap_or_else(|e| panic!("query failed: {e}"))
    }

    /// [`Project::query`], or the error (a registry still being created).
    pub fn try_query(&self, sql: &str) -> Result<Vec<Value>, String> {
        let out = self.haic(&[
            "registry",
            "-p",
            "pipeline.yaml",
            "query",
            sql,
            "--format",
            "json",
        ]);
        if !out.status.success() {
            return Err(stderr(&out));
        }
        let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    /// The data folder of the only artifact whose `column` (`kind` or
    /// `stage`) is `value`.
    pub fn artifact_data(&self, column: &str, value: &str) -> PathBuf {
        let rows = self.query(&format!(
            "SELECT path FROM artifacts WHERE {column} = '{value}'"
        ));
        assert_eq!(rows.len(), 1, "{rows:?}");
        Path::new(rows[0]["path"].as_str().expect("path")).join("data")
    }

    /// The pid of the local worker running (or that ran) `stage`.
    pub fn worker_pid(&self, stage: &str) -> u32 {
        let rows = self.query(&format!(
            "SELECT worker FROM stage_runs WHERE stage = '{stage}'"
        ));
        rows[0]["worker"]
            .as_str()
            .and_then(|w| w.strip_prefix("local:"))
            .and_then(|w| w.parse().ok())
            .unwrap_or_else(|| panic!("the running stage names its worker: {rows:?}"))
    }

    /// `stage -> status` of the stage runs of one run.
    pub fn statuses(&self, run: i64) -> Vec<(String, String)> {
        self.query(&format!(
            "SELECT stage, status FROM stage_runs WHERE run_id = {run} ORDER BY id"
        ))
        .into_iter()
        .map(|r| {
            (
                r["stage"].as_str().unwrap_or_default().to_string(),
                r["status"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
    }

    /// Runs `stage` (and what it needs), waits until it has committed
    /// checkpoint `step`, SIGKILLs its worker and waits for the driver to fail.
    pub fn kill_worker_after_checkpoint(&self, stage: &str, step: u64) {
        let mut driver = self.driver_at_checkpoint(stage, step);
        send_signal(self.worker_pid(stage), "KILL");
        assert_eq!(
            driver.wait().expect("driver").code(),
            Some(1),
            "the stage fails, the driver survives"
        );
    }

    /// Runs `stage` (and what it needs), waits until it has committed
    /// checkpoint `step`, sends the driver SIGINT (Ctrl-C) and waits for it
    /// to stop the run (exit 130).
    pub fn interrupt_after_checkpoint(&self, stage: &str, step: u64) {
        let mut driver = self.driver_at_checkpoint(stage, step);
        send_signal(driver.id(), "INT");
        assert_eq!(driver.wait().expect("driver").code(), Some(130));
    }

    /// A driver running `stage`, once the stage has committed checkpoint `step`.
    fn driver_at_checkpoint(&self, stage: &str, step: u64) -> std::process::Child {
        let driver = self
            .cmd(&["run", "pipeline.yaml", stage])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn driver");
        let t = Instant::now();
        loop {
            // Until the driver has made the registry, a query fails.
            let keys = self
                .try_query(&format!(
                    "SELECT key FROM stage_runs WHERE stage = '{stage}' AND key IS NOT NULL"
                ))
                .unwrap_or_default();
            let found = keys.iter().any(|k| {
                self.path(&format!(
                    ".haic/scratch/{}/checkpoints/step-{step:012}",
                    k["key"].as_str().unwrap_or_default()
                ))
                .exists()
            });
            if found {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(180),
                "checkpoint {step} of {stage} never appeared"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        driver
    }

    /// The log of `stage`'s attempt `attempt`.
    pub fn attempt_log(&self, stage: &str, attempt: i64) -> String {
        let rows = self.query(&format!(
            "SELECT log_path FROM stage_runs WHERE stage = '{stage}' AND attempt = {attempt}"
        ));
        std::fs::read_to_string(rows[0]["log_path"].as_str().expect("log path")).expect("log")
    }

    /// `stage -> artifact digest` of every artifact in the registry.
    pub fn digests(&self) -> BTreeMap<String, String> {
        self.query("SELECT stage, digest FROM artifacts")
            .into_iter()
            .map(|r| {
                (
                    r["stage"].as_str().unwrap_or_default().to_string(),
                    r["digest"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }

    /// Starts `haic-pipe ARGS` in the background; stdout is dropped, stderr
    /// kept (for `wait_with_output`) when `keep_stderr`.
    pub fn spawn(&self, args: &[&str], keep_stderr: bool) -> std::process::Child {
        self.cmd(args)
            .stdout(std::process::Stdio::null())
            .stderr(if keep_stderr {
                std::process::Stdio::piped()
            } else {
                std::process::Stdio::null()
            })
            .spawn()
            .expect("starting haic-pipe")
    }

    pub fn artifact_count(&self) -> usize {
        count_artifacts(&self.path(".haic/artifacts"))
    }
}

pub fn count_artifacts(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|rd| rd.flatten().filter(|e| e.file_name().len() == 64).count())
        .unwrap_or(0)
}

/// Stages `a` and `b` wrote `NAME.start` and `NAME.end` (`date +%s.%N`):
/// they ran at the same time.
pub fn assert_ran_at_once(p: &Project, a: &str, b: &str) {
    let time = |f: String| p.read(&f).trim().parse::<f64>().expect("a time");
    let (a0, a1) = (time(format!("{a}.start")), time(format!("{a}.end")));
    let (b0, b1) = (time(format!("{b}.start")), time(format!("{b}.end")));
    assert!(
        a0 < b1 && b0 < a1,
        "both ran at once: {a} {a0}-{a1}, {b} {b0}-{b1}"
    );
}

/// `kill -SIG PID`.
pub fn send_signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("kill");
    assert!(status.success());
}

/// Runs a Python `script` with `args` and returns its stdout; a failure
/// panics with its stderr.
pub fn run_python(python: &str, script: &str, args: &[&Path]) -> Vec<u8> {
    let out = Command::new(python)
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("running python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// The command exited with `code` and its stderr says `text`.
pub fn assert_error(out: &Output, code: i32, text: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(code), "{err}");
    assert!(err.contains(text), "want `{text}` in:\n{err}");
}

pub fn sorted(mut v: Vec<(String, String)>) -> Vec<(String, String)> {
    v.sort();
    v
}

pub fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    sorted(
        items
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect(),
    )
}

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `pipelines/smoke.yaml` with its root pointed at the repository, plus `extra` stages.
pub fn smoke(extra: &str) -> Project {
    let text = std::fs::read_to_string(repo().join("pipelines/smoke.yaml")).unwrap();
    let text = text.replacen("root: ..", &format!("root: {}", repo().display()), 1);
    Project::new(&format!("{text}{extra}"))
}

/// The smoke pipeline run up to its human-eval export: the project and the
/// package folder.
pub fn human_eval_package() -> (Project, PathBuf) {
    let p = smoke("");
    let out = p.run(&["human_eval"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let pkg = p.artifact_data("stage", "human_eval");
    (p, pkg)
}

/// The browser script `name` under tests/browser, when Chromium and
/// playwright-core are there; else `None` (skip), or a panic where
/// HAIC_REQUIRE_BROWSER says they must be.
pub fn browser_script(name: &str) -> Option<PathBuf> {
    let script = repo().join("tests/browser").join(name);
    let module = repo().join("tests/browser/node_modules/playwright-core");
    let chromium = std::env::var("HAIC_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if module.is_dir() && Path::new(&chromium).is_file() {
        return Some(script);
    }
    let why = format!(
        "the browser test needs Chromium at {chromium} (Debian: apt-get install chromium) and playwright-core (npm ci --prefix tests/browser); .ci/run installs both"
    );
    assert!(std::env::var_os("HAIC_REQUIRE_BROWSER").is_none(), "{why}");
    eprintln!("skipping: {why}");
    None
}

/// A page `haic-pipe` serves (`eval serve`, `ui`), started by `cmd` and
/// killed when dropped: its URL is the first line it writes, after
/// `prefix`; `addr` is that URL's host and port.
pub struct Served {
    child: std::process::Child,
    pub url: String,
    pub addr: String,
    /// Kept open while the server runs.
    _stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Served {
    pub fn start(mut cmd: Command, prefix: &str) -> Served {
        use std::io::BufRead;
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("starting haic-pipe");
        let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut first = String::new();
        stdout
            .read_line(&mut first)
            .expect("reading the first line");
        let url = first
            .trim()
            .strip_prefix(prefix)
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
            .to_string();
        let addr = url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        Served {
            child,
            url,
            addr,
            _stdout: stdout,
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a browser script with node; its stdout, once it exited 0.
pub fn node(script: &Path, args: &[&str]) -> String {
    let out = Command::new("node")
        .arg(script)
        .args(args)
        .output()
        .expect("running node");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
