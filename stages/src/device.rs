//! The compute device a worker was given (`HAIC_DEVICE`, the job's
//! `device`): shared by every stage kind that computes with candle.

use candle_core::Device;

use crate::error::Error;

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
