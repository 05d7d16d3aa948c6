//! Which implementation the CPU layers take: this crate's kernels, or, for
//! side-by-side checks and benchmarks, the reference computation they
//! replace (candle's own ops, every tap of a masked layer). The stages
//! always take the kernels. The choice is per thread and scoped
//! ([`with`]): a test or benchmark that measures the reference cannot
//! change what another thread computes, so tests need no lock.
//!
//! The choice is read when a layer's forward runs; the backward pass
//! follows the forward's path.

use std::cell::Cell;

use super::conv::GpuConv;

/// The reference paths to take instead of the kernels; the default takes
/// none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Kernels {
    /// Every convolution through candle's conv2d / conv_transpose2d.
    pub candle_convs: bool,
    /// Masked layers multiply every tap, the zeroed ones too.
    pub all_masked_taps: bool,
    /// The PixelCNN's gates as candle's tanh, sigmoid, mul and adds.
    pub composed_gate: bool,
    /// With `candle_convs`: convolutions tap-wise (stride 1, and strided
    /// or transposed ones whose kernel is a multiple of the stride), as a
    /// GPU runs them with `HAIC_GPU_CONV=taps` (`Conv::forward_tapwise`).
    pub tapwise_convs: bool,
    /// With `tapwise_convs`: their own backward, as a GPU runs them with
    /// `HAIC_GPU_CONV=gemm` (`conv::tapwise::TapwiseConv`).
    pub tapwise_adjoint: bool,
}

impl Kernels {
    /// What a GPU computes with `conv` (`HAIC_GPU_CONV`), for the CPU to
    /// take the same paths: candle's convolutions, tap-wise, or tap-wise
    /// with their own adjoint.
    pub const fn gpu_convs(conv: GpuConv) -> Kernels {
        Kernels {
            candle_convs: true,
            all_masked_taps: false,
            composed_gate: false,
            tapwise_convs: !matches!(conv, GpuConv::Candle),
            tapwise_adjoint: matches!(conv, GpuConv::TapwiseAdjoint),
        }
    }
}

thread_local! {
    static CURRENT: Cell<Kernels> = const {
        Cell::new(Kernels {
            candle_convs: false,
            all_masked_taps: false,
            composed_gate: false,
            tapwise_convs: false,
            tapwise_adjoint: false,
        })
    };
}

/// This thread's choice.
pub fn current() -> Kernels {
    CURRENT.with(Cell::get)
}

/// Runs `f` with `kernels` on this thread, then restores the previous
/// choice (on a panic too).
pub fn with<R>(kernels: Kernels, f: impl FnOnce() -> R) -> R {
    super::with_thread_choice(&CURRENT, kernels, f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_choice_is_scoped_and_per_thread() {
        let gate = Kernels {
            composed_gate: true,
            ..Kernels::default()
        };
        assert_eq!(current(), Kernels::default());
        with(gate, || {
            assert_eq!(current(), gate);
            let other = std::thread::spawn(current).join().unwrap();
            assert_eq!(other, Kernels::default(), "another thread keeps its own");
        });
        assert_eq!(current(), Kernels::default());
        let _ = std::panic::catch_unwind(|| with(gate, || panic!("inside")));
        assert_eq!(current(), Kernels::default(), "restored after a panic");
    }
}
