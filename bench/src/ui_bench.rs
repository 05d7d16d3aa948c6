//! Dashboard benchmark: a registry of RUNS runs with POINTS_PER_RUN metric
//! points each (defaults 100,000 x 100 = 10,000,000, the registry
//! benchmark's size) and one stage with a 1,000,000-point series; then
//! `haic-pipe ui` on it, timed from outside over HTTP as a browser asks:
//! the runs page, the runs page filtered by a param, a run's page, ten
//! runs compared, ten runs' curves, the million-point curve; and the
//! server's peak memory (VmHWM) after all of them.
//!
//! `bash bench/ui.sh [RUNS POINTS_PER_RUN]` builds the release binaries
//! and runs this with `target/release/haic-pipe`.

mod common;
use common::median;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Instant;

use pipeline::registry::{MetricPoint, NewStageRun, Registry, RunLabel, StageStatus};

fn get(addr: &str, target: &str) -> Result<(u16, usize), Box<dyn std::error::Error>> {
    let mut s = TcpStream::connect(addr)?;
    write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let head = String::from_utf8_lossy(&raw[..raw.len().min(64)]).to_string();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or("no status")?;
    Ok((status, raw.len()))
}

fn peak_rss_mb(pid: u32) -> f64 {
    common::peak_resident_kib(&pid.to_string()).map_or(f64::NAN, |kib| kib as f64 / 1024.0)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let [runs, per_run] = common::numbers_or([100_000, 100]);
    let binary = std::env::var("HAIC_BIN").unwrap_or_else(|_| "target/release/haic-pipe".into());
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("registry.db");
    let reg = Registry::open(&path).await?;

    let t = Instant::now();
    let mut stage_runs = Vec::with_capacity(runs);
    for i in 0..runs {
        let run = reg.begin_run("/bench/pipeline.yaml", "d", "").await?;
        if i % 10 == 0 {
            let label = RunLabel {
                name: Some(format!("r{i}")),
                tags: vec![format!("group{}", i % 7)],
                note: None,
                overrides: vec![format!("vars.seed={i}")],
            };
            reg.label_run(run, &label).await?;
        }
        let params = serde_json::json!({
            "aux": if i % 2 == 0 { "msp" } else { "ff" },
            "codebook_size": 64 << (i % 4),
            "seed": i,
            "steps": per_run,
        });
        let row = NewStageRun::new(run, "vq1", "train_vq", StageStatus::Succeeded);
        stage_runs.push((run, reg.start_stage_run(&row, &params).await?));
    }
    let t_runs = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let mut batch = Vec::with_capacity(200_000);
    for (r, (_, id)) in stage_runs.iter().enumerate() {
        for step in 0..per_run {
            let (name, value) = match step % 3 {
                2 => (
                    "val_bpd",
                    8.0 / (1.0 + step as f64) + (r % 97) as f64 * 1e-3,
                ),
                _ => ("train_loss", 1.0 / (1.0 + step as f64)),
            };
            batch.push(MetricPoint {
                stage_run_id: *id,
                name: name.into(),
                step: step as i64,
                value,
                at: Some(1.7e9 + step as f64),
            });
        }
        if batch.len() >= 100_000 {
            reg.insert_metrics(&batch).await?;
            batch.clear();
        }
    }
    // The long series: one stage of the newest run with a million points.
    let (newest, _) = *stage_runs.last().ok_or("no runs")?;
    let long = reg
        .start_stage_run(
            &NewStageRun::new(newest, "long", "train_ar", StageStatus::Succeeded),
            &serde_json::json!({"steps": 1_000_000}),
        )
        .await?;
    for step in 0..1_000_000i64 {
        batch.push(MetricPoint {
            stage_run_id: long,
            name: "train.loss".into(),
            step,
            value: 1.0 / (1.0 + step as f64).sqrt() + if step == 777_777 { 5.0 } else { 0.0 },
            at: Some(1.7e9 + step as f64 * 0.01),
        });
        if batch.len() >= 100_000 {
            reg.insert_metrics(&batch).await?;
            batch.clear();
        }
    }
    reg.insert_metrics(&batch).await?;
    let t_points = t.elapsed().as_secs_f64();
    reg.checkpoint_wal().await?;
    reg.close().await?;
    let bytes = std::fs::metadata(&path)?.len();
    let points = runs * per_run + 1_000_000;

    let mut child = std::process::Command::new(&binary)
        .args(["ui", "--workspace"])
        .arg(dir.path())
        .args(["--port", "0"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {binary}: {e} (HAIC_BIN names another)"))?;
    let mut first = String::new();
    BufReader::new(child.stdout.take().ok_or("no stdout")?).read_line(&mut first)?;
    let addr = first
        .trim()
        .strip_prefix("dashboard: http://")
        .ok_or_else(|| format!("unexpected first line {first:?}"))?
        .trim_end_matches('/')
        .to_string();

    let ten: Vec<String> = stage_runs
        .iter()
        .rev()
        .step_by(997)
        .take(10)
        .map(|(r, _)| r.to_string())
        .collect();
    let ten = ten.join(",");
    let requests = [
        ("runs page (newest 50)", "/".to_string()),
        ("runs page, JSON", "/api/runs?limit=50".to_string()),
        ("runs page, tag filter", "/?tag=group3".to_string()),
        (
            "runs page, param filter (aux = msp)",
            "/?param=vq1.aux%3Dmsp".to_string(),
        ),
        ("runs page, 1000 rows", "/api/runs?limit=1000".to_string()),
        ("a run's page", format!("/runs/{newest}")),
        ("10 runs compared", format!("/compare?runs={ten}")),
        (
            "10 runs' curves (val_bpd)",
            format!("/api/series?runs={ten}&metric=vq1:val_bpd"),
        ),
        (
            "1,000,000-point curve -> 2000 (LTTB)",
            format!("/api/series?runs={newest}&metric=long:train.loss"),
        ),
        ("version poll", "/api/version".to_string()),
    ];
    println!(
        "ui: registry of {runs} runs, {points} metric points, {:.0} MB (built in {:.0} s + {:.0} s)",
        bytes as f64 / 1e6,
        t_runs,
        t_points
    );
    println!("  median (min) over 11 requests each, sent one at a time over loopback:");
    for (what, target) in &requests {
        let mut times = Vec::new();
        let mut size = 0;
        for _ in 0..11 {
            let t = Instant::now();
            let (status, n) = get(&addr, target)?;
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            if status != 200 {
                return Err(format!("{target}: status {status}").into());
            }
            size = n;
        }
        println!(
            "  {what:<40} {:>8.1} ms ({:.1})  {:>8} bytes",
            median(times.clone()),
            times.iter().cloned().fold(f64::INFINITY, f64::min),
            size
        );
    }
    println!(
        "  server peak memory (VmHWM): {:.0} MB",
        peak_rss_mb(child.id())
    );
    let _ = child.kill();
    let _ = child.wait();
    Ok(())
}
