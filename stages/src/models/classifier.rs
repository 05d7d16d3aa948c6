//! A small CNN image classifier for measuring samples without a human: the
//! accuracy of a classifier trained on real images on class-conditional
//! samples, and the classification accuracy score (CAS, Ravuri & Vinyals
//! 2019: trained on samples, tested on real images). Sized for a CPU:
//! conv 3x3 -> two stride-2 convs 3x3 -> global mean pool -> linear, ReLU
//! after each conv; AdamW with a cosine schedule on random batches.

use candle_core::{D, Device, Module, Tensor};
use candle_nn::{Linear, VarBuilder, linear};
use serde::{Deserialize, Serialize};

use super::conv::Conv;
use super::optim::{AdamW, OptimConfig, Schedule};
use super::vars::SeededVars;
use crate::data::level_table::Rows;
use crate::rng::SplitMix64;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClassifierConfig {
    /// Channels of the first conv (the next two have twice as many).
    pub hidden: usize,
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
}

impl Default for ClassifierConfig {
    fn default() -> Self {
        ClassifierConfig {
            hidden: 16,
            steps: 300,
            batch_size: 64,
            lr: 0.003,
        }
    }
}

pub struct Classifier {
    convs: Vec<Conv>,
    head: Linear,
    vars: SeededVars,
    channels: usize,
    side: (usize, usize),
}

impl Classifier {
    pub fn new(
        cfg: &ClassifierConfig,
        (h, w, c): (usize, usize, usize),
        classes: usize,
        seed: u64,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let vars = SeededVars::new(seed);
        let vb: VarBuilder = vars.var_builder(device);
        let k = cfg.hidden.max(1);
        let convs = vec![
            Conv::new(c, k, 3, 1, 1, vb.pp("conv0"))?,
            Conv::new(k, 2 * k, 3, 2, 1, vb.pp("conv1"))?,
            Conv::new(2 * k, 2 * k, 3, 2, 1, vb.pp("conv2"))?,
        ];
        let head = linear(2 * k, classes, vb.pp("head"))?;
        Ok(Classifier {
            convs,
            head,
            vars,
            channels: c,
            side: (h, w),
        })
    }

    /// Pixels (table layout, HWC 0..=255 per row) -> f32 (B, C, H, W) in [-0.5, 0.5].
    fn input(&self, values: &[u16], device: &Device) -> candle_core::Result<Tensor> {
        let (h, w, c) = (self.side.0, self.side.1, self.channels);
        let per = h * w * c;
        let b = values.len() / per;
        let mut x = vec![0f32; values.len()];
        for i in 0..b {
            for p in 0..h * w {
                for ch in 0..c {
                    x[(i * c + ch) * h * w + p] = values[i * per + p * c + ch] as f32 / 255.0 - 0.5;
                }
            }
        }
        Tensor::from_vec(x, (b, c, h, w), device)
    }

    /// Logits (B, classes).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // relu(conv(.)) of each conv, with the ReLUs fused into the next conv.
        let mut f = x.clone();
        for (i, conv) in self.convs.iter().enumerate() {
            f = match i {
                0 => conv.forward(&f)?,
                _ => conv.forward_relu(&f)?,
            };
        }
        self.head
            .forward(&f.relu()?.mean(D::Minus1)?.mean(D::Minus1)?)
    }

    /// Trains on `rows` (labels must be class indices) for `cfg.steps`
    /// steps of random batches drawn with `seed`; returns the last loss.
    pub fn train(
        &self,
        cfg: &ClassifierConfig,
        rows: &Rows,
        seed: u64,
        device: &Device,
    ) -> candle_core::Result<f64> {
        let per = self.side.0 * self.side.1 * self.channels;
        let optim = OptimConfig {
            lr: cfg.lr,
            schedule: Schedule::Cosine,
            ..Default::default()
        };
        let mut opt = AdamW::new(self.vars.all(), optim.clone())?;
        let mut rng = SplitMix64::stream(seed, "classifier batches");
        let n = rows.len();
        let mut loss_value = f64::NAN;
        if n == 0 {
            return Ok(loss_value);
        }
        let b = cfg.batch_size.max(1);
        for step in 0..cfg.steps {
            let mut values = Vec::with_capacity(b * per);
            let mut labels = Vec::with_capacity(b);
            for _ in 0..b {
                let r = rng.below(n as u64) as usize;
                values.extend_from_slice(&rows.values[r * per..(r + 1) * per]);
                labels.push(rows.labels[r] as u32);
            }
            let x = self.input(&values, device)?;
            let y = Tensor::from_vec(labels, b, device)?;
            let loss = candle_nn::loss::cross_entropy(&self.forward(&x)?, &y)?;
            let grads = loss.backward()?;
            opt.step(&grads, optim.lr_at(step as u64, cfg.steps as u64))?;
            loss_value = loss.to_scalar::<f32>()? as f64;
        }
        Ok(loss_value)
    }

    /// The fraction of `rows` whose predicted class is their label.
    pub fn accuracy(&self, rows: &Rows, device: &Device) -> candle_core::Result<f64> {
        let per = self.side.0 * self.side.1 * self.channels;
        let mut right = 0usize;
        for (values, labels) in rows.values.chunks(256 * per).zip(rows.labels.chunks(256)) {
            let predicted = self
                .forward(&self.input(values, device)?)?
                .argmax(D::Minus1)?
                .to_vec1::<u32>()?;
            right += predicted
                .iter()
                .zip(labels)
                .filter(|(p, l)| **p as i64 == **l as i64)
                .count();
        }
        Ok(right as f64 / rows.len().max(1) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two classes told apart by brightness: the classifier must learn them.
    #[test]
    fn the_classifier_learns_an_easy_task() {
        let dev = Device::Cpu;
        let mut rng = SplitMix64(3);
        let n = 64;
        let mut rows = Rows::default();
        for i in 0..n {
            let label = i % 2;
            rows.ids.push(i as i64);
            rows.labels.push(label);
            let base = if label == 0 { 40 } else { 200 };
            rows.values
                .extend((0..64).map(|_| (base + rng.below(30)) as u16));
        }
        let cfg = ClassifierConfig {
            hidden: 4,
            steps: 60,
            batch_size: 16,
            lr: 0.01,
        };
        let model = Classifier::new(&cfg, (8, 8, 1), 2, 0, &dev).unwrap();
        let before = model.accuracy(&rows, &dev).unwrap();
        model.train(&cfg, &rows, 1, &dev).unwrap();
        let after = model.accuracy(&rows, &dev).unwrap();
        assert!(after > 0.95, "accuracy {before} -> {after}");
    }
}
