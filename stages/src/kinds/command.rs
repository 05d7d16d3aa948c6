//! The `command` stage: a shell command with declared `deps` and `outs`,
//! cached like every other stage (DVC's `cmd`/`deps`/`outs`).
//!
//! The command runs under `sh -c` in a fresh sandbox folder, not in the
//! pipeline folder: each dep is linked in at its relative path and the
//! parent folders of the outs exist. After it exits 0, every declared out
//! must be there; they are moved into the artifact, and the driver copies
//! them into the pipeline folder. So a failed or interrupted command never
//! leaves half-written outs where the user looks, two stages never write
//! over each other, and an undeclared dep shows up as a missing file.
//! Deps are links to the user's files, so a command could write through
//! them: every dep is listed (size, time, inode of each file under it)
//! before and after the command, and any change fails the stage, naming
//! the path, before anything is published.
//!
//! The command sees these variables:
//!
//! | variable | value |
//! | --- | --- |
//! | `HAIC_STAGE` | the stage name |
//! | `HAIC_PIPELINE_DIR` | the folder of the pipeline file |
//! | `HAIC_SCRATCH` | a folder kept across interrupted attempts of this stage key (for the command's own checkpoints) |
//! | `HAIC_INPUT_<NAME>` | for each entry under `inputs:`, the folder of that upstream artifact (name upper-cased) |
//! | `HAIC_DEVICE` | `cpu` or the GPU device(s) the slot gave it |
//! | `HAIC_METRICS` | a file the command may append metric lines to, `name step value` (e.g. `echo "loss 10 0.37" >> "$HAIC_METRICS"`); they reach the registry while the command runs |

use std::collections::BTreeMap;
use std::io::BufRead;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use pipeline::ParamError;
use pipeline::spec::Stage;
use pipeline::stage::{StageContext, StageError, StageKind};

pub struct Command;

/// The variable that holds input `name`'s folder: `HAIC_INPUT_` and the
/// name upper-cased, anything but letters and digits as `_`.
fn input_var(name: &str) -> String {
    let var: String = name
        .chars()
        .map(|c| match c.is_ascii_alphanumeric() {
            true => c.to_ascii_uppercase(),
            false => '_',
        })
        .collect();
    format!("HAIC_INPUT_{var}")
}

impl StageKind for Command {
    fn name(&self) -> &'static str {
        "command"
    }

    fn version(&self) -> u32 {
        1
    }

    fn check(&self, stage: &Stage) -> Result<(), ParamError> {
        let mut vars: std::collections::HashMap<String, &str> = Default::default();
        for name in stage.inputs.keys() {
            if let Some(other) = vars.insert(input_var(name), name) {
                return Err(ParamError::new(
                    format!("inputs.{name}"),
                    format!(
                        "inputs `{other}` and `{name}` would both be {} in the command; rename one",
                        input_var(name)
                    ),
                ));
            }
        }
        match stage.params.get("cmd") {
            Some(serde_json::Value::String(s)) if !s.trim().is_empty() => Ok(()),
            Some(serde_json::Value::String(_)) => Err(ParamError::new("cmd", "`cmd` is empty")),
            Some(_) => Err(ParamError::new("cmd", "`cmd` must be a string")),
            None => Err(ParamError::new("kind", "a `command` stage needs a `cmd`")),
        }
    }

    fn run(&self, ctx: &StageContext) -> Result<(), StageError> {
        let job = &ctx.job;
        let cmd = job
            .params
            .get("cmd")
            .and_then(|v| v.as_str())
            .ok_or("the job has no `cmd`")?;
        let sandbox = ctx.scratch_dir().join("work");
        if sandbox.exists() {
            pipeline::cache::remove_tree(&sandbox)?;
        }
        std::fs::create_dir_all(&sandbox)?;
        for (rel, abs) in &job.deps {
            let link = sandbox.join(rel);
            if let Some(parent) = link.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::os::unix::fs::symlink(abs, &link)
                .map_err(|e| format!("linking dep `{rel}` into the sandbox: {e}"))?;
        }
        for out in &job.outs {
            if let Some(parent) = sandbox.join(out).parent() {
                std::fs::create_dir_all(parent)?;
            }
        }
        let state = ctx.scratch_dir().join("state");
        std::fs::create_dir_all(&state)?;
        let metrics_file = ctx
            .scratch_dir()
            .join(format!("metrics-attempt{}.txt", job.attempt));
        std::fs::write(&metrics_file, b"")?;

        // The command's output goes to the stage log (our stderr); our stdout
        // carries events for the driver only.
        let log_out = dup_stderr()?;
        let log_err = dup_stderr()?;
        let mut command = std::process::Command::new("sh");
        command
            .arg("-c")
            .arg(cmd)
            .current_dir(&sandbox)
            .stdin(Stdio::null())
            .stdout(log_out)
            .stderr(log_err)
            .env("HAIC_STAGE", &job.stage)
            .env("HAIC_PIPELINE_DIR", &job.pipeline_dir)
            .env("HAIC_SCRATCH", &state)
            .env("HAIC_DEVICE", &job.device)
            .env("HAIC_METRICS", &metrics_file);
        for (name, dir) in &job.inputs {
            command.env(input_var(name), dir);
        }
        // SAFETY: prctl is async-signal-safe; the command dies with its worker.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let deps_before = dep_listing(&job.deps);
        eprintln!("$ {cmd}");
        let mut child = command
            .spawn()
            .map_err(|e| format!("starting `sh -c {cmd:?}`: {e}"))?;
        let (exited, wake) = std::sync::mpsc::channel::<()>();
        let (status, metrics) = std::thread::scope(|s| {
            let file = &metrics_file;
            let tail = s.spawn(move || forward_metrics(ctx, file, wake));
            let status = child.wait();
            // Wakes the reader at once (a sleeping reader would add its poll
            // interval to every command stage).
            drop(exited);
            let metrics = tail
                .join()
                .unwrap_or_else(|_| Err("metrics reader panicked".into()));
            (status, metrics)
        });
        let status = status.map_err(|e| format!("waiting for `sh -c {cmd:?}`: {e}"))?;
        if let Some(changed) = first_change(&deps_before, &dep_listing(&job.deps)) {
            return Err(format!(
                "the command changed `{changed}`, which the stage reads as a dep (the sandbox links deps to the originals, so a write there reaches your file): a stage may write only its outs. Nothing is published; restore the file if it was yours, and write to a declared out instead"
            )
            .into());
        }
        metrics?;
        if !status.success() {
            let how = match status.code() {
                Some(c) => format!("exited with status {c}"),
                None => "was killed by a signal".to_string(),
            };
            return Err(format!("command {how}: `{cmd}` (its output is in the stage log)").into());
        }
        for out in &job.outs {
            let from = sandbox.join(out);
            if std::fs::symlink_metadata(&from).is_err() {
                return Err(format!(
                    "the command succeeded but did not write its out `{out}`; write it relative to the working folder, or fix `outs`"
                )
                .into());
            }
            let to = ctx.out_dir().join(out);
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent)?;
            }
            move_path(&from, &to)?;
        }
        pipeline::cache::remove_tree(&sandbox)?;
        Ok(())
    }
}

/// What a dep looks like on disk, file by file (a folder's whole tree):
/// path, kind, size, modification time and inode. A command that writes,
/// truncates, adds or removes anything under a dep changes it.
type DepListing = Vec<(PathBuf, bool, u64, i64, i64, u64)>;

fn dep_listing(deps: &BTreeMap<String, PathBuf>) -> DepListing {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    // A dep's own path follows a symlink the user made; inside it, not.
    let mut stack: Vec<(PathBuf, bool)> = deps.values().map(|abs| (abs.clone(), true)).collect();
    while let Some((path, root)) = stack.pop() {
        let meta = match root {
            true => std::fs::metadata(&path),
            false => std::fs::symlink_metadata(&path),
        };
        let Ok(meta) = meta else {
            out.push((path, false, u64::MAX, 0, 0, 0));
            continue;
        };
        if meta.is_dir()
            && let Ok(rd) = std::fs::read_dir(&path)
        {
            stack.extend(rd.flatten().map(|e| (e.path(), false)));
        }
        out.push((
            path,
            meta.is_dir(),
            meta.len(),
            meta.mtime(),
            meta.mtime_nsec(),
            meta.ino(),
        ));
    }
    out.sort();
    out
}

/// The first path that differs between two listings, if any.
fn first_change(before: &DepListing, after: &DepListing) -> Option<String> {
    let (mut b, mut a) = (before.iter().peekable(), after.iter().peekable());
    loop {
        match (b.peek(), a.peek()) {
            (None, None) => return None,
            (Some(x), Some(y)) if x == y => {
                b.next();
                a.next();
            }
            (Some(x), Some(y)) => return Some((&x.0).min(&y.0).display().to_string()),
            (Some(x), None) => return Some(x.0.display().to_string()),
            (None, Some(y)) => return Some(y.0.display().to_string()),
        }
    }
}

/// Forwards `name step value` lines from the metrics file as they appear,
/// until the command has exited (`wake` disconnects) and the file is drained.
fn forward_metrics(
    ctx: &StageContext,
    path: &Path,
    wake: std::sync::mpsc::Receiver<()>,
) -> Result<(), StageError> {
    let mut reader = std::io::BufReader::new(std::fs::File::open(path)?);
    let mut line = String::new();
    let mut number = 0;
    let mut finished = false;
    loop {
        loop {
            reader.read_line(&mut line)?;
            // A line without its newline may still be being written, unless
            // the command has exited.
            let complete = if finished {
                !line.is_empty()
            } else {
                line.ends_with('\n')
            };
            if !complete {
                break;
            }
            number += 1;
            let text = line.trim();
            if !text.is_empty() {
                let (name, step, value) = parse_metric_line(text).ok_or_else(|| {
                    format!(
                        "line {number} of $HAIC_METRICS is `{text}`; write `name step value`, e.g. `loss 10 0.37`"
                    )
                })?;
                ctx.metric(name, step, value);
            }
            line.clear();
        }
        if finished {
            return Ok(());
        }
        // Poll every 50 ms while the command runs; one last pass after it exits.
        finished = matches!(
            wake.recv_timeout(Duration::from_millis(50)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected)
        );
    }
}

fn parse_metric_line(text: &str) -> Option<(&str, i64, f64)> {
    let mut parts = text.split_whitespace();
    let name = parts.next()?;
    let step = parts.next()?.parse().ok()?;
    let value = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some((name, step, value))
}

fn dup_stderr() -> Result<Stdio, StageError> {
    use std::os::fd::AsFd;
    Ok(Stdio::from(std::io::stderr().as_fd().try_clone_to_owned()?))
}

/// Moves a file or folder; an out that is a link to a dep is copied instead.
fn move_path(from: &Path, to: &Path) -> Result<(), StageError> {
    let meta = std::fs::symlink_metadata(from)?;
    if meta.file_type().is_symlink() {
        std::fs::copy(from, to)?;
        return Ok(());
    }
    std::fs::rename(from, to).map_err(|e| format!("moving {}: {e}", from.display()).into())
}
