//! Space-to-depth and its adjoint, for strided layers: a stride-s
//! convolution with a k x k kernel (k a multiple of s) is a stride-1
//! convolution with a k/s x k/s kernel over the image cut into s x s
//! blocks, each block's pixels stacked as channels (the weights rearranged
//! alike). That runs on the column-free stride-1 kernels.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::Geometry;
use super::implicit;
use super::ops::{ConvOp, ConvTransposeOp};
use crate::models::kernels::{
    Finish, add_plane_sums, input_grad_by_image, layer_grads, relu, store_run, sum_chunks,
    with_scratch, written_in_full,
};
use crate::models::{contiguous_f32x3, fastmath};

/// (B, C, H, W) -> (B, C*s*s, HS, WS): channel `(c*s + dy)*s + dx` at (i, j)
/// holds pixel `(i*s + dy - pad, j*s + dx - pad)` of channel c (zero outside
/// the image), ReLU'd if `relu_input`.
#[derive(Debug, Clone, Copy)]
pub(super) struct SpaceToDepth {
    pub s: usize,
    pub pad: usize,
    pub hs: usize,
    pub ws: usize,
    pub relu_input: bool,
}

impl SpaceToDepth {
    /// The columns j of a block row whose pixel `j*s + dx - pad` lies in
    /// `0..w`.
    fn columns(&self, dx: usize, w: usize) -> std::ops::Range<usize> {
        let (s, p) = (self.s, self.pad);
        let lo = if dx >= p { 0 } else { (p - dx).div_ceil(s) }.min(self.ws);
        let hi = match w + p > dx {
            true => ((w + p - dx - 1) / s + 1).min(self.ws),
            false => 0,
        };
        lo..hi.max(lo)
    }

    /// Calls `f(block row start, pixels)` for every row of every block
    /// plane, `pixels` being `Some((image start, columns))` when the row
    /// comes from inside an image of `c` x `h` x `w`: the image start is
    /// the pixel of the first column, every s-th pixel from there.
    fn block_rows(
        &self,
        (c, h, w): (usize, usize, usize),
        mut f: impl FnMut(usize, Option<(usize, std::ops::Range<usize>)>),
    ) {
        let (s, p) = (self.s, self.pad);
        for ch in 0..c {
            for dy in 0..s {
                for dx in 0..s {
                    let plane = (ch * s + dy) * s + dx;
                    let cols = self.columns(dx, w);
                    for i in 0..self.hs {
                        let row = (plane * self.hs + i) * self.ws;
                        let y = (i * s + dy).checked_sub(p).filter(|&y| y < h);
                        match y {
                            Some(y) if !cols.is_empty() => {
                                let x = cols.start * s + dx - p;
                                f(row, Some(((ch * h + y) * w + x, cols.clone())));
                            }
                            _ => f(row, None),
                        }
                    }
                }
            }
        }
    }

    /// Image (C x H x W) -> blocks, zero where no pixel maps.
    pub(super) fn gather(
        &self,
        chw: (usize, usize, usize),
        img: &[f32],
        relu_in: bool,
        blocks: &mut [f32],
    ) {
        if self.s == 2 && self.covers(chw.1, chw.2) {
            return self.gather_stride_two(chw, img, relu_in, blocks);
        }
        let (s, ws) = (self.s, self.ws);
        self.block_rows(chw, |row, pixels| {
            let dst = &mut blocks[row..row + ws];
            let Some((x0, cols)) = pixels else {
                dst.fill(0.0);
                return;
            };
            dst[..cols.start].fill(0.0);
            dst[cols.end..].fill(0.0);
            for (j, d) in dst[cols].iter_mut().enumerate() {
                *d = relu(img[x0 + j * s], relu_in);
            }
        });
    }

    /// [`Self::gather`] into the stride-1 kernels' padded layout of the
    /// block image (see `implicit`): the block geometry has no padding, so
    /// that is the blocks followed by zeros.
    pub(super) fn gather_padded(
        &self,
        chw: (usize, usize, usize),
        img: &[f32],
        relu_in: bool,
        xp: &mut [f32],
    ) {
        let (blocks, slack) = xp.split_at_mut(chw.0 * self.s * self.s * self.hs * self.ws);
        self.gather(chw, img, relu_in, blocks);
        slack.fill(0.0);
    }

    /// Whether every pixel of an h x w image lies in some block.
    fn covers(&self, h: usize, w: usize) -> bool {
        (h + self.pad).div_ceil(self.s) <= self.hs && (w + self.pad).div_ceil(self.s) <= self.ws
    }

    /// Blocks -> image (C x H x W), zero where no block value maps, every
    /// value finished as `finish` says.
    pub(super) fn scatter(
        &self,
        chw: (usize, usize, usize),
        blocks: &[f32],
        img: &mut [MaybeUninit<f32>],
        finish: Finish,
    ) {
        let (_, h, w) = chw;
        if self.s == 2 && self.covers(h, w) {
            return self.scatter_stride_two(chw, blocks, img, finish);
        }
        let s = self.s;
        for (r, row) in img.chunks_exact_mut(w).enumerate() {
            let run = finish.run(r / h, r * w, w);
            for (j, d) in row.iter_mut().enumerate() {
                d.write(run.apply(j, 0.0));
            }
        }
        self.block_rows(chw, |row, pixels| {
            if let Some((x0, cols)) = pixels {
                for (j, &v) in blocks[row + cols.start..row + cols.end].iter().enumerate() {
                    let at = x0 + j * s;
                    img[at].write(finish.run(at / (h * w), at, 1).apply(0, v));
                }
            }
        });
    }

    /// [`Self::gather`] for stride 2 when the blocks cover the image: each
    /// image row splits into one row of the dx = 0 plane and one of the
    /// dx = 1 plane (see [`Self::scatter_stride_two`]); every block value
    /// is written once, padding included.
    fn gather_stride_two(
        &self,
        chw: (usize, usize, usize),
        img: &[f32],
        relu_in: bool,
        blocks: &mut [f32],
    ) {
        gather_stride_two(*self, chw, img, relu_in, blocks);
    }

    /// [`Self::scatter`] for stride 2 when the blocks cover the image: each
    /// image row interleaves one row of the dx = 0 plane and one of the
    /// dx = 1 plane (into a row buffer, in pairs so the stores vectorise),
    /// then is finished into place.
    fn scatter_stride_two(
        &self,
        chw: (usize, usize, usize),
        blocks: &[f32],
        img: &mut [MaybeUninit<f32>],
        finish: Finish,
    ) {
        let mut row = vec![0f32; chw.2];
        scatter_stride_two(*self, chw, blocks, img, finish, &mut row);
    }
}

fastmath::simd_kernel! {
    /// See [`SpaceToDepth::gather_stride_two`].
    fn gather_stride_two(
        layout: SpaceToDepth,
        chw: (usize, usize, usize),
        img: &[f32],
        relu_in: bool,
        blocks: &mut [f32],
    ) {
        let (c, h, w) = chw;
        let (p, hs, ws) = (layout.pad, layout.hs, layout.ws);
        // Pixel x = 2m + e goes to plane dx = (e + p) % 2, column
        // m + (e + p) / 2.
        let (dx_even, skip_even, skip_odd) = (p % 2, p / 2, p.div_ceil(2));
        let (n_even, n_odd) = (w.div_ceil(2), w / 2);
        for ch in 0..c {
            for dy in 0..2 {
                for i in 0..hs {
                    let start = |dx: usize| (((ch * 2 + dy) * 2 + dx) * hs + i) * ws;
                    let (lo, hi) = (start(0), start(1));
                    // The dx = 0 row lies before the dx = 1 row.
                    let (first, second) = blocks.split_at_mut(hi);
                    let (row0, row1) = (&mut first[lo..lo + ws], &mut second[..ws]);
                    let y = (2 * i + dy).checked_sub(p).filter(|&y| y < h);
                    let Some(y) = y else {
                        row0.fill(0.0);
                        row1.fill(0.0);
                        continue;
                    };
                    let (even, odd) = match dx_even {
                        0 => (row0, row1),
                        _ => (row1, row0),
                    };
                    even[..skip_even].fill(0.0);
                    even[skip_even + n_even..].fill(0.0);
                    odd[..skip_odd].fill(0.0);
                    odd[skip_odd + n_odd..].fill(0.0);
                    let src = &img[(ch * h + y) * w..(ch * h + y + 1) * w];
                    let (even, odd) = (&mut even[skip_even..], &mut odd[skip_odd..]);
                    match relu_in {
                        true => split_pairs(src, even, odd, |v| v.max(0.0)),
                        false => split_pairs(src, even, odd, |v| v),
                    }
                }
            }
        }
    }
}

fastmath::simd_kernel! {
    /// See [`SpaceToDepth::scatter_stride_two`]; `row` holds W floats.
    fn scatter_stride_two(
        layout: SpaceToDepth,
        chw: (usize, usize, usize),
        blocks: &[f32],
        img: &mut [MaybeUninit<f32>],
        finish: Finish,
        row: &mut [f32],
    ) {
        let (c, h, w) = chw;
        let (p, hs, ws) = (layout.pad, layout.hs, layout.ws);
        // Pixel x = 2m + e comes from plane dx = (e + p) % 2, column
        // m + (e + p) / 2.
        let (dx_even, skip_even) = (p % 2, p / 2);
        let (dx_odd, skip_odd) = ((p + 1) % 2, p.div_ceil(2));
        for ch in 0..c {
            for y in 0..h {
                let (dy, i) = ((y + p) % 2, (y + p) / 2);
                let block_row = |dx: usize, skip: usize| {
                    let plane = (ch * 2 + dy) * 2 + dx;
                    &blocks[(plane * hs + i) * ws + skip..(plane * hs + i + 1) * ws]
                };
                let (even, odd) = (block_row(dx_even, skip_even), block_row(dx_odd, skip_odd));
                let mut pairs = row.chunks_exact_mut(2);
                for ((pair, &a), &b) in (&mut pairs).zip(even).zip(odd) {
                    pair[0] = a;
                    pair[1] = b;
                }
                if let [last] = pairs.into_remainder() {
                    *last = even[w / 2];
                }
                let at = (ch * h + y) * w;
                store_run(&mut img[at..at + w], row, finish.run(ch, at, w));
            }
        }
    }
}

/// `even[m] = f(row[2 m])`, `odd[m] = f(row[2 m + 1])`.
#[inline(always)]
fn split_pairs(row: &[f32], even: &mut [f32], odd: &mut [f32], f: impl Fn(f32) -> f32) {
    let mut pairs = row.chunks_exact(2);
    for ((pair, e), o) in (&mut pairs).zip(even.iter_mut()).zip(odd.iter_mut()) {
        *e = f(pair[0]);
        *o = f(pair[1]);
    }
    if let [last] = pairs.remainder() {
        even[row.len() / 2] = f(*last);
    }
}

/// A strided convolution as one op: per image, the input's blocks (kept in
/// a scratch buffer, never a tensor) convolved by the stride-1 kernels of
/// `g` (the geometry over blocks). (x (B, C, H, W), w_t (C*s*s*T, O), bias
/// (O)) -> (B, O, OH, OW).
#[derive(Debug, Clone, Copy)]
pub(super) struct BlockConv {
    pub blocks: SpaceToDepth,
    pub g: Geometry,
}

/// The image shape of a contiguous (B, C, H, W) layout, and one image's length.
fn image(l: &Layout) -> candle_core::Result<((usize, usize, usize), usize)> {
    let (_, c, h, w) = l.shape().dims4()?;
    Ok(((c, h, w), c * h * w))
}

impl CustomOp3 for BlockConv {
    fn name(&self) -> &'static str {
        "conv2d-blocks"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.g;
        let op = "strided conv";
        let (x, w_t, bias) = contiguous_f32x3((s1, l1), (s2, l2), (s3, l3), op)?;
        let ((chw, len), o) = (image(l1)?, bias.len());
        let b = l1.dims()[0];
        let p = g.padded();
        let w = ConvOp::taps(w_t, g.k * g.k, o);
        let out_len = o * g.out_h() * g.out_w();
        let out = written_in_full(b * out_len, |out| {
            out.par_chunks_mut(out_len)
                .zip(x.par_chunks(len))
                .for_each(|(ob, xb)| {
                    with_scratch(p.len + o * p.n, |buf| {
                        let (xp, grid) = buf.split_at_mut(p.len);
                        self.blocks
                            .gather_padded(chw, xb, self.blocks.relu_input, xp);
                        let out = (ob, Finish::Store);
                        implicit::forward_padded(&g, w, o, xp, Some(bias), out, grid)
                    })
                })
        });
        Ok((
            CpuStorage::F32(out),
            Shape::from((b, o, g.out_h(), g.out_w())),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w_t: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (ct, o) = w_t.dims2()?;
        layer_grads(
            x,
            ((ct, o), o),
            || x.apply_op3_no_bwd(w_t, &grad, &BlockConvGrad(*self, Part::Data)),
            || x.apply_op3_no_bwd(w_t, &grad, &BlockConvGrad(*self, Part::Weight)),
        )
    }
}

#[derive(Debug, Clone, Copy)]
enum Part {
    /// The input gradient.
    Data,
    /// [dw_t | db], flat.
    Weight,
}

/// (x, w_t, dy) -> a gradient of [`BlockConv`].
struct BlockConvGrad(BlockConv, Part);

impl CustomOp3 for BlockConvGrad {
    fn name(&self) -> &'static str {
        "conv2d-blocks-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let BlockConv { blocks: layout, g } = self.0;
        let op = "strided conv gradient";
        let (x, w_t, dy) = contiguous_f32x3((s1, l1), (s2, l2), (s3, l3), op)?;
        let (chw, len) = image(l1)?;
        let (b, (ct, o)) = (l1.dims()[0], l2.shape().dims2()?);
        let (blocks, p) = (g.c * g.h * g.w, g.padded());
        let out_len = o * g.out_h() * g.out_w();
        match self.1 {
            Part::Data => {
                let w = ConvOp::taps(w_t, g.k * g.k, o);
                let dx = input_grad_by_image(
                    (x, len),
                    (dy, out_len),
                    layout.relu_input,
                    p.len + o * p.n,
                    |(dxb, finish), dyb, buf| {
                        let (dxp, grid) = buf.split_at_mut(p.len);
                        implicit::data_grad_padded(&g, w, o, dyb, false, dxp, grid);
                        layout.scatter(chw, &dxp[..blocks], dxb, finish);
                    },
                );
                Ok((CpuStorage::F32(dx), l1.shape().clone()))
            }
            Part::Weight => {
                let total = sum_chunks(b, ct * o + o, |images, acc| {
                    let (dw, db) = acc.split_at_mut(ct * o);
                    for bi in images {
                        let dyb = &dy[bi * out_len..(bi + 1) * out_len];
                        with_scratch(p.len + o * p.n, |buf| {
                            let (xp, grid) = buf.split_at_mut(p.len);
                            let xb = &x[bi * len..(bi + 1) * len];
                            layout.gather_padded(chw, xb, layout.relu_input, xp);
                            let taps = (o, 1, g.k * g.k * o);
                            implicit::weight_grad_padded(&g, taps, o, xp, (dyb, false), dw, grid);
                        });
                        add_plane_sums(db, dyb, out_len / o);
                    }
                });
                Ok((CpuStorage::F32(total), Shape::from(ct * o + o)))
            }
        }
    }
}

/// A strided transposed convolution as one op, the adjoint of
/// [`BlockConv`]: per image, the stride-1 adjoint kernels of `g` give the
/// output's blocks (in a scratch buffer), put in place. (x (B, Cin, h, w),
/// w (Cin, Cout*s*s*T), bias (Cout)) -> (B, Cout, H, W); `relu_input`
/// applies to x.
#[derive(Debug, Clone, Copy)]
pub(super) struct BlockConvTranspose {
    pub blocks: SpaceToDepth,
    pub g: Geometry,
    /// The output image: Cout, H, W.
    pub out: (usize, usize, usize),
    pub relu_input: bool,
}

impl CustomOp3 for BlockConvTranspose {
    fn name(&self) -> &'static str {
        "conv-transpose2d-blocks"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.g;
        let op = "strided conv_transpose";
        let (x, w, bias) = contiguous_f32x3((s1, l1), (s2, l2), (s3, l3), op)?;
        let ((c_in, ..), len) = image(l1)?;
        let (b, (_, ct)) = (l1.dims()[0], l2.shape().dims2()?);
        let (blocks, p) = (g.c * g.h * g.w, g.padded());
        let w = ConvTransposeOp::taps(w, g.k * g.k, ct);
        let (c_out, h, wd) = self.out;
        let out = written_in_full(b * c_out * h * wd, |out| {
            out.par_chunks_mut(c_out * h * wd)
                .zip(x.par_chunks(len))
                .for_each(|(ob, xb)| {
                    with_scratch(p.len + c_in * p.n, |buf| {
                        let (dxp, grid) = buf.split_at_mut(p.len);
                        implicit::data_grad_padded(&g, w, c_in, xb, self.relu_input, dxp, grid);
                        let finish = Finish::Bias(bias);
                        self.blocks.scatter(self.out, &dxp[..blocks], ob, finish);
                    });
                })
        });
        Ok((CpuStorage::F32(out), Shape::from((b, c_out, h, wd))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        layer_grads(
            x,
            (w.dims2()?, self.out.0),
            || x.apply_op3_no_bwd(w, &grad, &BlockConvTransposeGrad(*self, Part::Data)),
            || x.apply_op3_no_bwd(w, &grad, &BlockConvTransposeGrad(*self, Part::Weight)),
        )
    }
}

/// (x, w, dy) -> a gradient of [`BlockConvTranspose`].
struct BlockConvTransposeGrad(BlockConvTranspose, Part);

impl CustomOp3 for BlockConvTransposeGrad {
    fn name(&self) -> &'static str {
        "conv-transpose2d-blocks-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let BlockConvTranspose {
            blocks: layout,
            g,
            out,
            relu_input,
        } = self.0;
        let op = "strided conv_transpose gradient";
        let (x, w, dy) = contiguous_f32x3((s1, l1), (s2, l2), (s3, l3), op)?;
        let ((c_in, ..), len) = image(l1)?;
        let (b, (_, ct)) = (l1.dims()[0], l2.shape().dims2()?);
        let p = g.padded();
        let out_len = out.0 * out.1 * out.2;
        match self.1 {
            Part::Data => {
                let w = ConvTransposeOp::taps(w, g.k * g.k, ct);
                let dx = input_grad_by_image(
                    (x, len),
                    (dy, out_len),
                    relu_input,
                    p.len + c_in * p.n,
                    |dx, dyb, buf| {
                        let (xp, grid) = buf.split_at_mut(p.len);
                        layout.gather_padded(out, dyb, false, xp);
                        implicit::forward_padded(&g, w, c_in, xp, None, dx, grid);
                    },
                );
                Ok((CpuStorage::F32(dx), l1.shape().clone()))
            }
            Part::Weight => {
                let taps = g.k * g.k;
                let total = sum_chunks(b, c_in * ct + out.0, |images, acc| {
                    let (dw, db) = acc.split_at_mut(c_in * ct);
                    // Tap by tap a C_in x C' block with C_in contiguous, the
                    // layout gemm writes fastest (w's own layout puts the
                    // taps innermost), then into w's layout once.
                    let mut tap_major = vec![0f32; c_in * ct];
                    for bi in images {
                        let dyb = &dy[bi * out_len..(bi + 1) * out_len];
                        with_scratch(p.len + c_in * p.n, |buf| {
                            let (xp, grid) = buf.split_at_mut(p.len);
                            layout.gather_padded(out, dyb, false, xp);
                            let xb = &x[bi * len..(bi + 1) * len];
                            let dy = (xb, relu_input);
                            let tm_layout = (c_in * g.c, 1, c_in);
                            let tm = &mut tap_major;
                            implicit::weight_grad_padded(&g, tm_layout, c_in, xp, dy, tm, grid);
                        });
                        add_plane_sums(db, dyb, out.1 * out.2);
                    }
                    // (t, i, c) at (t * C' + c) * C_in + i -> (i, c * T + t).
                    for (t, block) in tap_major.chunks_exact(c_in * g.c).enumerate() {
                        for (c, column) in block.chunks_exact(c_in).enumerate() {
                            for (i, &v) in column.iter().enumerate() {
                                dw[i * ct + c * taps + t] += v;
                            }
                        }
                    }
                });
                Ok((CpuStorage::F32(total), Shape::from(c_in * ct + out.0)))
            }
        }
    }
}
