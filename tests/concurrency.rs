//! Using one workspace from several processes at once: registry queries
//! while a run writes (WAL readers: never blocked, never a half-written
//! state), and `gc` or a second `run` while a run holds the workspace.

mod common;

use std::time::{Duration, Instant};

use common::{Project, stderr};

/// Ten stages in a chain, 0.3 s each: a run that writes the registry for
/// about three seconds.
fn chain() -> String {
    let mut text = String::from("stages:\n");
    for i in 0..10 {
        text.push_str(&format!("  s{i}:\n    kind: command\n"));
        if i == 0 {
            text.push_str("    cmd: \"sleep 0.3; echo 0 > s0.txt\"\n");
        } else {
            text.push_str(&format!(
                "    cmd: \"sleep 0.3; cat s{}.txt > s{i}.txt; echo {i} >> s{i}.txt\"\n    deps: [s{}.txt]\n",
                i - 1,
                i - 1
            ));
        }
        text.push_str(&format!("    outs: [s{i}.txt]\n"));
    }
    text
}

#[test]
fn queries_while_a_run_writes_never_block_and_see_whole_rows() {
    let p = Project::new(&chain());
    let mut driver = p.spawn(&["run", "pipeline.yaml"], false);
    let mut last_done = 0;
    let mut answered = 0;
    let t = Instant::now();
    while driver.try_wait().expect("driver").is_none() {
        assert!(t.elapsed() < Duration::from_secs(60), "the run never ended");
        let asked = Instant::now();
        let Ok(rows) = p.try_query(
            "SELECT r.status AS run, s.stage, s.status, s.key FROM stage_runs s JOIN runs r ON r.id = s.run_id",
        ) else {
            continue; // the driver has not made the registry yet
        };
        answered += 1;
        assert!(
            asked.elapsed() < Duration::from_secs(2),
            "a query waited {:?} on the writer",
            asked.elapsed()
        );
        let done = rows.iter().filter(|r| r["status"] == "succeeded").count();
        assert!(
            done >= last_done,
            "succeeded stages went from {last_done} to {done}"
        );
        last_done = done;
        for r in &rows {
            // A run is seen finished only with all its stages finished.
            assert!(
                r["run"] == "running" || (r["run"] == "succeeded" && done == 10),
                "{r} with {done} stages done"
            );
            // A row is never seen half-made: a started stage has its key.
            assert!(r["key"].is_string(), "{r}");
        }
    }
    assert!(answered >= 3, "only {answered} queries ran during the run");
    assert_eq!(
        p.query("SELECT count(*) AS n FROM stage_runs WHERE status = 'succeeded'")[0]["n"],
        10
    );
}

#[test]
fn gc_or_a_second_run_during_a_run_is_refused_and_deletes_nothing() {
    let p = Project::new(&chain());
    let out = p.run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let before = p.artifact_count();
    assert_eq!(before, 10);
    // A changed first stage: the whole chain runs again, about 3 s.
    std::fs::write(
        p.pipeline(),
        chain().replace("echo 0 > s0.txt", "echo zero > s0.txt"),
    )
    .unwrap();
    let mut driver = p.spawn(&["run", "pipeline.yaml"], false);
    let t = Instant::now();
    while p.artifact_count() == before {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the run made nothing"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // gc judges by the registry the run is still writing: it must not run.
    let gc = p.haic(&["gc", "pipeline.yaml", "--keep-runs", "1"]);
    assert_eq!(gc.status.code(), Some(2), "{}", stderr(&gc));
    let msg = stderr(&gc);
    assert!(
        msg.contains(&format!("in use by haic-pipe pid {}", driver.id())),
        "{msg}"
    );
    let second = p.run(&[]);
    assert_eq!(second.status.code(), Some(2), "{}", stderr(&second));
    assert!(driver.wait().expect("driver").success());
    assert_eq!(p.artifact_count(), 20, "nothing was deleted");
    assert_eq!(p.read("s9.txt").lines().next(), Some("zero"));
}
