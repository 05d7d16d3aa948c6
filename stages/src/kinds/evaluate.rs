//! The `evaluate` stage: sample quality without a human, for any number of
//! sample sets side by side (the hierarchy's and the flat baseline's).
//!
//! ```yaml
//! evaluation:
//!   kind: evaluate
//!   inputs: {real: prep, ham: ham_samples, baseline: baseline_samples}
//!   params:
//!     classifier: {hidden: 16, steps: 300, batch_size: 64, lr: 0.003}
//!     train_split: train        # real images the reference classifier learns
//!     test_split: test          # real images every classifier is tested on
//!     seed: 0
//! ```
//!
//! - A classifier ([`Classifier`]) trained on the real `train_split`; its
//!   accuracy on the real `test_split`, and on each sample set (does it see
//!   the class the sample was drawn for?).
//! - Classification accuracy score (CAS): a classifier of the same
//!   architecture, seed and steps trained on each sample set alone, tested
//!   on the real `test_split`.
//!
//! `real` is an image table (a `preprocess` stage); every other input is a
//! `sample` stage (its `images/` table) or an image table, with the real
//! table's image shape and classes.
//!
//! Output: `evaluation.json`, `evaluation.md` (the table). Metrics:
//! `eval.real.test_accuracy`, `eval.<input>.accuracy`, `eval.<input>.cas`.

use std::time::Instant;

use pipeline::ParamError;
use pipeline::spec::Stage;
use pipeline::stage::{StageContext, StageError, StageKind};
use serde::Deserialize;
use serde_json::json;

use crate::data::layout::{SAMPLES_SPLIT, image_table_dir};
use crate::data::level_table::InputKind;
use crate::data::level_table::{LevelTable, Rows};
use crate::device::device;
use crate::error::Error;
use crate::models::classifier::{Classifier, ClassifierConfig};

pub struct Evaluate;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    classifier: ClassifierConfig,
    #[serde(default = "train")]
    train_split: String,
    #[serde(default = "test")]
    test_split: String,
    #[serde(default)]
    seed: u64,
}

fn train() -> String {
    "train".into()
}
fn test() -> String {
    "test".into()
}

/// All rows of an image table's split, each label checked to be a class.
fn labelled_rows(table: &LevelTable, split: &str, input: &str) -> Result<Rows, Error> {
    let rows = table.read_split(split, None)?;
    let n = table.class_names.len();
    if let Some((id, l)) = rows
        .ids
        .iter()
        .zip(&rows.labels)
        .find(|(_, l)| !(0..n as i32).contains(l))
    {
        return Err(Error::Params(format!(
            "inputs.{input}: row id {id} of split `{split}` has label {l}, not one of the {n} classes; evaluation needs labelled images"
        )));
    }
    if rows.is_empty() {
        return Err(Error::Params(format!(
            "inputs.{input}: split `{split}` has no rows"
        )));
    }
    Ok(rows)
}

impl StageKind for Evaluate {
    fn name(&self) -> &'static str {
        "evaluate"
    }

    fn version(&self) -> u32 {
        1
    }

    fn device_dependent(&self) -> bool {
        true
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
        let train_rows = labelled_rows(&real, &cfg.train_split, "real")?;
        let test_rows = labelled_rows(&real, &cfg.test_split, "real")?;

        let mut sets = Vec::new();
        for name in ctx.job.inputs.keys().filter(|k| *k != "real") {
            let table = LevelTable::open(&image_table_dir(ctx.input(name)?))?;
            if table.input != real.input || (table.height, table.width) != (real.height, real.width)
            {
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
                        return Err(
                            Error::Params(format!("inputs.{name}: the table is empty")).into()
                        );
                    }
                }
            };
            sets.push((name.clone(), labelled_rows(&table, &split, name)?));
        }

        let err = Error::candle("training the classifier");
        let t = Instant::now();
        let reference =
            Classifier::new(&cfg.classifier, shape, classes, cfg.seed, &device).map_err(&err)?;
        reference
            .train(&cfg.classifier, &train_rows, cfg.seed, &device)
            .map_err(&err)?;
        let real_acc = reference.accuracy(&test_rows, &device).map_err(&err)?;
        ctx.metric("eval.real.test_accuracy", 0, real_acc);
        eprintln!(
            "real: classifier trained on {} `{}` images: {:.1} % on {} `{}` images ({:.0} s)",
            train_rows.len(),
            cfg.train_split,
            100.0 * real_acc,
            test_rows.len(),
            cfg.test_split,
            t.elapsed().as_secs_f64()
        );
        let mut results = serde_json::Map::new();
        let mut table = format!(
            "| samples | images | real-data classifier's accuracy on them | CAS (trained on them, tested on real `{}`) |\n| --- | --- | --- | --- |\n",
            cfg.test_split
        );
        table.push_str(&format!(
            "| real (`{}`) | {} | {:.1} % (real `{}`) | {:.1} % |\n",
            cfg.train_split,
            train_rows.len(),
            100.0 * real_acc,
            cfg.test_split,
            100.0 * real_acc
        ));
        for (i, (name, rows)) in sets.iter().enumerate() {
            let accuracy = reference.accuracy(rows, &device).map_err(&err)?;
            let t = Instant::now();
            let on_samples = Classifier::new(&cfg.classifier, shape, classes, cfg.seed, &device)
                .map_err(&err)?;
            on_samples
                .train(&cfg.classifier, rows, cfg.seed, &device)
                .map_err(&err)?;
            let cas = on_samples.accuracy(&test_rows, &device).map_err(&err)?;
            ctx.metric(&format!("eval.{name}.accuracy"), 0, accuracy);
            ctx.metric(&format!("eval.{name}.cas"), 0, cas);
            ctx.progress((i + 1) as u64, sets.len() as u64, Some(name.clone()));
            eprintln!(
                "{name}: {} samples; real-data classifier {:.1} %; CAS {:.1} % ({:.0} s)",
                rows.len(),
                100.0 * accuracy,
                100.0 * cas,
                t.elapsed().as_secs_f64()
            );
            table.push_str(&format!(
                "| {name} | {} | {:.1} % | {:.1} % |\n",
                rows.len(),
                100.0 * accuracy,
                100.0 * cas
            ));
            results.insert(
                name.clone(),
                json!({"samples": rows.len(), "accuracy": accuracy, "cas": cas}),
            );
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
