//! The candle half of the device check (`bench/gpu-stage.sh`, then
//! `gpu-check/run.sh` on a GPU machine): training steps of a pipeline's
//! `vq1` and `decoder1` at their own sizes (read from the pipeline file,
//! `pipelines/imagenet128.yaml` by default), and decoder1's sampler, on
//! random inputs, on one device. `bench/torch_twin.py --size imagenet128`
//! is the PyTorch side.
//!
//! `gpu-bench [--pipeline FILE] [--device cuda|cpu] [--only vq|ar|sample|ops]
//!  [--batch N] [--steps N] [--sample-rows R] [--sample-images N]
//!  [--precision f32|bf16] [--conv candle|taps|gemm]`
//!
//! One JSON line per model: `seconds` (median step after warm-up, the
//! device synchronised at its end; for sampling, one run), `throughput`
//! (images/s). Sampling draws the first R rows (default 4) of every image
//! of a batch on decoder1's target size: `seconds_per_row` (on-device
//! drawing, one transfer per row) beside `host_seconds_per_row` (every
//! value drawn on the host: one transfer per value), and `image_seconds`
//! (per row x the image's rows: every row runs the vertical stack on the
//! same few cached rows, so the first rows stand for the rest).
//! `--only ops` (only when asked for) times each convolution shape of the
//! two models alone (see [`ops`]). `--precision bf16` computes the
//! convolutions in bf16 as the stages' `precision: bf16` does. On a GPU
//! `HAIC_GPU_CONV` picks the convolutions; on the CPU `--conv` runs the
//! same paths in place of the project's kernels (candle's conv2d, tap-wise
//! with autograd, tap-wise with their own adjoint), to compare them here,
//! and the last line gives the process's peak resident memory.

mod common;
use common::{arg, layer_seconds, median, pixel_table, random_rows};

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Device, Module};
use stages::data::level_table::InputKind;
use stages::kinds::{train_ar, train_vq};
use stages::models::ar::{AR_FORMAT, ArInfo, ArModel, CodeMapInfo, Sampling};
use stages::models::conv::{Conv, ConvTranspose, GpuConv};
use stages::models::optim::AdamW;
use stages::models::precision::{self, Precision};
use stages::models::reference::{self, Kernels};
use stages::models::vars::SeededVars;
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

fn count(name: &str, default: usize) -> Res<usize> {
    match arg(name) {
        Some(s) => Ok(s.parse().map_err(|_| format!("{name} {s}: not a count"))?),
        None => Ok(default),
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

/// The precision this thread computes in, as a JSON string.
fn precision_json() -> String {
    serde_json::to_string(&precision::current()).unwrap_or_default()
}

fn report(model: &str, batch: usize, seconds: f64, extra: &str) {
    println!(
        "{{\"impl\": \"candle\", \"model\": \"{model}\", \"precision\": {}, \"batch\": {batch}, \"seconds\": {seconds:.6}, \"throughput\": {:.3}{extra}}}",
        precision_json(),
        batch as f64 / seconds
    );
}

/// Median full training step of the VQ level (batch, forward, backward,
/// AdamW with the stage's clipping, EMA update), after 2 warm-up steps.
fn vq(cfg: &train_vq::Config, s: &Sizes, batch: usize, steps: usize, dev: &Device) -> Res<f64> {
    let mut level = VqLevel::new(&cfg.level(), &pixel_table(s.channels, s.side), 0, dev)?;
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

/// One layer of [`ops`]: name, batch, input (C, side), output channels,
/// kernel, stride, padding, transposed.
type OpSpec = (
    String,
    usize,
    (usize, usize),
    usize,
    (usize, usize, usize),
    bool,
);

/// The convolution shapes of vq1 (at batch 64) and decoder1 (at 16, the
/// batch that fits), each timed alone: forward, then backward of
/// `(y * r).sum()` for a fixed random r, input gradient included; the
/// median of `reps` after 2 warm-ups. `bench/torch_twin.py --only ops`
/// times the same list.
fn ops(
    vq: &train_vq::Config,
    ar: &train_ar::Config,
    s: &Sizes,
    reps: usize,
    dev: &Device,
) -> Res<()> {
    let (side, h, r) = (s.side, vq.encoder.hidden, vq.encoder.res_hidden);
    let (a, ch) = (ar.model.hidden, ar.model.cond_hidden);
    let k = ar.model.kernel;
    let specs: Vec<OpSpec> = vec![
        (
            format!("vq1 stem conv3x3 3->{h} at {side}"),
            64,
            (3, side),
            h,
            (3, 1, 1),
            false,
        ),
        (
            format!("vq1 down conv4x4/2 {h}->{h} at {side}"),
            64,
            (h, side),
            h,
            (4, 2, 1),
            false,
        ),
        (
            format!("vq1 res conv3x3 {h}->{r} at {}", s.code_side),
            64,
            (h, s.code_side),
            r,
            (3, 1, 1),
            false,
        ),
        (
            format!("vq1 up convT4x4/2 {h}->{h} at {}", side / 2),
            64,
            (h, side / 2),
            h,
            (4, 2, 1),
            true,
        ),
        (
            format!("vq1 out conv3x3 {h}->3 at {side}"),
            64,
            (h, side),
            3,
            (3, 1, 1),
            false,
        ),
        (
            format!("decoder1 conv{k}x{k} {a}->{} at {side}", 2 * a),
            16,
            (a, side),
            2 * a,
            (k, 1, k / 2),
            false,
        ),
        (
            format!("decoder1 1x1 {}->{} at {side}", 2 * a, 2 * a),
            16,
            (2 * a, side),
            2 * a,
            (1, 1, 0),
            false,
        ),
        (
            format!("decoder1 out 1x1 {a}->768 at {side}"),
            16,
            (a, side),
            768,
            (1, 1, 0),
            false,
        ),
        (
            format!("decoder1 cond convT4x4/2 {ch}->{ch} at {}", side / 2),
            16,
            (ch, side / 2),
            ch,
            (4, 2, 1),
            true,
        ),
    ];
    let mut rng = SplitMix64(3);
    for (name, batch, (c, side_in), out, (k, stride, pad), transposed) in specs {
        let vars = SeededVars::new(1);
        let layer: Box<dyn Module> = if transposed {
            Box::new(ConvTranspose::new(
                c,
                out,
                k,
                stride,
                pad,
                vars.var_builder(dev),
            )?)
        } else {
            Box::new(Conv::new(c, out, k, stride, pad, vars.var_builder(dev))?)
        };
        let seconds = layer_seconds(
            layer.as_ref(),
            (batch, c, side_in, side_in),
            reps,
            &mut rng,
            dev,
        )
        .map_err(|e| format!("{name}: {e}"))?;
        println!(
            "{{\"impl\": \"candle\", \"op\": \"{name}\", \"precision\": {}, \"batch\": {batch}, \"seconds\": {seconds:.6}}}",
            precision_json()
        );
    }
    Ok(())
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
    let precision: Precision = match arg("--precision") {
        Some(p) => serde_json::from_value(serde_json::Value::String(p.clone()))
            .map_err(|_| format!("--precision {p}: f32 or bf16"))?,
        None => Precision::F32,
    };
    if precision == Precision::Bf16 && dev.is_cpu() {
        return Err("--precision bf16 computes on a GPU; the CPU's kernels are f32 only".into());
    }
    let kernels = match (arg("--conv").as_deref(), dev.is_cpu()) {
        (None, _) => Kernels::default(),
        (Some(_), false) => return Err("--conv is for the CPU; on a GPU set HAIC_GPU_CONV".into()),
        (Some(path), true) => Kernels::gpu_convs(match path {
            "candle" => GpuConv::Candle,
            "taps" => GpuConv::Tapwise,
            "gemm" => GpuConv::TapwiseAdjoint,
            other => return Err(format!("--conv {other}: candle, taps or gemm").into()),
        }),
    };
    reference::with(kernels, || {
        precision::with(precision, || measure(&pipeline, dev))
    })?;
    if let Some(peak) = common::peak_resident_kib("self") {
        println!("{{\"peak_resident_mib\": {}}}", peak / 1024);
    }
    Ok(())
}

/// What `main` asked for, at this thread's precision.
fn measure(pipeline: &std::path::Path, dev: Device) -> Res<()> {
    let steps = count("--steps", 5)?;
    let only = arg("--only");
    // `ops` runs only when asked for by name.
    let wanted = |m: &str| only.as_deref().is_none_or(|o| o == m);

    let spec = pipeline::spec::load(pipeline, &stages::all())?;
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
    if only.as_deref() == Some("ops") {
        ops(&vq_cfg, &ar_cfg, &sizes, steps, &dev)?;
    }
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
