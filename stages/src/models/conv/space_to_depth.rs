//! Space-to-depth and its adjoint, for strided layers: a stride-s
//! convolution with a k x k kernel (k a multiple of s) is a stride-1
//! convolution with a k/s x k/s kernel over the image cut into s x s
//! blocks, each block's pixels stacked as channels (the weights rearranged
//! alike). That runs on the column-free stride-1 kernels.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::models::contiguous_f32;
use crate::models::kernels::relu;

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
    /// Calls `f(block start, image start, count)` for every run of block
    /// values (consecutive) that come from inside an image of `c` x `h` x
    /// `w` (every s-th pixel of a row from the image start).
    fn runs(&self, (c, h, w): (usize, usize, usize), mut f: impl FnMut(usize, usize, usize)) {
        let (s, p) = (self.s, self.pad);
        for ch in 0..c {
            for dy in 0..s {
                for dx in 0..s {
                    let plane = (ch * s + dy) * s + dx;
                    // Columns j whose pixel j*s + dx - p lies in 0..w.
                    let lo = if dx >= p { 0 } else { (p - dx).div_ceil(s) }.min(self.ws);
                    let hi = match w + p > dx {
                        true => ((w + p - dx - 1) / s + 1).min(self.ws),
                        false => 0,
                    };
                    if hi <= lo {
                        continue;
                    }
                    for i in 0..self.hs {
                        let Some(y) = (i * s + dy).checked_sub(p).filter(|&y| y < h) else {
                            continue;
                        };
                        let block = (plane * self.hs + i) * self.ws + lo;
                        let x = lo * s + dx - p;
                        f(block, (ch * h + y) * w + x, hi - lo);
                    }
                }
            }
        }
    }

    /// Image (C x H x W) -> blocks, zero where no pixel maps.
    fn gather(&self, chw: (usize, usize, usize), img: &[f32], relu_in: bool, blocks: &mut [f32]) {
        let s = self.s;
        blocks.fill(0.0);
        self.runs(chw, |b0, x0, n| {
            for (j, d) in blocks[b0..b0 + n].iter_mut().enumerate() {
                *d = relu(img[x0 + j * s], relu_in);
            }
        });
    }

    /// Blocks -> image (C x H x W), zero where no block value maps.
    fn scatter(&self, chw: (usize, usize, usize), blocks: &[f32], img: &mut [f32]) {
        let s = self.s;
        img.fill(0.0);
        self.runs(chw, |b0, x0, n| {
            for (j, &v) in blocks[b0..b0 + n].iter().enumerate() {
                img[x0 + j * s] = v;
            }
        });
    }
}

impl CustomOp1 for SpaceToDepth {
    fn name(&self) -> &'static str {
        "space-to-depth"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = l.shape().dims4()?;
        let x = contiguous_f32(st, l, "space-to-depth")?;
        let block = c * self.s * self.s * self.hs * self.ws;
        let mut out = vec![0f32; b * block];
        out.par_chunks_mut(block)
            .zip(x.par_chunks(c * h * w))
            .for_each(|(o, xb)| self.gather((c, h, w), xb, self.relu_input, o));
        Ok((
            CpuStorage::F32(out),
            Shape::from((b, c * self.s * self.s, self.hs, self.ws)),
        ))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(
            &grad.contiguous()?,
            &DepthToSpace(*self, true),
        )?))
    }
}

/// The adjoint of [`SpaceToDepth`]: (x (B, C, H, W) for the shape, and the
/// ReLU mask if `.1`; blocks (B, C*s*s, HS, WS)) -> (B, C, H, W).
#[derive(Debug, Clone, Copy)]
pub(super) struct DepthToSpace(pub SpaceToDepth, pub bool);

impl CustomOp2 for DepthToSpace {
    fn name(&self) -> &'static str {
        "depth-to-space"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = l1.shape().dims4()?;
        let blocks = contiguous_f32(s2, l2, "depth-to-space")?;
        let x = match self.1 && self.0.relu_input {
            true => Some(contiguous_f32(s1, l1, "depth-to-space")?),
            false => None,
        };
        let block = c * self.0.s * self.0.s * self.0.hs * self.0.ws;
        let mut out = vec![0f32; b * c * h * w];
        out.par_chunks_mut(c * h * w)
            .zip(blocks.par_chunks(block))
            .enumerate()
            .for_each(|(bi, (o, sb))| {
                self.0.scatter((c, h, w), sb, o);
                if let Some(x) = x {
                    crate::models::kernels::relu_backward(o, &x[bi * c * h * w..][..c * h * w]);
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `DepthToSpace` as a differentiable op on blocks, for the transposed
/// convolution's output: (B, C*s*s, HS, WS) -> (B, C, H, W).
#[derive(Debug, Clone, Copy)]
pub(super) struct BlocksToImage {
    pub layout: SpaceToDepth,
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

impl CustomOp1 for BlocksToImage {
    fn name(&self) -> &'static str {
        "blocks-to-image"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let b = l.shape().dims4()?.0;
        let blocks = contiguous_f32(st, l, "blocks-to-image")?;
        let (c, h, w) = (self.c, self.h, self.w);
        let block = c * self.layout.s * self.layout.s * self.layout.hs * self.layout.ws;
        let mut out = vec![0f32; b * c * h * w];
        out.par_chunks_mut(c * h * w)
            .zip(blocks.par_chunks(block))
            .for_each(|(o, sb)| self.layout.scatter((c, h, w), sb, o));
        Ok((CpuStorage::F32(out), Shape::from((b, c, h, w))))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let plain = SpaceToDepth {
            relu_input: false,
            ..self.layout
        };
        Ok(Some(grad.contiguous()?.apply_op1(plain)?))
    }
}
