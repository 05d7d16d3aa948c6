//! `kill -9` chaos over the smoke pipeline. An uninterrupted run gives every
//! artifact's digest; then episodes, each in a fresh workspace, SIGKILL the
//! driver or a running worker at random times, each kill followed by
//! `run --resume`, until the run succeeds. Every episode must end with the
//! uninterrupted digests, a registry that passes `PRAGMA integrity_check`,
//! no stage run left `running`, and a run history that shows the kills.
//!
//! Settings (environment): `HAIC_CHAOS_KILLS` (default 6, CI's fast
//! setting; the long setting is 20 or more), `HAIC_CHAOS_SEED` (default: from
//! the clock; printed, so a failing episode can be replayed).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
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

/// `(stage, kind, pid)` of the local workers running now.
fn running_workers(p: &Project) -> Vec<(String, String, u32)> {
    p.try_query("SELECT stage, kind, worker FROM stage_runs WHERE status = 'running'")
        .unwrap_or_default()
        .into_iter()
        .filter_map(|r| {
            let pid = r["worker"].as_str()?.strip_prefix("local:")?.parse().ok()?;
            Some((
                r["stage"].as_str()?.to_string(),
                r["kind"].as_str()?.to_string(),
                pid,
            ))
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
    /// The kinds of the stages running at the kill.
    kinds: Vec<String>,
}

/// One episode: kills until `want_kills` are done, then resumes to the end.
fn episode(rng: &mut Rng, want_kills: usize, want: &BTreeMap<String, String>) -> Vec<Kill> {
    let p = smoke("");
    let mut kills: Vec<Kill> = Vec::new();
    let mut drivers = 0;
    loop {
        drivers += 1;
        assert!(drivers < 200, "the run never finished");
        let mut args = vec!["run", "pipeline.yaml"];
        if drivers > 1 {
            args.push("--resume");
        }
        let mut driver = p.spawn(&args, false);
        if kills.len() >= want_kills {
            let status = driver.wait().expect("driver");
            assert!(status.success(), "the last resume failed: {status}");
            break;
        }
        // Later kills wait longer, so that long stages finish eventually.
        let delay = Duration::from_millis(50 + rng.below(200 + 150 * kills.len() as u64));
        let t = Instant::now();
        let mut ended = None;
        while t.elapsed() < delay {
            if let Some(s) = driver.try_wait().expect("driver") {
                ended = Some(s);
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Some(status) = ended {
            if status.success() {
                break; // finished before this kill: the episode ends
            }
            continue; // a stage failed (a killed worker's): resume
        }
        let workers = running_workers(&p);
        let kinds: Vec<String> = workers.iter().map(|w| w.1.clone()).collect();
        if workers.is_empty() || rng.below(2) == 0 {
            send_signal(driver.id(), "KILL");
            let _ = driver.wait();
            kills.push(Kill {
                victim: "driver",
                kinds,
            });
        } else {
            let (_, kind, pid) = &workers[rng.below(workers.len() as u64) as usize];
            // The worker may have ended in between; then nothing is killed.
            let killed = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            let _ = driver.wait();
            if killed {
                kills.push(Kill {
                    victim: "worker",
                    kinds: vec![kind.clone()],
                });
            }
        }
    }

    assert_eq!(&p.digests(), want, "the same artifacts as without kills");
    assert_eq!(integrity_check(&p), "ok");
    let left = p.query("SELECT stage FROM stage_runs WHERE status IN ('running', 'pending')");
    assert!(left.is_empty(), "left running: {left:?}");
    let runs = p.query("SELECT id, status FROM runs");
    assert_eq!(runs.len(), 1, "one run, resumed: {runs:?}");
    assert_eq!(runs[0]["status"], "succeeded");
    // A kill while stages ran shows in the history (one between stages
    // leaves nothing to show).
    if kills.iter().any(|k| !k.kinds.is_empty()) {
        let cut = p.query(
            "SELECT count(*) AS n FROM stage_runs WHERE status IN ('interrupted', 'failed')",
        );
        assert!(cut[0]["n"].as_i64().unwrap_or(0) > 0, "{cut:?}");
    }
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

    let whole = smoke("");
    let out = whole.run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let want = whole.digests();
    assert_eq!(want.len(), 14);

    let mut rng = Rng(seed);
    let mut all = Vec::new();
    let mut episodes = 0;
    while all.len() < want_kills {
        episodes += 1;
        assert!(episodes <= 20, "episodes kept finishing before their kills");
        all.extend(episode(&mut rng, want_kills - all.len(), &want));
    }
    let drivers = all.iter().filter(|k| k.victim == "driver").count();
    let kinds: BTreeSet<&str> = all
        .iter()
        .flat_map(|k| k.kinds.iter().map(String::as_str))
        .collect();
    eprintln!(
        "chaos: seed {seed}: {} kills ({drivers} of the driver, {} of a worker) in {episodes} episode(s), over stage kinds {kinds:?}",
        all.len(),
        all.len() - drivers
    );
}
