//! The models, in candle's house style: a `Config` (serde, `Default`), a
//! `new(cfg, vb)`, a `forward`. Weight names are stable (`encoder.down.0.weight`,
//! ...) so the safetensors files read the same in PyTorch.
//!
//! Everything random here draws from [`crate::rng::SplitMix64`] streams the
//! training loop owns and checkpoints; nothing uses candle's thread RNG.

pub mod aux_decoder;
pub mod categorical;
pub mod conv;
pub mod encoder;
pub mod masks;
pub mod nearest;
pub mod optim;
pub mod pixelcnn;
pub mod quantiser;
pub mod vars;

/// The largest absolute difference between two tensors of one shape (tests
/// that hold a kernel against candle's own ops).
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("tensors of one shape and dtype f32")
}
