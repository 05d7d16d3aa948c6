//! `kill -9` chaos over the smoke pipeline. An uninterrupted run gives every
//! artifact's digest; then episodes, each in a fresh workspace, SIGKILL the
//! driver or a running worker, each kill followed by `run --resume`, until
//! the run succeeds. A kill lands at a random time, or (while some stage
//! kind has not been hit yet) a few milliseconds after the driver reports
//! that a stage of such a kind started: the quick kinds (encode, bound,
//! human_eval_export take 0.02-0.4 s) are otherwise never hit. Every episode
//! must end with the uninterrupted digests, a registry that passes
//! `PRAGMA integrity_check`, no stage run left `running`, and a run history
//! that records every cut: one `interrupted` attempt per stage a driver kill
//! left running, a `failed` one per killed worker.
//!
//! Settings (environment): `HAIC_CHAOS_KILLS` (default 6, CI's fast
//! setting; the long setting is 20 or more, and must hit every stage kind),
//! `HAIC_CHAOS_SEED` (default: from the clock; printed, so a failing episode
//! can be replayed).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use common::{Project, send_signal, smoke, stderr};

/// splitmix64: a seeded stream, so an episode replays from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// `(stage, worker pid)` of the stages the registry has `running` now; the
/// pid is `None` until the driver has started the worker.
fn running_stages(p: &Project) -> Vec<(String, Option<u32>)> {
    p.try_query("SELECT stage, worker FROM stage_runs WHERE status = 'running'")
        .unwrap_or_default()
        .into_iter()
        .filter_map(|r| {
            let pid = r["worker"]
                .as_str()
                .and_then(|w| w.strip_prefix("local:"))
                .and_then(|w| w.parse().ok());
            Some((r["stage"].as_str()?.to_string(), pid))
        })
        .collect()
}

/// The registry's own check, by an independent reader (Python's sqlite3).
fn integrity_check(p: &Project) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg("import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('PRAGMA integrity_check').fetchone()[0])")
        .arg(p.path(".haic/registry.db"))
        .output()
        .expect("python3");
    assert!(out.status.success(), "{}", stderr(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

struct Kill {
    victim: &'static str,
    /// The stages the kill cut: those left `running` by a dead driver, or
    /// the killed worker's.
    stages: Vec<String>,
}

/// Starts a driver with `--json` and a thread that forwards the names of
/// the stages it reports started.
fn spawn_driver(p: &Project, resume: bool) -> (Child, Receiver<String>) {
    let mut args = vec!["run", "pipeline.yaml", "--json"];
    if resume {
        args.push("--resume");
    }
    let mut driver = p
        .cmd(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting haic-pipe");
    let (tx, rx) = channel();
    let stdout = driver.stdout.take().expect("piped stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if event["event"] == "stage_started"
                && let Some(stage) = event["stage"].as_str()
                && tx.send(stage.to_string()).is_err()
            {
                return;
            }
        }
    });
    (driver, rx)
}

/// Waits until it is time to kill: after `delay`, or `delay` after a stage
/// whose kind is in `aim` started (none: time only). `Err` with the
/// driver's exit status when it ended first.
fn wait_for_moment(
    driver: &mut Child,
    started: &Receiver<String>,
    kind_of: &BTreeMap<String, String>,
    aim: Option<&BTreeSet<String>>,
    delay: Duration,
) -> Result<(), std::process::ExitStatus> {
    let mut from = aim.is_none().then(Instant::now);
    loop {
        if let Some(status) = driver.try_wait().expect("driver") {
            return Err(status);
        }
        match from {
            Some(t) if t.elapsed() >= delay => return Ok(()),
            Some(_) => std::thread::sleep(Duration::from_millis(1)),
            None => match started.recv_timeout(Duration::from_millis(5)) {
                Ok(stage) if aim.is_some_and(|a| a.contains(&kind_of[&stage])) => {
                    from = Some(Instant::now())
                }
                Ok(_) | Err(RecvTimeoutError::Timeout) => {}
                // The driver closed its stdout: it is ending.
                Err(RecvTimeoutError::Disconnected) => std::thread::sleep(Duration::from_millis(5)),
            },
        }
    }
}

/// One episode: kills until `want_kills` are done, then resumes to the end.
fn episode(
    rng: &mut Rng,
    want_kills: usize,
    want: &BTreeMap<String, String>,
    kind_of: &BTreeMap<String, String>,
    hit: &mut BTreeSet<String>,
) -> Vec<Kill> {
    let all_kinds: BTreeSet<String> = kind_of.values().cloned().collect();
    let p = smoke("");
    let mut kills: Vec<Kill> = Vec::new();
    let mut drivers = 0;
    loop {
        drivers += 1;
        assert!(drivers < 200, "the run never finished");
        let (mut driver, started) = spawn_driver(&p, drivers > 1);
        if kills.len() >= want_kills {
            let status = driver.wait().expect("driver");
            assert!(status.success(), "the last resume failed: {status}");
            break;
        }
        let not_hit: BTreeSet<String> = all_kinds.difference(hit).cloned().collect();
        let aimed = !not_hit.is_empty() && rng.below(4) != 0;
        // Later kills wait longer, so that long stages finish eventually.
        let delay = if aimed {
            Duration::from_millis(rng.below(30))
        } else {
            Duration::from_millis(50 + rng.below(200 + 150 * kills.len() as u64))
        };
        let aim = aimed.then_some(&not_hit);
        if let Err(status) = wait_for_moment(&mut driver, &started, kind_of, aim, delay) {
            if status.success() {
                break; // finished before this kill: the episode ends
            }
            continue; // a stage failed (a killed worker's): resume
        }
        let workers: Vec<(String, u32)> = if rng.below(2) == 0 {
            Vec::new() // the driver, without looking
        } else {
            running_stages(&p)
                .into_iter()
                .filter_map(|(s, pid)| Some((s, pid?)))
                .collect()
        };
        let kill = if workers.is_empty() {
            send_signal(driver.id(), "KILL");
            let _ = driver.wait();
            // The driver is dead: what it left `running` is what was cut.
            let stages = running_stages(&p).into_iter().map(|s| s.0).collect();
            Some(Kill {
                victim: "driver",
                stages,
            })
        } else {
            let (stage, pid) = &workers[rng.below(workers.len() as u64) as usize];
            // The worker may have ended in between; then nothing is killed.
            let killed = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            let _ = driver.wait();
            killed.then(|| Kill {
                victim: "worker",
                stages: vec![stage.clone()],
            })
        };
        if let Some(kill) = kill {
            hit.extend(kill.stages.iter().map(|s| kind_of[s].clone()));
            kills.push(kill);
        }
    }

    assert_eq!(&p.digests(), want, "the same artifacts as without kills");
    assert_eq!(integrity_check(&p), "ok");
    let left = p.query("SELECT stage FROM stage_runs WHERE status IN ('running', 'pending')");
    assert!(left.is_empty(), "left running: {left:?}");
    // One run, resumed; a kill after the driver recorded the run finished
    // makes the next `--resume` a new run, which finds everything cached.
    let runs = p.query("SELECT id, status FROM runs ORDER BY id");
    assert!(runs.iter().all(|r| r["status"] == "succeeded"), "{runs:?}");
    let later =
        p.query("SELECT stage, status FROM stage_runs WHERE run_id > 1 AND status != 'cached'");
    assert!(
        later.is_empty(),
        "later runs only found the first one's artifacts: {later:?}"
    );
    // The history records every cut.
    let count = |rows: Vec<serde_json::Value>| -> BTreeMap<String, i64> {
        rows.iter()
            .map(|r| {
                let stage = r["stage"].as_str().unwrap_or_default().to_string();
                (stage, r["n"].as_i64().unwrap_or(0))
            })
            .collect()
    };
    let recorded = |status: &str| {
        count(p.query(&format!(
            "SELECT stage, count(*) AS n FROM stage_runs WHERE status = '{status}' GROUP BY stage"
        )))
    };
    let cut = |victim: &str| {
        let mut m = BTreeMap::new();
        for k in kills.iter().filter(|k| k.victim == victim) {
            for s in &k.stages {
                *m.entry(s.clone()).or_insert(0) += 1;
            }
        }
        m
    };
    assert_eq!(
        recorded("interrupted"),
        cut("driver"),
        "one interrupted attempt per stage a driver kill left running"
    );
    assert_eq!(
        recorded("failed"),
        cut("worker"),
        "one failed attempt per killed worker"
    );
    kills
}

#[test]
fn kill_9_chaos_ends_with_the_uninterrupted_digests() {
    let want_kills: usize = std::env::var("HAIC_CHAOS_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let seed: u64 = std::env::var("HAIC_CHAOS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("chaos: HAIC_CHAOS_SEED={seed} HAIC_CHAOS_KILLS={want_kills}");
    let t = Instant::now();

    let whole = smoke("");
    let out = whole.run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let want = whole.digests();
    assert_eq!(want.len(), 14);
    let kind_of: BTreeMap<String, String> = whole
        .query("SELECT stage, kind FROM stage_runs")
        .iter()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap_or_default().to_string();
            (s("stage"), s("kind"))
        })
        .collect();

    let mut rng = Rng(seed);
    let mut all = Vec::new();
    let mut hit = BTreeSet::new();
    let mut episodes = 0;
    while all.len() < want_kills {
        episodes += 1;
        assert!(episodes <= 20, "episodes kept finishing before their kills");
        all.extend(episode(
            &mut rng,
            want_kills - all.len(),
            &want,
            &kind_of,
            &mut hit,
        ));
    }
    let drivers = all.iter().filter(|k| k.victim == "driver").count();
    let mut per_kind: BTreeMap<&str, usize> = BTreeMap::new();
    for k in &all {
        let kinds: BTreeSet<&str> = k.stages.iter().map(|s| kind_of[s].as_str()).collect();
        for kind in kinds {
            *per_kind.entry(kind).or_default() += 1;
        }
    }
    eprintln!(
        "chaos: seed {seed}: {} kills ({drivers} of the driver, {} of a worker) in {episodes} episode(s), {:.0} s; kills per stage kind {per_kind:?}",
        all.len(),
        all.len() - drivers,
        t.elapsed().as_secs_f64()
    );
    if want_kills >= 20 {
        let all_kinds: BTreeSet<&String> = kind_of.values().collect();
        assert_eq!(
            hit.iter().collect::<BTreeSet<_>>(),
            all_kinds,
            "the long setting cuts a stage of every kind"
        );
    }
}
