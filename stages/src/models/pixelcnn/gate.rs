//! The gated activation `tanh(a) * sigmoid(b)` of the PixelCNN's layers, as
//! CPU ops of one pass forward and one backward: alone ([`gate`]) and fused
//! with the sums that feed it ([`gate_of_sum`]). Other devices, and a
//! thread that asked for the reference ([`crate::models::reference`]), take
//! candle's composition.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::models::kernels::with_scratch;
use crate::models::{contiguous_f32, contiguous_f32x3, fastmath};

/// `tanh(a) * sigmoid(b)` of the two halves (B, 2h, H, W) along channels:
/// one pass forward and one backward on the CPU (candle's composition makes
/// two strided copies, three ops and their gradients).
pub fn gate(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() && !crate::models::reference::current().composed_gate {
        return x.contiguous()?.apply_op1(Gate);
    }
    let h = x.dim(1)? / 2;
    x.narrow(1, 0, h)?.tanh()? * candle_nn::ops::sigmoid(&x.narrow(1, h, h)?)?
}

struct Gate;

/// A contiguous (B, 2h, H, W) f32 tensor as slices, and h*H*W.
fn gate_halves<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<(&'a [f32], usize)> {
    let (_, c, hh, ww) = l.shape().dims4()?;
    if c % 2 != 0 {
        candle_core::bail!("gate needs an even channel count, got {c}");
    }
    Ok((contiguous_f32(s, l, "gate")?, c / 2 * hh * ww))
}

impl CustomOp1 for Gate {
    fn name(&self) -> &'static str {
        "gate"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, half) = gate_halves(s, l)?;
        let mut out = vec![0f32; x.len() / 2];
        out.par_chunks_mut(half)
            .zip(x.par_chunks(2 * half))
            .for_each(|(o, xb)| {
                let (a, g) = xb.split_at(half);
                gate_forward(o, a, g)
            });
        let (b, c, h, w) = l.shape().dims4()?;
        Ok((CpuStorage::F32(out), Shape::from((b, c / 2, h, w))))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(&grad.contiguous()?, &GateGrad)?))
    }
}

fastmath::simd_kernel! {
    fn gate_forward(out: &mut [f32], a: &[f32], b: &[f32]) {
        for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
            *o = fastmath::tanh(a) * fastmath::sigmoid(b);
        }
    }
}

fastmath::simd_kernel! {
    /// d/da = g sigmoid(b) (1 - tanh(a)^2), d/db = g tanh(a) sigmoid(b) (1 - sigmoid(b)).
    fn gate_backward(da: &mut [f32], db: &mut [f32], a: &[f32], b: &[f32], grad: &[f32]) {
        for ((((da, db), &a), &b), &g) in da.iter_mut().zip(db).zip(a).zip(b).zip(grad) {
            let (t, s) = (fastmath::tanh(a), fastmath::sigmoid(b));
            *da = g * s * (1.0 - t * t);
            *db = g * t * s * (1.0 - s);
        }
    }
}

struct GateGrad;

impl CustomOp2 for GateGrad {
    fn name(&self) -> &'static str {
        "gate-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, half) = gate_halves(s1, l1)?;
        let g = contiguous_f32(s2, l2, "gate gradient")?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(2 * half)
            .zip(x.par_chunks(2 * half).zip(g.par_chunks(half)))
            .for_each(|(o, (xb, gb))| {
                let (a, b) = xb.split_at(half);
                let (oa, ob) = o.split_at_mut(half);
                gate_backward(oa, ob, a, b, gb)
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `gate(x + y + extra)`, `y` optional, `extra` (B, 2h, 1, 1) or (B, 2h,
/// H, W) broadcast over x's (B, 2h, H, W): what each gated layer computes.
/// On the CPU one op forward and one pass backward: candle's adds (and
/// their gradients, each summed into a fresh zero tensor) were the largest
/// item of a PixelCNN step besides the convolutions and the NLL.
pub fn gate_of_sum(
    x: &Tensor,
    y: Option<&Tensor>,
    extra: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let composed = || {
        let mut pre = match y {
            Some(y) => (x + y)?,
            None => x.clone(),
        };
        if let Some(e) = extra {
            pre = pre.broadcast_add(e)?;
        }
        gate(&pre)
    };
    let Some(e) = extra else {
        return composed();
    };
    let (b, c, h, w) = x.dims4()?;
    // Anything else (an odd channel count included) takes candle's ops,
    // which explain what does not fit.
    let fits = c % 2 == 0
        && matches!(e.dims4()?, (eb, ec, eh, ew) if eb == b && ec == c
            && ((eh, ew) == (1, 1) || (eh, ew) == (h, w)));
    if !x.device().is_cpu() || crate::models::reference::current().composed_gate || !fits {
        return composed();
    }
    let (x, e) = (x.contiguous()?, e.contiguous()?);
    match y {
        Some(y) => x.apply_op3(&y.contiguous()?, &e, GateOfSum),
        None => x.apply_op2(&e, GateOfSum),
    }
}

/// See [`gate_of_sum`].
struct GateOfSum;

/// A contiguous f32 tensor's values, from its storage (read-locked by the
/// caller).
fn cpu_slice<'a>(
    storage: &'a candle_core::Storage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    match storage {
        candle_core::Storage::Cpu(s) => contiguous_f32(s, layout, what),
        _ => candle_core::bail!("{what}: a CPU tensor was expected"),
    }
}

impl GateOfSum {
    /// One image's pre-activation `x + y + e` into `pre` (2h planes of
    /// `plane` values), summed in the order candle's adds take.
    fn pre(pre: &mut [f32], x: &[f32], y: Option<&[f32]>, e: &[f32], plane: usize) {
        match y {
            Some(y) => {
                for ((p, &a), &b) in pre.iter_mut().zip(x).zip(y) {
                    *p = a + b;
                }
            }
            None => pre.copy_from_slice(x),
        }
        if e.len() == pre.len() {
            for (p, &v) in pre.iter_mut().zip(e) {
                *p += v;
            }
        } else {
            for (row, &v) in pre.chunks_exact_mut(plane).zip(e) {
                for p in row {
                    *p += v;
                }
            }
        }
    }

    fn forward(
        x: &[f32],
        y: Option<&[f32]>,
        e: &[f32],
        l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = l.shape().dims4()?;
        let (image, plane) = (c * h * w, h * w);
        let e_image = e.len() / b;
        let mut out = vec![0f32; x.len() / 2];
        out.par_chunks_mut(image / 2)
            .enumerate()
            .for_each(|(bi, o)| {
                let at = bi * image..(bi + 1) * image;
                let yb = y.map(|y| &y[at.clone()]);
                let eb = &e[bi * e_image..(bi + 1) * e_image];
                with_scratch(image, |pre| {
                    Self::pre(pre, &x[at], yb, eb, plane);
                    let (a, g) = pre.split_at(image / 2);
                    gate_forward(o, a, g)
                })
            });
        Ok((CpuStorage::F32(out), Shape::from((b, c / 2, h, w))))
    }

    /// The gradient of the pre-activation, and of `extra` when it is one
    /// value per channel (else the same tensor).
    fn backward(
        x: &Tensor,
        y: Option<&Tensor>,
        e: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (b, c, h, w) = x.dims4()?;
        let (image, plane) = (c * h * w, h * w);
        let grad = grad.contiguous()?;
        let per_channel = e.dims4()?.2 == 1 && h * w > 1;
        let what = "gated layer gradient";
        let ((xg, xl), (eg, el), (gg, gl)) = (
            x.storage_and_layout(),
            e.storage_and_layout(),
            grad.storage_and_layout(),
        );
        let (xs, es, gs) = (
            cpu_slice(&xg, xl, what)?,
            cpu_slice(&eg, el, what)?,
            cpu_slice(&gg, gl, what)?,
        );
        let yg = y.map(|y| y.storage_and_layout());
        let ys = match &yg {
            Some((g, l)) => Some(cpu_slice(g, l, what)?),
            None => None,
        };
        let e_image = es.len() / b;
        let mut dpre = vec![0f32; b * image];
        dpre.par_chunks_mut(image).enumerate().for_each(|(bi, d)| {
            let at = bi * image..(bi + 1) * image;
            with_scratch(image, |pre| {
                let yb = ys.map(|y| &y[at.clone()]);
                Self::pre(pre, &xs[at], yb, &es[bi * e_image..][..e_image], plane);
                let (a, g) = pre.split_at(image / 2);
                let (da, dg) = d.split_at_mut(image / 2);
                gate_backward(da, dg, a, g, &gs[bi * image / 2..][..image / 2]);
            })
        });
        let mut de = vec![0f32; if per_channel { b * c } else { 0 }];
        for (d, row) in de.iter_mut().zip(dpre.chunks_exact(plane)) {
            *d = row.iter().sum();
        }
        let dpre = Tensor::from_vec(dpre, (b, c, h, w), x.device())?;
        let de = match per_channel {
            true => Tensor::from_vec(de, (b, c, 1, 1), x.device())?,
            false => dpre.clone(),
        };
        Ok((dpre, de))
    }
}

impl CustomOp2 for GateOfSum {
    fn name(&self) -> &'static str {
        "gate-of-sum"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let what = "gated layer";
        let (x, e) = (contiguous_f32(s1, l1, what)?, contiguous_f32(s2, l2, what)?);
        Self::forward(x, None, e, l1)
    }

    fn bwd(
        &self,
        x: &Tensor,
        e: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, de) = Self::backward(x, None, e, grad)?;
        Ok((Some(dx), Some(de)))
    }
}

impl CustomOp3 for GateOfSum {
    fn name(&self) -> &'static str {
        "gate-of-sum"
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
        let what = "gated layer";
        let (x, y, e) = contiguous_f32x3((s1, l1), (s2, l2), (s3, l3), what)?;
        Self::forward(x, Some(y), e, l1)
    }

    fn bwd(
        &self,
        x: &Tensor,
        y: &Tensor,
        e: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, de) = Self::backward(x, Some(y), e, grad)?;
        Ok((Some(dx.clone()), Some(dx), Some(de)))
    }
}
