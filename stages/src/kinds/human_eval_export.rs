//! The `human_eval_export` stage: a package of pairwise realism tasks, as
//! in the paper's human study, for raters on a crowd-sourcing platform or
//! on the local rating page (`haic-pipe eval serve PACKAGE`).
//!
//! ```yaml
//! human_eval:
//!   kind: human_eval_export
//!   inputs: {ham: ham_samples, baseline: baseline_samples, catch: prep}
//!   params: {pairs: 50, catch_trials: 6, seed: 0, base_url: "https://example.org/eval/"}
//! ```
//!
//! The two inputs other than `catch` are the compared sets (sample stages
//! or image tables; A is the first by name). Each pair shows an image of A
//! and one of B of the same class; which one is on the left is drawn so
//! that A is left in exactly half of the pairs (one more when odd). Catch
//! trials show a real image of `catch` (split `catch_split`, default the
//! first) against a broken copy of another real image (its pixels
//! shuffled); a rater who prefers the broken one is screened out.
//! Tasks are shuffled; image files are named by their content hash, so a
//! URL says nothing about its source.
//! Memory holds each split's labels and the images drawn, never a split:
//! the rows are drawn from the labels, then read by position.
//!
//! Output (the package):
//! - `images/HASH.png`;
//! - `tasks.csv`: one row per task, `task_id,image_left_url,image_right_url`
//!   (the batch-file format of crowd platforms; URLs are `base_url` +
//!   `images/HASH.png`);
//! - `manifest.json` ([`Manifest`]): every task's sources, rows, labels and
//!   sides, and every image's blake3 hash.

use std::collections::BTreeMap;
use std::path::Path;

use pipeline::ParamError;
use pipeline::spec::Stage;
use pipeline::stage::{StageContext, StageError, StageKind};
use serde::{Deserialize, Serialize};

use crate::data::grid::write_image;
use crate::data::layout::image_table_dir;
use crate::data::level_table::InputKind;
use crate::data::level_table::{LevelTable, Rows};
use crate::data::row_source::RowSource;
use crate::error::Error;
use crate::human_eval::{BROKEN, MANIFEST_FORMAT, Manifest, Shown, Task, tasks_csv};
use crate::rng::SplitMix64;

pub struct HumanEvalExport;

pub const QUESTION: &str = "Which image is more realistic?";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "fifty")]
    pairs: usize,
    #[serde(default)]
    catch_trials: usize,
    #[serde(default)]
    catch_split: Option<String>,
    #[serde(default)]
    seed: u64,
    /// Prefix of the image URLs in `tasks.csv` (empty: relative paths).
    #[serde(default)]
    base_url: String,
}

fn fifty() -> usize {
    50
}

/// The compared inputs, in name order.
fn compared(inputs: impl Iterator<Item = String>) -> Result<[String; 2], String> {
    let mut names: Vec<String> = inputs.filter(|n| n != "catch").collect();
    names.sort();
    match <[String; 2]>::try_from(names) {
        Ok(pair) => Ok(pair),
        Err(names) => Err(format!(
            "human_eval_export compares two sets; give two inputs besides `catch` (e.g. `{{ham: SAMPLE_STAGE, baseline: SAMPLE_STAGE, catch: PREPROCESS_STAGE}}`), got {names:?}"
        )),
    }
}

/// An image set: its table, the split shown, that split's labels (the
/// images are read only for the rows drawn) and the images' shape.
struct Set {
    name: String,
    table: LevelTable,
    split: String,
    labels: Vec<i32>,
    shape: (usize, usize, usize),
}

impl Set {
    fn open(name: &str, dir: &Path, split: Option<&str>) -> Result<Set, Error> {
        let table = LevelTable::open(&image_table_dir(dir))?;
        let InputKind::Pixels { channels } = table.input else {
            return Err(Error::Params(format!(
                "inputs.{name}: a code table; give a sample stage or an image table"
            )));
        };
        let split = match split {
            Some(s) => s.to_string(),
            None => table
                .splits
                .keys()
                .next()
                .cloned()
                .ok_or_else(|| Error::Params(format!("inputs.{name}: the table is empty")))?,
        };
        let labels = RowSource::split(&table, &split)?.labels()?;
        if labels.is_empty() {
            return Err(Error::Params(format!(
                "inputs.{name}: split `{split}` has no rows"
            )));
        }
        Ok(Set {
            name: name.to_string(),
            shape: (table.height, table.width, channels),
            table,
            split,
            labels,
        })
    }

    fn len(&self) -> u64 {
        self.labels.len() as u64
    }

    /// The rows at these positions of the split, in that order (a shard
    /// in memory at a time while they are read).
    fn rows_at(&self, positions: &[usize]) -> Result<Drawn, Error> {
        let rows = RowSource::split(&self.table, &self.split)?.rows_at(positions)?;
        Ok(Drawn {
            per_row: self.shape.0 * self.shape.1 * self.shape.2,
            rows,
        })
    }

    /// Row indices by label.
    fn by_label(&self) -> BTreeMap<i32, Vec<usize>> {
        let mut m: BTreeMap<i32, Vec<usize>> = BTreeMap::new();
        for (r, &l) in self.labels.iter().enumerate() {
            m.entry(l).or_default().push(r);
        }
        m
    }
}

/// The rows drawn from a set, in the order drawn.
struct Drawn {
    per_row: usize,
    rows: Rows,
}

impl Drawn {
    fn image(&self, i: usize) -> &[u16] {
        &self.rows.values[i * self.per_row..(i + 1) * self.per_row]
    }
}

/// `n` sides, `true` = A on the left: exactly n / 2 (rounded up) of them,
/// in an order drawn from `rng`.
pub fn balanced_sides(n: usize, rng: &mut SplitMix64) -> Vec<bool> {
    let mut sides: Vec<bool> = (0..n).map(|i| i < n.div_ceil(2)).collect();
    rng.shuffle(&mut sides);
    sides
}

/// Writes images once each, named by their content hash.
struct ImageWriter<'a> {
    dir: &'a Path,
    hashes: BTreeMap<String, String>,
}

impl ImageWriter<'_> {
    fn write(&mut self, image: &[u16], shape: (usize, usize, usize)) -> Result<String, Error> {
        let bytes: Vec<u8> = image.iter().map(|&v| v.min(255) as u8).collect();
        let mut h = blake3::Hasher::new();
        h.update(&bytes);
        h.update(format!("{shape:?}").as_bytes());
        let name = format!("images/{}.png", &h.finalize().to_hex()[..24]);
        if !self.hashes.contains_key(&name) {
            let path = self.dir.join(&name);
            write_image(&path, image, shape)?;
            let written = std::fs::read(&path)
                .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
            self.hashes
                .insert(name.clone(), blake3::hash(&written).to_hex().to_string());
        }
        Ok(name)
    }
}

impl StageKind for HumanEvalExport {
    fn name(&self) -> &'static str {
        "human_eval_export"
    }

    fn version(&self) -> u32 {
        1
    }

    fn device_dependent(&self) -> bool {
        false
    }

    fn resolved_params(
        &self,
        stage: &Stage,
    ) -> Result<serde_json::Map<String, serde_json::Value>, ParamError> {
        crate::params::resolve::<Config>(&stage.params)
    }

    fn check(&self, stage: &Stage) -> Result<(), ParamError> {
        let cfg: Config = crate::params::parse(&stage.params)?;
        compared(stage.inputs.keys().cloned()).map_err(|m| ParamError::new("inputs", m))?;
        if cfg.catch_trials > 0 && !stage.inputs.contains_key("catch") {
            return Err(ParamError::new(
                "inputs",
                "catch trials need real images: add `catch: PREPROCESS_STAGE` to the inputs (or set `catch_trials: 0`)",
            ));
        }
        if cfg.pairs == 0 {
            return Err(ParamError::new(
                "params.pairs",
                "params: pairs: must be at least 1",
            ));
        }
        Ok(())
    }

    fn run(&self, ctx: &StageContext) -> Result<(), StageError> {
        let cfg: Config = crate::params::parse(&crate::params::object(&ctx.job.params))
            .map_err(|e| Error::Params(e.message))?;
        let [a, b] = compared(ctx.job.inputs.keys().cloned()).map_err(Error::Params)?;
        let a = Set::open(&a, ctx.input(&a)?, None)?;
        let b = Set::open(&b, ctx.input(&b)?, None)?;
        if a.shape != b.shape {
            return Err(Error::Params(format!(
                "inputs.{}: images of {:?} (HxWxC), inputs.{}: {:?}; compare images of one shape",
                a.name, a.shape, b.name, b.shape
            ))
            .into());
        }
        let out = ctx.out_dir();
        let images_dir = out.join("images");
        std::fs::create_dir_all(&images_dir)
            .map_err(|e| Error::io(format!("creating {}", images_dir.display()), e))?;
        let mut writer = ImageWriter {
            dir: out,
            hashes: BTreeMap::new(),
        };
        let mut rng = SplitMix64::stream(cfg.seed, "human eval pairs");
        let b_by_label = b.by_label();
        let mut tasks = Vec::new();
        let sides = balanced_sides(cfg.pairs, &mut rng);
        // The draws need the labels only; the images drawn are read after.
        let (mut from_a, mut from_b) = (Vec::new(), Vec::new());
        for _ in &sides {
            let ra = rng.below(a.len()) as usize;
            // A same-class image of B when B has that class.
            let rb = match b_by_label.get(&a.labels[ra]) {
                Some(rows) => rows[rng.below(rows.len() as u64) as usize],
                None => rng.below(b.len()) as usize,
            };
            from_a.push(ra);
            from_b.push(rb);
        }
        let (drawn_a, drawn_b) = (a.rows_at(&from_a)?, b.rows_at(&from_b)?);
        for (i, &a_left) in sides.iter().enumerate() {
            let shown = |set: &Set, d: &Drawn, w: &mut ImageWriter| -> Result<Shown, Error> {
                Ok(Shown {
                    source: set.name.clone(),
                    row: d.rows.ids[i],
                    label: d.rows.labels[i],
                    image: w.write(d.image(i), set.shape)?,
                })
            };
            let sa = shown(&a, &drawn_a, &mut writer)?;
            let sb = shown(&b, &drawn_b, &mut writer)?;
            let (left, right) = if a_left { (sa, sb) } else { (sb, sa) };
            tasks.push(Task {
                id: String::new(),
                kind: "pair".into(),
                left,
                right,
            });
        }
        if cfg.catch_trials > 0 {
            let real = Set::open("catch", ctx.input("catch")?, cfg.catch_split.as_deref())?;
            if real.shape != a.shape {
                return Err(Error::Params(format!(
                    "inputs.catch: images of {:?}, the compared ones {:?}",
                    real.shape, a.shape
                ))
                .into());
            }
            let mut rng = SplitMix64::stream(cfg.seed, "human eval catch trials");
            let sides = balanced_sides(cfg.catch_trials, &mut rng);
            // The draws first (a shuffle's draws depend on the length
            // only: shuffling the positions 0..per_row shuffles the pixels
            // alike), then the images drawn.
            let per_row = real.shape.0 * real.shape.1 * real.shape.2;
            let (mut shown, mut broken, mut orders) = (Vec::new(), Vec::new(), Vec::new());
            for _ in &sides {
                shown.push(rng.below(real.len()) as usize);
                broken.push(rng.below(real.len()) as usize);
                let mut order: Vec<usize> = (0..per_row).collect();
                rng.shuffle(&mut order);
                orders.push(order);
            }
            let (good_rows, broken_rows) = (real.rows_at(&shown)?, real.rows_at(&broken)?);
            for (i, &real_left) in sides.iter().enumerate() {
                let original = broken_rows.image(i);
                let shuffled: Vec<u16> = orders[i].iter().map(|&k| original[k]).collect();
                let good = Shown {
                    source: "catch".into(),
                    row: good_rows.rows.ids[i],
                    label: good_rows.rows.labels[i],
                    image: writer.write(good_rows.image(i), real.shape)?,
                };
                let bad = Shown {
                    source: BROKEN.into(),
                    row: broken_rows.rows.ids[i],
                    label: broken_rows.rows.labels[i],
                    image: writer.write(&shuffled, real.shape)?,
                };
                let (left, right) = if real_left { (good, bad) } else { (bad, good) };
                tasks.push(Task {
                    id: String::new(),
                    kind: "catch".into(),
                    left,
                    right,
                });
            }
        }
        let mut rng = SplitMix64::stream(cfg.seed, "human eval task order");
        rng.shuffle(&mut tasks);
        let width = tasks.len().to_string().len().max(4);
        for (i, t) in tasks.iter_mut().enumerate() {
            t.id = format!("t{:0width$}", i + 1);
        }

        let manifest = Manifest {
            format: MANIFEST_FORMAT.into(),
            question: QUESTION.into(),
            comparison: [a.name.clone(), b.name.clone()],
            seed: cfg.seed,
            base_url: cfg.base_url.clone(),
            tasks,
            images: writer.hashes,
        };
        let csv = tasks_csv(&manifest, &cfg.base_url)
            .map_err(|e| Error::Params(format!("writing tasks.csv: {e}")))?;
        for (file, bytes) in [
            ("tasks.csv", csv),
            ("manifest.json", serde_json::to_vec_pretty(&manifest)?),
        ] {
            let p = out.join(file);
            std::fs::write(&p, bytes)
                .map_err(|e| Error::io(format!("writing {}", p.display()), e))?;
        }
        ctx.metric("human_eval.tasks", 0, manifest.tasks.len() as f64);
        eprintln!(
            "{} tasks ({} pairs {} vs {}, {} catch trials), {} images",
            manifest.tasks.len(),
            cfg.pairs,
            a.name,
            b.name,
            cfg.catch_trials,
            manifest.images.len()
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A is on the left in exactly half of the pairs, and which ones varies
    /// with the seed.
    #[test]
    fn left_right_sides_are_balanced_and_random() {
        for n in [1usize, 2, 7, 50, 51] {
            let sides = balanced_sides(n, &mut SplitMix64(3));
            let left = sides.iter().filter(|&&s| s).count();
            assert_eq!(left, n.div_ceil(2), "n = {n}");
        }
        let a = balanced_sides(50, &mut SplitMix64(1));
        let b = balanced_sides(50, &mut SplitMix64(2));
        assert_ne!(a, b);
        // Not a block of lefts then rights: the order is drawn.
        assert!(a[..25].iter().any(|&s| !s) && a[25..].iter().any(|&s| s));
    }
}
