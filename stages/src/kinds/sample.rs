//! The `sample` stage: ancestral sampling through the hierarchy. For each
//! class label, the prior draws the top code map, each level's AR decoder
//! draws the level below given it, down to the pixels. A flat model (a
//! class-conditional PixelCNN on the pixels) is sampled by giving it as the
//! prior alone.
//!
//! ```yaml
//! ham_samples:
//!   kind: sample
//!   inputs: {prior: prior, decoder2: decoder2, decoder1: decoder1}
//!   params:
//!     classes: all                 # or a list of class names or indices
//!     samples_per_class: 10
//!     temperature: 1.0             # or per input: {prior: 1.0, decoder1: 0.9}
//!     seed: 0
//!     batch_size: 50
//! ```
//!
//! Every position is drawn by the cached sampler ([`Sampling::Cached`]),
//! which draws the same values as re-running the network per position; on
//! a GPU the values are drawn on the device ([`Sampling::OnDevice`]: one
//! transfer per row, not per value).
//! Batch b draws from its own random stream (seed, b): a stage killed
//! mid-way keeps its finished batches (checkpointed after each) and the
//! resumed run gives the same samples, bit for bit.
//!
//! Output:
//! - `images/`: an image table (split `samples`, id = sample index, label =
//!   its class), readable wherever a `preprocess` table is;
//! - `codes/levelN/`: the sampled code tables of every level;
//! - `png/NNNNN.png`: one PNG per sample; `grid.png`: classes as rows;
//! - `sample.json`: the chain, temperatures, counts and timings.
//!
//! Metrics: `sample.seconds`, `sample.images_per_s`, `sample.seconds.<input>`,
//! `sample.sampled_now` (timings stay out of the artifact: its digest depends
//! on the inputs alone).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use candle_core::Tensor;
use pipeline::ParamError;
use pipeline::spec::Stage;
use pipeline::stage::{StageContext, StageError, StageKind};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::data::Sample as ImageRow;
use crate::data::code_table::{CODE_TABLE_FORMAT, CodeMeta, CodeShardWriter, CodeTableIndex};
use crate::data::grid::{write_grid, write_image};
use crate::data::layout::{SAMPLES_CODES, SAMPLES_IMAGES, SAMPLES_SPLIT};
use crate::data::level_table::InputKind;
use crate::data::table::{ShardWriter, TABLE_FORMAT, TableIndex, TableMeta};
use crate::device::device;
use crate::error::Error;
use crate::hierarchy::{check_chain, decoder_names};
use crate::models::ar::{ArModel, Sampling};
use crate::rng::SplitMix64;

pub struct SampleStage;

const OTHERS: &[&str] = &["prior"];

/// A class by name or index.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
enum ClassRef {
    Index(usize),
    Name(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
enum Classes {
    /// `all`
    All(String),
    List(Vec<ClassRef>),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
enum Temperature {
    All(f64),
    PerInput(BTreeMap<String, f64>),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "all_classes")]
    classes: Classes,
    #[serde(default = "ten")]
    samples_per_class: usize,
    #[serde(default = "one")]
    temperature: Temperature,
    #[serde(default)]
    seed: u64,
    #[serde(default = "fifty")]
    batch_size: usize,
    /// Columns of `grid.png` (default: samples per class, at most 16).
    #[serde(default)]
    grid_columns: Option<usize>,
}

fn all_classes() -> Classes {
    Classes::All("all".into())
}
fn ten() -> usize {
    10
}
fn one() -> Temperature {
    Temperature::All(1.0)
}
fn fifty() -> usize {
    50
}

fn parse_config(params: &serde_json::Map<String, serde_json::Value>) -> Result<Config, ParamError> {
    let cfg: Config = crate::params::parse(params)?;
    let bad = |field: &str, m: String| {
        Err(ParamError::new(
            format!("params.{field}"),
            format!("params: {field}: {m}"),
        ))
    };
    if let Classes::All(s) = &cfg.classes
        && s != "all"
    {
        return bad(
            "classes",
            format!("`{s}`: give `all` or a list of class names or indices"),
        );
    }
    if cfg.samples_per_class == 0 {
        return bad("samples_per_class", "must be at least 1".into());
    }
    if cfg.batch_size == 0 {
        return bad("batch_size", "must be at least 1".into());
    }
    let temps: Vec<(String, f64)> = match &cfg.temperature {
        Temperature::All(t) => vec![("".into(), *t)],
        Temperature::PerInput(m) => m.iter().map(|(k, v)| (format!(".{k}"), *v)).collect(),
    };
    for (at, t) in temps {
        if !(t > 0.0 && t.is_finite()) {
            return bad(
                &format!("temperature{at}"),
                format!("{t}: must be a positive number"),
            );
        }
    }
    Ok(cfg)
}

impl Config {
    fn temperature(&self, input: &str) -> f64 {
        match &self.temperature {
            Temperature::All(t) => *t,
            Temperature::PerInput(m) => m.get(input).copied().unwrap_or(1.0),
        }
    }

    /// The class indices to sample, checked against the prior's classes.
    fn class_indices(&self, names: &[String]) -> Result<Vec<usize>, Error> {
        let list = match &self.classes {
            Classes::All(_) => return Ok((0..names.len()).collect()),
            Classes::List(l) => l,
        };
        let mut out = Vec::new();
        for c in list {
            let i = match c {
                ClassRef::Index(i) if *i < names.len() => *i,
                ClassRef::Name(n) => match names.iter().position(|x| x == n) {
                    Some(i) => i,
                    None => {
                        return Err(Error::Params(format!(
                            "params.classes: no class `{n}`; the prior's classes are {names:?}"
                        )));
                    }
                },
                ClassRef::Index(i) => {
                    return Err(Error::Params(format!(
                        "params.classes: class index {i} is out of range; the prior has {} classes",
                        names.len()
                    )));
                }
            };
            if !out.contains(&i) {
                out.push(i);
            }
        }
        if out.is_empty() {
            return Err(Error::Params("params.classes: the list is empty".into()));
        }
        Ok(out)
    }
}

impl StageKind for SampleStage {
    fn name(&self) -> &'static str {
        "sample"
    }

    fn version(&self) -> u32 {
        2 // 2: sample.json without timings
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

    fn check(&self, stage: &Stage) -> Result<(), ParamError> {
        let cfg = parse_config(&stage.params)?;
        let err = |m: String| ParamError::new("inputs", m);
        if !stage.inputs.contains_key("prior") {
            return Err(err(
                "sample needs `inputs: {prior: AR_STAGE}` and, for a hierarchy, `decoder1: AR_STAGE`, ... down to the pixels".into(),
            ));
        }
        decoder_names("sample", stage.inputs.keys().cloned(), OTHERS, false).map_err(err)?;
        if let Temperature::PerInput(m) = &cfg.temperature
            && let Some(k) = m.keys().find(|k| !stage.inputs.contains_key(*k))
        {
            return Err(ParamError::new(
                "params.temperature",
                format!(
                    "params: temperature: no input `{k}`; give a temperature per input name ({})",
                    stage.inputs.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        Ok(())
    }

    fn run(&self, ctx: &StageContext) -> Result<(), StageError> {
        let cfg = parse_config(&crate::params::object(&ctx.job.params))
            .map_err(|e| Error::Params(e.message))?;
        let device = device(&ctx.job.device)?;
        let names = decoder_names("sample", ctx.job.inputs.keys().cloned(), OTHERS, false)
            .map_err(Error::Params)?;
        // Top first: prior, decoderN, ..., decoder1.
        let mut order: Vec<String> = vec!["prior".into()];
        order.extend(names.iter().rev().cloned());
        let models: Vec<ArModel> = order
            .iter()
            .map(|n| ArModel::load(ctx.input(n)?, &device).map_err(StageError::from))
            .collect::<Result<_, _>>()?;
        let links: Vec<(&str, &crate::models::ar::ArInfo)> = order
            .iter()
            .zip(&models)
            .rev()
            .map(|(n, m)| (n.as_str(), &m.info))
            .collect();
        check_chain(&links)?;
        let prior = &models[0].info;
        if !prior.class_conditional {
            return Err(Error::Params(
                "inputs.prior: is not class-conditional; sampling draws samples per class, so train the prior with `class_conditional: true`".into(),
            )
            .into());
        }
        let class_names = prior.class_names.clone();
        let classes = cfg.class_indices(&class_names)?;
        let labels: Vec<u32> = classes
            .iter()
            .flat_map(|&c| std::iter::repeat_n(c as u32, cfg.samples_per_class))
            .collect();
        let total = labels.len();
        let batches = total.div_ceil(cfg.batch_size);

        // Resume from the finished batches.
        let mut drawn = Drawn::new(&models);
        if let Some(cp) = ctx.latest_checkpoint() {
            drawn = Drawn::read(
                &cp.dir,
                &models,
                (cp.step as usize * cfg.batch_size).min(total),
            )?;
            eprintln!("resuming after batch {} of {batches}", cp.step);
        }
        let resumed_rows = drawn.rows;
        let mut seconds = vec![0f64; models.len()];
        let started = Instant::now();
        let first = drawn.rows.div_ceil(cfg.batch_size);
        for b in first..batches {
            let (start, end) = (b * cfg.batch_size, ((b + 1) * cfg.batch_size).min(total));
            let n = end - start;
            let mut rng = SplitMix64::stream(cfg.seed, &format!("batch {b}"));
            let label_tensor = Tensor::from_slice(&labels[start..end], n, &device)
                .map_err(Error::candle("building the labels"))?;
            let mut above: Option<Tensor> = None;
            for (l, (model, name)) in models.iter().zip(&order).enumerate() {
                let t = Instant::now();
                let values = model
                    .sample(
                        model.info.class_conditional.then_some(&label_tensor),
                        above.as_ref(),
                        n,
                        cfg.temperature(name),
                        &mut rng,
                        Sampling::for_device(&device),
                    )
                    .map_err(Error::candle(&format!("sampling from `{name}`")))?;
                seconds[l] += t.elapsed().as_secs_f64();
                if let InputKind::Codes { .. } = model.info.target {
                    let codes: Vec<u32> = values.iter().map(|&v| v as u32).collect();
                    above = Some(
                        Tensor::from_vec(codes, (n, model.info.height, model.info.width), &device)
                            .map_err(Error::candle("building a code map"))?,
                    );
                }
                drawn.levels[l].extend_from_slice(&values);
            }
            drawn.rows = end;
            ctx.save_checkpoint((b + 1) as u64, |dir| drawn.write(dir))?;
            ctx.progress(
                end as u64,
                total as u64,
                Some(format!("batch {} of {batches}", b + 1)),
            );
        }
        let elapsed = started.elapsed().as_secs_f64();

        let out = ctx.out_dir();
        write_outputs(
            ctx,
            out,
            &cfg,
            &models,
            &order,
            &drawn,
            &labels,
            &class_names,
            &classes,
        )?;
        let new_rows = total - resumed_rows;
        ctx.metric("sample.seconds", 0, elapsed);
        if elapsed > 0.0 && new_rows > 0 {
            ctx.metric("sample.images_per_s", 0, new_rows as f64 / elapsed);
        }
        for (name, s) in order.iter().zip(&seconds) {
            ctx.metric(&format!("sample.seconds.{name}"), 0, *s);
        }
        // Timings and how much this attempt drew are metrics, never part of
        // the artifact: its digest depends only on the stage's inputs.
        ctx.metric("sample.sampled_now", 0, new_rows as f64);
        let record = json!({
            "chain": order,
            "classes": classes.iter().map(|&c| &class_names[c]).collect::<Vec<_>>(),
            "samples_per_class": cfg.samples_per_class,
            "samples": total,
            "temperature": order.iter().map(|n| (n.clone(), json!(cfg.temperature(n)))).collect::<serde_json::Map<_, _>>(),
            "seed": cfg.seed,
            "batch_size": cfg.batch_size,
        });
        let path = out.join("sample.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&record)?)
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        eprintln!("sampled {total} images in {elapsed:.1} s");
        Ok(())
    }
}

/// What has been drawn so far: per model (top first), the values of the
/// finished rows in table layout.
struct Drawn {
    rows: usize,
    levels: Vec<Vec<u16>>,
    per_row: Vec<usize>,
}

impl Drawn {
    fn new(models: &[ArModel]) -> Self {
        Drawn {
            rows: 0,
            levels: vec![Vec::new(); models.len()],
            per_row: models.iter().map(|m| m.info.values_per_row()).collect(),
        }
    }

    /// `level-L.u16`: little-endian values, one file per model.
    fn write(&self, dir: &Path) -> Result<(), StageError> {
        for (l, values) in self.levels.iter().enumerate() {
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            let p = dir.join(format!("level-{l}.u16"));
            std::fs::write(&p, bytes)
                .map_err(|e| Error::io(format!("writing {}", p.display()), e))?;
        }
        Ok(())
    }

    fn read(dir: &Path, models: &[ArModel], rows: usize) -> Result<Self, StageError> {
        let mut d = Drawn::new(models);
        for l in 0..models.len() {
            let p = dir.join(format!("level-{l}.u16"));
            let bytes =
                std::fs::read(&p).map_err(|e| Error::io(format!("reading {}", p.display()), e))?;
            if bytes.len() != rows * d.per_row[l] * 2 {
                return Err(Error::data(
                    &p,
                    None,
                    format!("holds {} bytes, {rows} rows need {}; remove the stage's scratch folder to start over", bytes.len(), rows * d.per_row[l] * 2),
                )
                .into());
            }
            d.levels[l] = bytes
                .chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
                .collect();
        }
        d.rows = rows;
        Ok(d)
    }
}

#[allow(clippy::too_many_arguments)]
fn write_outputs(
    ctx: &StageContext,
    out: &Path,
    cfg: &Config,
    models: &[ArModel],
    order: &[String],
    drawn: &Drawn,
    labels: &[u32],
    class_names: &[String],
    classes: &[usize],
) -> Result<(), StageError> {
    let pixels = models
        .last()
        .map(|m| &m.info)
        .ok_or_else(|| Error::Params("no model".into()))?;
    let (h, w, c) = (pixels.height, pixels.width, pixels.channels());
    let per = h * w * c;
    let images = &drawn.levels[models.len() - 1];
    let err = |p: &Path, e| Error::io(format!("writing {}", p.display()), e);

    // The image table.
    let dir = out.join(SAMPLES_IMAGES);
    std::fs::create_dir_all(&dir).map_err(|e| err(&dir, e))?;
    let meta = TableMeta {
        height: h as u32,
        width: w as u32,
        channels: c as u32,
        channel_order: if c == 1 { "L" } else { "RGB" }.into(),
        class_names: class_names.to_vec(),
    };
    let mut writer = ShardWriter::new(&dir, SAMPLES_SPLIT, &meta, 10_000);
    for (i, (img, &label)) in images.chunks_exact(per).zip(labels).enumerate() {
        writer.push(
            i as i64,
            &ImageRow {
                pixels: img.iter().map(|&v| v.min(255) as u8).collect(),
                height: h as u32,
                width: w as u32,
                channels: c as u32,
                label: label as i64,
                source_id: format!("{}#{i}", ctx.job.stage),
            },
        )?;
    }
    let index = TableIndex {
        format: TABLE_FORMAT.into(),
        meta,
        splits: [(SAMPLES_SPLIT.to_string(), writer.finish()?)].into(),
    };
    let p = dir.join("table.json");
    std::fs::write(&p, serde_json::to_vec_pretty(&index)?).map_err(|e| err(&p, e))?;

    // The code tables, named by level: the prior draws level L, decoder l
    // draws level l - 1.
    let levels = models.len() - 1;
    for (i, model) in models[..levels].iter().enumerate() {
        let level = levels - i;
        let InputKind::Codes { classes: k } = model.info.target else {
            continue;
        };
        let dir = out.join(SAMPLES_CODES).join(format!("level{level}"));
        std::fs::create_dir_all(&dir).map_err(|e| err(&dir, e))?;
        let meta = CodeMeta {
            height: model.info.height as u32,
            width: model.info.width as u32,
            codebook_size: k as u32,
            class_names: class_names.to_vec(),
            producer_key: ctx.job.key.clone(),
            source_key: ctx.job.key.clone(),
        };
        let mut writer = CodeShardWriter::new(&dir, SAMPLES_SPLIT, &meta, 10_000);
        let n = model.info.values_per_row();
        for (r, (codes, &label)) in drawn.levels[i].chunks_exact(n).zip(labels).enumerate() {
            writer.push(r as i64, label as i32, codes)?;
        }
        let index = CodeTableIndex {
            format: CODE_TABLE_FORMAT.into(),
            meta,
            splits: [(SAMPLES_SPLIT.to_string(), writer.finish()?)].into(),
        };
        let p = dir.join("table.json");
        std::fs::write(&p, serde_json::to_vec_pretty(&index)?).map_err(|e| err(&p, e))?;
        eprintln!("level {level} codes drawn by `{}`", order[i]);
    }

    // PNGs.
    let png = out.join("png");
    std::fs::create_dir_all(&png).map_err(|e| err(&png, e))?;
    for (i, img) in images.chunks_exact(per).enumerate() {
        write_image(&png.join(format!("{i:05}.png")), img, (h, w, c))?;
    }
    let per_class = cfg.samples_per_class;
    let columns = cfg.grid_columns.unwrap_or(per_class.min(16)).max(1);
    let mut grid: Vec<&[u16]> = Vec::new();
    for k in 0..classes.len() {
        let first = k * per_class;
        grid.extend(
            images
                .chunks_exact(per)
                .skip(first)
                .take(per_class.min(columns)),
        );
    }
    write_grid(
        &out.join("grid.png"),
        &grid,
        (h, w, c),
        per_class.min(columns),
    )?;
    Ok(())
}
