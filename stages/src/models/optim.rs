//! AdamW (Loshchilov and Hutter, PyTorch's semantics), global-norm gradient
//! clipping and the learning-rate schedule. candle-nn's AdamW keeps its
//! moments private; checkpoints need them, so this one exposes its state.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    Constant,
    /// Cosine decay from `lr` to `lr * min_lr_ratio` over the run.
    Cosine,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Linear warm-up from 0 over this many steps.
    pub warmup_steps: u64,
    pub schedule: Schedule,
    pub min_lr_ratio: f64,
    /// Clip the global gradient norm to this (none if absent).
    pub grad_clip: Option<f64>,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: 3e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            warmup_steps: 0,
            schedule: Schedule::Constant,
            min_lr_ratio: 0.1,
            grad_clip: Some(1.0),
        }
    }
}

impl OptimConfig {
    /// The learning rate of step `step` (0-based) of `total`.
    pub fn lr_at(&self, step: u64, total: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::Cosine => {
                let span = total.saturating_sub(self.warmup_steps).max(1) as f64;
                let t = ((step - self.warmup_steps) as f64 / span).min(1.0);
                let min = self.lr * self.min_lr_ratio;
                min + (self.lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }
}

pub struct AdamW {
    cfg: OptimConfig,
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Updates done so far (the bias corrections' t).
    pub steps: u64,
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, cfg: OptimConfig) -> candle_core::Result<Self> {
        let zeros = |vars: &[(String, Var)]| -> candle_core::Result<Vec<Tensor>> {
            vars.iter()
                .map(|(_, v)| v.as_tensor().zeros_like())
                .collect()
        };
        Ok(AdamW {
            m: zeros(&vars)?,
            v: zeros(&vars)?,
            vars,
            cfg,
            steps: 0,
        })
    }

    /// The global L2 norm of the gradients, summed in variable order.
    pub fn grad_norm(&self, grads: &GradStore) -> candle_core::Result<f64> {
        let mut sum = 0f64;
        for (_, var) in &self.vars {
            if let Some(g) = grads.get(var) {
                sum += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            }
        }
        Ok(sum.sqrt())
    }

    /// One update at learning rate `lr`; clips first. Returns the gradient
    /// norm before clipping.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> candle_core::Result<f64> {
        let norm = self.grad_norm(grads)?;
        let scale = match self.cfg.grad_clip {
            Some(c) if norm > c => c / (norm + 1e-6),
            _ => 1.0,
        };
        self.steps += 1;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let c1 = 1.0 - b1.powi(self.steps as i32);
        let c2 = 1.0 - b2.powi(self.steps as i32);
        for (i, (_, var)) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(var) else { continue };
            let g = (g * scale)?;
            let m = ((&self.m[i] * b1)? + (&g * (1.0 - b1))?)?;
            let v = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let step = ((&m / c1)? / ((&v / c2)?.sqrt()? + self.cfg.eps)?)?;
            let decayed = (var.as_tensor() * (1.0 - lr * self.cfg.weight_decay))?;
            var.set(&(decayed - (step * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(norm)
    }

    /// Moments under `prefix`m.NAME / `prefix`v.NAME.
    pub fn state(&self, prefix: &str) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.push((format!("{prefix}m.{name}"), self.m[i].clone()));
            out.push((format!("{prefix}v.{name}"), self.v[i].clone()));
        }
        out
    }

    pub fn load_state(
        &mut self,
        tensors: &BTreeMap<String, Tensor>,
        prefix: &str,
        steps: u64,
    ) -> candle_core::Result<()> {
        for (i, (name, var)) in self.vars.iter().enumerate() {
            for (which, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let key = format!("{prefix}{which}.{name}");
                let t = tensors
                    .get(&key)
                    .ok_or_else(|| candle_core::Error::Msg(format!("no tensor `{key}`")))?;
                if t.shape() != var.shape() {
                    candle_core::bail!("`{key}` has the wrong shape {:?}", t.dims());
                }
                *slot = t.clone();
            }
        }
        self.steps = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn one_step_matches_a_hand_computation() {
        let x = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let cfg = OptimConfig {
            lr: 0.1,
            weight_decay: 0.5,
            grad_clip: None,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![("x".into(), x.clone())], cfg).unwrap();
        // loss = sum(x^2): g = 2x = [2, -4]. After one step m_hat = g,
        // v_hat = g^2, so the update is lr * sign(g) (up to eps), after the
        // decay x * (1 - lr * wd).
        let grads = x
            .as_tensor()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let norm = opt.step(&grads, 0.1).unwrap();
        assert!((norm - 20f64.sqrt()).abs() < 1e-5);
        let got = x.as_tensor().to_vec1::<f32>().unwrap();
        let want = [1.0 * 0.95 - 0.1, -2.0 * 0.95 + 0.1];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn clipping_and_schedules() {
        let x = Var::new(&[3.0f32, 4.0], &Device::Cpu).unwrap();
        let cfg = OptimConfig {
            grad_clip: Some(1.0),
            ..Default::default()
        };
        let opt = AdamW::new(vec![("x".into(), x.clone())], cfg.clone()).unwrap();
        let grads = (x.as_tensor() * 1.0)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!((opt.grad_norm(&grads).unwrap() - 2f64.sqrt()).abs() < 1e-6);

        let c = OptimConfig {
            lr: 1.0,
            warmup_steps: 10,
            schedule: Schedule::Cosine,
            min_lr_ratio: 0.0,
            ..Default::default()
        };
        assert!((c.lr_at(0, 110) - 0.1).abs() < 1e-12);
        assert!((c.lr_at(10, 110) - 1.0).abs() < 1e-12);
        assert!((c.lr_at(60, 110) - 0.5).abs() < 1e-12);
        assert!(c.lr_at(109, 110) < 0.01);
    }
}
