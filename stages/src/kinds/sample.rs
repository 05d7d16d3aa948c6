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
//!     precision: f32               # or bf16: convolutions in bf16 on a GPU (resources: {gpus: 1})
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
//! Chain reconstructions (the paper's figure): with `start: CODE_TABLE`
//! instead of `prior`, the top decoder starts from the code maps of real
//! images (`samples_per_class` rows per class of the table's `start_split`,
//! `val` unless given, in table order) and every level below is sampled
//! as usual; with `real: IMAGE_TABLE` (the table those codes were encoded
//! from), `reconstructions.png` shows the real images (a row, one per
//! class) above their reconstructions, as the levels' figures do.
//!
//! ```yaml
//! chain:
//!   kind: sample
//!   inputs: {start: codes2, decoder2: decoder2, decoder1: decoder1, real: prep}
//!   params: {samples_per_class: 4, start_split: val}
//! ```
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

use candle_core::{Device, Tensor};
use pipeline::ParamError;
use pipeline::spec::Stage;
use pipeline::stage::{StageContext, StageError, StageKind};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::data::Sample as ImageRow;
use crate::data::code_table::{CODE_TABLE_FORMAT, CodeMeta, CodeShardWriter, CodeTableIndex};
use crate::data::grid::{write_grid, write_image};
use crate::data::layout::{SAMPLES_CODES, SAMPLES_IMAGES, SAMPLES_SPLIT};
use crate::data::level_table::{InputKind, LevelTable, Rows};
use crate::data::table::{ShardWriter, TABLE_FORMAT, TableIndex, TableMeta};
use crate::device::{at_precision, check_precision, device};
use crate::error::Error;
use crate::hierarchy::{check_chain, check_links, decoder_names};
use crate::models::ar::{ArModel, Sampling};
use crate::models::precision::Precision;
use crate::rng::SplitMix64;

pub struct SampleStage;

const OTHERS: &[&str] = &["prior", "start", "real"];

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
    /// With a `start` input: the split its rows come from (default `val`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    start_split: Option<String>,
    /// `bf16`: convolutions in bf16 on a GPU ([`crate::models::precision`]).
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    precision: Precision,
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
        check_precision(stage, cfg.precision)?;
        let err = |m: String| ParamError::new("inputs", m);
        let has = |name: &str| stage.inputs.contains_key(name);
        match (has("prior"), has("start")) {
            (false, false) => return Err(err(
                "sample needs `inputs: {prior: AR_STAGE}` and, for a hierarchy, `decoder1: AR_STAGE`, ... down to the pixels; or, for chain reconstructions, `start: CODE_TABLE` and the decoders below it".into(),
            )),
            (true, true) => return Err(err(
                "give `prior` (samples from scratch) or `start` (chain reconstructions of real images' codes), not both".into(),
            )),
            _ => {}
        }
        let decoders =
            decoder_names("sample", stage.inputs.keys().cloned(), OTHERS, false).map_err(err)?;
        if has("start") && decoders.is_empty() {
            return Err(err(
                "`start` needs the decoders below its codes: decoder1, ... up to the level the code table holds".into(),
            ));
        }
        if has("real") && !has("start") {
            return Err(err(
                "`real` (the images shown beside their reconstructions) goes with `start`".into(),
            ));
        }
        if cfg.start_split.is_some() && !has("start") {
            return Err(ParamError::new(
                "params.start_split",
                "params: start_split: only with a `start` input",
            ));
        }
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
        at_precision(cfg.precision, &device, || draw(ctx, &cfg, &device))
    }
}

/// The stage's work, at the precision its params ask for.
fn draw(ctx: &StageContext, cfg: &Config, device: &Device) -> Result<(), StageError> {
    let names = decoder_names("sample", ctx.job.inputs.keys().cloned(), OTHERS, false)
        .map_err(Error::Params)?;
    // Chain reconstructions start from this code table instead of the prior.
    let start_table = match ctx.job.inputs.contains_key("start") {
        true => Some(LevelTable::open(ctx.input("start")?)?),
        false => None,
    };
    // Top first: prior (unless starting from codes), decoderN, ..., decoder1.
    let mut order: Vec<String> = match start_table {
        Some(_) => Vec::new(),
        None => vec!["prior".into()],
    };
    order.extend(names.iter().rev().cloned());
    let models: Vec<ArModel> = order
        .iter()
        .map(|n| ArModel::load(ctx.input(n)?, device).map_err(StageError::from))
        .collect::<Result<_, _>>()?;
    let links: Vec<(&str, &crate::models::ar::ArInfo)> = order
        .iter()
        .zip(&models)
        .rev()
        .map(|(n, m)| (n.as_str(), &m.info))
        .collect();
    let (class_names, start_rows) = match &start_table {
        None => {
            check_chain(&links)?;
            let prior = &models[0].info;
            if !prior.class_conditional {
                return Err(Error::Params(
                        "inputs.prior: is not class-conditional; sampling draws samples per class, so train the prior with `class_conditional: true`".into(),
                    )
                    .into());
            }
            (prior.class_names.clone(), None)
        }
        Some(table) => {
            check_start_chain(&links, ctx.input_key("start")?)?;
            (table.class_names.clone(), Some(table))
        }
    };
    let classes = cfg.class_indices(&class_names)?;
    let labels: Vec<u32> = classes
        .iter()
        .flat_map(|&c| std::iter::repeat_n(c as u32, cfg.samples_per_class))
        .collect();
    let start_rows = match start_rows {
        Some(table) => Some(rows_per_class(
            table,
            cfg.start_split.as_deref().unwrap_or("val"),
            &classes,
            cfg.samples_per_class,
            &class_names,
        )?),
        None => None,
    };
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
        let label_tensor = Tensor::from_slice(&labels[start..end], n, device)
            .map_err(Error::candle("building the labels"))?;
        let mut above: Option<Tensor> = match &start_rows {
            Some(rows) => {
                let per = rows.values.len() / rows.len().max(1);
                let (ch, cw) = models[0]
                    .info
                    .condition
                    .map(|c| (c.height, c.width))
                    .ok_or_else(|| {
                        Error::Params("inputs.start: the top decoder takes no code map".into())
                    })?;
                Some(code_maps(
                    &rows.values[start * per..end * per],
                    (n, ch, cw),
                    device,
                )?)
            }
            None => None,
        };
        for (l, (model, name)) in models.iter().zip(&order).enumerate() {
            let t = Instant::now();
            let values = model
                .sample(
                    model.info.class_conditional.then_some(&label_tensor),
                    above.as_ref(),
                    n,
                    cfg.temperature(name),
                    &mut rng,
                    Sampling::for_device(device),
                )
                .map_err(Error::candle(&format!("sampling from `{name}`")))?;
            seconds[l] += t.elapsed().as_secs_f64();
            if let InputKind::Codes { .. } = model.info.target {
                let shape = (n, model.info.height, model.info.width);
                above = Some(code_maps(&values, shape, device)?);
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
        cfg,
        &models,
        &order,
        &drawn,
        &labels,
        &class_names,
        &classes,
    )?;
    if let (Some(rows), true) = (&start_rows, ctx.job.inputs.contains_key("real")) {
        write_chain_figure(ctx, out, cfg, &drawn, models.len(), rows, &classes)?;
    }
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
    let mut chain = order.clone();
    if start_rows.is_some() {
        chain.insert(0, "start".into());
    }
    let record = json!({
        "chain": chain,
        "start": start_rows.as_ref().map(|r| json!({
            "split": cfg.start_split.as_deref().unwrap_or("val"),
            "ids": r.ids,
        })),
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

/// `n` code maps of h x w (table values, row-major) as the tensor the
/// next decoder is conditioned on.
fn code_maps(
    values: &[u16],
    (n, h, w): (usize, usize, usize),
    device: &candle_core::Device,
) -> Result<Tensor, Error> {
    let codes: Vec<u32> = values.iter().map(|&v| u32::from(v)).collect();
    Tensor::from_vec(codes, (n, h, w), device).map_err(Error::candle("building a code map"))
}

/// The top decoder of a chain reconstruction must have been trained on
/// the code table `start` names (its `condition`), and the chain below it
/// must hold as for sampling.
fn check_start_chain(
    links: &[(&str, &crate::models::ar::ArInfo)],
    start_key: &str,
) -> Result<(), Error> {
    check_links(links)?;
    let (top, t) = links[links.len() - 1];
    if t.condition_key.as_deref() != Some(start_key) {
        return Err(Error::Params(format!(
            "inputs.start: `{top}` was not trained conditioned on this code table; give as `start` the code table `{top}` has as `condition`"
        )));
    }
    Ok(())
}

/// `per_class` rows of each class in `classes`, in class order then table
/// order, from `split` of a code table (read one shard at a time).
fn rows_per_class(
    table: &LevelTable,
    split: &str,
    classes: &[usize],
    per_class: usize,
    class_names: &[String],
) -> Result<Rows, StageError> {
    let mut picked: Vec<Rows> = vec![Rows::default(); classes.len()];
    let per = table.values_per_row;
    for f in &table.split(split)?.files {
        if picked.iter().all(|r| r.len() >= per_class) {
            break;
        }
        table.for_each_batch(f, 8192, |b| {
            for r in 0..b.len() {
                let slot = classes
                    .iter()
                    .position(|&c| i64::from(b.labels[r]) == c as i64);
                if let Some(k) = slot
                    && picked[k].len() < per_class
                {
                    picked[k].push_row(&b, r, per);
                }
            }
            Ok(())
        })?;
    }
    let mut out = Rows::default();
    for (k, rows) in picked.into_iter().enumerate() {
        if rows.len() < per_class {
            return Err(Error::Params(format!(
                "inputs.start: split `{split}` holds {} row(s) of class `{}`, fewer than samples_per_class ({per_class}); lower it or pick other classes",
                rows.len(),
                class_names[classes[k]]
            ))
            .into());
        }
        out.extend(rows);
    }
    Ok(out)
}

/// `reconstructions.png`: the real images (input `real`, the rows `start`
/// encoded, by id) above their reconstructions.
fn write_chain_figure(
    ctx: &StageContext,
    out: &Path,
    cfg: &Config,
    drawn: &Drawn,
    models: usize,
    start: &Rows,
    classes: &[usize],
) -> Result<(), StageError> {
    let real = LevelTable::open(ctx.input("real")?)?;
    let split = cfg.start_split.as_deref().unwrap_or("val");
    let per = real.values_per_row;
    let images = &drawn.levels[models - 1];
    if images.len() != start.len() * per {
        return Err(Error::Params(format!(
            "inputs.real: its images hold {per} values, the reconstructions {}; give the image table the start codes were encoded from",
            images.len() / start.len().max(1)
        ))
        .into());
    }
    let wanted: std::collections::HashMap<i64, usize> = start
        .ids
        .iter()
        .enumerate()
        .map(|(i, &id)| (id, i))
        .collect();
    let mut found: Vec<Option<Vec<u16>>> = vec![None; start.len()];
    for f in &real.split(split)?.files {
        real.for_each_batch(f, 8192, |b| {
            for r in 0..b.len() {
                if let Some(&i) = wanted.get(&b.ids[r]) {
                    found[i] = Some(b.values[r * per..(r + 1) * per].to_vec());
                }
            }
            Ok(())
        })?;
    }
    let mut originals: Vec<&[u16]> = Vec::with_capacity(start.len());
    for (i, image) in found.iter().enumerate() {
        let Some(image) = image else {
            return Err(Error::Params(format!(
                "inputs.real: split `{split}` has no row {}; give the image table the start codes were encoded from",
                start.ids[i]
            ))
            .into());
        };
        originals.push(image);
    }
    // As every stage's reconstructions.png: one column per class, the
    // originals' row above their reconstructions' row, a pair of rows per
    // sample of each class (at most 8).
    let per_class = cfg.samples_per_class;
    let mut grid: Vec<&[u16]> = Vec::new();
    for j in 0..per_class.min(8) {
        let at = |k: usize| k * per_class + j;
        grid.extend((0..classes.len()).map(|k| originals[at(k)]));
        grid.extend((0..classes.len()).map(|k| &images[at(k) * per..(at(k) + 1) * per]));
    }
    write_grid(
        &out.join("reconstructions.png"),
        &grid,
        (
            real.height,
            real.width,
            real.values_per_row / (real.height * real.width),
        ),
        classes.len(),
    )?;
    Ok(())
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
