//! The compute device a worker was given (`HAIC_DEVICE`, the job's
//! `device`) and the precision it computes in: shared by every stage kind
//! that computes with candle.

use candle_core::Device;
use pipeline::ParamError;
use pipeline::executor::gpus::gpu_memory;
use pipeline::spec::Stage;
use pipeline::stage::StageError;

use crate::error::Error;
use crate::models::conv::tapwise_on_gpu;
use crate::models::precision::{self, Precision};

/// The compute device of a job (`cpu`; CUDA arrives with its issue).
pub fn device(name: &str) -> Result<Device, Error> {
    match name {
        "cpu" => Ok(Device::Cpu),
        // The worker sees only the devices its slot or job was given
        // (CUDA_VISIBLE_DEVICES): the first of them is ordinal 0.
        #[cfg(feature = "cuda")]
        other if other.starts_with("cuda") => {
            let what = format!("opening {other}");
            Device::new_cuda(0).map_err(Error::candle(&what))
        }
        other => Err(Error::Params(format!(
            "device `{other}`: this haic-pipe was built without CUDA; build it with `--features cuda` (needs nvcc), or give the stage `resources: {{gpus: 0}}` to train on CPU"
        ))),
    }
}

/// `params.precision: bf16` computes on a GPU: a stage that asks for it
/// with `resources: {gpus: 0}` would run on the CPU, whose kernels are
/// f32 only. Checked when the pipeline is read.
pub fn check_precision(stage: &Stage, precision: Precision) -> Result<(), ParamError> {
    if precision == Precision::Bf16 && stage.resources.gpus == 0 {
        return Err(ParamError::new(
            "params.precision",
            "`precision: bf16` computes on a GPU, and this stage runs on the CPU (`resources: {gpus: 0}`), whose kernels are f32 only: give the stage `resources: {gpus: 1}` or remove `precision`",
        ));
    }
    Ok(())
}

/// A training step's GPU memory, by a kind's estimate, for
/// [`check_gpu_batch`].
pub struct StepMemory<'a> {
    /// Bytes an image of the batch, at a precision.
    pub per_image: &'a dyn Fn(Precision) -> f64,
    /// What the estimate counted, for the message: "hidden 126, 16 layers ...".
    pub model: String,
    /// The params that make one image smaller, for when none fits.
    pub shrink: &'a str,
}

/// A GPU stage whose training step would not fit one GPU's memory
/// ([`gpu_memory`]) at its batch fails when the pipeline is read, not at
/// its first step after the stages below it trained: the error names
/// `params.batch_size`, the estimate and the batch that fits (and the one
/// `precision: bf16` would fit). Not checked on the CPU, without a known
/// GPU memory, or with `HAIC_GPU_CONV=taps` or `gemm`: the estimates are of candle's
/// own convolutions.
pub fn check_gpu_batch(
    stage: &Stage,
    batch_size: usize,
    precision: Precision,
    step: StepMemory,
) -> Result<(), ParamError> {
    if stage.resources.gpus == 0 || tapwise_on_gpu() {
        return Ok(());
    }
    let Some((budget, source)) = gpu_memory().map_err(|m| ParamError::new("resources", m))? else {
        return Ok(());
    };
    let per_image = (step.per_image)(precision);
    let need = per_image * batch_size as f64;
    if need <= budget as f64 {
        return Ok(());
    }
    let gib = |bytes: f64| bytes / (1u64 << 30) as f64;
    // The batch to suggest leaves a tenth of the GPU to what the estimate
    // leaves out (the allocator's fragments, the CUDA context): decoder1's
    // batch 32 failed on an H200 at 137 of its 140 GiB.
    let fitting = |per_image: f64| (0.9 * budget as f64 / per_image).floor() as usize;
    let fix = match fitting(per_image) {
        0 => format!(
            "even one image does not fit: make the model smaller ({})",
            step.shrink
        ),
        n => format!("lower it to {n} or less"),
    };
    let bf16 = match precision {
        Precision::F32 => match fitting((step.per_image)(Precision::Bf16)) {
            n if n > fitting(per_image) => format!(", or set `precision: bf16` ({n} fit)"),
            _ => String::new(),
        },
        Precision::Bf16 => String::new(),
    };
    Err(ParamError::new(
        "params.batch_size",
        format!(
            "batch_size {batch_size} needs about {:.0} GiB of GPU memory a training step ({:.2} GiB an image: {}, estimated from a step measured on an H200, docs/benchmarks.md), more than one GPU's {:.0} GiB ({source}): {fix}{bf16}",
            gib(need),
            gib(per_image),
            step.model,
            gib(budget as f64),
        ),
    ))
}

/// Runs a stage's work at `precision` on `device` ([`crate::models::precision`]);
/// bf16 on the CPU is an error (a job sent there by hand).
pub fn at_precision<R>(
    precision: Precision,
    device: &Device,
    work: impl FnOnce() -> Result<R, StageError>,
) -> Result<R, StageError> {
    if precision == Precision::Bf16 && device.is_cpu() {
        return Err(Error::Params(
            "`precision: bf16` computes on a GPU, and this job was given the CPU: run it with `resources: {gpus: 1}` or remove `precision`".into(),
        )
        .into());
    }
    precision::with(precision, work)
}
