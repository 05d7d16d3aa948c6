//! The compute device a worker was given (`HAIC_DEVICE`, the job's
//! `device`) and the precision it computes in: shared by every stage kind
//! that computes with candle.

use candle_core::Device;
use pipeline::ParamError;
use pipeline::spec::Stage;
use pipeline::stage::StageError;

use crate::error::Error;
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
