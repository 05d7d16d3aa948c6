//! The precision convolutions compute in off the CPU (`params.precision`
//! of the training and sampling stages): `f32`, or `bf16` as PyTorch's
//! autocast does it: a convolution casts its input, weight and bias to
//! bf16, computes, and hands back f32; the weights, their gradients, the
//! optimiser, the loss and the VQ codebook's averages stay f32. The
//! project's CPU kernels are f32 only, so a stage refuses `bf16` there.
//!
//! The choice is per thread and scoped ([`with`]), like
//! [`super::reference`]: the loop that trains or samples sets it once.

use std::cell::Cell;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl Precision {
    /// For `skip_serializing_if`: a default `f32` stays out of the
    /// resolved params, so stage keys from before the option stay valid.
    pub fn is_f32(&self) -> bool {
        *self == Precision::F32
    }
}

thread_local! {
    static CURRENT: Cell<Precision> = const { Cell::new(Precision::F32) };
}

/// This thread's choice.
pub fn current() -> Precision {
    CURRENT.with(Cell::get)
}

/// Runs `f` with `precision` on this thread, then restores the previous
/// choice (on a panic too).
pub fn with<R>(precision: Precision, f: impl FnOnce() -> R) -> R {
    super::with_thread_choice(&CURRENT, precision, f)
}

/// The dtype a convolution of `x` computes in: bf16 where this thread
/// asked for it and candle's ops compute it (on a GPU, or on the CPU where
/// the thread takes the reference path, as tests do), else `x`'s own.
pub fn compute_dtype(x: &Tensor) -> DType {
    compute_dtype_on(x.device(), x.dtype())
}

/// [`compute_dtype`] of a `dtype` tensor on `device`.
pub fn compute_dtype_on(device: &candle_core::Device, dtype: DType) -> DType {
    let candle_ops = !device.is_cpu() || super::reference::current().candle_convs;
    match current() {
        Precision::Bf16 if candle_ops => DType::BF16,
        _ => dtype,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_choice_is_scoped_and_per_thread() {
        assert_eq!(current(), Precision::F32);
        with(Precision::Bf16, || {
            assert_eq!(current(), Precision::Bf16);
            assert_eq!(std::thread::spawn(current).join().unwrap(), Precision::F32);
        });
        assert_eq!(current(), Precision::F32);
        let _ = std::panic::catch_unwind(|| with(Precision::Bf16, || panic!("inside")));
        assert_eq!(current(), Precision::F32, "restored after a panic");
    }

    #[test]
    fn the_cpu_kernels_compute_in_f32() {
        let x = Tensor::zeros((1, 1, 2, 2), DType::F32, &candle_core::Device::Cpu).unwrap();
        with(Precision::Bf16, || {
            assert_eq!(compute_dtype(&x), DType::F32)
        });
        let candle = super::super::reference::Kernels {
            candle_convs: true,
            ..Default::default()
        };
        super::super::reference::with(candle, || {
            assert_eq!(compute_dtype(&x), DType::F32, "f32 unless asked");
            with(Precision::Bf16, || {
                assert_eq!(compute_dtype(&x), DType::BF16)
            });
        });
    }

    #[test]
    fn it_reads_and_writes_lowercase() {
        let p: Precision = serde_json::from_str("\"bf16\"").unwrap();
        assert_eq!(p, Precision::Bf16);
        assert_eq!(serde_json::to_string(&Precision::F32).unwrap(), "\"f32\"");
        assert!(serde_json::from_str::<Precision>("\"fp16\"").is_err());
    }
}
