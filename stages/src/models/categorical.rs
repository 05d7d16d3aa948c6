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

use candle_core::{CpuStorage, CustomOp1, CustomOp3, D, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::aux_decoder::class_rows;
use super::contiguous_f32;

/// -ln softmax(logits)[target] at every position and group: (B, G, H, W),
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
    let t = targets.flatten_all()?.to_vec1::<u32>()?;
    if let Some(bad) = t.iter().find(|&&v| v as usize >= classes) {
        candle_core::bail!("categorical NLL: target {bad} is not below {classes}");
    }
    logits.contiguous()?.apply_op1(CategoricalNll {
        targets: t.into(),
        classes,
    })
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

/// Log-sum-exp over K of one plane (K x HW), per position.
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
            *s += (v - m).exp();
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
            .for_each(|((o, plane), t)| {
                let lse = log_sum_exp(plane, k, hw);
                for p in 0..hw {
                    o[p] = lse[p] - plane[t[p] as usize * hw + p];
                }
            });
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
        let (x, nll, grad) = (
            contiguous_f32(s1, l1, op)?,
            contiguous_f32(s2, l2, op)?,
            contiguous_f32(s3, l3, op)?,
        );
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(k * hw)
            .zip(x.par_chunks(k * hw))
            .zip(nll.par_chunks(hw).zip(grad.par_chunks(hw)))
            .zip(self.0.targets.par_chunks(hw))
            .for_each(|(((o, plane), (nll, g)), t)| {
                // log-sum-exp = nll + the target's logit.
                let lse: Vec<f32> = (0..hw)
                    .map(|p| nll[p] + plane[t[p] as usize * hw + p])
                    .collect();
                for c in 0..k {
                    let (oc, xc) = (&mut o[c * hw..(c + 1) * hw], &plane[c * hw..(c + 1) * hw]);
                    for p in 0..hw {
                        oc[p] = g[p] * (xc[p] - lse[p]).exp();
                    }
                }
                for p in 0..hw {
                    o[t[p] as usize * hw + p] -= g[p];
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::max_abs_diff;
    use candle_core::{Device, Var};

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
