//! A small CNN image classifier for measuring samples without a human: the
//! accuracy of a classifier trained on real images on class-conditional
//! samples, the classification accuracy score (CAS, Ravuri & Vinyals
//! 2019: trained on samples, tested on real images), and the features a
//! Fréchet distance compares. Sized for a CPU: four 3x3 convs (the second
//! and fourth of stride 2, ReLU after each) -> a fully connected feature
//! layer (ReLU) -> linear; AdamW with a cosine schedule over whole epochs,
//! each a fresh permutation of the training rows, every image shifted by
//! up to `shift` pixels (background fill) as it is drawn.

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
    /// Channels of the first two convs (the next two have twice as many).
    pub hidden: usize,
    /// Width of the feature layer (what the Fréchet distance compares).
    pub features: usize,
    /// Passes over the training rows.
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    /// Random translation of each training image, in pixels either way.
    pub shift: usize,
}

impl Default for ClassifierConfig {
    fn default() -> Self {
        ClassifierConfig {
            hidden: 16,
            features: 128,
            epochs: 20,
            batch_size: 64,
            lr: 0.002,
            shift: 2,
        }
    }
}

impl ClassifierConfig {
    /// Optimiser steps to train on `rows` images.
    pub fn steps(&self, rows: usize) -> usize {
        self.epochs * rows.div_ceil(self.batch_size.max(1))
    }
}

pub struct Classifier {
    convs: Vec<Conv>,
    features: Linear,
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
            Conv::new(2 * k, 2 * k, 3, 1, 1, vb.pp("conv2"))?,
            Conv::new(2 * k, 4 * k, 3, 2, 1, vb.pp("conv3"))?,
        ];
        let flat = 4 * k * h.div_ceil(4) * w.div_ceil(4);
        let features = linear(flat, cfg.features.max(1), vb.pp("features"))?;
        let head = linear(cfg.features.max(1), classes, vb.pp("head"))?;
        Ok(Classifier {
            convs,
            features,
            head,
            vars,
            channels: c,
            side: (h, w),
        })
    }

    fn per_image(&self) -> usize {
        self.side.0 * self.side.1 * self.channels
    }

    /// Pixels (table layout, HWC 0..=255 per row) -> f32 (B, C, H, W) in
    /// [-0.5, 0.5], image i moved by `shifts[i]` (dy, dx) with 0-valued
    /// pixels shifted in.
    fn input(
        &self,
        values: &[u16],
        shifts: Option<&[(isize, isize)]>,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let (h, w, c) = (self.side.0, self.side.1, self.channels);
        let per = self.per_image();
        let b = values.len() / per;
        let mut x = vec![-0.5f32; values.len()];
        for i in 0..b {
            let (dy, dx) = shifts.map_or((0, 0), |s| s[i]);
            for y in 0..h {
                let Some(sy) = y.checked_add_signed(-dy).filter(|sy| *sy < h) else {
                    continue;
                };
                for xx in 0..w {
                    let Some(sx) = xx.checked_add_signed(-dx).filter(|sx| *sx < w) else {
                        continue;
                    };
                    for ch in 0..c {
                        x[((i * c + ch) * h + y) * w + xx] =
                            values[i * per + (sy * w + sx) * c + ch] as f32 / 255.0 - 0.5;
                    }
                }
            }
        }
        Tensor::from_vec(x, (b, c, h, w), device)
    }

    /// The feature layer's activations (B, features).
    pub fn features(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // relu(conv(.)) of each conv, with the ReLUs fused into the next conv.
        let mut f = x.clone();
        for (i, conv) in self.convs.iter().enumerate() {
            f = match i {
                0 => conv.forward(&f)?,
                _ => conv.forward_relu(&f)?,
            };
        }
        self.features.forward(&f.relu()?.flatten_from(1)?)?.relu()
    }

    /// Logits (B, classes).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.head.forward(&self.features(x)?)
    }

    /// Trains on `rows` (labels must be class indices) for `cfg.epochs`
    /// passes in orders drawn with `seed`; returns the last loss.
    pub fn train(
        &self,
        cfg: &ClassifierConfig,
        rows: &Rows,
        seed: u64,
        device: &Device,
    ) -> candle_core::Result<f64> {
        let per = self.per_image();
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
        let total = cfg.steps(n) as u64;
        let span = cfg.shift as u64 * 2 + 1;
        let mut step = 0u64;
        for _ in 0..cfg.epochs {
            let order = rng.permutation(n);
            for batch in order.chunks(b) {
                let mut values = Vec::with_capacity(batch.len() * per);
                let mut labels = Vec::with_capacity(batch.len());
                let mut shifts = Vec::with_capacity(batch.len());
                for &r in batch {
                    values.extend_from_slice(&rows.values[r * per..(r + 1) * per]);
                    labels.push(rows.labels[r] as u32);
                    let dy = rng.below(span) as isize - cfg.shift as isize;
                    let dx = rng.below(span) as isize - cfg.shift as isize;
                    shifts.push((dy, dx));
                }
                let x = self.input(&values, Some(&shifts), device)?;
                let y = Tensor::from_vec(labels, batch.len(), device)?;
                let loss = candle_nn::loss::cross_entropy(&self.forward(&x)?, &y)?;
                let grads = loss.backward()?;
                opt.step(&grads, optim.lr_at(step, total))?;
                loss_value = loss.to_scalar::<f32>()? as f64;
                step += 1;
            }
        }
        Ok(loss_value)
    }

    /// For each row, whether its predicted class is its label; and, when
    /// `features` is set, its feature vector (rows x features, row-major).
    pub fn predict(
        &self,
        rows: &Rows,
        mut features: Option<&mut Vec<f32>>,
        device: &Device,
    ) -> candle_core::Result<Vec<bool>> {
        let per = self.per_image();
        let mut right = Vec::with_capacity(rows.len());
        for (values, labels) in rows.values.chunks(256 * per).zip(rows.labels.chunks(256)) {
            let f = self.features(&self.input(values, None, device)?)?;
            let predicted = self.head.forward(&f)?.argmax(D::Minus1)?.to_vec1::<u32>()?;
            right.extend(
                predicted
                    .iter()
                    .zip(labels)
                    .map(|(p, l)| *p as i64 == *l as i64),
            );
            if let Some(out) = features.as_deref_mut() {
                out.extend(f.flatten_all()?.to_vec1::<f32>()?);
            }
        }
        Ok(right)
    }

    /// The fraction of `rows` whose predicted class is their label.
    pub fn accuracy(&self, rows: &Rows, device: &Device) -> candle_core::Result<f64> {
        let right = self.predict(rows, None, device)?;
        Ok(right.iter().filter(|r| **r).count() as f64 / rows.len().max(1) as f64)
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
            features: 8,
            epochs: 15,
            batch_size: 16,
            lr: 0.01,
            shift: 0,
        };
        let model = Classifier::new(&cfg, (8, 8, 1), 2, 0, &dev).unwrap();
        let before = model.accuracy(&rows, &dev).unwrap();
        model.train(&cfg, &rows, 1, &dev).unwrap();
        let after = model.accuracy(&rows, &dev).unwrap();
        assert!(after > 0.95, "accuracy {before} -> {after}");
    }
}
