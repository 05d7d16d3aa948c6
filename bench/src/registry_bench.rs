//! Registry benchmark: metric ingest through the driver's path (worker JSON
//! lines -> parse -> channel -> batched transactions), bytes per point, and
//! the "best 10 runs by val_bpd where aux = msp" question.
//!
//! Also the cost of opening the file when it changed since its last clean
//! close (the integrity check) against opening it as closed.
//!
//! `cargo run --release -p haic-bench --bin registry-bench -- RUNS POINTS_PER_RUN`
//! (defaults 2000 150). Compare with `bench/mlflow_registry.py`.

mod common;
use common::median;

use std::sync::Arc;
use std::time::Instant;

use pipeline::registry::{MetricPoint, NewStageRun, Registry, StageStatus, query_read_only};
use pipeline::stage::WorkerEvent;

const BEST10: &str = "SELECT s.stage_run_id, s.last_value FROM metric_summaries s
    JOIN params p ON p.stage_run_id = s.stage_run_id AND p.name = 'aux' AND p.value = 'msp'
    WHERE s.name = 'val_bpd' ORDER BY s.last_value LIMIT 10";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let [runs, per_run] = common::numbers_or([2000, 150]);
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("registry.db");
    let reg = Arc::new(Registry::open(&path).await?);
    let run = reg.begin_run("/bench/pipeline.yaml", "d", "").await?;

    let t = Instant::now();
    let mut ids = Vec::with_capacity(runs);
    for i in 0..runs {
        let params = serde_json::json!({
            "aux": if i % 2 == 0 { "msp" } else { "ff" },
            "codebook_size": 64 << (i % 4),
            "lr": 1e-4 * (1 + i % 7) as f64,
            "seed": i,
        });
        let row = NewStageRun::new(run, "vq1", "train_vq", StageStatus::Succeeded);
        ids.push(reg.start_stage_run(&row, &params).await?);
    }
    let t_runs = t.elapsed().as_secs_f64();

    // What workers print: one JSON line per point (val_bpd every third step).
    let mut lines = Vec::with_capacity(runs * per_run);
    for (r, id) in ids.iter().enumerate() {
        for step in 0..per_run {
            let (name, value) = if step % 3 == 2 {
                (
                    "val_bpd",
                    8.0 / (1.0 + step as f64) + (r % 97) as f64 * 1e-3,
                )
            } else {
                ("train_loss", 1.0 / (1.0 + step as f64))
            };
            let line = serde_json::to_string(&WorkerEvent::Metric {
                name: name.into(),
                step: step as i64,
                value,
            })?;
            lines.push((*id, line));
        }
    }
    let points = lines.len();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let t = Instant::now();
    let writer = tokio::spawn(reg.clone().write_metrics(rx));
    for (id, line) in &lines {
        if let Ok(WorkerEvent::Metric { name, step, value }) = serde_json::from_str(line) {
            let _ = tx.send(MetricPoint {
                stage_run_id: *id,
                name,
                step,
                value,
                at: Some(pipeline::registry::unix_now()),
            });
        }
    }
    drop(tx);
    writer.await?;
    let t_ingest = t.elapsed().as_secs_f64();

    reg.checkpoint_wal().await?;
    let bytes = std::fs::metadata(&path)?.len();

    let mut times = Vec::new();
    let mut best = None;
    for _ in 0..21 {
        let t = Instant::now();
        let r = query_read_only(&path, BEST10, &Default::default())
            .await?
            .result;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        best = Some(r);
    }
    let best = best.ok_or("no query result")?;
    assert_eq!(best.rows.len(), 10.min(runs / 2));

    // Opening: a file as the last clean close left it is not checked; one
    // changed since (a crash, a copy) gets SQLite's quick_check first.
    drop(reg);
    let stamp = pipeline::registry::clean_stamp_file(&path);
    let mut clean = Vec::new();
    let mut checked = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        Registry::open(&path).await?.close().await?;
        clean.push(t.elapsed().as_secs_f64() * 1000.0);
        std::fs::remove_file(&stamp)?;
        let t = Instant::now();
        Registry::open(&path).await?.close().await?;
        checked.push(t.elapsed().as_secs_f64() * 1000.0);
    }

    println!("registry: {runs} runs x {per_run} points = {points} points");
    println!(
        "  stage runs + params: {:.2} s ({:.0} runs/s)",
        t_runs,
        runs as f64 / t_runs
    );
    println!(
        "  metric ingest (parse + batch insert + summaries): {:.2} s = {:.0} points/s",
        t_ingest,
        points as f64 / t_ingest
    );
    println!(
        "  file size {:.1} MB = {:.1} bytes/point (whole file incl. params, summaries, indexes)",
        bytes as f64 / 1e6,
        bytes as f64 / points as f64
    );
    println!(
        "  best-10-by-val_bpd where aux = msp: median {:.2} ms over 21 (open read-only + query), min {:.2} ms",
        median(times.clone()),
        times.iter().cloned().fold(f64::INFINITY, f64::min)
    );
    println!(
        "  open + close: median {:.1} ms as cleanly closed, {:.1} ms when changed since (quick_check), over 5 each",
        median(clean),
        median(checked)
    );
    Ok(())
}
