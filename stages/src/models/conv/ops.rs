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
//! - Stride-1 convolutions use no columns: on a padded copy of the image,
//!   tap (ky, kx) of every output position reads a fixed offset, so the
//!   layer is one gemm per tap straight from the padded image (into an
//!   output grid as wide as the padded image, whose extra columns are
//!   dropped). They work image by image, which also keeps a position's
//!   value independent of the other positions and images.
//! - Everything else works image by image in parallel, each image with a
//!   single-threaded gemm into buffers that stay allocated per thread.
//!   Weight gradients sum over fixed chunks of images, then over chunks in
//!   order, so results do not depend on the thread count.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::Geometry;
use crate::models::contiguous_f32;
use crate::models::kernels::{
    View, gemm, gemm_strided, relu, relu_backward, sum_chunks, with_scratch,
};

impl Geometry {
    fn out_len(&self) -> usize {
        self.out_h() * self.out_w()
    }

    fn plane(&self) -> usize {
        self.h * self.w
    }

    /// The kept taps as (ky, kx), in column-row order.
    fn tap_list(&self) -> Vec<(usize, usize)> {
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

fn f32s<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    contiguous_f32(s, l, what)
}

fn check_len(data: &[f32], len: usize, what: &str) -> candle_core::Result<()> {
    if data.len() != len {
        candle_core::bail!("{what}: {} values where {len} were expected", data.len());
    }
    Ok(())
}

/// The stride-1 layout: the image padded to Hp x Wp (plus `k` zeros so
/// the last tap's view stays inside), outputs on an OH x Wp grid.
struct Padded {
    hp: usize,
    wp: usize,
    /// Padded image length, slack included.
    len: usize,
    /// Output grid positions: OH x Wp.
    n: usize,
}

impl Geometry {
    /// Whether the layer runs without columns: stride 1 and a kernel wider
    /// than 1. (A 1x1 layer's columns are a plain copy, and its one batched
    /// forward gemm keeps a position's value exact when the incremental
    /// sampler computes a single column: a gemm of one column takes
    /// gemm's matrix-vector path, which sums in another order.)
    fn implicit(&self) -> bool {
        self.stride == 1 && self.k > 1
    }

    fn padded(&self) -> Padded {
        let (hp, wp) = (self.h + 2 * self.pad, self.w + 2 * self.pad);
        Padded {
            hp,
            wp,
            len: self.c * hp * wp + self.k,
            n: self.out_h() * wp,
        }
    }

    /// `img` (C x H x W) into the padded layout, ReLU'd if `relu_in`.
    fn pad_image(&self, img: &[f32], relu_in: bool, xp: &mut [f32]) {
        let Padded { hp, wp, .. } = self.padded();
        xp.fill(0.0);
        for (c, plane) in img.chunks_exact(self.plane()).enumerate() {
            for (y, row) in plane.chunks_exact(self.w).enumerate() {
                let at = (c * hp + y + self.pad) * wp + self.pad;
                for (d, &v) in xp[at..at + self.w].iter_mut().zip(row) {
                    *d = relu(v, relu_in);
                }
            }
        }
    }

    /// Output planes (O x OH x OW) onto the OH x Wp grid, extra columns zero.
    fn grid_from_output(&self, out: &[f32], grid: &mut [f32]) {
        let (wp, ow) = (self.padded().wp, self.out_w());
        grid.fill(0.0);
        for (g, o) in grid.chunks_exact_mut(wp).zip(out.chunks_exact(ow)) {
            g[..ow].copy_from_slice(o);
        }
    }
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
        let (x, w_t, bias) = (
            f32s(s1, l1, "conv")?,
            f32s(s2, l2, "conv")?,
            f32s(s3, l3, "conv")?,
        );
        let (b, o) = (l1.dims()[0], bias.len());
        let (taps, l) = (g.tap_list(), g.out_len());
        let (ct, n) = (g.c * taps.len(), b * l);
        check_len(x, b * g.c * g.plane(), "conv input")?;
        check_len(w_t, ct * o, "conv weight")?;
        let mut out = vec![0f32; b * o * l];
        if g.implicit() {
            self.stride_one(x, w_t, bias, &mut out);
            return Ok((
                CpuStorage::F32(out),
                Shape::from((b, o, g.out_h(), g.out_w())),
            ));
        }
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
            let a = View {
                data: cols,
                rs: 1,
                cs: n,
            };
            let wv = View {
                data: w_t,
                rs: o,
                cs: 1,
            };
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
        let dx = match x.track_op() {
            true => Some(x.apply_op3_no_bwd(w_t, &grad, &ConvDataGrad(*self))?),
            false => None,
        };
        let (ct, o) = w_t.dims2()?;
        let both = x.apply_op2_no_bwd(&grad, &ConvWeightGrad(*self))?;
        let dw = both.narrow(0, 0, ct * o)?.reshape((ct, o))?;
        let db = both.narrow(0, ct * o, o)?;
        Ok((dx, Some(dw), Some(db)))
    }
}

impl ConvOp {
    /// The stride-1 forward: per image, bias + one gemm per tap.
    fn stride_one(&self, x: &[f32], w_t: &[f32], bias: &[f32], out: &mut [f32]) {
        let g = self.g;
        let (taps, o) = (g.tap_list(), bias.len());
        let p = g.padded();
        let (t, ow) = (taps.len(), g.out_w());
        out.par_chunks_mut(o * g.out_len())
            .zip(x.par_chunks(g.c * g.plane()))
            .for_each(|(ob, xb)| {
                with_scratch(p.len + o * p.n, |buf| {
                    let (xp, yp) = buf.split_at_mut(p.len);
                    g.pad_image(xb, self.relu_input, xp);
                    for (row, &bias) in yp.chunks_exact_mut(p.n).zip(bias) {
                        row.fill(bias);
                    }
                    for (i, &(ky, kx)) in taps.iter().enumerate() {
                        let tap = View {
                            data: &w_t[i * o..],
                            rs: 1,
                            cs: t * o,
                        };
                        let shifted = View {
                            data: &xp[ky * p.wp + kx..],
                            rs: p.hp * p.wp,
                            cs: 1,
                        };
                        gemm(yp, (o, p.n, g.c), true, tap, shifted, false);
                    }
                    for (plane, grid) in ob.chunks_exact_mut(g.out_len()).zip(yp.chunks_exact(p.n))
                    {
                        for (d, s) in plane.chunks_exact_mut(ow).zip(grid.chunks_exact(p.wp)) {
                            d.copy_from_slice(&s[..ow]);
                        }
                    }
                });
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
        let (x, w_t, dy) = (
            f32s(s1, l1, "conv")?,
            f32s(s2, l2, "conv")?,
            f32s(s3, l3, "conv")?,
        );
        let (taps, l) = (g.tap_list(), g.out_len());
        let ct = g.c * taps.len();
        let o = l2.dims()[1];
        let image = g.c * g.plane();
        let mut dx = vec![0f32; x.len()];
        if g.implicit() {
            let (p, t) = (g.padded(), taps.len());
            dx.par_chunks_mut(image)
                .zip(x.par_chunks(image).zip(dy.par_chunks(o * l)))
                .for_each(|(dxb, (xb, dyb))| {
                    with_scratch(o * p.n + p.len, |buf| {
                        let (dyp, dxp) = buf.split_at_mut(o * p.n);
                        g.grid_from_output(dyb, dyp);
                        dxp.fill(0.0);
                        let dyv = View {
                            data: dyp,
                            rs: p.n,
                            cs: 1,
                        };
                        for (i, &(ky, kx)) in taps.iter().enumerate() {
                            let tap_t = View {
                                data: &w_t[i * o..],
                                rs: t * o,
                                cs: 1,
                            };
                            let at = ky * p.wp + kx;
                            gemm_strided(
                                &mut dxp[at..],
                                p.hp * p.wp,
                                (g.c, p.n, o),
                                true,
                                tap_t,
                                dyv,
                                false,
                            );
                        }
                        for (c, plane) in dxb.chunks_exact_mut(g.plane()).enumerate() {
                            for (y, row) in plane.chunks_exact_mut(g.w).enumerate() {
                                let at = (c * p.hp + y + g.pad) * p.wp + g.pad;
                                row.copy_from_slice(&dxp[at..at + g.w]);
                            }
                        }
                    });
                    if relu_input {
                        relu_backward(dxb, xb);
                    }
                });
            return Ok((CpuStorage::F32(dx), l1.shape().clone()));
        }
        dx.par_chunks_mut(image)
            .zip(x.par_chunks(image).zip(dy.par_chunks(o * l)))
            .for_each(|(dxb, (xb, dyb))| {
                with_scratch(ct * l, |cols| {
                    let a = View {
                        data: w_t,
                        rs: o,
                        cs: 1,
                    };
                    let b = View {
                        data: dyb,
                        rs: l,
                        cs: 1,
                    };
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
        let (x, dy) = (f32s(s1, l1, "conv")?, f32s(s2, l2, "conv")?);
        let (b, o) = (l1.dims()[0], l2.dims()[1]);
        let (taps, l) = (g.tap_list(), g.out_len());
        let ct = g.c * taps.len();
        let image = g.c * g.plane();
        let total = sum_chunks(b, ct * o + o, |images, acc| {
            let (dw, db) = acc.split_at_mut(ct * o);
            for bi in images {
                let dyb = &dy[bi * o * l..(bi + 1) * o * l];
                let xb = &x[bi * image..(bi + 1) * image];
                if g.implicit() {
                    let (p, t) = (g.padded(), taps.len());
                    with_scratch(o * p.n + p.len, |buf| {
                        let (dyp, xp) = buf.split_at_mut(o * p.n);
                        g.grid_from_output(dyb, dyp);
                        g.pad_image(xb, relu_input, xp);
                        let dyt = View {
                            data: dyp,
                            rs: 1,
                            cs: p.n,
                        };
                        for (i, &(ky, kx)) in taps.iter().enumerate() {
                            let shifted = View {
                                data: &xp[ky * p.wp + kx..],
                                rs: p.hp * p.wp,
                                cs: 1,
                            };
                            gemm_strided(
                                &mut dw[i * o..],
                                t * o,
                                (g.c, o, p.n),
                                true,
                                shifted,
                                dyt,
                                false,
                            );
                        }
                    });
                } else {
                    with_scratch(ct * l, |cols| {
                        g.im2col(xb, &taps, relu_input, cols);
                        let a = View {
                            data: cols,
                            rs: l,
                            cs: 1,
                        };
                        let bv = View {
                            data: dyb,
                            rs: 1,
                            cs: l,
                        };
                        gemm(dw, (ct, o, l), true, a, bv, false);
                    });
                }
                for (d, plane) in db.iter_mut().zip(dyb.chunks_exact(l)) {
                    *d += plane.iter().sum::<f32>();
                }
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
        let (x, w, bias) = (
            f32s(s1, l1, "conv_transpose")?,
            f32s(s2, l2, "conv_transpose")?,
            f32s(s3, l3, "conv_transpose")?,
        );
        let (b, c_in) = (l1.dims()[0], l1.dims()[1]);
        let (taps, l) = (g.tap_list(), g.out_len());
        let ct = g.c * taps.len();
        check_len(x, b * c_in * l, "conv_transpose input")?;
        check_len(w, c_in * ct, "conv_transpose weight")?;
        let image = g.c * g.plane();
        let mut out = vec![0f32; b * image];
        out.par_chunks_mut(image)
            .zip(x.par_chunks(c_in * l))
            .for_each(|(ob, xb)| {
                with_scratch(ct * l + c_in * l, |buf| {
                    let (cols, xr) = buf.split_at_mut(ct * l);
                    for (d, &v) in xr.iter_mut().zip(xb) {
                        *d = relu(v, self.relu_input);
                    }
                    let a = View {
                        data: w,
                        rs: 1,
                        cs: ct,
                    };
                    let bv = View {
                        data: xr,
                        rs: l,
                        cs: 1,
                    };
                    gemm(cols, (ct, l, c_in), false, a, bv, false);
                    g.col2im(cols, &taps, ob);
                });
                for (plane, &bias) in ob.chunks_exact_mut(g.plane()).zip(bias) {
                    for v in plane {
                        *v += bias;
                    }
                }
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
        let dx = match x.track_op() {
            true => Some(x.apply_op3_no_bwd(w, &grad, &ConvTransposeDataGrad(*self))?),
            false => None,
        };
        let (c_in, ct) = w.dims2()?;
        let both = x.apply_op2_no_bwd(&grad, &ConvTransposeWeightGrad(*self))?;
        let dw = both.narrow(0, 0, c_in * ct)?.reshape((c_in, ct))?;
        let db = both.narrow(0, c_in * ct, self.g.c)?;
        Ok((dx, Some(dw), Some(db)))
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
        let (x, w, dy) = (
            f32s(s1, l1, "conv_transpose")?,
            f32s(s2, l2, "conv_transpose")?,
            f32s(s3, l3, "conv_transpose")?,
        );
        let c_in = l1.dims()[1];
        let (taps, l) = (g.tap_list(), g.out_len());
        let ct = g.c * taps.len();
        let image = g.c * g.plane();
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(c_in * l)
            .zip(x.par_chunks(c_in * l).zip(dy.par_chunks(image)))
            .for_each(|(dxb, (xb, dyb))| {
                with_scratch(ct * l, |cols| {
                    g.im2col(dyb, &taps, false, cols);
                    let a = View {
                        data: w,
                        rs: ct,
                        cs: 1,
                    };
                    let bv = View {
                        data: cols,
                        rs: l,
                        cs: 1,
                    };
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
            f32s(s1, l1, "conv_transpose")?,
            f32s(s2, l2, "conv_transpose")?,
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
                with_scratch(ct * l + c_in * l, |buf| {
                    let (cols, xr) = buf.split_at_mut(ct * l);
                    g.im2col(dyb, &taps, false, cols);
                    for (d, &v) in xr.iter_mut().zip(xb) {
                        *d = relu(v, relu_input);
                    }
                    let a = View {
                        data: xr,
                        rs: l,
                        cs: 1,
                    };
                    let bv = View {
                        data: cols,
                        rs: 1,
                        cs: l,
                    };
                    gemm(dw, (c_in, ct, l), true, a, bv, false);
                });
                for (d, plane) in db.iter_mut().zip(dyb.chunks_exact(g.plane())) {
                    *d += plane.iter().sum::<f32>();
                }
            }
        });
        Ok((CpuStorage::F32(total), Shape::from(c_in * ct + g.c)))
    }
}
