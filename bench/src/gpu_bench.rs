//! The candle half of the device check (`bench/gpu-stage.sh`, then
//! `gpu-check/run.sh` on a GPU machine): training steps of a pipeline's
//! `vq1` and `decoder1` at their own sizes (read from the pipeline file,
//! `pipelines/imagenet128.yaml` by default), and decoder1's sampler, on
//! random inputs, on one device. `bench/torch_twin.py --size imagenet128`
//! is the PyTorch side.
//!
//! `gpu-bench [--pipeline FILE] [--device cuda|cpu] [--only vq|ar|sample]
//!  [--batch N] [--steps N] [--sample-rows R] [--sample-images N]`
//!
//! One JSON line per model: `seconds` (median step after warm-up, the
//! device synchronised at its end; for sampling, one run), `throughput`
//! (images/s). Sampling draws the first R rows (default 4) of every image
//! of a batch on decoder1's target size: `seconds_per_row` (on-device
//! drawing, one transfer per row) beside `host_seconds_per_row` (every
//! value drawn on the host: one transfer per value), and `image_seconds`
//! (per row x the image's rows: a lower bound, since a later row's
//! vertical band is up to `rows_above` rows tall, the first rows' are not).

mod common;
use common::median;

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Device;
use stages::data::level_table::{InputKind, LevelTable, Rows};
use stages::kinds::{train_ar, train_vq};
use stages::models::ar::{AR_FORMAT, ArInfo, ArModel, CodeMapInfo, Sampling};
use stages::models::optim::AdamW;
use stages::models::vq_level::VqLevel;
use stages::rng::SplitMix64;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// The sizes the models are built at: a level-1 table of RGB images.
struct Sizes {
    channels: usize,
    side: usize,
    /// decoder1's code map: its side and codebook size.
    code_side: usize,
    codes: usize,
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn count(name: &str, default: usize) -> Res<usize> {
    match arg(name) {
        Some(s) => Ok(s.parse().map_err(|_| format!("{name} {s}: not a count"))?),
        None => Ok(default),
    }
}

fn random_rows(rng: &mut SplitMix64, n: usize, values: usize, below: u64) -> Rows {
    Rows {
        ids: (0..n as i64).collect(),
        labels: (0..n).map(|_| rng.below(10) as i32).collect(),
        values: (0..n * values).map(|_| rng.below(below) as u16).collect(),
    }
}

fn table(s: &Sizes) -> LevelTable {
    LevelTable {
        dir: "synthetic".into(),
        input: InputKind::Pixels {
            channels: s.channels,
        },
        height: s.side,
        width: s.side,
        values_per_row: s.side * s.side * s.channels,
        class_names: (0..10).map(|i| i.to_string()).collect(),
        splits: Default::default(),
        source_key: None,
    }
}

fn ar_info(model: &train_ar::Config, s: &Sizes, height: usize) -> ArInfo {
    ArInfo {
        format: AR_FORMAT.into(),
        target: InputKind::Pixels {
            channels: s.channels,
        },
        height,
        width: s.side,
        class_names: (0..10).map(|i| i.to_string()).collect(),
        class_conditional: model.class_conditional,
        condition: Some(CodeMapInfo {
            codebook_size: s.codes,
            height: s.code_side,
            width: s.code_side,
            upsample: (s.side / s.code_side).trailing_zeros() as usize,
        }),
        target_key: String::new(),
        condition_key: None,
        seed: 0,
        model: model.model.clone(),
    }
}

fn report(model: &str, batch: usize, seconds: f64, extra: &str) {
    println!(
        "{{\"impl\": \"candle\", \"model\": \"{model}\", \"batch\": {batch}, \"seconds\": {seconds:.6}, \"throughput\": {:.3}{extra}}}",
        batch as f64 / seconds
    );
}

/// Median full training step of the VQ level (batch, forward, backward,
/// AdamW with the stage's clipping, EMA update), after 2 warm-up steps.
fn vq(cfg: &train_vq::Config, s: &Sizes, batch: usize, steps: usize, dev: &Device) -> Res<f64> {
    let mut level = VqLevel::new(&cfg.level(), &table(s), 0, dev)?;
    let mut opt = AdamW::new(level.trainable(), cfg.optimizer.clone())?;
    let (mut rng, mut mask_rng) = (SplitMix64(1), SplitMix64(2));
    let mut times = Vec::new();
    for i in 0..steps + 2 {
        let rows = random_rows(&mut rng, batch, s.side * s.side * s.channels, 256);
        let t = Instant::now();
        let b = level.batch(&rows)?;
        let loss = level.loss(&b, &mut mask_rng)?;
        let grads = loss.total.backward()?;
        opt.step(&grads, cfg.optimizer.lr)?;
        level.quantiser.ema_update_batch(&loss.z, &loss.codes)?;
        dev.synchronize()?;
        if i >= 2 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    Ok(median(times))
}

/// Median full training step of decoder1 given its code map.
fn ar(cfg: &train_ar::Config, s: &Sizes, batch: usize, steps: usize, dev: &Device) -> Res<f64> {
    let model = ArModel::new(ar_info(cfg, s, s.side), dev)?;
    let mut opt = AdamW::new(model.trainable(), cfg.optimizer.clone())?;
    let mut rng = SplitMix64(1);
    let mut times = Vec::new();
    for i in 0..steps + 2 {
        let rows = random_rows(&mut rng, batch, s.side * s.side * s.channels, 256);
        let codes = random_rows(&mut rng, batch, s.code_side * s.code_side, s.codes as u64);
        let t = Instant::now();
        let b = model.batch(&rows, Some(&codes))?;
        let loss = model.loss(&b)?;
        let grads = loss.backward()?;
        opt.step(&grads, cfg.optimizer.lr)?;
        dev.synchronize()?;
        if i >= 2 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    Ok(median(times))
}

/// Seconds per row of drawing `rows` rows of `n` images, each way.
fn sample(
    cfg: &train_ar::Config,
    s: &Sizes,
    n: usize,
    rows: usize,
    dev: &Device,
) -> Res<(f64, f64)> {
    // A target of the first rows (whole rows of the code map above them,
    // so `rows` rounds up to a multiple of the code map's scale).
    let scale = s.side / s.code_side;
    let map_rows = rows.div_ceil(scale);
    let info = ArInfo {
        condition: Some(CodeMapInfo {
            codebook_size: s.codes,
            height: map_rows,
            width: s.code_side,
            upsample: scale.trailing_zeros() as usize,
        }),
        ..ar_info(cfg, s, map_rows * scale)
    };
    let model = ArModel::new(info, dev)?;
    let mut rng = SplitMix64(5);
    let codes = random_rows(&mut rng, n, map_rows * s.code_side, s.codes as u64);
    let map = candle_core::Tensor::from_vec(
        codes
            .values
            .iter()
            .map(|&v| u32::from(v))
            .collect::<Vec<_>>(),
        (n, map_rows, s.code_side),
        dev,
    )?;
    let labels = candle_core::Tensor::from_vec(
        codes.labels.iter().map(|&l| l as u32).collect::<Vec<_>>(),
        n,
        dev,
    )?;
    let labels = cfg.class_conditional.then_some(&labels);
    let drawn_rows = (map_rows * scale) as f64;
    let per_row = |how| -> Res<f64> {
        // A warm-up draw, then the timed one.
        model.sample(labels, Some(&map), n, 1.0, &mut SplitMix64(9), how)?;
        let t = Instant::now();
        model.sample(labels, Some(&map), n, 1.0, &mut SplitMix64(9), how)?;
        dev.synchronize()?;
        Ok(t.elapsed().as_secs_f64() / drawn_rows)
    };
    Ok((per_row(Sampling::OnDevice)?, per_row(Sampling::Cached)?))
}

fn main() -> Res<()> {
    stages::tuning::apply();
    let pipeline =
        PathBuf::from(arg("--pipeline").unwrap_or_else(|| "pipelines/imagenet128.yaml".into()));
    let dev = match arg("--device").as_deref().unwrap_or("cuda") {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0)?,
        other => return Err(format!("--device {other}: cpu or cuda").into()),
    };
    let steps = count("--steps", 5)?;
    let only = arg("--only");
    let wanted = |m: &str| only.as_deref().is_none_or(|o| o == m);

    let spec = pipeline::spec::load(&pipeline, &stages::all())?;
    let params = |name: &str| -> Res<&serde_json::Map<String, serde_json::Value>> {
        let i = spec
            .index
            .get(name)
            .ok_or_else(|| format!("{}: no stage `{name}`", pipeline.display()))?;
        Ok(&spec.stages[*i].params)
    };
    let vq_cfg: train_vq::Config = stages::params::parse(params("vq1")?)?;
    let ar_cfg: train_ar::Config = stages::params::parse(params("decoder1")?)?;
    // The sizes of imagenet128.yaml's preprocess stage (the bench does not
    // read the data): RGB, side from `transforms.crop`.
    let side = params("prep")?
        .get("transforms")
        .and_then(|t| t.get("crop"))
        .and_then(|c| c.as_u64())
        .ok_or("the prep stage names no transforms.crop")? as usize;
    let down = 1usize << vq_cfg.encoder.downsample;
    let sizes = Sizes {
        channels: 3,
        side,
        code_side: side / down,
        codes: vq_cfg.quantiser.codebook_size,
    };
    eprintln!(
        "{}: {side}x{side}x3, vq1 codes {}x{} of {}; device {dev:?}",
        pipeline.display(),
        sizes.code_side,
        sizes.code_side,
        sizes.codes
    );
    if wanted("vq") {
        let batch = count("--batch", vq_cfg.batch_size)?;
        report("vq1", batch, vq(&vq_cfg, &sizes, batch, steps, &dev)?, "");
    }
    if wanted("ar") {
        let batch = count("--batch", ar_cfg.batch_size)?;
        report(
            "decoder1",
            batch,
            ar(&ar_cfg, &sizes, batch, steps, &dev)?,
            "",
        );
    }
    if wanted("sample") {
        let n = count("--sample-images", 64)?;
        let rows = count("--sample-rows", 4)?;
        let (on_device, host) = sample(&ar_cfg, &sizes, n, rows, &dev)?;
        let image = on_device * sizes.side as f64;
        report(
            "sample",
            n,
            image,
            &format!(
                ", \"seconds_per_row\": {on_device:.6}, \"host_seconds_per_row\": {host:.6}, \"image_seconds\": {image:.3}"
            ),
        );
    }
    Ok(())
}
