//! The `preprocess` stage: an image source -> a Parquet image table
//! (`data::table`), with transforms, splits, caps and subsets.
//!
//! ```yaml
//! prep:
//!   kind: preprocess
//!   params:
//!     source:
//!       format: idx                 # idx | cifar10 | cifar100 | image_folder | parquet
//!       train: {images: data/fashion-mnist/train-images-idx3-ubyte.gz,
//!               labels: data/fashion-mnist/train-labels-idx1-ubyte.gz}
//!       test:  {images: ..., labels: ...}   # optional: the source's own test split
//!     transforms: {pad: 2}          # color (gray|rgb), resize (shorter side), crop (centre, square), pad
//!     validation: {fraction: 0.1, seed: 0}  # carve a `val` split out of train
//!     per_class_cap: 500            # at most this many rows per class and split
//!     subset: 2000                  # at most this many rows per split
//!     class_names: [...]            # default: from the source
//!     shuffle: true                 # rows in a seeded random order (default); false: source order
//!     seed: 0                       # of that order
//! ```
//!
//! Source paths are relative to the pipeline's root and are deps of the stage
//! (their contents are in the stage key). Rows are read and transformed one
//! at a time, so memory holds one shard, not the data set. Order is
//! deterministic: each split's rows are written in a seeded random order
//! over the whole split ([`Spill`]: through spill files, one per shard), so
//! that a class-sorted source (an ImageFolder) still gives shards, batches
//! and validation rows of every class; `subset` and `per_class_cap` keep
//! the first rows of that order, a random subset. `shuffle: false` keeps
//! the source order. The validation split is chosen by a seeded shuffle.

use std::path::{Path, PathBuf};

use pipeline::ParamError;
use pipeline::spec::{Stage, clean_relative};
use pipeline::stage::{StageContext, StageError, StageKind};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::data::cifar::{CIFAR10_CLASSES, CifarReader, Variant};
use crate::data::folder::FolderReader;
use crate::data::hub_parquet::HubParquetReader;
use crate::data::idx::IdxReader;
use crate::data::layout::{HEIGHT_FACT, PIXEL_CHANNELS_FACT, WIDTH_FACT};
use crate::data::shuffle::Spill;
use crate::data::table::{ShardWriter, TABLE_FORMAT, TableIndex, TableMeta};
use crate::data::transform::{Color, Transforms};
use crate::data::{Sample, SampleSource};
use crate::error::Error;
use crate::rng::SplitMix64;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdxPair {
    pub images: String,
    pub labels: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "format", rename_all = "snake_case", deny_unknown_fields)]
pub enum Source {
    Idx {
        train: IdxPair,
        test: Option<IdxPair>,
    },
    Cifar10 {
        train: Vec<String>,
        test: Option<Vec<String>>,
    },
    Cifar100 {
        train: Vec<String>,
        test: Option<Vec<String>>,
    },
    ImageFolder {
        train: String,
        test: Option<String>,
    },
    Parquet {
        train: Vec<String>,
        test: Option<Vec<String>>,
        #[serde(default = "image_column")]
        image_column: String,
        #[serde(default = "label_column")]
        label_column: String,
    },
}

fn image_column() -> String {
    "image".into()
}

fn label_column() -> String {
    "label".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Validation {
    pub fraction: f64,
    #[serde(default)]
    pub seed: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub source: Source,
    #[serde(default)]
    pub transforms: Transforms,
    pub validation: Option<Validation>,
    pub per_class_cap: Option<u64>,
    pub subset: Option<u64>,
    pub class_names: Option<Vec<String>>,
    #[serde(default = "shard_rows")]
    pub shard_rows: usize,
    #[serde(default = "shuffle")]
    pub shuffle: bool,
    #[serde(default)]
    pub seed: u64,
}

fn shuffle() -> bool {
    true
}

fn shard_rows() -> usize {
    10_000
}

impl Source {
    /// Every file or folder the source reads, as written in the params.
    pub fn paths(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        match self {
            Source::Idx { train, test } => {
                for p in std::iter::once(train).chain(test) {
                    out.push(&p.images);
                    out.push(&p.labels);
                }
            }
            Source::Cifar10 { train, test }
            | Source::Cifar100 { train, test }
            | Source::Parquet { train, test, .. } => {
                out.extend(
                    train
                        .iter()
                        .chain(test.iter().flatten())
                        .map(String::as_str),
                );
            }
            Source::ImageFolder { train, test } => {
                out.push(train);
                out.extend(test.as_deref());
            }
        }
        out
    }
}

/// The params as a [`Config`]; an error names the param path (`source.train`).
fn parse_config(params: &serde_json::Map<String, Value>) -> Result<Config, ParamError> {
    crate::params::parse(params)
}

pub struct Preprocess;

impl StageKind for Preprocess {
    fn name(&self) -> &'static str {
        "preprocess"
    }

    fn version(&self) -> u32 {
        2
    }

    fn input_names(&self) -> Option<&'static [&'static str]> {
        Some(&[])
    }

    fn resolved_params(
        &self,
        stage: &Stage,
    ) -> Result<serde_json::Map<String, serde_json::Value>, ParamError> {
        crate::params::resolve::<Config>(&stage.params)
    }

    fn check(&self, stage: &Stage) -> Result<(), ParamError> {
        let cfg = parse_config(&stage.params)?;
        if let Some(v) = &cfg.validation
            && !(v.fraction > 0.0 && v.fraction < 1.0)
        {
            return Err(ParamError::new(
                "params.validation",
                format!(
                    "validation.fraction must be between 0 and 1, not {}",
                    v.fraction
                ),
            ));
        }
        if cfg.shard_rows == 0 {
            return Err(ParamError::new(
                "params.shard_rows",
                "shard_rows must be at least 1",
            ));
        }
        if let Source::Parquet { .. } = cfg.source
            && cfg.class_names.is_none()
        {
            return Err(ParamError::new(
                "params.source",
                "a parquet source needs `class_names` (the labels are only numbers there)",
            ));
        }
        Ok(())
    }

    fn implicit_deps(&self, stage: &Stage) -> Vec<String> {
        parse_config(&stage.params)
            .map(|c| c.source.paths().into_iter().map(str::to_string).collect())
            .unwrap_or_default()
    }

    /// The images' channels where the params fix them: a `color`
    /// transform, else IDX (grey) or CIFAR (RGB); a folder or Parquet
    /// source keeps whatever its files hold. Their size where the params
    /// fix it: a `crop` (square), or CIFAR's 32x32 without `resize`; plus
    /// twice the `pad`. (An IDX file's size is in its header, not here.)
    fn output_facts(
        &self,
        stage: &Stage,
        _inputs: &std::collections::BTreeMap<String, Value>,
    ) -> Value {
        let Ok(cfg) = parse_config(&stage.params) else {
            return Value::Null;
        };
        let mut facts = serde_json::Map::new();
        let channels = match (cfg.transforms.color, &cfg.source) {
            (Some(Color::Gray), _) | (None, Source::Idx { .. }) => Some(1),
            (Some(Color::Rgb), _) | (None, Source::Cifar10 { .. } | Source::Cifar100 { .. }) => {
                Some(3)
            }
            (None, _) => None,
        };
        if let Some(c) = channels {
            facts.insert(PIXEL_CHANNELS_FACT.into(), c.into());
        }
        let side = match (cfg.transforms.crop, cfg.transforms.resize, &cfg.source) {
            (Some(crop), _, _) => Some(crop),
            (None, None, Source::Cifar10 { .. } | Source::Cifar100 { .. }) => {
                Some(crate::data::cifar::SIDE as u32)
            }
            _ => None,
        };
        if let Some(side) = side {
            let side = side as u64 + 2 * cfg.transforms.pad.unwrap_or(0) as u64;
            facts.insert(HEIGHT_FACT.into(), side.into());
            facts.insert(WIDTH_FACT.into(), side.into());
        }
        match facts.is_empty() {
            true => Value::Null,
            false => Value::Object(facts),
        }
    }

    fn run(&self, ctx: &StageContext) -> Result<(), StageError> {
        let cfg = parse_config(&crate::params::object(&ctx.job.params))
            .map_err(|e| Error::Params(e.message))?;
        let root = ctx.job.pipeline_dir.clone();
        let resolve = |p: &str| -> Result<PathBuf, Error> {
            Ok(root.join(clean_relative(p).map_err(|m| Error::Params(format!("`{p}`: {m}")))?))
        };
        let rgb = matches!(
            cfg.transforms.color,
            Some(crate::data::transform::Color::Rgb)
        );
        let (train, test, source_classes) = open_sources(&cfg.source, &resolve, rgb)?;
        let class_names = cfg.class_names.clone().unwrap_or(source_classes);
        let total = train.len_hint() + test.as_ref().map_or(0, |t| t.len_hint());
        let mut writer = TableWriter::new(ctx, &cfg, class_names, total);

        let val_mask = cfg
            .validation
            .as_ref()
            .map(|v| validation_mask(train.len_hint(), v.fraction, v.seed));
        let mut spill = match cfg.shuffle {
            true => {
                let mut spill = Spill::new(
                    &ctx.out_dir().join(".row-shuffle"),
                    cfg.shard_rows,
                    cfg.seed,
                )?;
                let val = val_mask
                    .as_ref()
                    .map_or(0, |m| m.iter().filter(|v| **v).count() as u64);
                spill.expect("train", train.len_hint() - val);
                if val_mask.is_some() {
                    spill.expect("val", val);
                }
                if let Some(t) = &test {
                    spill.expect("test", t.len_hint());
                }
                Some(spill)
            }
            false => None,
        };
        let mut route = |writer: &mut TableWriter, split: &str, s| -> Result<(), Error> {
            let s = writer.prepare(split, s)?;
            match &mut spill {
                Some(spill) => spill.add(split, &s),
                None => writer.store(split, &s),
            }
        };
        for (i, s) in train.enumerate() {
            let split = match &val_mask {
                Some(m) if m.get(i).copied().unwrap_or(false) => "val",
                _ => "train",
            };
            route(&mut writer, split, s?)?;
        }
        if let Some(test) = test {
            for s in test {
                route(&mut writer, "test", s?)?;
            }
        }
        if let Some(spill) = spill {
            spill.drain(|split, s| writer.store(split, &s))?;
        }
        writer.finish()?;
        Ok(())
    }
}

type Opened = (
    Box<dyn SampleSource>,
    Option<Box<dyn SampleSource>>,
    Vec<String>,
);

fn open_sources(
    source: &Source,
    resolve: &dyn Fn(&str) -> Result<PathBuf, Error>,
    rgb: bool,
) -> Result<Opened, Error> {
    let numbered = |n: usize| (0..n).map(|i| i.to_string()).collect::<Vec<_>>();
    let files = |list: &Vec<String>| {
        list.iter()
            .map(|p| resolve(p))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(match source {
        Source::Idx { train, test } => {
            let open = |p: &IdxPair| -> Result<Box<dyn SampleSource>, Error> {
                Ok(Box::new(IdxReader::open(
                    &resolve(&p.images)?,
                    &resolve(&p.labels)?,
                )?))
            };
            (
                open(train)?,
                test.as_ref().map(open).transpose()?,
                numbered(10),
            )
        }
        Source::Cifar10 { train, test } | Source::Cifar100 { train, test } => {
            let variant = if matches!(source, Source::Cifar10 { .. }) {
                Variant::Cifar10
            } else {
                Variant::Cifar100
            };
            let names = if variant == Variant::Cifar10 {
                CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect()
            } else {
                numbered(100)
            };
            let open = |l: &Vec<String>| -> Result<Box<dyn SampleSource>, Error> {
                Ok(Box::new(CifarReader::open(variant, &files(l)?)?))
            };
            (open(train)?, test.as_ref().map(open).transpose()?, names)
        }
        Source::ImageFolder { train, test } => {
            let tr = FolderReader::open(&resolve(train)?, rgb)?;
            let names = tr.classes.clone();
            let te = match test {
                Some(t) => {
                    let r = FolderReader::open(&resolve(t)?, rgb)?;
                    if r.classes != names {
                        return Err(Error::data(
                            resolve(t)?,
                            None,
                            "its class folders differ from the train folder's; both need the same classes",
                        ));
                    }
                    Some(Box::new(r) as Box<dyn SampleSource>)
                }
                None => None,
            };
            (Box::new(tr), te, names)
        }
        Source::Parquet {
            train,
            test,
            image_column,
            label_column,
        } => {
            let open = |l: &Vec<String>| -> Result<Box<dyn SampleSource>, Error> {
                Ok(Box::new(HubParquetReader::open(
                    &files(l)?,
                    image_column,
                    label_column,
                    rgb,
                )?))
            };
            (
                open(train)?,
                test.as_ref().map(open).transpose()?,
                Vec::new(),
            )
        }
    })
}

/// `n` flags, `round(fraction * n)` of them set, chosen by a seeded shuffle.
pub fn validation_mask(n: u64, fraction: f64, seed: u64) -> Vec<bool> {
    let mut order: Vec<u64> = (0..n).collect();
    SplitMix64(seed ^ 0x6a09_e667_f3bc_c909).shuffle(&mut order);
    let k = ((n as f64) * fraction).round() as usize;
    let mut mask = vec![false; n as usize];
    for &i in &order[..k.min(order.len())] {
        mask[i as usize] = true;
    }
    mask
}

/// Applies transforms, caps and subsets, and writes rows into per-split shards.
struct TableWriter<'a> {
    ctx: &'a StageContext,
    cfg: &'a Config,
    class_names: Vec<String>,
    meta: Option<TableMeta>,
    splits: Vec<(String, ShardWriter)>,
    seen: u64,
    total: u64,
}

impl<'a> TableWriter<'a> {
    fn new(ctx: &'a StageContext, cfg: &'a Config, class_names: Vec<String>, total: u64) -> Self {
        TableWriter {
            ctx,
            cfg,
            class_names,
            meta: None,
            splits: Vec::new(),
            seen: 0,
            total,
        }
    }

    /// Counts, checks and transforms one row of `split`.
    fn prepare(&mut self, split: &str, s: Sample) -> Result<Sample, Error> {
        self.seen += 1;
        if self.seen.is_multiple_of(1000) || self.seen == self.total {
            self.ctx
                .progress(self.seen, self.total, Some(split.to_string()));
        }
        let n_classes = self.class_names.len() as i64;
        if s.label < 0 || s.label >= n_classes {
            let (file, record) = split_source_id(&s.source_id);
            return Err(Error::data(
                file,
                record,
                format!(
                    "label {} is out of range for {n_classes} classes; fix the data or set `class_names`",
                    s.label
                ),
            ));
        }
        let source_id = s.source_id.clone();
        let s = self
            .cfg
            .transforms
            .apply(s)
            .map_err(|m| Error::Params(format!("{source_id}: {m}")))?;
        self.meta.get_or_insert_with(|| TableMeta {
            height: s.height,
            width: s.width,
            channels: s.channels,
            channel_order: if s.channels == 1 {
                "L".into()
            } else {
                "RGB".into()
            },
            class_names: self.class_names.clone(),
        });
        Ok(s)
    }

    /// Writes one prepared row of `split`, unless a cap is reached.
    fn store(&mut self, split: &str, s: &Sample) -> Result<(), Error> {
        let Some(meta) = &self.meta else {
            return Err(Error::Params(
                "internal: a row stored before any was prepared".into(),
            ));
        };
        let pos = match self.splits.iter().position(|(n, _)| n == split) {
            Some(p) => p,
            None => {
                let w = ShardWriter::new(self.ctx.out_dir(), split, meta, self.cfg.shard_rows);
                self.splits.push((split.to_string(), w));
                self.splits.len() - 1
            }
        };
        let w = &mut self.splits[pos].1;
        if self.cfg.subset.is_some_and(|cap| w.index.rows >= cap) {
            return Ok(());
        }
        if let Some(cap) = self.cfg.per_class_cap
            && w.index
                .class_counts
                .get(s.label as usize)
                .is_some_and(|&c| c >= cap)
        {
            return Ok(());
        }
        let id = w.index.rows as i64;
        w.push(id, s)
    }

    fn finish(self) -> Result<(), Error> {
        let Some(meta) = self.meta else {
            return Err(Error::Params("the source holds no images".into()));
        };
        let mut index = TableIndex {
            format: TABLE_FORMAT.into(),
            meta,
            splits: Default::default(),
        };
        for (name, w) in self.splits {
            let si = w.finish()?;
            self.ctx.metric(&format!("rows.{name}"), 0, si.rows as f64);
            for (c, n) in si.class_counts.iter().enumerate() {
                self.ctx
                    .metric(&format!("class_rows.{name}.{c}"), 0, *n as f64);
            }
            index.splits.insert(name, si);
        }
        let path = self.ctx.out_dir().join("table.json");
        let text = serde_json::to_vec_pretty(&index).unwrap_or_default();
        std::fs::write(&path, text)
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        Ok(())
    }
}

/// `file#record` -> (file, record), for error messages.
fn split_source_id(id: &str) -> (PathBuf, Option<u64>) {
    match id.rsplit_once('#') {
        Some((f, r)) => (Path::new(f).to_path_buf(), r.parse().ok()),
        None => (Path::new(id).to_path_buf(), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_mask_is_exact_and_seeded() {
        let a = validation_mask(1000, 0.1, 7);
        assert_eq!(a.iter().filter(|x| **x).count(), 100);
        assert_eq!(a, validation_mask(1000, 0.1, 7));
        assert_ne!(a, validation_mask(1000, 0.1, 8));
    }
}
