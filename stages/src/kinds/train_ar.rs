//! The `train_ar` stage: a gated PixelCNN ([`crate::models::pixelcnn`]) on
//! a table: the AR decoder of a level (the level's input given its codes),
//! the prior (the top codes given the class) or the flat baseline (pixels
//! given the class).
//!
//! ```yaml
//! ar1:
//!   kind: train_ar
//!   inputs: {table: prep, condition: codes1}   # condition: optional, a code table of the same images
//!   params:
//!     steps: 2000
//!     batch_size: 64
//!     seed: 0
//!     class_conditional: false       # a label embedding in every gated layer
//!     model: {hidden: 64, layers: 8, kernel: 5, code_embedding: 32, cond_hidden: 64, cond_res_blocks: 2}
//!     optimizer: {lr: 1.0e-3, schedule: cosine, warmup_steps: 100, grad_clip: 1.0}
//!     validate_every: 200            # on `validation_split` (default val), `validation_rows` of it spread over the classes
//!     checkpoint_every: 100
//!     reconstruct: {rows: 8, temperature: 1.0}   # with a code map: sample the rows given their own codes
//!     precision: f32                 # or bf16: convolutions in bf16 on a GPU (resources: {gpus: 1})
//! ```
//!
//! The codes come from the code table, so no gradient reaches an encoder.
//! Rows of `condition` must line up with `table`'s (as `encode` writes
//! them); every batch checks the ids.
//!
//! Measures: `val.bits_per_dim` (mean NLL per modelled value, in bits) and
//! `val.bits_per_image` (-log2 p(row | conditioning), summed over the row's
//! values), the quantities the hierarchical bound (stage `bound`) adds up;
//! with a code map, `val.reconstruction_psnr` (pixels, with a 95 %
//! bootstrap interval over the rows, `_lo` and `_hi`) or
//! `val.reconstruction_accuracy` (codes) of samples drawn given the rows'
//! own codes, and `reconstructions.png` (originals above, samples below).
//!
//! Output: `model.safetensors`, `ar.json`, `metrics.json` (the last
//! validation, with the validation rows' ids digest so that measures of
//! different models can be checked to be on the same images).
//!
//! **Bit-exact resume**, as `train_vq`: a checkpoint holds the weights, the
//! optimiser's moments, the step and the data cursor.

use std::path::Path;
use std::time::Instant;

use candle_core::Device;
use pipeline::ParamError;
use pipeline::spec::Stage;
use pipeline::stage::{StageContext, StageError, StageKind};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::checkpoint;
use crate::data::grid::write_grid;
use crate::data::layout::{PIXEL_CHANNELS_FACT, fact, size_fact};
use crate::data::level_table::InputKind;
use crate::data::level_table::{BatchStream, Cursor, LevelTable, Rows, check_aligned};
use crate::data::prefetch::Prefetched;
use crate::device::{StepMemory, at_precision, check_gpu_batch, check_precision, device};
use crate::error::Error;
use crate::models::ar::{AR_FORMAT, ArInfo, ArModel, Sampling, upsample_factor};
use crate::models::conv::MAX_KERNEL;
use crate::models::optim::{AdamW, OptimConfig};
use crate::models::pixelcnn::{PixelCnnConfig, bits_per_dim};
use crate::models::precision::Precision;
use crate::rng::SplitMix64;
use crate::stats;
use crate::training::{self, Schedule, StepReport, Trainable, check_schedule};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub steps: u64,
    #[serde(default = "training::batch_size")]
    pub batch_size: usize,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub class_conditional: bool,
    #[serde(default)]
    pub model: PixelCnnConfig,
    #[serde(default)]
    pub optimizer: OptimConfig,
    #[serde(default = "training::validate_every")]
    pub validate_every: u64,
    #[serde(default = "training::validation_split")]
    pub validation_split: String,
    #[serde(default = "training::validation_rows")]
    pub validation_rows: usize,
    #[serde(default = "training::checkpoint_every")]
    pub checkpoint_every: u64,
    #[serde(default = "training::log_every")]
    pub log_every: u64,
    #[serde(default)]
    pub reconstruct: ReconstructConfig,
    /// `bf16`: convolutions in bf16 on a GPU ([`crate::models::precision`]).
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
}

/// Reconstruction by sampling (models with a code map only).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReconstructConfig {
    /// Validation rows to reconstruct (0: none).
    pub rows: usize,
    pub temperature: f64,
}

impl Default for ReconstructConfig {
    fn default() -> Self {
        ReconstructConfig {
            rows: 8,
            temperature: 1.0,
        }
    }
}

impl Config {
    pub fn schedule(&self) -> Schedule {
        Schedule {
            steps: self.steps,
            batch_size: self.batch_size,
            lr: self.optimizer.lr,
            validate_every: self.validate_every,
            validation_rows: self.validation_rows,
            checkpoint_every: self.checkpoint_every,
            log_every: self.log_every,
        }
    }
}

fn parse_config(params: &serde_json::Map<String, serde_json::Value>) -> Result<Config, ParamError> {
    let cfg: Config = crate::params::parse(params)?;
    check_schedule(cfg.schedule())?;
    let bad = |field: &str, msg: String| Err(ParamError::new(format!("params.{field}"), msg));
    let m = &cfg.model;
    if m.hidden == 0 || m.layers == 0 || m.code_embedding == 0 || m.cond_hidden < 2 {
        return bad(
            "model",
            "model.hidden, layers and code_embedding must be at least 1, cond_hidden at least 2"
                .into(),
        );
    }
    if m.kernel.is_multiple_of(2) || !(1..=MAX_KERNEL).contains(&m.kernel) {
        return bad(
            "model",
            format!(
                "model.kernel is {}; it must be odd, 1 to {MAX_KERNEL}",
                m.kernel
            ),
        );
    }
    let t = cfg.reconstruct.temperature;
    if t.is_nan() || t <= 0.0 {
        return bad(
            "reconstruct",
            format!("reconstruct.temperature is {t}; it must be positive"),
        );
    }
    Ok(cfg)
}

pub struct TrainAr;

impl StageKind for TrainAr {
    fn name(&self) -> &'static str {
        "train_ar"
    }

    fn version(&self) -> u32 {
        3 // 2: metrics.json without the reconstruction's seconds; 3: class-stratified validation rows
    }

    fn input_names(&self) -> Option<&'static [&'static str]> {
        Some(&["table", "condition"])
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

    /// A resume is bit-exact, so how often a run checkpoints or logs
    /// cannot change its output.
    fn unkeyed_params(&self) -> &'static [&'static str] {
        &["checkpoint_every", "log_every"]
    }

    fn headline_metrics(&self) -> &'static [&'static str] {
        &["val.bits_per_dim"]
    }

    fn check(&self, stage: &Stage) -> Result<(), ParamError> {
        check_precision(stage, parse_config(&stage.params)?.precision)?;
        if !stage.inputs.contains_key("table") {
            return Err(ParamError::new(
                "inputs",
                "train_ar needs `inputs: {table: STAGE}` (a preprocess or encode stage), and optionally `condition: ENCODE_STAGE`",
            ));
        }
        if let Some(other) = stage
            .inputs
            .keys()
            .find(|k| !["table", "condition"].contains(&k.as_str()))
        {
            return Err(ParamError::new(
                "inputs",
                format!("train_ar has no input `{other}`; its inputs are `table` and `condition`"),
            ));
        }
        Ok(())
    }

    /// The model against its inputs: hidden channels the pixel channels
    /// divide, a training step that fits the GPU, and a code map the
    /// target is 2^s times larger than.
    fn check_inputs(
        &self,
        stage: &Stage,
        inputs: &std::collections::BTreeMap<String, serde_json::Value>,
    ) -> Result<(), ParamError> {
        let cfg = parse_config(&stage.params)?;
        if let Some(c) = fact(inputs.get("table"), PIXEL_CHANNELS_FACT) {
            check_hidden(stage, &cfg, c)?;
        }
        if let Some((h, w)) = size_fact(inputs.get("table")) {
            check_gpu_memory(stage, &cfg, h * w)?;
        }
        let Some(condition) = inputs.get("condition") else {
            return Ok(());
        };
        let named = |input: &str| {
            stage
                .inputs
                .get(input)
                .map_or("", String::as_str)
                .to_string()
        };
        if fact(Some(condition), PIXEL_CHANNELS_FACT).is_some() {
            return Err(ParamError::new(
                "inputs.condition",
                format!(
                    "input `condition` (stage `{}`) is an image table; give the code table an `encode` stage wrote",
                    named("condition")
                ),
            ));
        }
        if let (Some((th, tw)), Some((ch, cw))) =
            (size_fact(inputs.get("table")), size_fact(Some(condition)))
            && upsample_factor((ch, cw), (th, tw)).is_none()
        {
            return Err(ParamError::new(
                "inputs.condition",
                format!(
                    "input `condition` (stage `{}`) has {ch}x{cw} code maps and the target `table` (stage `{}`) is {th}x{tw}: the target must be 2^s times larger on both sides; condition on the level just above the target's",
                    named("condition"),
                    named("table")
                ),
            ));
        }
        Ok(())
    }

    fn run(&self, ctx: &StageContext) -> Result<(), StageError> {
        let cfg = parse_config(&crate::params::object(&ctx.job.params))
            .map_err(|e| Error::Params(e.message))?;
        let device = device(&ctx.job.device)?;
        at_precision(cfg.precision, &device.clone(), || {
            Trainer::new(ctx, cfg, device)?.run()
        })
    }
}

/// [`check_gpu_batch`] by [`PixelCnnConfig::gpu_bytes_per_image`].
fn check_gpu_memory(stage: &Stage, cfg: &Config, pixels: usize) -> Result<(), ParamError> {
    let m = &cfg.model;
    let per_image = |precision| m.gpu_bytes_per_image(pixels, precision);
    let step = StepMemory {
        per_image: &per_image,
        model: format!(
            "hidden {}, {} layers, kernel {} on {pixels} positions",
            m.hidden, m.layers, m.kernel
        ),
        shrink: "`model.hidden`, `layers` or `kernel`",
    };
    check_gpu_batch(stage, cfg.batch_size, cfg.precision, step)
}

/// The PixelCNN gives each of the `c` pixel channels an equal group of
/// hidden channels.
fn check_hidden(stage: &Stage, cfg: &Config, c: usize) -> Result<(), ParamError> {
    let h = cfg.model.hidden;
    if c > 1 && !h.is_multiple_of(c) {
        let from = stage.inputs.get("table").map_or("", String::as_str);
        let below = h / c * c;
        let fix = if below == 0 {
            format!("{c}")
        } else {
            format!("{below} or {}", below + c)
        };
        return Err(ParamError::new(
            "params.model",
            format!(
                "model.hidden is {h}, not a multiple of the {c} pixel channels of input `table` (stage `{from}`): the PixelCNN gives each channel an equal group of hidden channels; use {fix}"
            ),
        ));
    }
    Ok(())
}

/// Everything a checkpoint holds besides tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TrainState {
    step: u64,
    cursor: Cursor,
    optimizer_steps: u64,
}

/// The validation rows (and their code maps).
struct Validation {
    rows: Rows,
    condition: Option<Rows>,
    ids_digest: String,
}

struct Trainer<'a> {
    ctx: &'a StageContext,
    cfg: Config,
    model: ArModel,
    opt: AdamW,
    stream: Prefetched,
    step: u64,
    validation: Validation,
}

impl<'a> Trainer<'a> {
    fn new(ctx: &'a StageContext, cfg: Config, device: Device) -> Result<Self, StageError> {
        let table = LevelTable::open(ctx.input("table")?)?;
        let condition = match ctx.job.inputs.contains_key("condition") {
            true => Some(LevelTable::open(ctx.input("condition")?)?),
            false => None,
        };
        let target_key = ctx.input_key("table")?;
        if let Some(source) = condition.as_ref().and_then(|c| c.source_key.as_deref())
            && source != target_key
        {
            return Err(Error::Params(format!(
                "inputs.condition: that code table was encoded from another table (stage key {source}) than `table` (stage key {target_key}); give as `condition` the encode stage whose `table` is this stage's `table`"
            ))
            .into());
        }
        let info = ArInfo {
            format: AR_FORMAT.into(),
            target: table.input,
            height: table.height,
            width: table.width,
            class_names: table.class_names.clone(),
            class_conditional: cfg.class_conditional,
            condition: match &condition {
                Some(c) => Some(ArInfo::code_map(&table, c)?),
                None => None,
            },
            target_key: target_key.to_string(),
            condition_key: match &condition {
                Some(_) => Some(ctx.input_key("condition")?.to_string()),
                None => None,
            },
            seed: cfg.seed,
            model: cfg.model.clone(),
        };
        if info.class_conditional && info.class_names.is_empty() {
            return Err(Error::Params(
                "params.class_conditional: the table has no class names; set `class_conditional: false`".into(),
            )
            .into());
        }
        let model = ArModel::new(info, &device)?;
        let opt = AdamW::new(model.trainable(), cfg.optimizer.clone())
            .map_err(Error::candle("optimizer"))?;
        let split = &cfg.validation_split;
        let (rows, positions) = training::validation_rows_of(&table, split, cfg.validation_rows)?;
        let val_condition = match &condition {
            Some(c) => {
                let other = c.read_positions(split, &positions)?;
                check_aligned((&table, &rows), (c, &other), split, 0)?;
                Some(other)
            }
            None => None,
        };
        let stream = match &condition {
            Some(c) => BatchStream::paired(&table, c, "train", cfg.seed, Cursor::default())?,
            None => BatchStream::new(&table, "train", cfg.seed, Cursor::default())?,
        };
        let stream = Prefetched::new(stream, cfg.batch_size);
        Ok(Trainer {
            validation: Validation {
                ids_digest: ids_digest(&rows.ids),
                rows,
                condition: val_condition,
            },
            stream,
            step: 0,
            ctx,
            model,
            opt,
            cfg,
        })
    }

    fn save_checkpoint(&self) -> Result<(), StageError> {
        let state = TrainState {
            step: self.step,
            cursor: self.stream.cursor(),
            optimizer_steps: self.opt.steps,
        };
        let tensors = checkpoint::weights_and_moments(&self.model.vars, &self.opt);
        checkpoint::save(self.ctx, self.step, &tensors, &state)
    }

    fn restore(&mut self, dir: &Path) -> Result<(), StageError> {
        let (tensors, state): (_, TrainState) = checkpoint::load(dir, &self.model.device)?;
        checkpoint::restore_weights_and_moments(
            &tensors,
            dir,
            &self.model.vars,
            &mut self.opt,
            state.optimizer_steps,
        )?;
        self.stream.seek(state.cursor)?;
        self.step = state.step;
        Ok(())
    }

    fn run(mut self) -> Result<(), StageError> {
        let ctx = self.ctx;
        if let Some(ck) = ctx.latest_checkpoint() {
            self.restore(&ck.dir)
                .map_err(|e| format!("restoring checkpoint {}: {e}", ck.dir.display()))?;
            eprintln!("resuming from the checkpoint at step {}", self.step);
        }
        let info = &self.model.info;
        eprintln!(
            "train_ar: {} parameters; {}x{} {:?}{}{}",
            self.model.vars.parameter_count(),
            info.height,
            info.width,
            info.target,
            if info.class_conditional {
                " given the class"
            } else {
                ""
            },
            info.condition
                .map(|c| format!(
                    " given {}x{} codes of {}",
                    c.height, c.width, c.codebook_size
                ))
                .unwrap_or_default()
        );
        let schedule = self.cfg.schedule();
        let last = training::train(ctx, &mut self, &schedule)?;
        let mut summary = match last {
            Some(v) => v,
            None => self.validate()?,
        };
        let out = ctx.out_dir();
        if let Some(r) = self.reconstruct(out)? {
            summary["reconstruction"] = r;
        }
        self.model.save(out)?;
        std::fs::write(
            out.join("metrics.json"),
            serde_json::to_vec_pretty(&summary)?,
        )?;
        Ok(())
    }

    /// Likelihood on the validation rows; reports and returns the measures.
    fn validate(&self) -> Result<serde_json::Value, StageError> {
        let v = &self.validation;
        let info = &self.model.info;
        let b = self.cfg.batch_size;
        let mut nats = 0.0;
        for start in (0..v.rows.len()).step_by(b) {
            let end = (start + b).min(v.rows.len());
            let chunk = v.rows.range(start, end, info.values_per_row());
            let cond = match (&v.condition, info.condition) {
                (Some(c), Some(map)) => Some(c.range(start, end, map.values())),
                _ => None,
            };
            let batch = self.model.batch(&chunk, cond.as_ref())?;
            let per_row = self
                .model
                .nll_per_row(&batch)
                .map_err(Error::candle("validation"))?;
            nats += per_row.iter().sum::<f64>();
        }
        let n = v.rows.len() as f64;
        let bits_per_image = bits_per_dim(nats / n);
        let bpd = bits_per_image / info.values_per_row() as f64;
        let s = self.step as i64;
        self.ctx.metric("val.bits_per_dim", s, bpd);
        self.ctx.metric("val.bits_per_image", s, bits_per_image);
        let out = json!({
            "step": self.step,
            "bits_per_dim": bpd,
            "bits_per_image": bits_per_image,
            "values_per_image": info.values_per_row(),
            "validation": {
                "split": self.cfg.validation_split,
                "rows": v.rows.len(),
                "ids_digest": v.ids_digest,
            },
        });
        eprintln!("step {}: validation {out}", self.step);
        Ok(out)
    }

    /// Samples the first validation rows given their own codes; reports how
    /// close the samples are and draws them under the originals.
    fn reconstruct(&self, out: &Path) -> Result<Option<serde_json::Value>, StageError> {
        let info = &self.model.info;
        let n = self.cfg.reconstruct.rows.min(self.validation.rows.len());
        let (Some(cond), Some(map)) = (&self.validation.condition, info.condition) else {
            return Ok(None);
        };
        if n == 0 {
            return Ok(None);
        }
        let per = info.values_per_row();
        let rows = self.validation.rows.range(0, n, per);
        let cond = cond.range(0, n, map.values());
        let batch = self.model.batch(&rows, Some(&cond))?;
        let started = Instant::now();
        let mut rng = SplitMix64::stream(self.cfg.seed, "reconstruct");
        let samples = self
            .model
            .sample(
                batch.labels.as_ref(),
                batch.code_map.as_ref(),
                n,
                self.cfg.reconstruct.temperature,
                &mut rng,
                Sampling::for_device(&self.model.device),
            )
            .map_err(Error::candle("sampling"))?;
        let s = self.step as i64;
        // A metric, not part of metrics.json: the artifact's digest depends
        // only on the stage's inputs.
        self.ctx.metric(
            "val.reconstruction_seconds",
            s,
            started.elapsed().as_secs_f64(),
        );
        let result = match info.target {
            InputKind::Pixels { channels } => {
                let row_mse: Vec<f64> = samples
                    .chunks_exact(per)
                    .zip(rows.values.chunks_exact(per))
                    .map(|(a, b)| {
                        a.iter()
                            .zip(b)
                            .map(|(&a, &b)| ((a as f64 - b as f64) / 255.0).powi(2))
                            .sum::<f64>()
                            / per as f64
                    })
                    .collect();
                let mse = row_mse.iter().sum::<f64>() / n as f64;
                let psnr = stats::psnr(&row_mse, RECONSTRUCTION_RESAMPLES, self.cfg.seed);
                self.ctx.metric("val.reconstruction_mse", s, mse);
                self.ctx.metric("val.reconstruction_psnr", s, psnr.value);
                // Registry metrics only, as the seconds above: metrics.json
                // keeps its form, so cached stages stay valid.
                self.ctx.metric("val.reconstruction_psnr_lo", s, psnr.lo);
                self.ctx.metric("val.reconstruction_psnr_hi", s, psnr.hi);
                let psnr = psnr.value;
                // The first rows only: a figure, not the measure.
                let shown = n.min(RECONSTRUCTIONS_SHOWN);
                let mut images: Vec<&[u16]> = rows.values.chunks_exact(per).take(shown).collect();
                images.extend(samples.chunks_exact(per).take(shown));
                write_grid(
                    &out.join("reconstructions.png"),
                    &images,
                    (info.height, info.width, channels),
                    shown,
                )?;
                json!({"rows": n, "mse": mse, "psnr": psnr})
            }
            InputKind::Codes { .. } => {
                let same = samples
                    .iter()
                    .zip(&rows.values)
                    .filter(|(a, b)| a == b)
                    .count();
                let accuracy = same as f64 / samples.len() as f64;
                self.ctx.metric("val.reconstruction_accuracy", s, accuracy);
                json!({"rows": n, "accuracy": accuracy})
            }
        };
        eprintln!("reconstruction: {result}");
        Ok(Some(result))
    }
}

/// Bootstrap draws for the reconstructions' PSNR interval (as `evaluate`'s
/// default).
const RECONSTRUCTION_RESAMPLES: usize = 1000;

/// Reconstructions drawn in `reconstructions.png`, under their originals.
const RECONSTRUCTIONS_SHOWN: usize = 16;

/// A digest of the validation rows' ids: two models measured on the same
/// rows have the same one.
fn ids_digest(ids: &[i64]) -> String {
    let mut h = blake3::Hasher::new();
    for id in ids {
        h.update(&id.to_le_bytes());
    }
    h.finalize().to_hex().to_string()
}
impl Trainable for Trainer<'_> {
    fn steps_done(&self) -> u64 {
        self.step
    }

    fn train_step(&mut self, total: u64) -> Result<StepReport, StageError> {
        let (rows, condition) = self.stream.next_pair()?;
        let batch = self.model.batch(&rows, condition.as_ref())?;
        let loss = self.model.loss(&batch).map_err(Error::candle("forward"))?;
        let nll = loss.to_scalar::<f32>().map_err(Error::candle("forward"))? as f64;
        if !nll.is_finite() {
            return Err(format!(
                "the loss became {nll} at step {}; lower `optimizer.lr` or set `optimizer.grad_clip` and run again",
                self.step + 1
            )
            .into());
        }
        let grads = loss.backward().map_err(Error::candle("backward"))?;
        let lr = self.cfg.optimizer.lr_at(self.step, total);
        let grad_norm = self
            .opt
            .step(&grads, lr)
            .map_err(Error::candle("optimizer"))?;
        self.step += 1;
        Ok(StepReport {
            lr,
            grad_norm,
            logged: vec![
                ("train.nll", nll),
                ("train.bits_per_dim", bits_per_dim(nll)),
            ],
            always: Vec::new(),
            note: format!("{:.3} bits/dim", bits_per_dim(nll)),
        })
    }

    fn validate(&self) -> Result<serde_json::Value, StageError> {
        Trainer::validate(self)
    }

    fn save_checkpoint(&self) -> Result<(), StageError> {
        Trainer::save_checkpoint(self)
    }
}
