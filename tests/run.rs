//! End-to-end tests of `haic-pipe run`: caching, re-runs, failures, resume.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Project, assert_error, assert_ran_at_once, pairs, send_signal, sorted, stderr};

const CHAIN: &str = r#"
stages:
  a:
    kind: command
    cmd: "printf '${text}' > a.txt"
    params: {text: hello}
    outs: [a.txt]
  b:
    kind: command
    cmd: "tr a-z A-Z < a.txt > b.txt; echo ${suffix} >> b.txt"
    params: {suffix: one}
    deps: [a.txt]
    outs: [b.txt]
  c:
    kind: command
    cmd: "wc -c < b.txt > c.txt"
    deps: [b.txt]
    outs: [c.txt]
  d:
    kind: command
    cmd: "echo independent > d.txt"
    outs: [d.txt]
"#;

#[test]
fn second_run_is_all_cached_and_restores_outs() {
    let p = Project::new(CHAIN);
    let out = p.run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(p.read("b.txt"), "HELLOone\n");
    assert_eq!(p.artifact_count(), 4);
    assert_eq!(
        sorted(p.statuses(1)),
        pairs(&[
            ("a", "succeeded"),
            ("b", "succeeded"),
            ("c", "succeeded"),
            ("d", "succeeded")
        ])
    );

    std::fs::remove_file(p.path("b.txt")).unwrap();
    let out = p.run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        sorted(p.statuses(2)),
        pairs(&[
            ("a", "cached"),
            ("b", "cached"),
            ("c", "cached"),
            ("d", "cached")
        ])
    );
    assert_eq!(
        p.read("b.txt"),
        "HELLOone\n",
        "a cache hit restores a deleted out"
    );
    assert_eq!(p.artifact_count(), 4);
    let logs = std::fs::read_dir(p.path(".haic/logs")).unwrap().count();
    assert_eq!(logs, 4, "cached stages start no worker");
}

#[test]
fn param_change_reruns_exactly_the_downstream_stages() {
    let p = Project::new(CHAIN);
    assert!(p.run(&[]).status.success());
    std::fs::write(p.pipeline(), CHAIN.replace("suffix: one", "suffix: two")).unwrap();

    let st = p.haic(&["status", "pipeline.yaml"]);
    let text = String::from_utf8_lossy(&st.stdout);
    assert!(
        text.contains("param `suffix` changed: \"one\" -> \"two\""),
        "{text}"
    );
    assert!(text.contains("upstream not up to date: b"), "{text}");

    let out = p.run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        sorted(p.statuses(2)),
        pairs(&[
            ("a", "cached"),
            ("b", "succeeded"),
            ("c", "succeeded"),
            ("d", "cached")
        ])
    );
    assert_eq!(p.read("b.txt"), "HELLOtwo\n");

    // Early cut-off: `a` re-runs with a different command giving the same
    // bytes; its dependents keep their keys.
    let same_bytes = CHAIN
        .replace("suffix: one", "suffix: two")
        .replace("printf '${text}' > a.txt", "printf '%s' '${text}' > a.txt");
    std::fs::write(p.pipeline(), same_bytes).unwrap();
    let out = p.run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        sorted(p.statuses(3)),
        pairs(&[
            ("a", "succeeded"),
            ("b", "cached"),
            ("c", "cached"),
            ("d", "cached")
        ])
    );
}

#[test]
fn a_changed_dep_file_reruns_its_stage() {
    let p = Project::new(
        "stages:\n  s:\n    kind: command\n    cmd: cat in.txt > out.txt\n    deps: [in.txt]\n    outs: [out.txt]\n",
    );
    p.write("in.txt", "v1\n");
    assert!(p.run(&[]).status.success());
    p.write("in.txt", "v2 longer\n");
    let st = String::from_utf8_lossy(&p.haic(&["status", "pipeline.yaml"]).stdout).to_string();
    assert!(st.contains("dep `in.txt` changed"), "{st}");
    assert!(p.run(&[]).status.success());
    assert_eq!(p.statuses(2), pairs(&[("s", "succeeded")]));
    assert_eq!(p.read("out.txt"), "v2 longer\n");
}

#[test]
fn a_failed_stage_skips_its_dependents_and_independent_branches_finish() {
    let p = Project::new(&CHAIN.replace(
        "tr a-z A-Z < a.txt > b.txt; echo ${suffix} >> b.txt",
        "echo broken >&2; exit 3",
    ));
    let out = p.run(&[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(
        sorted(p.statuses(1)),
        pairs(&[
            ("a", "succeeded"),
            ("b", "failed"),
            ("c", "skipped"),
            ("d", "succeeded")
        ])
    );
    let err = p.query("SELECT error, log_path FROM stage_runs WHERE stage = 'b'");
    assert!(
        err[0]["error"]
            .as_str()
            .unwrap()
            .contains("exited with status 3")
    );
    let log = std::fs::read_to_string(err[0]["log_path"].as_str().unwrap()).unwrap();
    assert!(
        log.contains("broken"),
        "the command's stderr is in the stage log: {log}"
    );
    let skipped = p.query("SELECT error FROM stage_runs WHERE stage = 'c'");
    assert_eq!(skipped[0]["error"], "upstream stage `b` failed");
    assert_eq!(p.artifact_count(), 2, "only a and d published");
    assert!(!p.path("b.txt").exists() && !p.path("c.txt").exists());
    let run = p.query("SELECT status FROM runs WHERE id = 1");
    assert_eq!(run[0]["status"], "failed");
}

#[test]
fn fail_fast_stops_the_other_branches() {
    let p = Project::new(
        "stages:\n  bad:\n    kind: command\n    cmd: sleep 0.3; exit 1\n  slow:\n    kind: command\n    cmd: sleep 30; echo x > x.txt\n    outs: [x.txt]\n",
    );
    let t = Instant::now();
    let out = p.run(&["--fail-fast", "--jobs", "2"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "the slow stage was stopped"
    );
    assert_eq!(
        sorted(p.statuses(1)),
        pairs(&[("bad", "failed"), ("slow", "interrupted")])
    );
}

#[test]
fn only_the_named_targets_and_their_upstream_run() {
    let p = Project::new(CHAIN);
    let out = p.run(&["b"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        sorted(p.statuses(1)),
        pairs(&[("a", "succeeded"), ("b", "succeeded")])
    );
    let out = p.run(&["nope"]);
    assert_error(&out, 2, "there is no stage `nope`");
    // A misspelt target leaves no run behind for `--resume` to trip over.
    assert_eq!(p.query("SELECT id FROM runs").len(), 1);
    let out = p.run(&["--resume"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("nothing to resume"),
        "{}",
        stderr(&out)
    );
}

/// When a run ends, its history is in `registry.db` itself: the file
/// alone, copied without its write-ahead log, holds every run.
#[test]
fn the_registry_file_alone_holds_the_history_after_a_run() {
    let p = Project::new(CHAIN);
    assert!(p.run(&[]).status.success());
    assert!(p.run(&["d"]).status.success());
    let wal = p.path(".haic/registry.db-wal");
    assert!(
        !wal.exists() || std::fs::metadata(&wal).unwrap().len() == 0,
        "the log is folded in"
    );
    let copy = tempfile::tempdir().unwrap();
    std::fs::copy(p.path(".haic/registry.db"), copy.path().join("registry.db")).unwrap();
    let out = p.haic(&[
        "registry",
        "--workspace",
        copy.path().to_str().unwrap(),
        "query",
        "SELECT count(*) AS n FROM stage_runs",
        "--format",
        "csv",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "n\n5\n",
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_stage_that_runs_too_long_fails_with_its_timeout() {
    // A slow command, and a hung one that ignores SIGTERM: the worker stops
    // on SIGTERM and its whole process group gets SIGKILL.
    for cmd in ["sleep 20", "trap '' TERM; sleep 60"] {
        let p = Project::new(&format!(
            "stages:\n  s:\n    kind: command\n    cmd: \"{cmd}\"\n    timeout: 1\n"
        ));
        let t = Instant::now();
        let out = p.run(&[]);
        assert_eq!(out.status.code(), Some(1), "{cmd}: {}", stderr(&out));
        assert!(t.elapsed() < Duration::from_secs(20), "{cmd}");
        let e = p.query("SELECT error FROM stage_runs");
        let error = e[0]["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("timed out after 1 s (the stage's `timeout`); raise it"),
            "{cmd}: {e:?}"
        );
    }
}

#[test]
fn inputs_pass_artifact_folders_and_lineage_is_recorded() {
    let p = Project::new(
        "stages:\n  a:\n    kind: command\n    cmd: echo data > a.txt\n    outs: [a.txt]\n  b:\n    kind: command\n    cmd: cat $HAIC_INPUT_SRC/a.txt > b.txt\n    inputs: {src: a}\n    outs: [b.txt]\n",
    );
    let out = p.run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(p.read("b.txt"), "data\n");
    let rows = p
        .query("SELECT l.input, a.stage FROM lineage l JOIN artifacts a ON a.key = l.artifact_key");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["input"], "src");
    assert_eq!(rows[0]["stage"], "a");
}

/// Starts `run` in the background and waits until `marker` exists.
fn start_and_wait_for(p: &Project, marker: &str, extra: &[&str]) -> std::process::Child {
    let mut args = vec!["run", "pipeline.yaml"];
    args.extend_from_slice(extra);
    let child = p
        .cmd(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn driver");
    let t = Instant::now();
    while !p.path(marker).exists() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{marker} never appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// `slow` counts to 40 in its scratch folder (its own checkpoint), ~50 ms a step.
const RESUMABLE: &str = r#"
stages:
  first:
    kind: command
    cmd: "echo first > first.txt"
    outs: [first.txt]
  slow:
    kind: command
    cmd: >-
      n=$(cat "$HAIC_SCRATCH/n" 2>/dev/null || echo 0);
      echo "start at $n" >> "$HAIC_PIPELINE_DIR/starts.log";
      while [ "$n" -lt 40 ]; do
        n=$((n+1)); echo $n > "$HAIC_SCRATCH/n.tmp"; mv "$HAIC_SCRATCH/n.tmp" "$HAIC_SCRATCH/n";
        [ "$n" -eq 5 ] && touch "$HAIC_PIPELINE_DIR/running.flag";
        sleep 0.05;
      done;
      cat first.txt > slow.txt; echo $n >> slow.txt
    deps: [first.txt]
    outs: [slow.txt]
"#;

#[test]
fn kill_9_of_the_driver_then_resume_finishes_the_same_run() {
    let p = Project::new(RESUMABLE);
    let mut driver = start_and_wait_for(&p, "running.flag", &[]);
    let worker = p.worker_pid("slow");
    driver.kill().expect("SIGKILL the driver");
    let _ = driver.wait();
    let t = Instant::now();
    while Path::new(&format!("/proc/{worker}")).exists() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the worker outlived the driver"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let rows = p.query("SELECT stage, status FROM stage_runs ORDER BY id");
    assert_eq!(
        rows.last().unwrap()["status"],
        "running",
        "left running by the dead driver"
    );
    let st = String::from_utf8_lossy(&p.haic(&["status", "pipeline.yaml"]).stdout).to_string();
    assert!(
        st.contains("slow   interrupted") && st.contains("--resume"),
        "{st}"
    );

    let out = p.run(&["--resume"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("marked interrupted: slow"),
        "{}",
        stderr(&out)
    );
    assert_eq!(p.read("slow.txt"), "first\n40\n");
    let runs = p.query("SELECT id, status FROM runs");
    assert_eq!(runs.len(), 1, "resume continues the same run id");
    assert_eq!(runs[0]["status"], "succeeded");
    let hist = p.query("SELECT stage, status, attempt FROM stage_runs ORDER BY id");
    let first_runs: Vec<_> = hist.iter().filter(|r| r["stage"] == "first").collect();
    assert_eq!(
        first_runs.len(),
        1,
        "the finished stage is not re-run: {hist:?}"
    );
    let slow: Vec<(String, i64)> = hist
        .iter()
        .filter(|r| r["stage"] == "slow")
        .map(|r| {
            (
                r["status"].as_str().unwrap().to_string(),
                r["attempt"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        slow,
        vec![("interrupted".into(), 1), ("succeeded".into(), 2)]
    );
    let starts = p.read("starts.log");
    let second_start: i64 = starts.lines().nth(1).unwrap()[9..].parse().unwrap();
    assert!(second_start >= 5, "continued from its checkpoint: {starts}");
}

#[test]
fn sigterm_or_ctrl_c_stops_cleanly_and_resume_completes() {
    for signal in ["TERM", "INT"] {
        let p = Project::new(RESUMABLE);
        let driver = start_and_wait_for(&p, "running.flag", &[]);
        send_signal(driver.id(), signal);
        let out = driver.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(130), "SIG{signal}");
        let hist = p.query("SELECT stage, status FROM stage_runs ORDER BY id");
        assert_eq!(hist.last().unwrap()["status"], "interrupted", "SIG{signal}");
        assert_eq!(
            p.query("SELECT status FROM runs")[0]["status"],
            "interrupted"
        );
        let out = p.run(&["--resume"]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(p.query("SELECT status FROM runs")[0]["status"], "succeeded");
    }
}

#[test]
fn a_second_run_on_the_same_workspace_is_refused_at_once() {
    let p = Project::new(RESUMABLE);
    let mut first = start_and_wait_for(&p, "running.flag", &[]);
    let t = Instant::now();
    let out = p.run(&[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(t.elapsed() < Duration::from_secs(5));
    let msg = stderr(&out);
    assert!(
        msg.contains(&format!("in use by haic-pipe pid {}", first.id())),
        "{msg}"
    );
    assert!(msg.contains("--wait"), "{msg}");
    first.kill().unwrap();
    let _ = first.wait();
}

#[test]
fn metrics_written_by_a_command_reach_the_registry() {
    let p = Project::new(
        r#"
stages:
  train:
    kind: command
    cmd: >-
      for i in 1 2 3 4 5; do echo "loss $i $(echo "scale=2; 1/$i" | bc 2>/dev/null || echo 0.$i)" >> "$HAIC_METRICS"; done;
      echo "val_bpd 5 3.25" >> "$HAIC_METRICS"; echo "nan_metric 1 nan" >> "$HAIC_METRICS";
      printf 'val_bpd 6 3.0' >> "$HAIC_METRICS"; touch done.txt
    params: {aux: msp}
    outs: [done.txt]
"#,
    );
    let out = p.run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let rows = p.query(
        "SELECT name, count(*) AS n, max(step) AS last FROM metrics GROUP BY name ORDER BY name",
    );
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(
        (rows[0]["name"].as_str(), rows[0]["n"].as_i64()),
        (Some("loss"), Some(5))
    );
    assert_eq!(
        (rows[1]["name"].as_str(), rows[1]["last"].as_i64()),
        (Some("val_bpd"), Some(6))
    );
    let best = p.query(
        "SELECT s.last_value, s.min_value FROM metric_summaries s JOIN params p
         ON p.stage_run_id = s.stage_run_id AND p.name = 'aux' AND p.value = 'msp' WHERE s.name = 'val_bpd'",
    );
    assert_eq!(best[0]["last_value"], 3.0);
    assert_eq!(best[0]["min_value"], 3.0);
    let log = p.query("SELECT log_path FROM stage_runs")[0]["log_path"]
        .as_str()
        .unwrap()
        .to_string();
    let log = std::fs::read_to_string(log).unwrap();
    assert!(
        log.contains("metric `nan_metric` at step 1 is NaN; not recorded"),
        "{log}"
    );
}

#[test]
fn a_malformed_metric_line_fails_the_stage_with_its_line_number() {
    let p = Project::new(
        "stages:\n  s:\n    kind: command\n    cmd: echo 'loss 1 0.5' >> $HAIC_METRICS; echo 'oops' >> $HAIC_METRICS\n",
    );
    let out = p.run(&[]);
    assert_eq!(out.status.code(), Some(1));
    let e = p.query("SELECT error FROM stage_runs");
    assert!(
        e[0]["error"]
            .as_str()
            .unwrap()
            .contains("line 2 of $HAIC_METRICS is `oops`"),
        "{e:?}"
    );
    assert_eq!(p.artifact_count(), 0);
}

#[test]
fn json_events_describe_the_run_for_scripts() {
    let p = Project::new(CHAIN);
    let out = p.run(&["--json", "--jobs", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("every stdout line is a JSON event"))
        .collect();
    assert_eq!(events.first().unwrap()["event"], "run_started");
    assert_eq!(events.first().unwrap()["stages"], 4);
    let last = events.last().unwrap();
    assert_eq!(last["event"], "run_finished");
    assert_eq!(last["status"], "succeeded");
    assert_eq!(last["counts"]["succeeded"], 4);
    let finished = events
        .iter()
        .filter(|e| e["event"] == "stage_finished")
        .count();
    assert_eq!(finished, 4);
}

#[test]
fn with_one_slot_the_longest_chain_goes_first() {
    // `d` is ready from the start; `b` only once `a` is done. Served by
    // arrival, `d` would run second and hold back the chain a -> b -> c;
    // `c` and `d` are chains of one, so `d`, there first, goes before `c`.
    let p = Project::new(CHAIN);
    let out = p.run(&["--jobs", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let rows = p.query("SELECT stage FROM stage_runs ORDER BY id");
    let order: Vec<&str> = rows.iter().filter_map(|r| r["stage"].as_str()).collect();
    assert_eq!(order, ["a", "b", "d", "c"]);
}

#[test]
fn a_killed_worker_fails_its_stage_and_resume_runs_it_again() {
    let p = Project::new(RESUMABLE);
    let mut driver = start_and_wait_for(&p, "running.flag", &[]);
    send_signal(p.worker_pid("slow"), "KILL");
    let status = driver.wait().unwrap();
    assert_eq!(status.code(), Some(1), "the run fails, the driver survives");
    let e = p.query("SELECT status, error FROM stage_runs WHERE stage = 'slow'");
    assert_eq!(e[0]["status"], "failed");
    assert!(
        e[0]["error"]
            .as_str()
            .unwrap()
            .contains("killed by signal 9"),
        "{e:?}"
    );
    let out = p.run(&["--resume"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(p.read("slow.txt"), "first\n40\n");
    assert_eq!(p.query("SELECT count(*) AS n FROM runs")[0]["n"], 1);
}

#[test]
fn an_out_is_never_written_through_a_symlink_that_leaves_the_pipeline_folder() {
    let outside = tempfile::tempdir().unwrap();
    let p = Project::new(
        "stages:\n  a:\n    kind: command\n    cmd: mkdir -p link && echo x > link/a.txt\n    outs: [link/a.txt]\n",
    );
    std::os::unix::fs::symlink(outside.path(), p.path("link")).unwrap();
    let out = p.run(&[]);
    assert_error(&out, 1, "out `link/a.txt` would be written to");
    assert!(stderr(&out).contains("through a symlink that leaves the pipeline folder"));
    assert_eq!(
        std::fs::read_dir(outside.path()).unwrap().count(),
        0,
        "nothing was written outside"
    );
    // Refused before the command ran: nothing stored, and `status` agrees
    // with `run` (it said `cached` while every run failed).
    assert_eq!(p.query("SELECT count(*) AS n FROM artifacts")[0]["n"], 0);
    let out = p.haic(&["status", "pipeline.yaml"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("failed") && text.contains("through a symlink that leaves"),
        "{text}"
    );
    assert_error(&p.run(&[]), 1, "out `link/a.txt` would be written to");
}

#[test]
fn an_artifact_the_registry_lost_is_recorded_when_a_run_finds_it() {
    // A driver killed after its worker published and before it recorded
    // the artifact leaves one the registry does not know (the chaos test
    // found this with the quick `bound` stage); the deletion stands in for
    // that moment, which no signal hits reliably.
    let p = Project::new(
        "stages:\n  a:\n    kind: command\n    cmd: echo data > a.txt\n    outs: [a.txt]\n  b:\n    kind: command\n    cmd: cat $HAIC_INPUT_SRC/a.txt > b.txt\n    inputs: {src: a}\n    outs: [b.txt]\n  d:\n    kind: command\n    cmd: echo d > d.txt\n    outs: [d.txt]\n",
    );
    assert!(p.run(&[]).status.success());
    let want = p.digests();
    let db = p.path(".haic/registry.db");
    let forget = "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute(\"DELETE FROM artifacts WHERE stage IN ('b', 'd')\"); c.commit()";
    common::run_python("python3", forget, &[&db]);
    assert_eq!(p.digests().len(), want.len() - 2);

    let out = p.run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(p.digests(), want, "every artifact is known again");
    let rows = p.query(
        "SELECT a.stage, r.run_id, r.status FROM artifacts a JOIN stage_runs r ON r.id = a.stage_run_id WHERE a.stage IN ('b', 'd') ORDER BY a.stage",
    );
    for r in &rows {
        assert_eq!(
            (&r["run_id"], &r["status"]),
            (&2.into(), &"cached".into()),
            "{rows:?}"
        );
    }
    let read = p.query(
        "SELECT l.input, a.stage FROM lineage l JOIN stage_runs r ON r.id = l.stage_run_id JOIN artifacts a ON a.key = l.artifact_key WHERE r.run_id = 2",
    );
    assert_eq!(read.len(), 1, "b's lineage is recorded with it: {read:?}");
    assert_eq!(
        (&read[0]["input"], &read[0]["stage"]),
        (&"src".into(), &"a".into())
    );
}

#[test]
fn a_worker_computes_with_as_many_threads_as_cpu_slots_it_holds() {
    let p = Project::new(
        "stages:\n  one:\n    kind: command\n    cmd: echo $RAYON_NUM_THREADS > one.txt\n    outs: [one.txt]\n  two:\n    kind: command\n    resources: {cpus: 2}\n    cmd: echo $RAYON_NUM_THREADS > two.txt\n    outs: [two.txt]\n",
    );
    let out = p
        .cmd(&["run", "pipeline.yaml", "--jobs", "4"])
        .env_remove("RAYON_NUM_THREADS")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(p.read("one.txt"), "1\n");
    assert_eq!(p.read("two.txt"), "2\n");
}

#[test]
fn gpu_slots_come_from_cuda_visible_devices_one_stage_per_device() {
    let stage = |name: &str, gpus: u32| {
        format!(
            "  {name}:\n    kind: command\n    cmd: \"date +%s.%N > {name}.start; echo $CUDA_VISIBLE_DEVICES $HAIC_DEVICE > {name}.txt; sleep 1; date +%s.%N > {name}.end\"\n    outs: [{name}.start, {name}.txt, {name}.end]\n    resources: {{gpus: {gpus}}}\n"
        )
    };
    let p = Project::new(&format!(
        "stages:\n{}{}{}",
        stage("a", 1),
        stage("b", 1),
        stage("c", 0)
    ));
    // Devices 3 and 5 of a larger machine: the slots keep their ids.
    let out = p
        .cmd(&["run", "pipeline.yaml", "--jobs", "3"])
        .env("CUDA_VISIBLE_DEVICES", "3,5")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let mut gpus = vec![p.read("a.txt"), p.read("b.txt")];
    gpus.sort();
    assert_eq!(gpus, ["3 cuda:3\n", "5 cuda:5\n"]);
    assert_eq!(
        p.read("c.txt"),
        "cpu\n",
        "no GPU for a stage that needs none"
    );
    assert_ran_at_once(&p, "a", "b");
    let mut devices: Vec<String> = p
        .query("SELECT device FROM stage_runs ORDER BY stage")
        .iter()
        .map(|r| r["device"].as_str().unwrap_or_default().to_string())
        .collect();
    devices.sort();
    assert_eq!(devices, ["cpu", "cuda:3", "cuda:5"]);

    // More GPUs than the machine has: a clear failure, not a hang.
    let p = Project::new(&format!("stages:\n{}", stage("big", 3)));
    let out = p
        .cmd(&["run", "pipeline.yaml"])
        .env("CUDA_VISIBLE_DEVICES", "0,1")
        .output()
        .unwrap();
    assert_error(&out, 1, "needs 3 GPU(s) but this driver has 2");
}

#[test]
fn a_command_that_changes_its_deps_fails_naming_the_file_and_publishes_nothing() {
    let p = Project::new(
        "stages:\n  w: {kind: command, cmd: \"echo x > words.txt; echo y > out.txt\", deps: [words.txt], outs: [out.txt]}\n  d: {kind: command, cmd: \"rm -rf ddir/*; echo z > o2.txt\", deps: [ddir], outs: [o2.txt]}\n  ok: {kind: command, cmd: \"cat words.txt > o3.txt\", deps: [words.txt], outs: [o3.txt]}\n",
    );
    p.write("words.txt", "hello\n");
    p.write("ddir/a", "a\n");
    let out = p.run(&["w", "d"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    for changed in [
        "words.txt`, which the stage reads as a dep",
        "ddir`, which the stage reads as a dep",
    ] {
        assert!(err.contains(changed), "{err}");
    }
    assert_eq!(
        p.query("SELECT count(*) AS n FROM artifacts")[0]["n"],
        0,
        "nothing published"
    );
    assert!(!p.path("out.txt").exists() && !p.path("o2.txt").exists());
    // A command that only reads its deps is not affected.
    p.write("words.txt", "hello\n");
    let out = p.run(&["ok"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(p.read("o3.txt"), "hello\n");
}
