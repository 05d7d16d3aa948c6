//! Stride-1 convolutions with one channel on a side (a stem reading one
//! grey channel, an output layer writing one), computed directly.
//!
//! With one input or one output channel each tap's gemm is a rank-1
//! update: it streams the whole O x positions result through memory once
//! per tap and input channel. Here every (output channel, input channel,
//! tap) is one `axpy` or dot product over a single plane of positions,
//! which stays in L1, on the same padded layout as [`super::implicit`]:
//! tap (ky, kx) reads offset `ky * Wp + kx` from where a position's window
//! starts. Each output sums its terms in a fixed order (input channel,
//! then tap), whatever the number of positions: the incremental sampler
//! computes a single column bit for bit as the whole image does.

use super::Geometry;
use super::implicit::TapWeights;
use crate::models::lanes::lanes_kernel;

impl Geometry {
    /// Whether the layer runs here: stride 1 and a single input or output
    /// channel (`o` outputs).
    pub(super) fn direct(&self, o: usize) -> bool {
        self.stride == 1 && (self.c == 1 || o == 1)
    }
}

lanes_kernel! {
    /// `grid (O x OH*Wp) = [bias +] sum_c sum_t W_t[o][c] shift_t(xp[c])` on
    /// the padded image `xp`; `offsets` are the taps' offsets. Each grid
    /// row's extra columns after the last output row are left as they were.
    pub(super) fn forward[lanes](
        g: &Geometry,
        w: TapWeights,
        offsets: &[usize],
        xp: &[f32],
        bias: Option<&[f32]>,
        grid: &mut [f32],
    ) {
        let (p, n) = (g.padded(), g.grid_span());
        for (o, acc) in grid.chunks_exact_mut(p.n).enumerate() {
            let acc = &mut acc[..n];
            acc.fill(bias.map_or(0.0, |b| b[o]));
            for c in 0..g.c {
                let x = &xp[c * p.plane()..(c + 1) * p.plane()];
                for (t, &at) in offsets.iter().enumerate() {
                    lanes.axpy(acc, w.at(t, o, c), &x[at..at + n]);
                }
            }
        }
    }
}

lanes_kernel! {
    /// The adjoint of `forward` without bias: `dxp (C x Hp*Wp) = sum_o
    /// sum_t W_t[o][c] shift_t^T(grid[o])`, zeroed first.
    pub(super) fn data_grad[lanes](
        g: &Geometry,
        w: TapWeights,
        offsets: &[usize],
        grid: &[f32],
        dxp: &mut [f32],
    ) {
        let (p, n) = (g.padded(), g.grid_span());
        dxp.fill(0.0);
        for (c, dst) in dxp.chunks_exact_mut(p.plane()).take(g.c).enumerate() {
            for (o, dy) in grid.chunks_exact(p.n).enumerate() {
                for (t, &at) in offsets.iter().enumerate() {
                    lanes.axpy(&mut dst[at..at + n], w.at(t, o, c), &dy[..n]);
                }
            }
        }
    }
}

lanes_kernel! {
    /// `dW_t[o][c] += grid[o] . shift_t(xp[c])` (the gradient on the grid,
    /// zero in its extra columns), into `dw` laid out as `layout` (tap_step,
    /// rs, cs) says: element (t, o, c) at `t * tap_step + o * rs + c * cs`.
    /// Four taps at a time share each read of the gradient.
    pub(super) fn weight_grad[lanes](
        g: &Geometry,
        layout: (usize, usize, usize),
        offsets: &[usize],
        xp: &[f32],
        grid: &[f32],
        dw: &mut [f32],
    ) {
        let (p, n) = (g.padded(), g.grid_span());
        let (tap_step, rs, cs) = layout;
        let (groups, rest) = offsets.as_chunks::<4>();
        for (o, dy) in grid.chunks_exact(p.n).enumerate() {
            let dy = &dy[..n];
            for c in 0..g.c {
                let x = &xp[c * p.plane()..(c + 1) * p.plane()];
                let sums = groups
                    .iter()
                    .flat_map(|group| lanes.dots(dy, group.map(|at| &x[at..at + n])))
                    .chain(rest.iter().map(|&at| lanes.dots(dy, [&x[at..at + n]])[0]));
                for (t, sum) in sums.enumerate() {
                    dw[t * tap_step + o * rs + c * cs] += sum;
                }
            }
        }
    }
}
