//! A small CNN image classifier for measuring samples without a human: the
//! accuracy of a classifier trained on real images on class-conditional
//! samples, the classification accuracy score (CAS, Ravuri & Vinyals
//! 2019: trained on samples, tested on real images), and the features a
//! Fréchet distance compares. Sized for a CPU: four 3x3 convs (the second
//! and fourth of stride 2, ReLU after each) -> a fully connected feature
//! layer (ReLU) -> linear; AdamW with a cosine schedule over whole epochs,
//! each a fresh permutation of the shards and of each shard's rows (one
//! shard in memory), every image shifted by up to `shift` pixels
//! (background fill) as it is drawn.

use candle_core::{D, Device, Module, Tensor};
use candle_nn::{Linear, VarBuilder, linear};
use serde::{Deserialize, Serialize};

use super::conv::Conv;
use super::optim::{AdamW, OptimConfig, Schedule};
use super::vars::SeededVars;
use crate::data::row_source::RowSource;
use crate::error::{Error, Result};
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

    /// Trains on `source` (labels must be class indices) for `cfg.epochs`
    /// passes; returns the last loss. Each pass visits the shards in a
    /// seeded order and each shard's rows in a seeded order (one shard in
    /// memory; rows held in memory are one shard), a batch running on
    /// across shards and the last of a pass short.
    pub fn train(
        &self,
        cfg: &ClassifierConfig,
        source: &RowSource,
        seed: u64,
        device: &Device,
    ) -> Result<f64> {
        let optim = OptimConfig {
            lr: cfg.lr,
            schedule: Schedule::Cosine,
            ..Default::default()
        };
        let mut opt = AdamW::new(self.vars.all(), optim.clone()).map_err(training())?;
        let mut rng = SplitMix64::stream(seed, "classifier batches");
        let n = source.len();
        let mut loss_value = f64::NAN;
        if n == 0 {
            return Ok(loss_value);
        }
        let (per, b) = (self.per_image(), cfg.batch_size.max(1));
        let total = cfg.steps(n) as u64;
        let span = cfg.shift as u64 * 2 + 1;
        let mut step = 0u64;
        let mut batch = Batch::default();
        for _ in 0..cfg.epochs {
            for shard in rng.permutation(source.shards()) {
                let rows = source.shard(shard)?;
                for r in rng.permutation(rows.len()) {
                    batch
                        .values
                        .extend_from_slice(&rows.values[r * per..(r + 1) * per]);
                    batch.labels.push(rows.labels[r] as u32);
                    let dy = rng.below(span) as isize - cfg.shift as isize;
                    let dx = rng.below(span) as isize - cfg.shift as isize;
                    batch.shifts.push((dy, dx));
                    if batch.labels.len() == b {
                        loss_value =
                            self.step(&mut opt, &batch, optim.lr_at(step, total), device)?;
                        batch.clear();
                        step += 1;
                    }
                }
            }
            if !batch.labels.is_empty() {
                loss_value = self.step(&mut opt, &batch, optim.lr_at(step, total), device)?;
                batch.clear();
                step += 1;
            }
        }
        Ok(loss_value)
    }

    /// One optimiser step on `batch`; its loss.
    fn step(&self, opt: &mut AdamW, batch: &Batch, lr: f64, device: &Device) -> Result<f64> {
        let mut step = || -> candle_core::Result<f64> {
            let x = self.input(&batch.values, Some(&batch.shifts), device)?;
            let y = Tensor::from_slice(&batch.labels, batch.labels.len(), device)?;
            let loss = candle_nn::loss::cross_entropy(&self.forward(&x)?, &y)?;
            let grads = loss.backward()?;
            opt.step(&grads, lr)?;
            Ok(loss.to_scalar::<f32>()? as f64)
        };
        step().map_err(training())
    }

    /// For each row of `source` in table order, whether its predicted
    /// class is its label; and, when `features` is set, its feature vector
    /// (rows x features, row-major). One shard in memory.
    pub fn predict(
        &self,
        source: &RowSource,
        mut features: Option<&mut Vec<f32>>,
        device: &Device,
    ) -> Result<Vec<bool>> {
        let per = self.per_image();
        let mut right = Vec::with_capacity(source.len());
        for shard in 0..source.shards() {
            let rows = source.shard(shard)?;
            for (values, labels) in rows.values.chunks(256 * per).zip(rows.labels.chunks(256)) {
                let predict = || -> candle_core::Result<(Vec<u32>, Option<Vec<f32>>)> {
                    let f = self.features(&self.input(values, None, device)?)?;
                    let predicted = self.head.forward(&f)?.argmax(D::Minus1)?.to_vec1::<u32>()?;
                    let f = match features {
                        Some(_) => Some(f.flatten_all()?.to_vec1::<f32>()?),
                        None => None,
                    };
                    Ok((predicted, f))
                };
                let (predicted, f) = predict().map_err(Error::candle("classifying"))?;
                right.extend(
                    predicted
                        .iter()
                        .zip(labels)
                        .map(|(p, l)| *p as i64 == *l as i64),
                );
                if let (Some(out), Some(f)) = (features.as_deref_mut(), f) {
                    out.extend(f);
                }
            }
        }
        Ok(right)
    }

    /// The fraction of `source`'s rows whose predicted class is their label.
    pub fn accuracy(&self, source: &RowSource, device: &Device) -> Result<f64> {
        let right = self.predict(source, None, device)?;
        Ok(right.iter().filter(|r| **r).count() as f64 / right.len().max(1) as f64)
    }
}

/// The rows of one training batch, as they are drawn.
#[derive(Default)]
struct Batch {
    values: Vec<u16>,
    labels: Vec<u32>,
    shifts: Vec<(isize, isize)>,
}

impl Batch {
    fn clear(&mut self) {
        self.values.clear();
        self.labels.clear();
        self.shifts.clear();
    }
}

fn training() -> impl Fn(candle_core::Error) -> Error {
    Error::candle("training the classifier")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::row_source::write_test_table;

    /// 64 8x8 images of two classes told apart by brightness.
    fn easy_rows() -> Vec<(i64, Vec<u8>)> {
        let mut rng = SplitMix64(3);
        (0..64)
            .map(|i| {
                let label = i % 2;
                let base = if label == 0 { 40 } else { 200 };
                (
                    label,
                    (0..64).map(|_| (base + rng.below(30)) as u8).collect(),
                )
            })
            .collect()
    }

    fn cfg() -> ClassifierConfig {
        ClassifierConfig {
            hidden: 4,
            features: 8,
            epochs: 15,
            batch_size: 16,
            lr: 0.01,
            shift: 1,
        }
    }

    /// Read from a table in shards of 10 rows (a batch spans shards), the
    /// classifier must learn them.
    #[test]
    fn the_classifier_learns_an_easy_task_from_a_table_a_shard_at_a_time() {
        let dev = Device::Cpu;
        let dir = tempfile::tempdir().unwrap();
        let table = write_test_table(dir.path(), (8, 8), 2, &easy_rows(), 10);
        let rows = RowSource::split(&table, "train").unwrap();
        assert_eq!(rows.shards(), 7);
        let model = Classifier::new(&cfg(), (8, 8, 1), 2, 0, &dev).unwrap();
        let before = model.accuracy(&rows, &dev).unwrap();
        model.train(&cfg(), &rows, 1, &dev).unwrap();
        let after = model.accuracy(&rows, &dev).unwrap();
        assert!(after > 0.95, "accuracy {before} -> {after}");
    }

    /// A split of one shard trains exactly as the same rows held in
    /// memory: streaming changes nothing where a split fits in a shard.
    #[test]
    fn one_shard_read_from_a_table_trains_as_the_rows_held_in_memory() {
        let dev = Device::Cpu;
        let dir = tempfile::tempdir().unwrap();
        let table = write_test_table(dir.path(), (8, 8), 2, &easy_rows(), 100);
        let split = RowSource::split(&table, "train").unwrap();
        let held = split.shard(0).unwrap().into_owned();
        let held = RowSource::Held(&held);
        let mut features = Vec::new();
        for source in [&split, &held] {
            let model = Classifier::new(&cfg(), (8, 8, 1), 2, 0, &dev).unwrap();
            let loss = model.train(&cfg(), source, 1, &dev).unwrap();
            let mut f = Vec::new();
            model.predict(source, Some(&mut f), &dev).unwrap();
            features.push((loss.to_bits(), f));
        }
        assert_eq!(features[0], features[1]);
    }
}
