//! Level-1 VQ training throughput on the CPU, beside this machine's matmul
//! peak as candle's gemm reaches it.
//!
//! `cargo run --release -p haic-bench --bin vq-bench [-- STEPS]`
//!
//! For each configuration it times full training steps at batch 64 on
//! 32x32x1 inputs (batch tensors, forward, backward, AdamW, EMA update; the
//! pixel values are random, which changes no cost), after 3 warm-up steps,
//! and prints the median step time, images/s, the FLOPs of a step and the
//! fraction of the matmul peak. FLOPs per step = 3 x the forward matmul
//! FLOPs of the convolutions (counted as they run; the backward does two
//! matmuls of the forward's size per layer) + 3 x the quantiser's distance
//! matmul; elementwise work is not counted. One line repeats the first
//! configuration with candle's own convolutions (the "before"). First, the
//! nearest-code search with the argmin kernel and with candle's argmin.

mod common;
use common::{BATCH, matmul_peak, median, tiny_level1, vq_training};

use std::time::Instant;

use candle_core::{Device, Tensor};
use stages::models::aux_decoder::{AuxDecoderConfig, AuxKind};
use stages::models::nearest::{ArgminRows, code_distances, nearest_code, nearest_code_reference};
use stages::models::reference::{self, Kernels};
use stages::models::vq_level::LevelConfig;
use stages::rng::SplitMix64;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Nearest code for 65,536 vectors of 64 dims against 512 codes: the
/// argmin kernel against candle's generic argmin, both after the same matmul.
fn nearest(reps: usize) -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let mut r = SplitMix64(5);
    let mut randn = |n: usize| -> Vec<f32> { (0..n).map(|_| r.normal() as f32).collect() };
    let z = Tensor::from_vec(randn(65536 * 64), (65536, 64), &dev)?;
    let e = Tensor::from_vec(randn(512 * 64), (512, 64), &dev)?;
    let mut fast = Vec::new();
    let mut generic = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        let a = nearest_code(&z, &e)?;
        fast.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let b = nearest_code_reference(&z, &e)?;
        generic.push(t.elapsed().as_secs_f64());
        assert_eq!(a.to_vec1::<u32>()?, b.to_vec1::<u32>()?);
    }
    let (f, g) = (median(fast), median(generic));
    // The argmin alone, on the same distance matrix.
    let d = code_distances(&z, &e)?.contiguous()?;
    let (mut fast_argmin, mut generic_argmin) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        let t = Instant::now();
        d.apply_op1_no_bwd(&ArgminRows)?;
        fast_argmin.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        d.argmin(candle_core::D::Minus1)?;
        generic_argmin.push(t.elapsed().as_secs_f64());
    }
    let (fa, ga) = (median(fast_argmin), median(generic_argmin));
    println!(
        "nearest code, 65,536 x 64 vs 512 codes: {:.1} ms vs {:.1} ms with candle's argmin ({:.2}x); the argmin alone {:.1} ms vs {:.1} ms ({:.2}x)",
        f * 1e3,
        g * 1e3,
        g / f,
        fa * 1e3,
        ga * 1e3,
        ga / fa
    );
    Ok(())
}

fn run(
    name: &str,
    cfg: &LevelConfig,
    steps: usize,
    peak: f64,
) -> Result<(), Box<dyn std::error::Error>> {
    let (step, flops, parameters) = vq_training(cfg, steps)?;
    let gflops = flops as f64 / 1e9;
    println!(
        "{name:<28} {:>8.1} ms/step  {:>7.1} images/s  {:>6.2} GFLOP/step  {:>6.1} GFLOP/s  {:>5.1} % of matmul peak  ({} parameters)",
        step * 1e3,
        BATCH as f64 / step,
        gflops,
        gflops / step,
        100.0 * gflops / step / peak,
        parameters
    );
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    stages::tuning::apply();
    let steps: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let peak = matmul_peak(1024)?;
    println!(
        "matmul peak (candle gemm, 1024^3 f32, {} threads): {peak:.1} GFLOP/s",
        rayon::current_num_threads()
    );
    nearest(9)?;
    let default = |kind| LevelConfig {
        decoder: AuxDecoderConfig {
            kind,
            ..Default::default()
        },
        ..Default::default()
    };
    run(
        "tiny.yaml level 1, ff",
        &tiny_level1(AuxKind::Ff),
        steps,
        peak,
    )?;
    let candle_convs = Kernels {
        candle_convs: true,
        ..Kernels::default()
    };
    reference::with(candle_convs, || {
        run(
            "  the same, candle's convs",
            &tiny_level1(AuxKind::Ff),
            steps.min(5),
            peak,
        )
    })?;
    run(
        "tiny.yaml level 1, msp",
        &tiny_level1(AuxKind::Msp),
        steps,
        peak,
    )?;
    run(
        "defaults (hidden 64), ff",
        &default(AuxKind::Ff),
        steps,
        peak,
    )?;
    run(
        "defaults (hidden 64), msp",
        &default(AuxKind::Msp),
        steps,
        peak,
    )?;
    Ok(())
}
