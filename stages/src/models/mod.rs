//! The models, in candle's house style: a `Config` (serde, `Default`), a
//! `new(cfg, vb)`, a `forward`. Weight names are stable (`encoder.down.0.weight`,
//! ...) so the safetensors files read the same in PyTorch.
//!
//! The two models a stage kind shares with others live here too: a VQ
//! level ([`vq_level`]: encoder + quantiser + auxiliary decoder, trained by
//! `train_vq`, run by `encode`) and an AR model ([`ar`]: a gated PixelCNN
//! with its conditioning, trained by `train_ar`, sampled by `sample`, scored
//! by `bound`).
//!
//! Everything random here draws from [`crate::rng::SplitMix64`] streams the
//! training loop owns and checkpoints; nothing uses candle's thread RNG.

pub mod ar;
pub mod aux_decoder;
pub mod categorical;
pub mod classifier;
pub mod conv;
pub mod encoder;
pub mod fastmath;
mod kernels;
mod lanes;
pub mod masks;
pub mod nearest;
pub mod optim;
pub mod pixelcnn;
pub mod precision;
pub mod quantiser;
pub mod reference;
pub mod vars;
pub mod vq_level;

/// Runs `f` with this thread's `key` set to `value`, then restores the
/// previous value (on a panic too): the scoped per-thread choices of
/// [`reference`] and [`precision`].
fn with_thread_choice<T: Copy + 'static, R>(
    key: &'static std::thread::LocalKey<std::cell::Cell<T>>,
    value: T,
    f: impl FnOnce() -> R,
) -> R {
    struct Restore<T: Copy + 'static>(&'static std::thread::LocalKey<std::cell::Cell<T>>, T);
    impl<T: Copy + 'static> Drop for Restore<T> {
        fn drop(&mut self) {
            self.0.with(|c| c.set(self.1));
        }
    }
    let _restore = Restore(key, key.with(|c| c.replace(value)));
    f()
}

/// The f32 values of a contiguous CPU tensor, for the CPU kernels of
/// `CustomOp`s; `op` names the kernel in the error.
pub(crate) fn contiguous_f32<'a>(
    storage: &'a candle_core::CpuStorage,
    layout: &candle_core::Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op} needs a contiguous input");
    };
    Ok(&storage.as_slice::<f32>()?[start..end])
}

/// [`contiguous_f32`] of a `CustomOp3`'s three inputs.
pub(crate) fn contiguous_f32x3<'a>(
    (s1, l1): (&'a candle_core::CpuStorage, &candle_core::Layout),
    (s2, l2): (&'a candle_core::CpuStorage, &candle_core::Layout),
    (s3, l3): (&'a candle_core::CpuStorage, &candle_core::Layout),
    op: &str,
) -> candle_core::Result<(&'a [f32], &'a [f32], &'a [f32])> {
    Ok((
        contiguous_f32(s1, l1, op)?,
        contiguous_f32(s2, l2, op)?,
        contiguous_f32(s3, l3, op)?,
    ))
}

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
