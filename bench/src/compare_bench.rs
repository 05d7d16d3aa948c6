//! The candle side of `bench/compare-torch.sh`: the models of
//! `bench/torch_twin.py` (tiny.yaml's level 1 with the `ff` decoder, and
//! its decoder1 gated PixelCNN given 8x8 codes), trained at batch 64 on
//! random 32x32x1 inputs, and the PixelCNN's cached sampler on 10 images.
//!
//! `cargo run --release -p haic-bench --bin compare-bench [-- --steps N] [--only ops|vq|ar|sample] [--op NAME-PART]`
//!
//! Prints the matmul peak; for each convolution layer shape in the models
//! (`ops`), the median time of its forward and backward at batch 64; then
//! one JSON line per model: `seconds` (median
//! step, or median of 3 sampling runs), `throughput` (images/s), and for
//! training `gflop_per_step` (3 x the forward matmul FLOPs of the layers,
//! counted from their shapes as they run, + 3 x the quantiser's distance
//! matmul) and `peak_fraction` (the step's FLOP rate over the peak).

mod common;
use common::{
    BATCH, ar_info, arg, layer_seconds, matmul_peak, median, random_rows, tiny_level1,
    tiny_pixelcnn, vq_training,
};

use std::sync::atomic::Ordering;
use std::time::Instant;

use candle_core::{Device, Module, Tensor};
use stages::models::ar::{ArModel, Sampling};
use stages::models::aux_decoder::AuxKind;
use stages::models::conv::{Conv, ConvTranspose, FORWARD_FLOPS};
use stages::models::optim::{AdamW, OptimConfig};
use stages::models::vars::SeededVars;
use stages::rng::SplitMix64;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// A benchmarked layer: its name, input (C, H, W), the layer and its weights.
type Layer = (
    &'static str,
    (usize, usize, usize),
    Box<dyn Module>,
    SeededVars,
);

/// Median step time and FLOPs of a step of tiny.yaml's decoder1.
fn ar(steps: usize) -> Res<(f64, u64)> {
    let model = ArModel::new(ar_info(tiny_pixelcnn(), true, false), &Device::Cpu)?;
    let mut opt = AdamW::new(model.trainable(), OptimConfig::default())?;
    let mut rng = SplitMix64(1);
    let (mut times, mut flops) = (Vec::new(), 0);
    for i in 0..steps + 2 {
        let rows = random_rows(&mut rng, BATCH, 1024, 256);
        let codes = random_rows(&mut rng, BATCH, 64, 128);
        let before = FORWARD_FLOPS.load(Ordering::Relaxed);
        let t = Instant::now();
        let batch = model.batch(&rows, Some(&codes))?;
        let loss = model.loss(&batch)?;
        let after = FORWARD_FLOPS.load(Ordering::Relaxed);
        let grads = loss.backward()?;
        opt.step(&grads, 1e-3)?;
        if i >= 2 {
            times.push(t.elapsed().as_secs_f64());
        }
        flops = 3 * (after - before);
    }
    Ok((median(times), flops))
}

/// Median of 3 runs of the cached sampler drawing `n` images.
fn sample(n: usize) -> Res<f64> {
    let model = ArModel::new(ar_info(tiny_pixelcnn(), true, false), &Device::Cpu)?;
    let mut rng = SplitMix64(5);
    let rows = random_rows(&mut rng, n, 1024, 1);
    let codes = random_rows(&mut rng, n, 64, 128);
    let batch = model.batch(&rows, Some(&codes))?;
    let mut times = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        model.sample(
            None,
            batch.code_map.as_ref(),
            n,
            1.0,
            &mut SplitMix64(9),
            Sampling::Cached,
        )?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(median(times))
}

/// A layer of the models at batch 64: name, input (C, H, W), and the layer.
fn layers() -> Res<Vec<Layer>> {
    let dev = Device::Cpu;
    let mut out: Vec<Layer> = Vec::new();
    let conv = |c, o, k, s, p| -> Res<(Box<dyn Module>, SeededVars)> {
        let vars = SeededVars::new(1);
        let layer = Conv::new(c, o, k, s, p, vars.var_builder(&dev))?;
        Ok((Box::new(layer), vars))
    };
    for (name, shape, (c, o, k, s, p)) in [
        (
            "vq stem conv3x3 1->32, 32x32",
            (1, 32, 32),
            (1, 32, 3, 1, 1),
        ),
        (
            "vq down conv4x4/2 32->32, 32x32",
            (32, 32, 32),
            (32, 32, 4, 2, 1),
        ),
        ("vq res conv3x3 32->16, 8x8", (32, 8, 8), (32, 16, 3, 1, 1)),
        (
            "vq out conv3x3 32->1, 32x32",
            (32, 32, 32),
            (32, 1, 3, 1, 1),
        ),
        ("ar 1x1 32->32, 32x32", (32, 32, 32), (32, 32, 1, 1, 0)),
    ] {
        let (layer, vars) = conv(c, o, k, s, p)?;
        out.push((name, shape, layer, vars));
    }
    let vars = SeededVars::new(1);
    let up = ConvTranspose::new(32, 32, 4, 2, 1, vars.var_builder(&dev))?;
    out.push((
        "vq up convT4x4/2 32->32, 16x16",
        (32, 16, 16),
        Box::new(up),
        vars,
    ));
    // The PixelCNN's vertical stack: rows above and the centre row (6 of 9 taps).
    let vars = SeededVars::new(1);
    let mask: Vec<f32> = (0..32 * 16 * 9)
        .map(|i| if i % 9 < 6 { 1.0 } else { 0.0 })
        .collect();
    let vertical = Conv::new(16, 32, 3, 1, 1, vars.var_builder(&dev))?.masked(Tensor::from_vec(
        mask,
        (32, 16, 3, 3),
        &dev,
    )?)?;
    out.push((
        "ar masked conv3x3 16->32, 32x32",
        (16, 32, 32),
        Box::new(vertical),
        vars,
    ));
    Ok(out)
}

/// Median forward + backward time of each layer (input gradient included),
/// of `(y * r).sum()` for a fixed random r.
fn ops(reps: usize) -> Res<()> {
    let dev = Device::Cpu;
    let mut rng = SplitMix64(3);
    let only_op = arg("--op");
    for (name, (c, h, w), layer, _vars) in layers()? {
        if only_op.as_deref().is_some_and(|o| !name.contains(o)) {
            continue;
        }
        let seconds = layer_seconds(layer.as_ref(), (BATCH, c, h, w), reps, &mut rng, &dev)
            .map_err(|e| format!("{name}: {e}"))?;
        println!("{{\"impl\": \"candle\", \"op\": \"{name}\", \"seconds\": {seconds:.6}}}");
    }
    Ok(())
}

fn main() -> Res<()> {
    stages::tuning::apply();
    let steps: usize = match arg("--steps") {
        Some(s) => s.parse().map_err(|_| format!("--steps {s}: not a count"))?,
        None => 10,
    };
    let only = arg("--only");
    let wanted = |m: &str| only.as_deref().is_none_or(|o| o == m);
    let peak = matmul_peak(1024)?;
    println!(
        "{{\"impl\": \"candle\", \"matmul_peak_gflops\": {peak:.1}, \"threads\": {}}}",
        rayon::current_num_threads()
    );
    let report = |model: &str, (s, flops): (f64, u64)| {
        let gflop = flops as f64 / 1e9;
        println!(
            "{{\"impl\": \"candle\", \"model\": \"{model}\", \"seconds\": {s:.6}, \"throughput\": {:.3}, \"gflop_per_step\": {gflop:.3}, \"peak_fraction\": {:.4}}}",
            BATCH as f64 / s,
            gflop / s / peak
        );
    };
    if wanted("ops") {
        ops(steps.max(5))?;
    }
    if wanted("vq") {
        let (seconds, flops, _) = vq_training(&tiny_level1(AuxKind::Ff), steps)?;
        report("vq", (seconds, flops));
    }
    if wanted("ar") {
        report("ar", ar(steps)?);
    }
    if wanted("sample") {
        let n = 10;
        let s = sample(n)?;
        println!(
            "{{\"impl\": \"candle\", \"model\": \"sample\", \"seconds\": {s:.6}, \"throughput\": {:.3}}}",
            n as f64 / s
        );
    }
    Ok(())
}
