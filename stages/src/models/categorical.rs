//! The negative log-likelihood of categorical logits laid out as the
//! convolutional models give them, (B, G*K, H, W): G groups (pixel
//! channels) of K classes at every position.
//!
//! The candle composition (permute to rows, `log_softmax`, `gather`) makes
//! several passes over the logits and, for 256-way pixels, the logits are
//! the largest tensor of a PixelCNN step: with this one-pass CPU kernel
//! (and a one-pass gradient) they are read once forward and once backward,
//! in place, without the permuted copy.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::aux_decoder::class_rows;
use super::conv::Conv;
use super::kernels::{CHUNK, View, add_plane_sums, gemm, relu_backward, relu_copy, with_scratch};
use super::{contiguous_f32, contiguous_f32x3, fastmath};

/// `-ln softmax(logits)[target]` at every position and group: (B, G, H, W),
/// for u32 `targets` (B, G, H, W) in 0..K.
pub fn categorical_nll(
    logits: &Tensor,
    targets: &Tensor,
    classes: usize,
) -> candle_core::Result<Tensor> {
    let (b, gk, h, w) = logits.dims4()?;
    if gk % classes != 0 || targets.dims() != [b, gk / classes, h, w] {
        candle_core::bail!(
            "categorical NLL: logits {:?} do not hold {classes} classes for targets {:?}",
            logits.dims(),
            targets.dims()
        );
    }
    if !logits.device().is_cpu() {
        let rows = class_rows(logits, classes)?;
        return candle_nn::ops::log_softmax(&rows, D::Minus1)?
            .gather(&targets.flatten_all()?.unsqueeze(1)?, 1)?
            .neg()?
            .reshape(targets.shape());
    }
    logits.contiguous()?.apply_op1(CategoricalNll {
        targets: target_values(targets, classes)?,
        classes,
    })
}

fn target_values(targets: &Tensor, classes: usize) -> candle_core::Result<Arc<[u32]>> {
    let t = targets.flatten_all()?.to_vec1::<u32>()?;
    if let Some(bad) = t.iter().find(|&&v| v as usize >= classes) {
        candle_core::bail!("categorical NLL: target {bad} is not below {classes}");
    }
    Ok(t.into())
}

/// [`categorical_nll`] of the logits `head.forward(relu(x))` (`head.forward(x)`
/// without `relu_input`) for a 1x1 `head`. On the CPU one kernel computes
/// the logits image by image and keeps none: the (B, G*K, H, W) logits of
/// a 256-way pixel model, the largest tensor of a PixelCNN step, are never
/// stored, nor is their gradient (the backward recomputes them per image).
pub fn categorical_nll_of_conv(
    x: &Tensor,
    head: &Conv,
    relu_input: bool,
    targets: &Tensor,
    classes: usize,
) -> candle_core::Result<Tensor> {
    let Some((w, bias)) = head.pointwise_on_cpu(x)? else {
        let logits = match relu_input {
            true => head.forward_relu(x)?,
            false => x.apply(head)?,
        };
        return categorical_nll(&logits, targets, classes);
    };
    let (b, _, h, wd) = x.dims4()?;
    let o = w.dim(0)?;
    if o % classes != 0 || targets.dims() != [b, o / classes, h, wd] {
        candle_core::bail!(
            "categorical NLL: {o} logits per position do not hold {classes} classes for targets {:?}",
            targets.dims()
        );
    }
    let wb = Tensor::cat(&[&w, &bias.unsqueeze(1)?], 1)?;
    x.contiguous()?.apply_op2(
        &wb,
        NllHead {
            targets: target_values(targets, classes)?,
            classes,
            relu_input,
        },
    )
}

/// (x (B, C, H, W), [W | bias] (O x C+1)) -> the NLL (B, O / K, H, W) of
/// the logits `W relu(x) + bias` at every position.
#[derive(Debug, Clone)]
struct NllHead {
    targets: Arc<[u32]>,
    classes: usize,
    relu_input: bool,
}

/// Sizes of an [`NllHead`] call: images, input channels, positions, logits.
fn head_sizes(x: &Layout, wb: &Layout) -> candle_core::Result<(usize, usize, usize, usize)> {
    let (b, c, h, w) = x.shape().dims4()?;
    let (o, c1) = wb.shape().dims2()?;
    if c1 != c + 1 {
        candle_core::bail!("NLL head: weights for {} inputs, {c} given", c1 - 1);
    }
    Ok((b, c, h * w, o))
}

impl NllHead {
    /// The logits (O x L) of one image into `y`; its ReLU'd input into `xr`.
    fn logits(
        &self,
        xb: &[f32],
        wb: &[f32],
        (c, l, o): (usize, usize, usize),
        y: &mut [f32],
        xr: &mut [f32],
    ) {
        relu_copy(xr, xb, self.relu_input);
        for (oc, row) in y.chunks_exact_mut(l).enumerate() {
            row.fill(wb[oc * (c + 1) + c]);
        }
        let a = View::new(wb, c + 1, 1);
        let bv = View::new(xr, l, 1);
        gemm(y, (o, l, c), true, a, bv, false);
    }
}

impl CustomOp2 for NllHead {
    fn name(&self) -> &'static str {
        "categorical-nll-head"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, c, l, o) = head_sizes(l1, l2)?;
        let (x, wb) = (
            contiguous_f32(s1, l1, "NLL head")?,
            contiguous_f32(s2, l2, "NLL head")?,
        );
        let (k, groups) = (self.classes, o / self.classes);
        let mut out = vec![0f32; b * groups * l];
        out.par_chunks_mut(groups * l)
            .zip(x.par_chunks(c * l))
            .zip(self.targets.par_chunks(groups * l))
            .for_each(|((nll, xb), t)| {
                with_scratch(o * l + c * l, |buf| {
                    let (y, xr) = buf.split_at_mut(o * l);
                    self.logits(xb, wb, (c, l, o), y, xr);
                    for ((plane, t), nll) in y
                        .chunks_exact(k * l)
                        .zip(t.chunks_exact(l))
                        .zip(nll.chunks_exact_mut(l))
                    {
                        nll_plane(plane, k, t, nll);
                    }
                });
            });
        let (_, _, h, w) = l1.shape().dims4()?;
        Ok((CpuStorage::F32(out), Shape::from((b, groups, h, w))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        wb: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let both = x.apply_op3_no_bwd(wb, &grad.contiguous()?, &NllHeadGrad(self.clone()))?;
        let n = x.elem_count();
        let dx = both.narrow(0, 0, n)?.reshape(x.shape())?;
        let dwb = both.narrow(0, n, wb.elem_count())?.reshape(wb.shape())?;
        Ok((Some(dx), Some(dwb)))
    }
}

/// (x, [W | bias], d nll) -> [dx | d[W | bias]] of [`NllHead`], flat; d
/// logits = d nll x (softmax - one-hot(target)), recomputed per image.
struct NllHeadGrad(NllHead);

impl CustomOp3 for NllHeadGrad {
    fn name(&self) -> &'static str {
        "categorical-nll-head-grad"
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
        let head = &self.0;
        let (b, c, l, o) = head_sizes(l1, l2)?;
        let op = "NLL head gradient";
        let (x, wb, grad) = contiguous_f32x3((s1, l1), (s2, l2), (s3, l3), op)?;
        let (k, groups) = (head.classes, o / head.classes);
        let mut dx = vec![0f32; b * c * l];
        // Per chunk of images: d W (O x C) and d bias (O), summed in order.
        let partials: Vec<Vec<f32>> = dx
            .par_chunks_mut(CHUNK * c * l)
            .enumerate()
            .map(|(chunk, dxc)| {
                let mut acc = vec![0f32; o * c + o];
                let (dw, db) = acc.split_at_mut(o * c);
                for (i, dxb) in dxc.chunks_exact_mut(c * l).enumerate() {
                    let bi = chunk * CHUNK + i;
                    let xb = &x[bi * c * l..(bi + 1) * c * l];
                    let (gb, tb) = (&grad[bi * groups * l..], &head.targets[bi * groups * l..]);
                    with_scratch(o * l + c * l, |buf| {
                        let (y, xr) = buf.split_at_mut(o * l);
                        head.logits(xb, wb, (c, l, o), y, xr);
                        for (g, plane) in y.chunks_exact_mut(k * l).enumerate() {
                            let (gg, tt) = (&gb[g * l..(g + 1) * l], &tb[g * l..(g + 1) * l]);
                            softmax_grad_plane(plane, k, gg, tt);
                        }
                        let dy = &*y;
                        let wt = View::new(wb, 1, c + 1);
                        let dyv = View::new(dy, l, 1);
                        gemm(dxb, (c, l, o), false, wt, dyv, false);
                        let xt = View::new(xr, 1, l);
                        gemm(dw, (o, c, l), true, dyv, xt, false);
                        add_plane_sums(db, dy, l);
                    });
                    if head.relu_input {
                        relu_backward(dxb, xb);
                    }
                }
                acc
            })
            .collect();
        let mut dwb = vec![0f32; o * (c + 1)];
        for acc in &partials {
            let (dw, db) = acc.split_at(o * c);
            for oc in 0..o {
                for ic in 0..c {
                    dwb[oc * (c + 1) + ic] += dw[oc * c + ic];
                }
                dwb[oc * (c + 1) + c] += db[oc];
            }
        }
        dx.extend_from_slice(&dwb);
        let n = dx.len();
        Ok((CpuStorage::F32(dx), Shape::from(n)))
    }
}

#[derive(Debug, Clone)]
struct CategoricalNll {
    targets: Arc<[u32]>,
    classes: usize,
}

/// (B, G*K, H, W) -> (B*G planes, K, H*W) sizes.
fn planes(layout: &Layout, classes: usize) -> candle_core::Result<(usize, usize, usize, usize)> {
    let (b, gk, h, w) = layout.shape().dims4()?;
    Ok((b, gk / classes, classes, h * w))
}

fastmath::simd_kernel! {
    /// `nll[p] = lse[p] - plane[t[p]][p]` of one plane (K x HW).
    fn nll_plane(plane: &[f32], k: usize, t: &[u32], nll: &mut [f32]) {
        let hw = nll.len();
        let lse = log_sum_exp(plane, k, hw);
        for p in 0..hw {
            nll[p] = lse[p] - plane[t[p] as usize * hw + p];
        }
    }
}

fastmath::simd_kernel! {
    /// Logits (K x HW) -> d nll / d logits = g (softmax - one-hot(t)), in place.
    fn softmax_grad_plane(plane: &mut [f32], k: usize, g: &[f32], t: &[u32]) {
        let hw = g.len();
        let lse = log_sum_exp(plane, k, hw);
        for (class, row) in plane.chunks_exact_mut(hw).enumerate() {
            let class = class as u32;
            for (((v, &m), &d), &t) in row.iter_mut().zip(&lse).zip(g).zip(t) {
                let hit = if t == class { 1.0 } else { 0.0 };
                *v = d * (fastmath::exp(*v - m) - hit);
            }
        }
    }
}

/// Log-sum-exp over K of one plane (K x HW), per position.
#[inline(always)]
fn log_sum_exp(plane: &[f32], k: usize, hw: usize) -> Vec<f32> {
    let mut max = vec![f32::NEG_INFINITY; hw];
    for c in 0..k {
        for (m, &v) in max.iter_mut().zip(&plane[c * hw..(c + 1) * hw]) {
            *m = m.max(v);
        }
    }
    let mut sum = vec![0f32; hw];
    for c in 0..k {
        for ((s, &v), &m) in sum.iter_mut().zip(&plane[c * hw..(c + 1) * hw]).zip(&max) {
            *s += fastmath::exp(v - m);
        }
    }
    max.iter().zip(&sum).map(|(m, s)| m + s.ln()).collect()
}

impl CustomOp1 for CategoricalNll {
    fn name(&self) -> &'static str {
        "categorical-nll"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, g, k, hw) = planes(l, self.classes)?;
        let x = contiguous_f32(s, l, "categorical NLL")?;
        let mut out = vec![0f32; b * g * hw];
        out.par_chunks_mut(hw)
            .zip(x.par_chunks(k * hw))
            .zip(self.targets.par_chunks(hw))
            .for_each(|((o, plane), t)| nll_plane(plane, k, t, o));
        let (_, _, h, w) = l.shape().dims4()?;
        Ok((CpuStorage::F32(out), Shape::from((b, g, h, w))))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = arg.apply_op3_no_bwd(
            &res.contiguous()?,
            &grad_res.contiguous()?,
            &CategoricalNllGrad(self.clone()),
        )?;
        Ok(Some(grad))
    }
}

/// d nll / d logits = grad x (softmax - one-hot(target)).
struct CategoricalNllGrad(CategoricalNll);

impl CustomOp3 for CategoricalNllGrad {
    fn name(&self) -> &'static str {
        "categorical-nll-grad"
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
        let (_, _, k, hw) = planes(l1, self.0.classes)?;
        let op = "categorical NLL gradient";
        let (x, nll, grad) = contiguous_f32x3((s1, l1), (s2, l2), (s3, l3), op)?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(k * hw)
            .zip(x.par_chunks(k * hw))
            .zip(nll.par_chunks(hw).zip(grad.par_chunks(hw)))
            .zip(self.0.targets.par_chunks(hw))
            .for_each(|(((o, plane), (_, g)), t)| {
                o.copy_from_slice(plane);
                softmax_grad_plane(o, k, g, t);
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::max_abs_diff;
    use candle_core::{Device, Var};

    /// The reference: candle's own 1x1 conv, log-softmax and gather.
    fn reference_nll(logits: &Tensor, t: &Tensor, k: usize) -> Tensor {
        let rows = class_rows(logits, k).unwrap();
        candle_nn::ops::log_softmax(&rows, D::Minus1)
            .unwrap()
            .gather(&t.flatten_all().unwrap().unsqueeze(1).unwrap(), 1)
            .unwrap()
            .neg()
            .unwrap()
            .reshape(t.shape())
            .unwrap()
    }

    #[test]
    fn the_fused_head_matches_candle_in_value_and_every_gradient() {
        use crate::models::vars::SeededVars;
        let dev = Device::Cpu;
        let mut r = crate::rng::SplitMix64(11);
        // 3 groups of 4 classes; 9 and 1 images (not multiples of CHUNK).
        for (b, relu_input) in [(9, true), (1, false), (2, true)] {
            let (c, g, k, h, w) = (5, 3, 4, 3, 5);
            let vars = SeededVars::new(b as u64);
            let head = Conv::new(c, g * k, 1, 1, 0, vars.var_builder(&dev)).unwrap();
            let xv: Vec<f32> = (0..b * c * h * w).map(|_| r.normal() as f32).collect();
            let x = Var::from_vec(xv, (b, c, h, w), &dev).unwrap();
            let t: Vec<u32> = (0..b * g * h * w)
                .map(|_| r.below(k as u64) as u32)
                .collect();
            let t = Tensor::from_vec(t, (b, g, h, w), &dev).unwrap();
            let wv: Vec<f32> = (0..b * g * h * w).map(|_| r.normal() as f32).collect();
            let weights = Tensor::from_vec(wv, (b, g, h, w), &dev).unwrap();

            let fast = categorical_nll_of_conv(x.as_tensor(), &head, relu_input, &t, k).unwrap();
            let input = match relu_input {
                true => x.as_tensor().relu().unwrap(),
                false => x.as_tensor().clone(),
            };
            let slow = reference_nll(&head.forward_reference(&input).unwrap(), &t, k);
            let what = format!("batch {b}, relu {relu_input}");
            assert!(max_abs_diff(&fast, &slow) < 1e-5, "{what}: values");
            let gf = (fast * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gs = (slow * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let d = max_abs_diff(gf.get(&x).unwrap(), gs.get(&x).unwrap());
            assert!(d < 1e-5, "{what}: input gradient off by {d}");
            for (name, v) in vars.all() {
                let d = max_abs_diff(gf.get(&v).unwrap(), gs.get(&v).unwrap());
                assert!(d < 1e-5, "{what}: gradient of {name} off by {d}");
            }
        }
    }

    #[test]
    fn matches_log_softmax_and_gather_in_value_and_gradient() {
        let dev = Device::Cpu;
        let (b, g, k, h, w) = (2, 3, 5, 3, 4);
        let mut r = crate::rng::SplitMix64(7);
        let logits: Vec<f32> = (0..b * g * k * h * w)
            .map(|_| 3.0 * r.normal() as f32)
            .collect();
        let targets: Vec<u32> = (0..b * g * h * w)
            .map(|_| r.below(k as u64) as u32)
            .collect();
        let x = Var::from_vec(logits, (b, g * k, h, w), &dev).unwrap();
        let t = Tensor::from_vec(targets, (b, g, h, w), &dev).unwrap();
        let weights: Vec<f32> = (0..b * g * h * w).map(|_| r.normal() as f32).collect();
        let wt = Tensor::from_vec(weights, (b, g, h, w), &dev).unwrap();

        let fast = categorical_nll(x.as_tensor(), &t, k).unwrap();
        let rows = class_rows(x.as_tensor(), k).unwrap();
        let slow = candle_nn::ops::log_softmax(&rows, D::Minus1)
            .unwrap()
            .gather(&t.flatten_all().unwrap().unsqueeze(1).unwrap(), 1)
            .unwrap()
            .neg()
            .unwrap()
            .reshape((b, g, h, w))
            .unwrap();
        assert!(max_abs_diff(&fast, &slow) < 1e-5);
        let gf = (fast * &wt).unwrap().sum_all().unwrap().backward().unwrap();
        let gs = (slow * &wt).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_abs_diff(gf.get(&x).unwrap(), gs.get(&x).unwrap()) < 1e-5);
        assert!(categorical_nll(x.as_tensor(), &(t + 10.0).unwrap(), k).is_err());
    }
}
