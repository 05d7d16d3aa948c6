//! The Slurm executor on a real one-node cluster (`scripts/slurm-local.sh`,
//! started by `.ci/run`; its `SLURM_CONF` tells the tests where it is).
//! Without one these tests say so and pass, unless `HAIC_REQUIRE_SLURM=1`.
//! They hold one lock: the cluster has two CPUs and two (fake) GPUs, and
//! two tests' jobs would queue behind each other.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{Project, assert_ran_at_once, send_signal, smoke, stderr};

static CLUSTER: Mutex<()> = Mutex::new(());

/// The cluster lock, or `None` (with a message) when there is no cluster.
fn cluster() -> Option<std::sync::MutexGuard<'static, ()>> {
    let conf = std::env::var("SLURM_CONF").unwrap_or_default();
    if conf.is_empty() || !std::path::Path::new(&conf).exists() {
        assert!(
            std::env::var("HAIC_REQUIRE_SLURM").as_deref() != Ok("1"),
            "HAIC_REQUIRE_SLURM=1 but SLURM_CONF (`{conf}`) names no cluster config; start one with scripts/slurm-local.sh start"
        );
        eprintln!(
            "SKIPPED: no Slurm cluster (SLURM_CONF unset); start one with `export SLURM_CONF=$(scripts/slurm-local.sh start)`"
        );
        return None;
    }
    Some(CLUSTER.lock().unwrap_or_else(|p| p.into_inner()))
}

/// A Slurm client command's stdout.
fn slurm(program: &str, args: &[&str]) -> String {
    let out = Command::new("timeout")
        .arg("30")
        .arg(program)
        .args(args)
        .output()
        .expect("slurm client");
    assert!(out.status.success(), "{program} {args:?}: {}", stderr(&out));
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// `scontrol show job ID` as `Key=Value` pairs.
fn job_fields(id: &str) -> BTreeMap<String, String> {
    slurm("scontrol", &["show", "job", id])
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Polls every 0.2 s so that the tests do not wait on the default 5 s.
const FAST_POLL: &str = "executor: {kind: slurm, poll_interval: 0.2}\n";

/// The Slurm job id recorded for `stage`, once there is one.
fn wait_for_job(p: &Project, stage: &str) -> String {
    let t = Instant::now();
    loop {
        let rows = p
            .try_query(&format!(
                "SELECT job_id FROM stage_runs WHERE stage = '{stage}' AND job_id IS NOT NULL"
            ))
            .unwrap_or_default();
        if let Some(id) = rows.first().and_then(|r| r["job_id"].as_str()) {
            return id.to_string();
        }
        assert!(t.elapsed() < Duration::from_secs(60), "no job for {stage}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_for_state(id: &str, state: &str) {
    let t = Instant::now();
    while job_fields(id).get("JobState").map(String::as_str) != Some(state) {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "job {id} never reached {state}: {:?}",
            job_fields(id)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_smoke_pipeline_on_slurm_ends_with_the_local_digests() {
    let Some(_c) = cluster() else { return };
    let local = smoke("");
    let out = local.run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let on_slurm = smoke(FAST_POLL);
    let out = on_slurm.run(&["--executor", "slurm"]);
    assert!(out.status.success(), "{}", stderr(&out));

    let (want, got) = (local.digests(), on_slurm.digests());
    assert_eq!(want.len(), 14, "{want:?}");
    assert_eq!(got, want, "same artifacts, bit for bit");
    let rows =
        on_slurm.query("SELECT worker, job_id, device FROM stage_runs WHERE status = 'succeeded'");
    assert_eq!(rows.len(), 14);
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    for r in rows {
        assert_eq!(r["worker"], "slurm", "{r}");
        assert!(
            r["job_id"]
                .as_str()
                .is_some_and(|j| j.parse::<u64>().is_ok()),
            "{r}"
        );
        assert_eq!(r["device"], format!("cpu@{}", host.trim()), "{r}");
    }
}

#[test]
fn two_gpu_stages_run_at_once_on_different_devices() {
    let Some(_c) = cluster() else { return };
    let stage = |name: &str| {
        format!(
            "  {name}:\n    kind: command\n    cmd: \"date +%s.%N > {name}.start; echo $CUDA_VISIBLE_DEVICES $HAIC_DEVICE > {name}.txt; sleep 2; date +%s.%N > {name}.end\"\n    outs: [{name}.start, {name}.txt, {name}.end]\n    resources: {{gpus: 1}}\n"
        )
    };
    let p = Project::new(&format!("{FAST_POLL}stages:\n{}{}", stage("a"), stage("b")));
    let out = p.run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut devices = vec![p.read("a.txt"), p.read("b.txt")];
    devices.sort();
    assert_eq!(devices, ["0 cuda:0\n", "1 cuda:1\n"]);
    assert_ran_at_once(&p, "a", "b");
    let mut recorded: Vec<String> = p
        .query("SELECT device FROM stage_runs")
        .iter()
        .map(|r| {
            r["device"]
                .as_str()
                .unwrap_or_default()
                .split('@')
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    recorded.sort();
    assert_eq!(recorded, ["cuda:0", "cuda:1"]);
}

#[test]
fn a_failed_job_is_reported_with_its_exit_code_and_its_dependents_skipped() {
    let Some(_c) = cluster() else { return };
    let p = Project::new(&format!(
        "{FAST_POLL}stages:
  bad:
    kind: command
    cmd: \"echo about to fail >&2; exit 3\"
    outs: [bad.txt]
  after:
    kind: command
    cmd: \"cat bad.txt > after.txt\"
    deps: [bad.txt]
    outs: [after.txt]
"
    ));
    let out = p.run(&[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let job = wait_for_job(&p, "bad");
    let err = stderr(&out);
    assert!(
        err.contains(&format!("Slurm job {job} FAILED with exit code 1"))
            && err.contains("command exited with status 3"),
        "{err}"
    );
    assert_eq!(
        p.statuses(1),
        [
            ("bad".into(), "failed".into()),
            ("after".into(), "skipped".into())
        ]
    );
    let fields = job_fields(&job);
    assert_eq!(
        fields.get("ExitCode").map(String::as_str),
        Some("1:0"),
        "{fields:?}"
    );
    assert!(p.attempt_log("bad", 1).contains("about to fail"));
}

#[test]
fn a_killed_driver_resumes_by_adopting_its_running_jobs() {
    let Some(_c) = cluster() else { return };
    let p = Project::new(&format!(
        "{FAST_POLL}stages:
  slow:
    kind: command
    cmd: \"sleep 4; echo $SLURM_JOB_ID > slow.txt\"
    outs: [slow.txt]
  after:
    kind: command
    cmd: \"cat slow.txt > after.txt\"
    deps: [slow.txt]
    outs: [after.txt]
"
    ));
    let mut driver = p.spawn(&["run", "pipeline.yaml"], false);
    let job = wait_for_job(&p, "slow");
    wait_for_state(&job, "RUNNING");
    send_signal(driver.id(), "KILL");
    let _ = driver.wait();
    assert_eq!(
        job_fields(&job)["JobState"],
        "RUNNING",
        "the job outlives its driver"
    );

    let out = p.run(&["--resume"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains(&format!("slurm job {job} (adopted)")), "{err}");
    assert_eq!(
        p.read("slow.txt").trim(),
        job,
        "the first job's output, not a second one's"
    );
    let name = &job_fields(&job)["JobName"];
    let jobs = slurm(
        "squeue",
        &["--name", name, "--states=all", "-h", "-o", "%i"],
    );
    assert_eq!(jobs.lines().count(), 2, "slow once, after once: {jobs}");
    assert_eq!(
        p.statuses(1),
        [
            ("slow".into(), "succeeded".into()),
            ("after".into(), "succeeded".into())
        ]
    );
}

#[test]
fn stopping_the_driver_cancels_the_runs_jobs() {
    let Some(_c) = cluster() else { return };
    let p = Project::new(&format!(
        "{FAST_POLL}stages:
  slow:
    kind: command
    cmd: \"sleep 30\"
    outs: [slow.txt]
"
    ));
    let driver = p.spawn(&["run", "pipeline.yaml"], true);
    let job = wait_for_job(&p, "slow");
    wait_for_state(&job, "RUNNING");
    send_signal(driver.id(), "TERM");
    let out = driver.wait_with_output().expect("driver");
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    wait_for_state(&job, "CANCELLED");
    assert_eq!(p.statuses(1), [("slow".into(), "interrupted".into())]);
}

#[test]
fn sigusr1_before_the_time_limit_checkpoints_and_the_requeued_job_continues() {
    let Some(_c) = cluster() else { return };
    // The smoke pipeline's level 1, trained for 200 steps instead of 20.
    let vq1_for_200_steps = |p: &Project| {
        let text = p
            .read("pipeline.yaml")
            .replacen("steps: 20\n", "steps: 200\n", 1);
        p.write("pipeline.yaml", &text);
    };
    let local = smoke("");
    vq1_for_200_steps(&local);
    let out = local.run(&["vq1"]);
    assert!(out.status.success(), "{}", stderr(&out));

    let p = smoke(FAST_POLL);
    vq1_for_200_steps(&p);
    let driver = p.spawn(&["run", "pipeline.yaml", "vq1"], true);
    let job = wait_for_job(&p, "vq1");
    // What Slurm sends `signal_before_limit` seconds before the time limit
    // (`--signal=B:USR1@N`), sent now: to the batch script, after step 20.
    let events = p.query("SELECT log_path FROM stage_runs WHERE stage = 'vq1'")[0]["log_path"]
        .as_str()
        .expect("log")
        .replace(".log", ".events.jsonl");
    let t = Instant::now();
    while !std::fs::read_to_string(&events)
        .unwrap_or_default()
        .contains("\"done\":20,")
    {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "vq1 never reached step 20"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    slurm("scancel", &["--signal=USR1", "--batch", &job]);
    // Slurm may hold a requeued job for about two minutes before it can
    // start again (seen here once; other times it restarts at once): if it
    // does, let it start now. (Two seconds after the requeue, not at once:
    // slurmd refuses a credential issued in the second that revoked the old
    // one.)
    let t = Instant::now();
    loop {
        let f = job_fields(&job);
        let (restarted, state) = (f["Restarts"] != "0", f["JobState"].as_str());
        if restarted && state == "PENDING" && f["Reason"] == "BeginTime" {
            std::thread::sleep(Duration::from_secs(2));
            slurm(
                "scontrol",
                &["update", &format!("JobId={job}"), "StartTime=now"],
            );
            break;
        }
        // Running again, or over (COMPLETING, REQUEUED and PENDING come
        // before either).
        if restarted && ["RUNNING", "COMPLETED", "FAILED", "CANCELLED"].contains(&state) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "job {job} was not requeued: {f:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let out = driver.wait_with_output().expect("driver");
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("checkpointed at step"), "{err}");
    let log = p.attempt_log("vq1", 1);
    let step: u64 = log
        .split("resuming from the checkpoint at step ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("the requeued job resumed:\n{log}"));
    assert!((20..200).contains(&step), "resumed at step {step}");
    assert_eq!(p.digests(), local.digests(), "continued, to the same bytes");
    assert_eq!(
        p.query("SELECT count(*) AS n FROM stage_runs WHERE stage = 'vq1'")[0]["n"],
        1,
        "one stage run, one job: requeued, not resubmitted"
    );
}

#[test]
fn slurm_client_failures_are_retried_and_reported_not_taken_as_job_failures() {
    let Some(_c) = cluster() else { return };
    // `sbatch` and `squeue` that fail their first calls the way an
    // overloaded controller does, then work.
    let bin = tempfile::tempdir().expect("tempdir");
    for (tool, fails) in [("sbatch", 1), ("squeue", 3)] {
        let real = String::from_utf8(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .expect("which")
                .stdout,
        )
        .expect("utf-8");
        let script = format!(
            "#!/bin/sh\nn=$(cat '{dir}/{tool}.count' 2>/dev/null || echo 0)\necho $((n + 1)) > '{dir}/{tool}.count'\nif [ \"$n\" -lt {fails} ]; then echo '{tool}: error: Socket timed out on send/recv operation' >&2; exit 1; fi\nexec {real} \"$@\"\n",
            dir = bin.path().display(),
            real = real.trim(),
        );
        let path = bin.path().join(tool);
        std::fs::write(&path, script).expect("write");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let p = Project::new(&format!(
        "{FAST_POLL}stages:\n  a:\n    kind: command\n    cmd: \"echo done > a.txt\"\n    outs: [a.txt]\n"
    ));
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = p
        .cmd(&["run", "pipeline.yaml"])
        .env("PATH", path)
        .output()
        .expect("run");
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("sbatch for stage `a` failed (try 1 of 5)")
            && err.contains("Socket timed out"),
        "{err}"
    );
    assert!(err.contains("polling Slurm failed (1 in a row"), "{err}");
    assert_eq!(p.read("a.txt"), "done\n");
    let name = &job_fields(&wait_for_job(&p, "a"))["JobName"];
    let jobs = slurm(
        "squeue",
        &["--name", name, "--states=all", "-h", "-o", "%i"],
    );
    assert_eq!(jobs.lines().count(), 1, "submitted once: {jobs}");
}

#[test]
fn a_shared_dir_holds_the_stage_data_while_the_registry_stays_with_the_driver() {
    let Some(_c) = cluster() else { return };
    let shared = tempfile::tempdir().expect("tempdir");
    let p = Project::new(&format!(
        "executor: {{kind: slurm, poll_interval: 0.2, shared_dir: {}}}\nstages:\n  a:\n    kind: command\n    cmd: \"echo $SLURM_JOB_ID > a.txt\"\n    outs: [a.txt]\n",
        shared.path().display()
    ));
    let out = p.run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let path = p.query("SELECT path FROM artifacts")[0]["path"]
        .as_str()
        .expect("path")
        .to_string();
    assert!(
        path.starts_with(&shared.path().join("artifacts").display().to_string()),
        "{path}"
    );
    assert!(p.path(".haic/registry.db").exists());
    assert!(!p.path(".haic/artifacts").exists() && !p.path(".haic/logs").exists());
    let log = p.query("SELECT log_path FROM stage_runs")[0]["log_path"]
        .as_str()
        .expect("log")
        .to_string();
    assert!(
        log.starts_with(&shared.path().display().to_string()),
        "{log}"
    );
    // Every command finds the artifacts there: a second run is all cached.
    let out = p.run(&[]);
    assert!(stderr(&out).contains("1 cached"), "{}", stderr(&out));
    let status = p.haic(&["status", "pipeline.yaml"]);
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("cached"),
        "{status:?}"
    );
}
