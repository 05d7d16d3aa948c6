//! The PixelCNN's masks: which taps of a `k x k` convolution each stack's
//! layer keeps, and which channel groups see each other at the centre tap
//! (see the causality notes of [`super`]).

use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;

use crate::models::conv::Conv;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum MaskType {
    A,
    B,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stack {
    Vertical,
    Horizontal,
}

/// The channel group (0..groups) of channel `c` of `n`; gated layers have
/// 2 x hidden outputs whose halves share the grouping.
fn group(c: usize, n: usize, groups: usize) -> usize {
    c * groups / n
}

/// Which taps of a `k x k` convolution a stack's layer keeps.
#[derive(Debug, Clone, Copy)]
pub(super) struct MaskSpec {
    pub(super) stack: Stack,
    pub(super) kind: MaskType,
    pub(super) k: usize,
    pub(super) groups: usize,
    /// The outputs are the two halves of a gate (grouped alike).
    pub(super) gate_out: bool,
}

impl MaskSpec {
    /// The 0/1 mask (c_out x c_in x k x k).
    pub(super) fn mask(
        &self,
        c_in: usize,
        c_out: usize,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let (k, centre) = (self.k, self.k / 2);
        let half_out = if self.gate_out { c_out / 2 } else { c_out };
        let mut m = vec![0f32; c_out * c_in * k * k];
        for o in 0..c_out {
            let go = group(o % half_out, half_out, self.groups);
            for i in 0..c_in {
                let gi = group(i, c_in, self.groups);
                let centre_ok = match self.kind {
                    MaskType::A => go > gi,
                    MaskType::B => go >= gi,
                };
                for ky in 0..k {
                    for kx in 0..k {
                        let keep = match self.stack {
                            // Rows above; the centre row too after the first layer.
                            Stack::Vertical => {
                                ky < centre || (ky == centre && self.kind == MaskType::B)
                            }
                            // The centre row, left of the centre; the centre by group.
                            Stack::Horizontal => {
                                ky == centre && (kx < centre || (kx == centre && centre_ok))
                            }
                        };
                        if keep {
                            m[((o * c_in + i) * k + ky) * k + kx] = 1.0;
                        }
                    }
                }
            }
        }
        Tensor::from_vec(m, (c_out, c_in, k, k), device)
    }

    pub(super) fn conv(
        &self,
        c_in: usize,
        c_out: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Conv> {
        let mask = self.mask(c_in, c_out, vb.device())?;
        Conv::new(c_in, c_out, self.k, 1, self.k / 2, vb)?.masked(mask)
    }
}
