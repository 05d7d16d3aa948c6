//! Gated PixelCNN training throughput and `encode` throughput on the CPU.
//!
//! `cargo run --release -p haic-bench --bin ar-bench [-- STEPS [ONLY]]`
//! (ONLY: run the lines whose name contains it)
//!
//! Training: full steps (batch tensors, forward, backward, AdamW) at batch
//! 64 on 32x32x1 pixels, after 2 warm-up steps; the values are random,
//! which changes no cost. Each configuration alternates, step by step, what
//! runs (masked convolutions that skip the taps their mask zeroes, the
//! one-pass gate kernel) and the "before" (every tap multiplied, candle's
//! tanh x sigmoid), and prints both medians.
//!
//! Sampling: 10 images of 32x32x1 from tiny.yaml's decoder1 and baseline
//! architectures, the cached sampler (median of 3) against the naive one
//! (the whole network re-run for every value; once, as it takes minutes),
//! in one run; both must draw the same images.
//!
//! Encode: the `encode` stage, run as the pipeline runs it, over a 12,000-row
//! image table (two splits) with the tiny pipeline's level-1 architecture:
//! images/s, the Parquet write included.

mod common;
use common::{ar_info, median, tiny_level1, tiny_pixelcnn};

use std::sync::atomic::Ordering;
use std::time::Instant;

use candle_core::Device;
use pipeline::stage::{Job, StageContext, StageKind};
use stages::data::Sample;
use stages::data::level_table::Rows;
use stages::data::table::{ShardWriter, TABLE_FORMAT, TableIndex, TableMeta};
use stages::models::ar::{ArInfo, ArModel, Sampling};
use stages::models::aux_decoder::AuxKind;
use stages::models::conv::FORWARD_FLOPS;
use stages::models::optim::{AdamW, OptimConfig};
use stages::models::pixelcnn::PixelCnnConfig;
use stages::models::reference::{self, Kernels};
use stages::models::vq_level::VqLevel;
use stages::rng::SplitMix64;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCH: usize = 64;

fn train(name: &str, info: ArInfo, steps: usize) -> Result<(), Box<dyn std::error::Error>> {
    if !selected(name) {
        return Ok(());
    }
    let model = ArModel::new(info, &Device::Cpu)?;
    let mut opt = AdamW::new(model.trainable(), OptimConfig::default())?;
    let mut rng = SplitMix64(1);
    let (mut skip, mut all) = (Vec::new(), Vec::new());
    let mut flops = [0u64; 2];
    for i in 0..2 * (steps + 2) {
        let compute_all = i % 2 == 1;
        // The "before": every tap of the masked layers, candle's gate.
        let kernels = Kernels {
            all_masked_taps: compute_all,
            composed_gate: compute_all,
            ..Kernels::default()
        };
        let rows = Rows {
            ids: (0..BATCH as i64).collect(),
            labels: (0..BATCH).map(|_| rng.below(10) as i32).collect(),
            values: (0..BATCH * 1024).map(|_| rng.below(256) as u16).collect(),
        };
        let codes = Rows {
            ids: rows.ids.clone(),
            labels: rows.labels.clone(),
            values: (0..BATCH * 64).map(|_| rng.below(128) as u16).collect(),
        };
        let before = FORWARD_FLOPS.load(Ordering::Relaxed);
        let t = Instant::now();
        let batch = model.batch(&rows, Some(&codes))?;
        let loss = reference::with(kernels, || model.loss(&batch))?;
        let after = FORWARD_FLOPS.load(Ordering::Relaxed);
        let grads = loss.backward()?;
        opt.step(&grads, 1e-3)?;
        let dt = t.elapsed().as_secs_f64();
        flops[compute_all as usize] = 3 * (after - before);
        if i >= 4 {
            if compute_all { &mut all } else { &mut skip }.push(dt);
        }
    }
    let (s, a) = (median(skip), median(all));
    println!(
        "{name:<34} {:>7.1} ms/step {:>5.2} steps/s {:>6.1} images/s {:>6.2} GFLOP/step | before (every tap, candle's gate): {:>7.1} ms/step {:>6.2} GFLOP/step | {:.2}x  ({} parameters)",
        s * 1e3,
        1.0 / s,
        BATCH as f64 / s,
        flops[0] as f64 / 1e9,
        a * 1e3,
        flops[1] as f64 / 1e9,
        a / s,
        model.vars.parameter_count()
    );
    Ok(())
}

/// Sampling `n` images from a freshly initialised model (the cost does not
/// depend on the weights), naive (the whole network per value, once)
/// against cached (incremental) and on-device drawing (cached, values drawn
/// where the logits are, one transfer per row), medians of `runs`; checks
/// that naive and cached draw the same images. `HAIC_BENCH_DEVICE`
/// (`cpu`, `cuda:0`) picks the device.
fn sample(
    name: &str,
    info: ArInfo,
    n: usize,
    runs: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    if !selected(name) {
        return Ok(());
    }
    let device = stages::device::device(
        &std::env::var("HAIC_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into()),
    )?;
    let model = ArModel::new(info, &device)?;
    let mut rng = SplitMix64(5);
    let rows = Rows {
        ids: (0..n as i64).collect(),
        labels: (0..n).map(|_| rng.below(10) as i32).collect(),
        values: vec![0; n * model.info.values_per_row()],
    };
    let codes = Rows {
        ids: rows.ids.clone(),
        labels: rows.labels.clone(),
        values: (0..n * 64).map(|_| rng.below(128) as u16).collect(),
    };
    let batch = model.batch(&rows, Some(&codes))?;
    let (mut naive, mut cached, mut on_device) = (Vec::new(), Vec::new(), Vec::new());
    let mut identical = true;
    for run in 0..runs {
        let mut drawn = Vec::new();
        // The naive sampler takes minutes: once, beside the first cached run.
        let methods = match run {
            0 => &[Sampling::Naive, Sampling::Cached, Sampling::OnDevice][..],
            _ => &[Sampling::Cached, Sampling::OnDevice],
        };
        for &how in methods {
            let times = match how {
                Sampling::Naive => &mut naive,
                Sampling::Cached => &mut cached,
                Sampling::OnDevice => &mut on_device,
            };
            let t = Instant::now();
            let values = model.sample(
                batch.labels.as_ref(),
                batch.code_map.as_ref(),
                n,
                1.0,
                &mut SplitMix64(9),
                how,
            )?;
            times.push(t.elapsed().as_secs_f64());
            if how != Sampling::OnDevice {
                drawn.push(values);
            }
        }
        identical &= drawn.len() < 2 || drawn[0] == drawn[1];
    }
    let (a, c, d) = (median(naive), median(cached), median(on_device));
    println!(
        "{name:<34} {n} images: cached {:>7.2} s ({:>6.1} images/s) | on-device drawing {:>7.2} s ({:.2}x cached) | naive (whole network per value, once) {:>7.2} s | {:.1}x | naive = cached: {identical}",
        c,
        n as f64 / c,
        d,
        c / d,
        a,
        a / c
    );
    Ok(())
}

/// An image table of `rows` random 32x32x1 images per split.
fn image_table(
    dir: &std::path::Path,
    splits: &[(&str, usize)],
) -> Result<(), Box<dyn std::error::Error>> {
    let meta = TableMeta {
        height: 32,
        width: 32,
        channels: 1,
        channel_order: "L".into(),
        class_names: (0..10).map(|i| i.to_string()).collect(),
    };
    let mut rng = SplitMix64(3);
    let mut index = TableIndex {
        format: TABLE_FORMAT.into(),
        meta: meta.clone(),
        splits: Default::default(),
    };
    let mut id = 0;
    for &(split, rows) in splits {
        let mut w = ShardWriter::new(dir, split, &meta, 10_000);
        for _ in 0..rows {
            let s = Sample {
                pixels: (0..1024).map(|_| rng.below(256) as u8).collect(),
                height: 32,
                width: 32,
                channels: 1,
                label: rng.below(10) as i64,
                source_id: format!("random#{id}"),
            };
            w.push(id, &s)?;
            id += 1;
        }
        index.splits.insert(split.to_string(), w.finish()?);
    }
    std::fs::write(dir.join("table.json"), serde_json::to_vec(&index)?)?;
    Ok(())
}

fn selected(name: &str) -> bool {
    std::env::args()
        .nth(2)
        .is_none_or(|only| name.contains(&only))
}

fn encode() -> Result<(), Box<dyn std::error::Error>> {
    if !selected("encode") {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let (table, level, out) = (
        tmp.path().join("table"),
        tmp.path().join("level"),
        tmp.path().join("out"),
    );
    for d in [&table, &level, &out] {
        std::fs::create_dir_all(d)?;
    }
    let splits = [("train", 10_000), ("test", 2_000)];
    image_table(&table, &splits)?;
    let cfg = tiny_level1(AuxKind::Ff);
    let opened = stages::data::level_table::LevelTable::open(&table)?;
    VqLevel::new(&cfg, &opened, 0, &Device::Cpu)?.save(&level)?;
    let mut times = Vec::new();
    for _ in 0..3 {
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(&out)?;
        let job = Job {
            stage: "codes1".into(),
            kind: "encode".into(),
            key: "0".repeat(64),
            params: serde_json::json!({}),
            inputs: [
                ("level".to_string(), level.clone()),
                ("table".to_string(), table.clone()),
            ]
            .into(),
            input_keys: [("table".to_string(), "1".repeat(64))].into(),
            deps: Default::default(),
            outs: vec![],
            pipeline_dir: tmp.path().to_path_buf(),
            artifacts_dir: tmp.path().join("artifacts"),
            scratch_dir: tmp.path().join("scratch"),
            device: "cpu".into(),
            attempt: 1,
        };
        let ctx = StageContext::new(job, out.clone(), Box::new(std::io::sink()));
        let t = Instant::now();
        stages::kinds::encode::Encode
            .run(&ctx)
            .map_err(|e| e.to_string())?;
        times.push(t.elapsed().as_secs_f64());
    }
    let rows: usize = splits.iter().map(|s| s.1).sum();
    let t = median(times);
    println!(
        "encode, tiny.yaml level 1 (32x32 -> 8x8 of 128), {rows} images incl. Parquet write: {:.2} s, {:.0} images/s (median of 3)",
        t,
        rows as f64 / t
    );
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    stages::tuning::apply();
    let steps: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    println!(
        "{} threads, batch {BATCH}, 32x32x1 pixels",
        rayon::current_num_threads()
    );
    let tiny = tiny_pixelcnn();
    train(
        "tiny.yaml decoder1 (given codes)",
        ar_info(tiny.clone(), true, false),
        steps,
    )?;
    // The baseline's width, 19, gives it decoder1's parameter count.
    let baseline = PixelCnnConfig {
        hidden: 19,
        ..tiny.clone()
    };
    train(
        "tiny.yaml baseline (given class)",
        ar_info(baseline.clone(), false, true),
        steps,
    )?;
    let (decoder1, baseline) = (ar_info(tiny, true, false), ar_info(baseline, false, true));
    sample("sampling decoder1 (given codes)", decoder1, 10, 3)?;
    sample("sampling baseline (given class)", baseline, 10, 3)?;
    // Minutes per run: only when asked for (`-- 2 defaults`).
    if std::env::args().nth(2).is_some() {
        train(
            "defaults (hidden 64, 8 layers, k5)",
            ar_info(PixelCnnConfig::default(), true, false),
            steps,
        )?;
    }
    encode()?;
    Ok(())
}
