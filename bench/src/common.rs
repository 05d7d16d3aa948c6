//! What the benchmark binaries share (each includes this file as a module).
#![allow(dead_code)]

use std::sync::atomic::Ordering;
use std::time::Instant;

use candle_core::{Device, Module, Tensor, Var};
use stages::data::level_table::InputKind;
use stages::data::level_table::{LevelTable, Rows};
use stages::models::ar::{AR_FORMAT, ArInfo, CodeMapInfo};
use stages::models::aux_decoder::{AuxDecoderConfig, AuxKind};
use stages::models::conv::FORWARD_FLOPS;
use stages::models::encoder::EncoderConfig;
use stages::models::optim::{AdamW, OptimConfig};
use stages::models::pixelcnn::PixelCnnConfig;
use stages::models::quantiser::QuantiserConfig;
use stages::models::vq_level::{LevelConfig, VqLevel};
use stages::rng::SplitMix64;

/// The batch of the training benchmarks.
pub const BATCH: usize = 64;

/// The value after `name` on the command line.
pub fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// Median seconds of `layer`'s forward and backward of `(y * r).sum()` for
/// a fixed random r, on a random input of `shape` (the input's gradient
/// included), over `reps` after 2 warm-ups, the device synchronised at the
/// end of each.
pub fn layer_seconds(
    layer: &dyn Module,
    shape: (usize, usize, usize, usize),
    reps: usize,
    rng: &mut SplitMix64,
    dev: &Device,
) -> Result<f64, Box<dyn std::error::Error>> {
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    let x: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    let x = Var::from_vec(x, shape, dev)?;
    let y = layer.forward(x.as_tensor())?;
    let r: Vec<f32> = (0..y.elem_count()).map(|_| rng.normal() as f32).collect();
    let r = Tensor::from_vec(r, y.shape(), dev)?;
    let mut times = Vec::new();
    for i in 0..reps + 2 {
        let t = Instant::now();
        let y = layer.forward(x.as_tensor())?;
        let grads = (y * &r)?.sum_all()?.backward()?;
        if grads.get(&x).is_none() {
            return Err("no input gradient".into());
        }
        dev.synchronize()?;
        if i >= 2 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    Ok(median(times))
}

/// The numbers on the command line, each in place of its default.
pub fn numbers_or<const N: usize>(defaults: [usize; N]) -> [usize; N] {
    let given: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let mut out = defaults;
    for (o, g) in out.iter_mut().zip(given) {
        *o = g;
    }
    out
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `pipelines/tiny.yaml`'s level 1 (hidden 32, D 32, K 128) with a `kind` decoder.
pub fn tiny_level1(kind: AuxKind) -> LevelConfig {
    LevelConfig {
        encoder: EncoderConfig {
            hidden: 32,
            res_blocks: 2,
            res_hidden: 16,
            downsample: 2,
            dim: 32,
            ..Default::default()
        },
        quantiser: QuantiserConfig {
            codebook_size: 128,
            ..Default::default()
        },
        decoder: AuxDecoderConfig {
            kind,
            hidden: 32,
            res_blocks: 2,
            res_hidden: 16,
            ..Default::default()
        },
    }
}

/// Median GFLOP/s of an n x n by n x n f32 matmul.
pub fn matmul_peak(n: usize) -> candle_core::Result<f64> {
    let dev = Device::Cpu;
    let a = Tensor::ones((n, n), candle_core::DType::F32, &dev)?;
    let b = Tensor::ones((n, n), candle_core::DType::F32, &dev)?;
    let mut rates = Vec::new();
    for i in 0..12 {
        let t = Instant::now();
        let c = a.matmul(&b)?;
        c.sum_all()?.to_scalar::<f32>()?;
        if i >= 2 {
            rates.push(2.0 * (n * n * n) as f64 / t.elapsed().as_secs_f64() / 1e9);
        }
    }
    Ok(median(rates))
}

/// `pipelines/tiny.yaml`'s decoder1 network (hidden 16, 4 layers, k 3).
pub fn tiny_pixelcnn() -> PixelCnnConfig {
    PixelCnnConfig {
        hidden: 16,
        layers: 4,
        kernel: 3,
        code_embedding: 16,
        cond_hidden: 16,
        cond_res_blocks: 1,
    }
}

/// A model of 32x32x1 pixels over 10 classes, given an 8x8 map of 128
/// codes (`codes`) and/or the class (`labels`).
pub fn ar_info(model: PixelCnnConfig, codes: bool, labels: bool) -> ArInfo {
    ArInfo {
        format: AR_FORMAT.into(),
        target: InputKind::Pixels { channels: 1 },
        height: 32,
        width: 32,
        class_names: (0..10).map(|i| i.to_string()).collect(),
        class_conditional: labels,
        condition: codes.then_some(CodeMapInfo {
            codebook_size: 128,
            height: 8,
            width: 8,
            upsample: 2,
        }),
        target_key: String::new(),
        condition_key: None,
        seed: 0,
        model,
    }
}

/// A level-1 table of `side` x `side` images of `channels` channels (no
/// rows: the benchmarks make their own).
pub fn pixel_table(channels: usize, side: usize) -> LevelTable {
    LevelTable {
        dir: "synthetic".into(),
        input: InputKind::Pixels { channels },
        height: side,
        width: side,
        values_per_row: side * side * channels,
        class_names: vec!["x".into()],
        splits: Default::default(),
        source_key: None,
    }
}

/// `n` rows of `values` random values below `below`, random labels of 10 classes.
pub fn random_rows(rng: &mut SplitMix64, n: usize, values: usize, below: u64) -> Rows {
    Rows {
        ids: (0..n as i64).collect(),
        labels: (0..n).map(|_| rng.below(10) as i32).collect(),
        values: (0..n * values).map(|_| rng.below(below) as u16).collect(),
    }
}

/// A level-1 VQ level of `cfg` trained for `steps` full steps (batch
/// tensors, forward, backward, AdamW, EMA update) at batch 64 on random
/// 32x32x1 pixels, after 3 warm-up steps: the median step in seconds, the
/// FLOPs of a step (3 x the convolutions' forward matmuls, counted as they
/// run, + 3 x the quantiser's distance matmul) and the parameter count.
pub fn vq_training(
    cfg: &LevelConfig,
    steps: usize,
) -> Result<(f64, u64, usize), Box<dyn std::error::Error>> {
    let mut level = VqLevel::new(cfg, &pixel_table(1, 32), 0, &Device::Cpu)?;
    let mut opt = AdamW::new(level.trainable(), OptimConfig::default())?;
    let (mut rng, mut mask_rng) = (SplitMix64(1), SplitMix64(2));
    let (mut times, mut flops) = (Vec::new(), 0);
    for i in 0..steps + 3 {
        let rows = random_rows(&mut rng, BATCH, 1024, 256);
        let before = FORWARD_FLOPS.load(Ordering::Relaxed);
        let t = Instant::now();
        let batch = level.batch(&rows)?;
        let loss = level.loss(&batch, &mut mask_rng)?;
        let after = FORWARD_FLOPS.load(Ordering::Relaxed);
        let grads = loss.total.backward()?;
        opt.step(&grads, 1e-3)?;
        level.quantiser.ema_update_batch(&loss.z, &loss.codes)?;
        if i >= 3 {
            times.push(t.elapsed().as_secs_f64());
        }
        let quantiser = 2 * loss.codes.elem_count() * cfg.encoder.dim * cfg.quantiser.codebook_size;
        flops = 3 * (after - before) + 3 * quantiser as u64;
    }
    Ok((median(times), flops, level.vars.parameter_count()))
}

/// The peak resident memory (`VmHWM`, Linux) of process `pid` ("self" for
/// this one), KiB; `None` where it cannot be read.
pub fn peak_resident_kib(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
