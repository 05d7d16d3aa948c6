//! The CPU kernels behind [`super::Conv`] and [`super::ConvTranspose`]:
//! whole layers (bias and an optional ReLU of the input fused in) as candle
//! custom ops, forward and backward, on contiguous NCHW tensors.
//!
//! Columns are in "Caffe" layout: one row per (input channel, kernel tap),
//! one column per output position, so each row is a shifted (and, for a
//! stride, subsampled) copy of an input plane, filled with slice copies.
//!
//! - Forward convolution: one gemm over the whole batch, `Y (B*L, O) =
//!   cols^T W^T`, then one pass that transposes Y into NCHW and adds the
//!   bias. The gemm sees the same shapes and strides as candle's matmul did
//!   before these kernels (the output channels along its contiguous
//!   dimension), so a position's value does not depend on how many other
//!   positions or images are computed with it: what exact incremental
//!   sampling needs.
//! - Stride-1 layers with one channel on a side hand over to
//!   [`super::direct`], those with a kernel wider than 1 and 4 or more
//!   input channels to the column-free kernels of [`super::implicit`],
//!   image by image (which also keeps a position's value independent of
//!   the other positions).
//! - Everything else works image by image in parallel, each image with a
//!   single-threaded gemm into buffers that stay allocated per thread.
//!   Weight gradients sum over fixed chunks of images, then over chunks in
//!   order, so results do not depend on the thread count.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::Geometry;
use super::direct;
use super::implicit::{self, TapWeights};
use crate::models::kernels::{
    Finish, View, add_bias, add_plane_sums, gemm, input_grad_by_image, layer_grads, relu,
    relu_backward, relu_copy, sum_chunks, with_scratch, written_in_full,
};
use crate::models::{contiguous_f32, contiguous_f32x3};

impl Geometry {
    fn out_len(&self) -> usize {
        self.out_h() * self.out_w()
    }

    fn plane(&self) -> usize {
        self.h * self.w
    }

    /// The kept taps as (ky, kx), in column-row order.
    pub(super) fn tap_list(&self) -> Vec<(usize, usize)> {
        (0..self.k * self.k)
            .filter(|t| self.taps >> t & 1 == 1)
            .map(|t| (t / self.k, t % self.k))
            .collect()
    }

    /// The output columns `lo..hi` whose tap `kx` reads inside the row.
    fn valid_columns(&self, kx: usize) -> (usize, usize) {
        let (s, p, ow) = (self.stride, self.pad, self.out_w());
        let lo = if kx >= p { 0 } else { (p - kx).div_ceil(s) }.min(ow);
        let hi = match self.w + p > kx {
            true => ((self.w + p - kx - 1) / s + 1).min(ow),
            false => 0,
        };
        (lo, hi.max(lo))
    }

    /// The input row tap `ky` reads for output row `oy`, if inside.
    fn input_row(&self, oy: usize, ky: usize) -> Option<usize> {
        (oy * self.stride + ky)
            .checked_sub(self.pad)
            .filter(|&iy| iy < self.h)
    }

    /// One column row: what tap (ky, kx) reads from `plane` (H x W) at
    /// every output position, zero outside, ReLU'd if `relu`.
    fn fill_row(&self, plane: &[f32], (ky, kx): (usize, usize), relu_in: bool, dst: &mut [f32]) {
        let (ow, s) = (self.out_w(), self.stride);
        let (lo, hi) = self.valid_columns(kx);
        for (oy, d) in dst.chunks_exact_mut(ow).enumerate() {
            let Some(iy) = self.input_row(oy, ky) else {
                d.fill(0.0);
                continue;
            };
            d[..lo].fill(0.0);
            d[hi..].fill(0.0);
            if lo == hi {
                continue;
            }
            let src = &plane[iy * self.w..(iy + 1) * self.w];
            let x0 = lo * s + kx - self.pad;
            if s == 1 {
                for (v, &x) in d[lo..hi].iter_mut().zip(&src[x0..x0 + hi - lo]) {
                    *v = relu(x, relu_in);
                }
            } else {
                for (j, v) in d[lo..hi].iter_mut().enumerate() {
                    *v = relu(src[x0 + j * s], relu_in);
                }
            }
        }
    }

    /// The adjoint of [`Geometry::fill_row`]: adds a column row into `plane`.
    fn add_row(&self, src: &[f32], (ky, kx): (usize, usize), plane: &mut [f32]) {
        let (ow, s) = (self.out_w(), self.stride);
        let (lo, hi) = self.valid_columns(kx);
        if lo == hi {
            return;
        }
        for (oy, r) in src.chunks_exact(ow).enumerate() {
            let Some(iy) = self.input_row(oy, ky) else {
                continue;
            };
            let dst = &mut plane[iy * self.w..(iy + 1) * self.w];
            let x0 = lo * s + kx - self.pad;
            if s == 1 {
                for (d, &v) in dst[x0..x0 + hi - lo].iter_mut().zip(&r[lo..hi]) {
                    *d += v;
                }
            } else {
                for (j, &v) in r[lo..hi].iter().enumerate() {
                    dst[x0 + j * s] += v;
                }
            }
        }
    }

    /// The columns (C*T x L) of one image (C x H x W).
    fn im2col(&self, img: &[f32], taps: &[(usize, usize)], relu_in: bool, cols: &mut [f32]) {
        let l = self.out_len();
        for (r, row) in cols.chunks_exact_mut(l).enumerate() {
            let c = r / taps.len();
            let plane = &img[c * self.plane()..(c + 1) * self.plane()];
            self.fill_row(plane, taps[r % taps.len()], relu_in, row);
        }
    }

    /// Columns (C*T x L) summed into one image (C x H x W), zeroed first.
    fn col2im(&self, cols: &[f32], taps: &[(usize, usize)], img: &mut [f32]) {
        img.fill(0.0);
        let l = self.out_len();
        for (r, row) in cols.chunks_exact(l).enumerate() {
            let c = r / taps.len();
            let plane = &mut img[c * self.plane()..(c + 1) * self.plane()];
            self.add_row(row, taps[r % taps.len()], plane);
        }
    }
}

fn check_len(data: &[f32], len: usize, what: &str) -> candle_core::Result<()> {
    if data.len() != len {
        candle_core::bail!("{what}: {} values where {len} were expected", data.len());
    }
    Ok(())
}

/// A convolution: (x (B, C, H, W), w_t (C*T, O), bias (O)) -> (B, O, OH, OW),
/// of `relu(x)` when `relu_input`.
#[derive(Debug, Clone, Copy)]
pub(super) struct ConvOp {
    pub g: Geometry,
    pub relu_input: bool,
}

impl CustomOp3 for ConvOp {
    fn name(&self) -> &'static str {
        "conv2d-cols"
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
        let (x, w_t, bias) = contiguous_f32x3((s1, l1), (s2, l2), (s3, l3), "conv")?;
        let (b, o) = (l1.dims()[0], bias.len());
        let (taps, l) = (g.tap_list(), g.out_len());
        let (ct, n) = (g.c * taps.len(), b * l);
        check_len(x, b * g.c * g.plane(), "conv input")?;
        check_len(w_t, ct * o, "conv weight")?;
        let shape = Shape::from((b, o, g.out_h(), g.out_w()));
        if g.direct(o) || g.implicit() {
            let out = written_in_full(b * o * l, |out| self.stride_one(x, w_t, bias, out));
            return Ok((CpuStorage::F32(out), shape));
        }
        let mut out = vec![0f32; b * o * l];
        with_scratch(ct * n + n * o, |buf| {
            let (cols, y) = buf.split_at_mut(ct * n);
            if ct > 0 {
                cols.par_chunks_mut(n).enumerate().for_each(|(r, row)| {
                    let c = r / taps.len();
                    for (bi, d) in row.chunks_exact_mut(l).enumerate() {
                        let plane = &x[(bi * g.c + c) * g.plane()..][..g.plane()];
                        g.fill_row(plane, taps[r % taps.len()], self.relu_input, d);
                    }
                });
            }
            let a = View::new(cols, 1, n);
            let wv = View::new(w_t, o, 1);
            gemm(y, (n, o, ct), false, a, wv, true);
            let y = &*y;
            out.par_chunks_mut(o * l)
                .enumerate()
                .for_each(|(bi, image)| {
                    let yb = &y[bi * l * o..(bi + 1) * l * o];
                    for (oc, plane) in image.chunks_exact_mut(l).enumerate() {
                        for (p, v) in plane.iter_mut().enumerate() {
                            *v = yb[p * o + oc] + bias[oc];
                        }
                    }
                });
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
            || x.apply_op3_no_bwd(w_t, &grad, &ConvDataGrad(*self)),
            || x.apply_op2_no_bwd(&grad, &ConvWeightGrad(*self)),
        )
    }
}

impl ConvOp {
    /// Tap t's O x C matrix inside w_t (C*T x O).
    pub(super) fn taps(w_t: &[f32], t: usize, o: usize) -> TapWeights<'_> {
        TapWeights {
            data: w_t,
            tap_step: o,
            rs: 1,
            cs: t * o,
        }
    }

    /// The stride-1 forward, image by image: the direct kernels for one
    /// channel on a side, else the implicit ones.
    fn stride_one(&self, x: &[f32], w_t: &[f32], bias: &[f32], out: &mut [MaybeUninit<f32>]) {
        let (g, o) = (self.g, bias.len());
        let (w, p) = (Self::taps(w_t, g.tap_list().len(), o), g.padded());
        let offsets = g.tap_offsets();
        out.par_chunks_mut(o * g.out_len())
            .zip(x.par_chunks(g.c * g.plane()))
            .for_each(|(ob, xb)| {
                with_scratch(p.len + o * p.n, |buf| {
                    if !g.direct(o) {
                        let out = (ob, Finish::Store);
                        return implicit::forward(
                            &g,
                            w,
                            o,
                            xb,
                            self.relu_input,
                            Some(bias),
                            out,
                            buf,
                        );
                    }
                    let (xp, grid) = buf.split_at_mut(p.len);
                    g.pad_image(xb, self.relu_input, xp);
                    direct::forward(&g, w, &offsets, xp, Some(bias), grid);
                    g.output_from_grid(grid, ob, Finish::Store);
                })
            });
    }
}

/// (x, w_t, dy) -> dx of [`ConvOp`].
struct ConvDataGrad(ConvOp);

impl CustomOp3 for ConvDataGrad {
    fn name(&self) -> &'static str {
        "conv2d-cols-data-grad"
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
        let ConvOp { g, relu_input } = self.0;
        let (x, w_t, dy) = contiguous_f32x3((s1, l1), (s2, l2), (s3, l3), "conv")?;
        let (taps, l) = (g.tap_list(), g.out_len());
        let ct = g.c * taps.len();
        let o = l2.dims()[1];
        let image = g.c * g.plane();
        if g.direct(o) || g.implicit() {
            let (p, w) = (g.padded(), ConvOp::taps(w_t, taps.len(), o));
            let offsets = g.tap_offsets();
            let dx = input_grad_by_image(
                (x, image),
                (dy, o * l),
                relu_input,
                o * p.n + p.len,
                |dx, dyb, buf| {
                    if !g.direct(o) {
                        return implicit::data_grad(&g, w, o, dyb, false, dx, buf);
                    }
                    let (grid, dxp) = buf.split_at_mut(o * p.n);
                    g.grid_from_output(dyb, false, grid);
                    direct::data_grad(&g, w, &offsets, grid, dxp);
                    g.image_from_padded(dxp, dx.0, dx.1);
                },
            );
            return Ok((CpuStorage::F32(dx), l1.shape().clone()));
        }
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(image)
            .zip(x.par_chunks(image).zip(dy.par_chunks(o * l)))
            .for_each(|(dxb, (xb, dyb))| {
                with_scratch(ct * l, |cols| {
                    let a = View::new(w_t, o, 1);
                    let b = View::new(dyb, l, 1);
                    gemm(cols, (ct, l, o), false, a, b, false);
                    g.col2im(cols, &taps, dxb);
                });
                if relu_input {
                    relu_backward(dxb, xb);
                }
            });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// (x, dy) -> [dw_t (C*T x O) | db (O)] of [`ConvOp`], flat.
struct ConvWeightGrad(ConvOp);

impl CustomOp2 for ConvWeightGrad {
    fn name(&self) -> &'static str {
        "conv2d-cols-weight-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let ConvOp { g, relu_input } = self.0;
        let (x, dy) = (
            contiguous_f32(s1, l1, "conv")?,
            contiguous_f32(s2, l2, "conv")?,
        );
        let (b, o) = (l1.dims()[0], l2.dims()[1]);
        let (taps, l) = (g.tap_list(), g.out_len());
        let ct = g.c * taps.len();
        let image = g.c * g.plane();
        let offsets = g.tap_offsets();
        let total = sum_chunks(b, ct * o + o, |images, acc| {
            let (dw, db) = acc.split_at_mut(ct * o);
            if g.direct(o) {
                let p = g.padded();
                for bi in images {
                    let dyb = &dy[bi * o * l..(bi + 1) * o * l];
                    let xb = &x[bi * image..(bi + 1) * image];
                    with_scratch(p.len + o * p.n, |buf| {
                        let (xp, grid) = buf.split_at_mut(p.len);
                        g.pad_image(xb, relu_input, xp);
                        g.grid_from_output(dyb, false, grid);
                        let layout = (o, 1, taps.len() * o);
                        direct::weight_grad(&g, layout, &offsets, xp, grid, dw);
                    });
                    add_plane_sums(db, dyb, l);
                }
                return;
            }
            if g.implicit() {
                // Tap-major over the chunk, then into w_t's layout once.
                let t_count = taps.len();
                let mut tap_major = vec![0f32; o * ct];
                for bi in images {
                    let dyb = &dy[bi * o * l..(bi + 1) * o * l];
                    let xb = (&x[bi * image..(bi + 1) * image], relu_input);
                    with_scratch(implicit::tap_major_scratch(&g, o), |buf| {
                        implicit::weight_grad_tap_major(
                            &g,
                            o,
                            xb,
                            (dyb, false),
                            &mut tap_major,
                            buf,
                        )
                    });
                    add_plane_sums(db, dyb, l);
                }
                let layout = (o, 1, t_count * o);
                implicit::add_tap_major(&tap_major, (g.c, t_count), layout, dw);
                return;
            }
            for bi in images {
                let dyb = &dy[bi * o * l..(bi + 1) * o * l];
                let xb = &x[bi * image..(bi + 1) * image];
                with_scratch(ct * l, |cols| {
                    g.im2col(xb, &taps, relu_input, cols);
                    let a = View::new(cols, l, 1);
                    let bv = View::new(dyb, 1, l);
                    gemm(dw, (ct, o, l), true, a, bv, false);
                });
                add_plane_sums(db, dyb, l);
            }
        });
        Ok((CpuStorage::F32(total), Shape::from(ct * o + o)))
    }
}

/// A transposed convolution, the adjoint of the convolution `g` describes
/// (`g.c` = its output channels): (x (B, Cin, h, w), w (Cin, Cout*k*k),
/// bias (Cout)) -> (B, Cout, H, W), of `relu(x)` when `relu_input`.
#[derive(Debug, Clone, Copy)]
pub(super) struct ConvTransposeOp {
    pub g: Geometry,
    pub relu_input: bool,
}

impl CustomOp3 for ConvTransposeOp {
    fn name(&self) -> &'static str {
        "conv-transpose2d-cols"
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
        let (x, w, bias) = contiguous_f32x3((s1, l1), (s2, l2), (s3, l3), "conv_transpose")?;
        let (b, c_in) = (l1.dims()[0], l1.dims()[1]);
        let (taps, l) = (g.tap_list(), g.out_len());
        let ct = g.c * taps.len();
        check_len(x, b * c_in * l, "conv_transpose input")?;
        check_len(w, c_in * ct, "conv_transpose weight")?;
        let image = g.c * g.plane();
        if g.implicit() {
            let (p, w) = (g.padded(), ConvTransposeOp::taps(w, taps.len(), ct));
            let out = written_in_full(b * image, |out| {
                out.par_chunks_mut(image)
                    .zip(x.par_chunks(c_in * l))
                    .for_each(|(ob, xb)| {
                        with_scratch(c_in * p.n + p.len, |buf| {
                            let out = (ob, Finish::Bias(bias));
                            implicit::data_grad(&g, w, c_in, xb, self.relu_input, out, buf)
                        });
                    })
            });
            return Ok((CpuStorage::F32(out), Shape::from((b, g.c, g.h, g.w))));
        }
        let mut out = vec![0f32; b * image];
        out.par_chunks_mut(image)
            .zip(x.par_chunks(c_in * l))
            .for_each(|(ob, xb)| {
                with_scratch(ct * l + c_in * l, |buf| {
                    let (cols, xr) = buf.split_at_mut(ct * l);
                    relu_copy(xr, xb, self.relu_input);
                    let a = View::new(w, 1, ct);
                    let bv = View::new(xr, l, 1);
                    gemm(cols, (ct, l, c_in), false, a, bv, false);
                    g.col2im(cols, &taps, ob);
                });
                add_bias(ob, bias, g.plane());
            });
        Ok((CpuStorage::F32(out), Shape::from((b, g.c, g.h, g.w))))
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
            (w.dims2()?, self.g.c),
            || x.apply_op3_no_bwd(w, &grad, &ConvTransposeDataGrad(*self)),
            || x.apply_op2_no_bwd(&grad, &ConvTransposeWeightGrad(*self)),
        )
    }
}

impl ConvTransposeOp {
    /// Tap t's Cin x C matrix inside w (Cin x C*T).
    pub(super) fn taps(w: &[f32], t: usize, ct: usize) -> TapWeights<'_> {
        TapWeights {
            data: w,
            tap_step: 1,
            rs: ct,
            cs: t,
        }
    }
}

/// (x, w, dy) -> dx of [`ConvTransposeOp`]: the convolution of dy.
struct ConvTransposeDataGrad(ConvTransposeOp);

impl CustomOp3 for ConvTransposeDataGrad {
    fn name(&self) -> &'static str {
        "conv-transpose2d-cols-data-grad"
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
        let ConvTransposeOp { g, relu_input } = self.0;
        let (x, w, dy) = contiguous_f32x3((s1, l1), (s2, l2), (s3, l3), "conv_transpose")?;
        let c_in = l1.dims()[1];
        let (taps, l) = (g.tap_list(), g.out_len());
        let ct = g.c * taps.len();
        let image = g.c * g.plane();
        if g.implicit() {
            let (p, w) = (g.padded(), ConvTransposeOp::taps(w, taps.len(), ct));
            let dx = input_grad_by_image(
                (x, c_in * l),
                (dy, image),
                relu_input,
                p.len + c_in * p.n,
                |dx, dyb, buf| implicit::forward(&g, w, c_in, dyb, false, None, dx, buf),
            );
            return Ok((CpuStorage::F32(dx), l1.shape().clone()));
        }
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(c_in * l)
            .zip(x.par_chunks(c_in * l).zip(dy.par_chunks(image)))
            .for_each(|(dxb, (xb, dyb))| {
                with_scratch(ct * l, |cols| {
                    g.im2col(dyb, &taps, false, cols);
                    let a = View::new(w, ct, 1);
                    let bv = View::new(cols, l, 1);
                    gemm(dxb, (c_in, l, ct), false, a, bv, false);
                });
                if relu_input {
                    relu_backward(dxb, xb);
                }
            });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// (x, dy) -> [dw (Cin x Cout*k*k) | db (Cout)] of [`ConvTransposeOp`], flat.
struct ConvTransposeWeightGrad(ConvTransposeOp);

impl CustomOp2 for ConvTransposeWeightGrad {
    fn name(&self) -> &'static str {
        "conv-transpose2d-cols-weight-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let ConvTransposeOp { g, relu_input } = self.0;
        let (x, dy) = (
            contiguous_f32(s1, l1, "conv_transpose")?,
            contiguous_f32(s2, l2, "conv_transpose")?,
        );
        let (b, c_in) = (l1.dims()[0], l1.dims()[1]);
        let (taps, l) = (g.tap_list(), g.out_len());
        let ct = g.c * taps.len();
        let image = g.c * g.plane();
        let total = sum_chunks(b, c_in * ct + g.c, |images, acc| {
            let (dw, db) = acc.split_at_mut(c_in * ct);
            for bi in images {
                let dyb = &dy[bi * image..(bi + 1) * image];
                let xb = &x[bi * c_in * l..(bi + 1) * c_in * l];
                if g.implicit() {
                    let p = g.padded();
                    let layout = (1, ct, taps.len());
                    with_scratch(c_in * p.n + p.len, |buf| {
                        implicit::weight_grad(
                            &g,
                            layout,
                            c_in,
                            (dyb, false),
                            (xb, relu_input),
                            dw,
                            buf,
                        )
                    });
                    add_plane_sums(db, dyb, g.plane());
                    continue;
                }
                with_scratch(ct * l + c_in * l, |buf| {
                    let (cols, xr) = buf.split_at_mut(ct * l);
                    g.im2col(dyb, &taps, false, cols);
                    relu_copy(xr, xb, relu_input);
                    let a = View::new(xr, l, 1);
                    let bv = View::new(cols, 1, l);
                    gemm(dw, (c_in, ct, l), true, a, bv, false);
                });
                add_plane_sums(db, dyb, g.plane());
            }
        });
        Ok((CpuStorage::F32(total), Shape::from(c_in * ct + g.c)))
    }
}
