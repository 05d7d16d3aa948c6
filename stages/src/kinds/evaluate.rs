//! The `evaluate` stage: sample quality without a human, for any number of
//! sample sets side by side (the hierarchy's and the flat baseline's).
//!
//! ```yaml
//! evaluation:
//!   kind: evaluate
//!   inputs: {real: prep, ham: ham_samples, baseline: baseline_samples}
//!   params:
//!     classifier: {hidden: 16, features: 128, epochs: 20, batch_size: 64, lr: 0.002, shift: 2}
//!     train_split: train        # real images the reference classifier learns
//!     test_split: test          # real images every classifier is tested on
//!     resamples: 1000           # bootstrap draws for each 95 % interval
//!     seed: 0
//! ```
//!
//! For each sample set of N images:
//! - **accuracy**: a reference classifier ([`Classifier`]), trained on the
//!   real `train_split` for `epochs` passes, classifies the samples: does
//!   it see the class each was drawn for? Interval: bootstrap over samples.
//! - **CAS** (Ravuri & Vinyals 2019): a classifier of the same
//!   architecture, seed and epochs trained on the N samples alone, tested
//!   on the real `test_split`; beside it **real CAS**, the same trained on
//!   N real `train_split` images with the sample set's class counts (the
//!   ceiling at that N). Intervals: bootstrap over the test images (the
//!   test set's noise; a sweep over seeds gives the training noise).
//! - **Fréchet distance** between the reference classifier's feature-layer
//!   activations on the samples and on the real test images (FID's formula
//!   on this classifier's features, not Inception's: comparable within one
//!   evaluation config only), beside the same for the N real images.
//!   Interval: bootstrap over samples.
//!
//! `real` is an image table (a `preprocess` stage); every other input is a
//! `sample` stage (its `images/` table) or an image table, with the real
//! table's image shape and classes.
//!
//! Memory holds one shard of a table at a time (every split is read a
//! shard at a time, [`RowSource`]), the labels of each split, the
//! classifier's features of the samples and the test images, and the N
//! real images a sample set's CAS is compared with: never a whole split.
//!
//! Output: `evaluation.json`, `evaluation.md` (the table). Metrics, each
//! with `_lo` and `_hi` (its interval): `eval.real.test_accuracy`,
//! `eval.<input>.accuracy`, `eval.<input>.cas`, `eval.<input>.real_cas`,
//! `eval.<input>.frechet`, `eval.<input>.real_frechet`.

use std::time::Instant;

use pipeline::ParamError;
use pipeline::spec::Stage;
use pipeline::stage::{StageContext, StageError, StageKind};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::data::layout::{SAMPLES_SPLIT, image_table_dir};
use crate::data::level_table::InputKind;
use crate::data::level_table::LevelTable;
use crate::data::row_source::RowSource;
use crate::device::device;
use crate::error::Error;
use crate::models::classifier::{Classifier, ClassifierConfig};
use crate::rng::SplitMix64;
use crate::stats::{self, Estimate};

pub struct Evaluate;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    classifier: ClassifierConfig,
    #[serde(default = "train")]
    train_split: String,
    #[serde(default = "test")]
    test_split: String,
    #[serde(default = "resamples")]
    resamples: usize,
    #[serde(default)]
    seed: u64,
}

fn resamples() -> usize {
    1000
}

fn train() -> String {
    "train".into()
}
fn test() -> String {
    "test".into()
}

/// A split read a shard at a time, and its labels (read once, in table
/// order), each checked to be a class.
struct Labelled<'a> {
    rows: RowSource<'a>,
    labels: Vec<i32>,
}

impl<'a> Labelled<'a> {
    fn read(table: &'a LevelTable, split: &'a str, input: &str) -> Result<Self, Error> {
        let rows = RowSource::split(table, split)?;
        let labels = rows.labels()?;
        let n = table.class_names.len();
        if let Some((at, l)) = labels
            .iter()
            .enumerate()
            .find(|(_, l)| !(0..n as i32).contains(l))
        {
            let id = rows
                .rows_at(&[at])?
                .ids
                .first()
                .copied()
                .unwrap_or_default();
            return Err(Error::Params(format!(
                "inputs.{input}: row id {id} of split `{split}` has label {l}, not one of the {n} classes; evaluation needs labelled images"
            )));
        }
        if labels.is_empty() {
            return Err(Error::Params(format!(
                "inputs.{input}: split `{split}` has no rows"
            )));
        }
        Ok(Labelled { rows, labels })
    }

    fn len(&self) -> usize {
        self.labels.len()
    }
}

impl StageKind for Evaluate {
    fn name(&self) -> &'static str {
        "evaluate"
    }

    fn version(&self) -> u32 {
        3
    }

    fn device_dependent(&self) -> bool {
        true
    }

    fn resolved_params(
        &self,
        stage: &Stage,
    ) -> Result<serde_json::Map<String, serde_json::Value>, ParamError> {
        crate::params::resolve::<Config>(&stage.params)
    }

    fn headline_metrics(&self) -> &'static [&'static str] {
        &["eval.*.accuracy", "eval.*.cas", "eval.*.frechet"]
    }

    fn check(&self, stage: &Stage) -> Result<(), ParamError> {
        let _: Config = crate::params::parse(&stage.params)?;
        if !stage.inputs.contains_key("real") || stage.inputs.len() < 2 {
            return Err(ParamError::new(
                "inputs",
                "evaluate needs `inputs: {real: PREPROCESS_STAGE, NAME: SAMPLE_STAGE, ...}` (one or more sample sets)",
            ));
        }
        Ok(())
    }

    fn run(&self, ctx: &StageContext) -> Result<(), StageError> {
        let cfg: Config = crate::params::parse(&crate::params::object(&ctx.job.params))
            .map_err(|e| Error::Params(e.message))?;
        let device = device(&ctx.job.device)?;
        let real = LevelTable::open(&image_table_dir(ctx.input("real")?))?;
        let InputKind::Pixels { channels } = real.input else {
            return Err(Error::Params(
                "inputs.real: a code table; give the image table of a preprocess stage".into(),
            )
            .into());
        };
        let shape = (real.height, real.width, channels);
        let classes = real.class_names.len();
        let train_rows = Labelled::read(&real, &cfg.train_split, "real")?;
        let test_rows = Labelled::read(&real, &cfg.test_split, "real")?;

        let mut tables = Vec::new();
        for name in ctx.job.inputs.keys().filter(|k| *k != "real") {
            tables.push((name.clone(), sample_table(ctx, name, &real)?));
        }
        let mut sets = Vec::new();
        for (name, (table, split)) in &tables {
            sets.push((name, Labelled::read(table, split, name)?));
        }

        let ev = Evaluation {
            cfg: &cfg,
            shape,
            classes,
            device: &device,
        };
        let t = Instant::now();
        let reference = ev.trained(&train_rows.rows)?;
        let mut test_features = Vec::new();
        let test_hits = reference.predict(&test_rows.rows, Some(&mut test_features), &device)?;
        let real_acc = stats::proportion(&test_hits, cfg.resamples, cfg.seed);
        emit(ctx, "eval.real.test_accuracy", real_acc);
        eprintln!(
            "real: classifier trained on {} `{}` images: {} on {} `{}` images ({:.0} s)",
            train_rows.len(),
            cfg.train_split,
            percent(real_acc),
            test_rows.len(),
            cfg.test_split,
            t.elapsed().as_secs_f64()
        );
        let mut results = serde_json::Map::new();
        let mut table = format!(
            "| images | N | real-data classifier's accuracy on them | CAS: trained on them, tested on real `{test}` | Fréchet distance to real `{test}` (classifier features) |\n| --- | --- | --- | --- | --- |\n| real `{}` | {} | {} (on real `{test}`) | | |\n",
            cfg.train_split,
            train_rows.len(),
            percent(real_acc),
            test = cfg.test_split,
        );
        let mut real_by_classes = RealByClasses::new();
        for (i, (name, rows)) in sets.iter().enumerate() {
            let t = Instant::now();
            let scores = ev.score(
                &reference,
                rows,
                &train_rows,
                &test_rows.rows,
                &test_features,
                &mut real_by_classes,
            )?;
            for (metric, e) in scores.metrics() {
                emit(ctx, &format!("eval.{name}.{metric}"), e);
            }
            ctx.progress((i + 1) as u64, sets.len() as u64, Some(name.to_string()));
            eprintln!(
                "{name}: {} samples; real-data classifier {}; CAS {} (real images: {}); Fréchet {} (real images: {}) ({:.0} s)",
                rows.len(),
                percent(scores.accuracy),
                percent(scores.cas),
                percent(scores.real_cas),
                distance(scores.frechet),
                distance(scores.real_frechet),
                t.elapsed().as_secs_f64()
            );
            table.push_str(&scores.table_rows(name, rows.len(), &cfg.train_split));
            results.insert(name.to_string(), scores.record(rows.len()));
        }
        let record = json!({
            "real": {
                "train_split": cfg.train_split,
                "train_rows": train_rows.len(),
                "test_split": cfg.test_split,
                "test_rows": test_rows.len(),
                "test_accuracy": real_acc,
            },
            "samples": results,
            "classifier": cfg.classifier,
            "resamples": cfg.resamples,
            "seed": cfg.seed,
        });
        let out = ctx.out_dir();
        for (file, bytes) in [
            ("evaluation.json", serde_json::to_vec_pretty(&record)?),
            ("evaluation.md", table.into_bytes()),
        ] {
            let p = out.join(file);
            std::fs::write(&p, bytes)
                .map_err(|e| Error::io(format!("writing {}", p.display()), e))?;
        }
        Ok(())
    }
}

/// The table of sample input `name` and the split that holds its images
/// (its `samples` split, else its first), checked to be images of the
/// real table's shape and classes.
fn sample_table(
    ctx: &StageContext,
    name: &str,
    real: &LevelTable,
) -> Result<(LevelTable, String), StageError> {
    let table = LevelTable::open(&image_table_dir(ctx.input(name)?))?;
    if table.input != real.input || (table.height, table.width) != (real.height, real.width) {
        return Err(Error::Params(format!(
            "inputs.{name}: its images are {}x{} {:?}, the real ones {}x{} {:?}; evaluate samples of the same data",
            table.height, table.width, table.input, real.height, real.width, real.input
        ))
        .into());
    }
    if table.class_names != real.class_names {
        return Err(Error::Params(format!(
            "inputs.{name}: its classes {:?} are not the real table's {:?}",
            table.class_names, real.class_names
        ))
        .into());
    }
    let split = if table.splits.contains_key(SAMPLES_SPLIT) {
        SAMPLES_SPLIT.to_string()
    } else {
        match table.splits.keys().next() {
            Some(s) => s.clone(),
            None => {
                return Err(Error::Params(format!("inputs.{name}: the table is empty")).into());
            }
        }
    };
    Ok((table, split))
}

/// One evaluation's classifier settings and device.
struct Evaluation<'a> {
    cfg: &'a Config,
    shape: (usize, usize, usize),
    classes: usize,
    device: &'a candle_core::Device,
}

/// What one sample set scored, each with its 95 % interval.
struct Scores {
    /// Real training images with the set's class counts (fewer than the
    /// samples where a class runs out).
    real_n: usize,
    accuracy: Estimate,
    cas: Estimate,
    real_cas: Estimate,
    frechet: Estimate,
    real_frechet: Estimate,
}

impl Scores {
    /// The set's row of `evaluation.md`, and its real images' row.
    fn table_rows(&self, name: &str, samples: usize, train_split: &str) -> String {
        format!(
            "| {name} | {samples} | {} | {} | {} |\n| real `{train_split}`, {} images with {name}'s classes | {} | | {} | {} |\n",
            percent(self.accuracy),
            percent(self.cas),
            distance(self.frechet),
            self.real_n,
            self.real_n,
            percent(self.real_cas),
            distance(self.real_frechet),
        )
    }

    /// The set's entry in `evaluation.json`.
    fn record(&self, samples: usize) -> serde_json::Value {
        let mut record = serde_json::Map::new();
        record.insert("samples".into(), json!(samples));
        record.insert("real_images".into(), json!(self.real_n));
        for (metric, e) in self.metrics() {
            record.insert(metric.into(), json!(e));
        }
        serde_json::Value::Object(record)
    }

    fn metrics(&self) -> [(&'static str, Estimate); 5] {
        [
            ("accuracy", self.accuracy),
            ("cas", self.cas),
            ("real_cas", self.real_cas),
            ("frechet", self.frechet),
            ("real_frechet", self.real_frechet),
        ]
    }
}

impl Evaluation<'_> {
    /// A classifier trained on `rows` with the stage's config and seed.
    fn trained(&self, rows: &RowSource) -> Result<Classifier, Error> {
        let c = &self.cfg.classifier;
        let model = Classifier::new(c, self.shape, self.classes, self.cfg.seed, self.device)
            .map_err(Error::candle("building the classifier"))?;
        model.train(c, rows, self.cfg.seed, self.device)?;
        Ok(model)
    }

    /// Accuracy, CAS and Fréchet distance of one sample set, and the same
    /// for as many real training images with the set's class counts.
    fn score(
        &self,
        reference: &Classifier,
        samples: &Labelled,
        train: &Labelled,
        test: &RowSource,
        test_features: &[f32],
        real_by_classes: &mut RealByClasses,
    ) -> Result<Scores, Error> {
        let (dim, seed, n) = (
            self.cfg.classifier.features.max(1),
            self.cfg.seed,
            self.cfg.resamples,
        );
        let mut features = Vec::new();
        let hits = reference.predict(&samples.rows, Some(&mut features), self.device)?;
        let cas_hits = self
            .trained(&samples.rows)?
            .predict(test, None, self.device)?;
        // The real images' side depends on the set's class counts alone:
        // sets drawn alike (100 per class each) share one computation.
        let counts = class_counts(&samples.labels);
        let real = match real_by_classes.get(&counts) {
            Some(r) => *r,
            None => {
                let r = self.real_side(reference, &counts, train, test, test_features)?;
                real_by_classes.insert(counts, r);
                r
            }
        };
        Ok(Scores {
            real_n: real.n,
            accuracy: stats::proportion(&hits, n, seed),
            cas: stats::proportion(&cas_hits, n, seed),
            real_cas: real.cas,
            frechet: stats::frechet_distance(&features, test_features, dim, n / 10, seed),
            real_frechet: real.frechet,
        })
    }

    /// CAS and Fréchet distance of real training images with class
    /// counts `like`.
    fn real_side(
        &self,
        reference: &Classifier,
        like: &ClassCounts,
        train: &Labelled,
        test: &RowSource,
        test_features: &[f32],
    ) -> Result<RealScores, Error> {
        let (dim, seed, n) = (
            self.cfg.classifier.features.max(1),
            self.cfg.seed,
            self.cfg.resamples,
        );
        let real = train
            .rows
            .rows_at(&same_classes(&train.labels, like, seed))?;
        let real = RowSource::Held(&real);
        let mut real_features = Vec::new();
        reference.predict(&real, Some(&mut real_features), self.device)?;
        let real_cas_hits = self.trained(&real)?.predict(test, None, self.device)?;
        Ok(RealScores {
            n: real.len(),
            cas: stats::proportion(&real_cas_hits, n, seed),
            frechet: stats::frechet_distance(&real_features, test_features, dim, n / 10, seed),
        })
    }
}

/// The real images' scores for a sample set's class counts.
#[derive(Clone, Copy)]
struct RealScores {
    n: usize,
    cas: Estimate,
    frechet: Estimate,
}

/// Class -> rows, the key under which real-image scores are reused.
type ClassCounts = std::collections::BTreeMap<i32, usize>;
type RealByClasses = std::collections::BTreeMap<ClassCounts, RealScores>;

fn class_counts(labels: &[i32]) -> ClassCounts {
    let mut counts = ClassCounts::new();
    for l in labels {
        *counts.entry(*l).or_default() += 1;
    }
    counts
}

/// Positions of rows of a pool with these labels that have the class
/// counts `like`, drawn without replacement in a seeded order (fewer
/// where a class runs out).
fn same_classes(labels: &[i32], like: &ClassCounts, seed: u64) -> Vec<usize> {
    let mut wanted = like.clone();
    let mut out = Vec::new();
    for r in SplitMix64::stream(seed, "real rows like the samples").permutation(labels.len()) {
        let Some(left) = wanted.get_mut(&labels[r]).filter(|n| **n > 0) else {
            continue;
        };
        *left -= 1;
        out.push(r);
    }
    out
}

fn emit(ctx: &StageContext, name: &str, e: Estimate) {
    ctx.metric(name, 0, e.value);
    ctx.metric(&format!("{name}_lo"), 0, e.lo);
    ctx.metric(&format!("{name}_hi"), 0, e.hi);
}

fn percent(e: Estimate) -> String {
    format!(
        "{:.1} % [{:.1}, {:.1}]",
        100.0 * e.value,
        100.0 * e.lo,
        100.0 * e.hi
    )
}

fn distance(e: Estimate) -> String {
    format!("{:.2} [{:.2}, {:.2}]", e.value, e.lo, e.hi)
}
