//! Stride-1 convolutions without columns, one image at a time.
//!
//! On a zero-padded copy of the image (Hp x Wp), tap (ky, kx) of every
//! output position reads the same offset `ky * Wp + kx` from where the
//! position's window starts. So the layer is one gemm per tap, straight
//! from the padded image, into an output grid as wide as the padded image
//! (OH x Wp; the Wp - OW extra columns of each row are dropped, or are
//! zero where the grid is a gradient). The three kernels serve both the
//! convolution and, as its adjoint, the transposed convolution; each has a
//! variant for an image already padded (the space-to-depth blocks).
//!
//! A convolution's weight gradient also runs on a channels-last copy, where
//! a run of taps on one kernel row is one contiguous window per position,
//! so one gemm covers the run ([`weight_grad_tap_major`]).

use std::mem::MaybeUninit;

use super::Geometry;
use crate::models::kernels::{Finish, View, gemm_strided, relu, relu_copy, store_run};

/// Where tap t's O x C matrix lies in a weight buffer: element (o, c) at
/// `t * tap_step + o * rs + c * cs`.
#[derive(Clone, Copy)]
pub(super) struct TapWeights<'a> {
    pub data: &'a [f32],
    pub tap_step: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> TapWeights<'a> {
    fn tap(&self, t: usize) -> View<'a> {
        View::new(&self.data[t * self.tap_step..], self.rs, self.cs)
    }

    /// The C x O transpose of tap t.
    fn tap_t(&self, t: usize) -> View<'a> {
        View::new(&self.data[t * self.tap_step..], self.cs, self.rs)
    }

    /// Element (o, c) of tap t.
    #[inline(always)]
    pub(super) fn at(&self, t: usize, o: usize, c: usize) -> f32 {
        self.data[t * self.tap_step + o * self.rs + c * self.cs]
    }
}

/// The stride-1 layout: the image padded to Hp x Wp (plus `k` zeros so
/// the last tap's view stays inside), outputs on an OH x Wp grid.
pub(super) struct Padded {
    hp: usize,
    wp: usize,
    /// Padded image length, slack included.
    pub len: usize,
    /// Output grid positions: OH x Wp.
    pub n: usize,
}

impl Padded {
    /// One padded channel: Hp x Wp.
    pub(super) fn plane(&self) -> usize {
        self.hp * self.wp
    }
}

impl Geometry {
    /// Whether the layer runs without columns: stride 1, a kernel wider
    /// than 1 and at least 4 input channels. (A 1x1 layer's columns are a
    /// plain copy, and its one batched forward gemm keeps a position's
    /// value exact when the incremental sampler computes a single column: a
    /// gemm of one column takes gemm's matrix-vector path, which sums in
    /// another order. With fewer channels each tap's gemm is a rank-1 to
    /// rank-3 update of the whole output, and the columns' one gemm is
    /// faster: the VQ stem, 3x3 1->32 at 32x32, took 17.6 ms forward and
    /// backward at batch 64 without columns, 14.9 ms with them.)
    pub(super) fn implicit(&self) -> bool {
        self.stride == 1 && self.k > 1 && self.c >= 4
    }

    pub(super) fn padded(&self) -> Padded {
        let (hp, wp) = (self.h + 2 * self.pad, self.w + 2 * self.pad);
        Padded {
            hp,
            wp,
            len: self.c * hp * wp + self.k,
            n: self.out_h() * wp,
        }
    }

    /// The grid positions from the first output to the last: OH x Wp less
    /// the extra columns after the last row. A tap's view of that many
    /// positions ends inside its channel's padded plane.
    pub(super) fn grid_span(&self) -> usize {
        (self.out_h() - 1) * self.padded().wp + self.out_w()
    }

    /// `img` (C x H x W) into the padded layout, ReLU'd if `relu_in`.
    pub(super) fn pad_image(&self, img: &[f32], relu_in: bool, xp: &mut [f32]) {
        let Padded { hp, wp, .. } = self.padded();
        xp.fill(0.0);
        for (c, plane) in img.chunks_exact(self.h * self.w).enumerate() {
            for (y, row) in plane.chunks_exact(self.w).enumerate() {
                let at = (c * hp + y + self.pad) * wp + self.pad;
                relu_copy(&mut xp[at..at + self.w], row, relu_in);
            }
        }
    }

    /// Output planes (O x OH x OW) onto the OH x Wp grid, extra columns zero.
    pub(super) fn grid_from_output(&self, out: &[f32], relu_in: bool, grid: &mut [f32]) {
        let (wp, ow) = (self.padded().wp, self.out_w());
        grid.fill(0.0);
        for (g, o) in grid.chunks_exact_mut(wp).zip(out.chunks_exact(ow)) {
            relu_copy(&mut g[..ow], o, relu_in);
        }
    }

    /// The OH x Wp grid (O planes) cropped to the output (O x OH x OW),
    /// finished as `finish` says.
    pub(super) fn output_from_grid(
        &self,
        grid: &[f32],
        out: &mut [MaybeUninit<f32>],
        finish: Finish,
    ) {
        let (p, ow, oh) = (self.padded(), self.out_w(), self.out_h());
        for (o, (plane, rows)) in out
            .chunks_exact_mut(oh * ow)
            .zip(grid.chunks_exact(p.n))
            .enumerate()
        {
            for (y, (d, s)) in plane
                .chunks_exact_mut(ow)
                .zip(rows.chunks_exact(p.wp))
                .enumerate()
            {
                store_run(d, s, finish.run(o, (o * oh + y) * ow, ow));
            }
        }
    }

    /// The padded layout cropped to the image (C x H x W), finished as
    /// `finish` says.
    pub(super) fn image_from_padded(
        &self,
        xp: &[f32],
        img: &mut [MaybeUninit<f32>],
        finish: Finish,
    ) {
        let p = self.padded();
        for (c, plane) in img.chunks_exact_mut(self.h * self.w).enumerate() {
            for (y, row) in plane.chunks_exact_mut(self.w).enumerate() {
                let at = (c * p.hp + y + self.pad) * p.wp + self.pad;
                let run = finish.run(c, (c * self.h + y) * self.w, self.w);
                store_run(row, &xp[at..at + self.w], run);
            }
        }
    }

    pub(super) fn tap_offsets(&self) -> Vec<usize> {
        let wp = self.padded().wp;
        self.tap_list()
            .iter()
            .map(|&(ky, kx)| ky * wp + kx)
            .collect()
    }
}

/// `out (O x OH x OW) = [bias +] sum_t W_t shift_t(pad(x))`, x ReLU'd if
/// `relu_in`, finished as `finish` says; `scratch` holds `p.len + O * p.n`
/// floats.
#[allow(clippy::too_many_arguments)]
pub(super) fn forward(
    g: &Geometry,
    w: TapWeights,
    o: usize,
    x: &[f32],
    relu_in: bool,
    bias: Option<&[f32]>,
    (out, finish): (&mut [MaybeUninit<f32>], Finish),
    scratch: &mut [f32],
) {
    let (xp, grid) = scratch.split_at_mut(g.padded().len);
    g.pad_image(x, relu_in, xp);
    forward_padded(g, w, o, xp, bias, (out, finish), grid);
}

/// [`forward`] of an image already in the padded layout `xp` (`p.len`
/// floats, zero outside the image); `grid` holds `O * p.n` floats.
pub(super) fn forward_padded(
    g: &Geometry,
    w: TapWeights,
    o: usize,
    xp: &[f32],
    bias: Option<&[f32]>,
    (out, finish): (&mut [MaybeUninit<f32>], Finish),
    grid: &mut [f32],
) {
    let p = g.padded();
    for (oc, row) in grid.chunks_exact_mut(p.n).enumerate() {
        row.fill(bias.map_or(0.0, |b| b[oc]));
    }
    for (t, at) in g.tap_offsets().into_iter().enumerate() {
        let shifted = View::new(&xp[at..], p.hp * p.wp, 1);
        gemm_strided(grid, (p.n, 1), (o, p.n, g.c), true, w.tap(t), shifted);
    }
    g.output_from_grid(grid, out, finish);
}

/// The adjoint of [`forward`] without bias: `dx (C x H x W) = crop(sum_t
/// shift_t^T(W_t^T grid(dy)))`, dy ReLU'd if `relu_dy`, finished as
/// `finish` says; `scratch` holds `O * p.n + p.len` floats.
#[allow(clippy::too_many_arguments)]
pub(super) fn data_grad(
    g: &Geometry,
    w: TapWeights,
    o: usize,
    dy: &[f32],
    relu_dy: bool,
    (dx, finish): (&mut [MaybeUninit<f32>], Finish),
    scratch: &mut [f32],
) {
    let (grid, dxp) = scratch.split_at_mut(o * g.padded().n);
    data_grad_padded(g, w, o, dy, relu_dy, dxp, grid);
    g.image_from_padded(dxp, dx, finish);
}

/// [`data_grad`] into the padded layout: `dxp` (`p.len` floats) gets the
/// gradient of the padded image, padding included; `grid` holds `O * p.n`
/// floats.
pub(super) fn data_grad_padded(
    g: &Geometry,
    w: TapWeights,
    o: usize,
    dy: &[f32],
    relu_dy: bool,
    dxp: &mut [f32],
    grid: &mut [f32],
) {
    let p = g.padded();
    g.grid_from_output(dy, relu_dy, grid);
    dxp.fill(0.0);
    let dyv = View::new(grid, p.n, 1);
    for (t, at) in g.tap_offsets().into_iter().enumerate() {
        let dst = &mut dxp[at..];
        gemm_strided(dst, (p.hp * p.wp, 1), (g.c, p.n, o), true, w.tap_t(t), dyv);
    }
}

/// `dW_t += grid(dy) shift_t(pad(x))^T` for every tap, into `dw` laid out
/// as `layout` describes the weights (its `data` unused); x and dy ReLU'd
/// if asked; `scratch` holds `O * p.n + p.len` floats.
#[allow(clippy::too_many_arguments)]
pub(super) fn weight_grad(
    g: &Geometry,
    layout: (usize, usize, usize),
    o: usize,
    (x, relu_x): (&[f32], bool),
    (dy, relu_dy): (&[f32], bool),
    dw: &mut [f32],
    scratch: &mut [f32],
) {
    let (grid, xp) = scratch.split_at_mut(o * g.padded().n);
    g.pad_image(x, relu_x, xp);
    weight_grad_padded(g, layout, o, xp, (dy, relu_dy), dw, grid);
}

/// [`weight_grad`] of an image already in the padded layout `xp`; `grid`
/// holds `O * p.n` floats.
pub(super) fn weight_grad_padded(
    g: &Geometry,
    layout: (usize, usize, usize),
    o: usize,
    xp: &[f32],
    (dy, relu_dy): (&[f32], bool),
    dw: &mut [f32],
    grid: &mut [f32],
) {
    let (tap_step, rs, cs) = layout;
    let p = g.padded();
    g.grid_from_output(dy, relu_dy, grid);
    let dyv = View::new(grid, p.n, 1);
    for (t, at) in g.tap_offsets().into_iter().enumerate() {
        let shifted_t = View::new(&xp[at..], 1, p.hp * p.wp);
        gemm_strided(
            &mut dw[t * tap_step..],
            (rs, cs),
            (o, g.c, p.n),
            true,
            dyv,
            shifted_t,
        );
    }
}

impl Geometry {
    /// The taps that take part as runs of neighbours on one kernel row:
    /// (ky, first kx, count, index of the first in [`Geometry::tap_list`]).
    fn tap_runs(&self) -> Vec<(usize, usize, usize, usize)> {
        let mut runs: Vec<(usize, usize, usize, usize)> = Vec::new();
        for (t, (ky, kx)) in self.tap_list().into_iter().enumerate() {
            match runs.last_mut() {
                Some(run) if run.0 == ky && run.1 + run.2 == kx => run.2 += 1,
                _ => runs.push((ky, kx, 1, t)),
            }
        }
        runs
    }

    /// Floats of the channels-last padded image: Hp x Wp x C, plus `k`
    /// pixels of zeros so the last tap's view stays inside.
    fn channels_last_len(&self) -> usize {
        let p = self.padded();
        (p.hp * p.wp + self.k) * self.c
    }

    /// `img` (C x H x W) into the channels-last padded layout, pixel
    /// (y, x) channel c at `(y * Wp + x) * C + c`, ReLU'd if `relu_in`.
    fn pad_channels_last(&self, img: &[f32], relu_in: bool, xp: &mut [f32]) {
        let (p, c) = (self.padded(), self.c);
        xp.fill(0.0);
        for y in 0..self.h {
            let row = (y + self.pad) * p.wp + self.pad;
            let dst = &mut xp[row * c..(row + self.w) * c];
            for (ch, plane) in img.chunks_exact(self.h * self.w).enumerate() {
                let src = &plane[y * self.w..(y + 1) * self.w];
                for (d, &v) in dst[ch..].iter_mut().step_by(c).zip(src) {
                    *d = relu(v, relu_in);
                }
            }
        }
    }
}

/// The scratch [`weight_grad_tap_major`] needs for O outputs.
pub(super) fn tap_major_scratch(g: &Geometry, o: usize) -> usize {
    g.channels_last_len() + o * g.padded().n
}

/// `acc (O x T*C) += dW` of one image, tap-major: element (o, t * C + c).
/// With the image channels-last, the taps of a run on one kernel row read
/// one contiguous window per position, so each run is one gemm over
/// `count * C` inputs; the tap-by-tap [`weight_grad`] gives gemm a result
/// only O x C big, which it fills slowly. x and dy ReLU'd if asked;
/// `scratch` holds [`tap_major_scratch`] floats.
pub(super) fn weight_grad_tap_major(
    g: &Geometry,
    o: usize,
    (x, relu_x): (&[f32], bool),
    (dy, relu_dy): (&[f32], bool),
    acc: &mut [f32],
    scratch: &mut [f32],
) {
    let (p, c) = (g.padded(), g.c);
    let (xp, grid) = scratch.split_at_mut(g.channels_last_len());
    g.pad_channels_last(x, relu_x, xp);
    g.grid_from_output(dy, relu_dy, grid);
    let inputs = g.tap_list().len() * c;
    let dyv = View::new(grid, p.n, 1);
    for (ky, kx, count, first) in g.tap_runs() {
        let window = View::new(&xp[(ky * p.wp + kx) * c..], c, 1);
        let dst = &mut acc[first * c..];
        gemm_strided(dst, (inputs, 1), (o, count * c, p.n), true, dyv, window);
    }
}

/// Adds a tap-major weight gradient (O x T*C, element (o, t * C + c)) into
/// `dw` laid out as `layout` (tap_step, rs, cs) describes, like
/// [`weight_grad`]'s.
pub(super) fn add_tap_major(
    tap_major: &[f32],
    (c, taps): (usize, usize),
    (tap_step, rs, cs): (usize, usize, usize),
    dw: &mut [f32],
) {
    for (o, row) in tap_major.chunks_exact(taps * c).enumerate() {
        for (j, &v) in row.iter().enumerate() {
            let (t, ch) = (j / c, j % c);
            dw[t * tap_step + o * rs + ch * cs] += v;
        }
    }
}
