//! The `train_vq` stage: learns one level of the hierarchy (encoder,
//! quantiser, auxiliary decoder) on an image table (level 1) or on the code
//! table of the level below.
//!
//! ```yaml
//! vq1:
//!   kind: train_vq
//!   inputs: {table: prep}           # a preprocess or encode stage
//!   params:
//!     steps: 2000
//!     batch_size: 64
//!     seed: 0
//!     encoder: {hidden: 64, res_blocks: 2, res_hidden: 32, downsample: 2, dim: 64}
//!     quantiser: {codebook_size: 512, decay: 0.99, epsilon: 1.0e-5, beta: 0.25,
//!                 dead_below: 1.0, reseed_every: 100}
//!     decoder: {kind: ff, pixel_loss: mse}   # or kind: msp, mask: {shape: rectangles, ratio: 0.5}
//!     optimizer: {lr: 3.0e-4, schedule: cosine, warmup_steps: 100, grad_clip: 1.0}
//!     validate_every: 200           # on `validation_split` (default val), `validation_rows` of it spread over the classes
//!     checkpoint_every: 100
//!     precision: f32                # or bf16: convolutions in bf16 on a GPU (resources: {gpus: 1})
//! ```
//!
//! Output: `model.safetensors` (encoder + codebook), `aux_decoder.safetensors`,
//! `level.json` (everything needed to rebuild the level), `metrics.json`
//! (the last validation) and, for a pixel level, `reconstructions.png`
//! (validation images above, the auxiliary decoder's reconstructions from
//! their codes alone below) and the same at each validation step,
//! `steps/reconstructions-STEP.png` (`haic-pipe ui` shows them with a step
//! slider, live while the stage trains).
//!
//! **Bit-exact resume.** Every `checkpoint_every` steps the scratch folder
//! gets one safetensors file: the weights, the optimiser's moments and the
//! quantiser's EMA state as tensors, the step, the generators' states and the
//! data cursor as JSON in its metadata (`haic.train_state`). Initialisation, data order, masks
//! and re-seeding draw from [`SplitMix64`] streams of the seed; reductions run
//! in a fixed order; so a run killed at any step and resumed ends with the
//! same bytes as one that was never stopped (on the same CPU and thread count).

use std::path::Path;

use candle_core::Device;
use pipeline::ParamError;
use pipeline::spec::Stage;
use pipeline::stage::{StageContext, StageError, StageKind};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::checkpoint;
use crate::data::grid::write_grid;
use crate::data::layout::{CODES_FACT, HEIGHT_FACT, WIDTH_FACT, fact, size_fact};
use crate::data::level_table::InputKind;
use crate::data::level_table::{BatchStream, Cursor, LevelTable, Rows};
use crate::data::prefetch::Prefetched;
use crate::device::{StepMemory, at_precision, check_gpu_batch, check_precision, device};
use crate::error::Error;
use crate::models::aux_decoder::AuxDecoderConfig;
use crate::models::encoder::EncoderConfig;
use crate::models::optim::{AdamW, OptimConfig};
use crate::models::precision::Precision;
use crate::models::quantiser::{QuantiserConfig, usage};
use crate::models::vq_level::{LevelConfig, Score, VqLevel};
use crate::rng::SplitMix64;
use crate::training::{self, Schedule, StepReport, Trainable, check_schedule};

/// Images in `reconstructions.png`'s two rows.
const RECONSTRUCTION_COLUMNS: usize = 10;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub steps: u64,
    #[serde(default = "training::batch_size")]
    pub batch_size: usize,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub encoder: EncoderConfig,
    #[serde(default)]
    pub quantiser: QuantiserConfig,
    #[serde(default)]
    pub decoder: AuxDecoderConfig,
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
    /// `bf16`: convolutions in bf16 on a GPU ([`crate::models::precision`]).
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
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

    pub fn level(&self) -> LevelConfig {
        LevelConfig {
            encoder: self.encoder.clone(),
            quantiser: self.quantiser.clone(),
            decoder: self.decoder.clone(),
        }
    }
}

fn parse_config(params: &serde_json::Map<String, serde_json::Value>) -> Result<Config, ParamError> {
    let cfg: Config = crate::params::parse(params)?;
    check_schedule(cfg.schedule())?;
    let bad = |field: &str, msg: String| Err(ParamError::new(format!("params.{field}"), msg));
    let k = cfg.quantiser.codebook_size;
    if !(1..=65536).contains(&k) {
        return bad(
            "quantiser",
            format!(
                "quantiser.codebook_size is {k}; it must be 1 to 65536 (codes are stored as u16)"
            ),
        );
    }
    let q = &cfg.quantiser;
    if !(0.0..1.0).contains(&q.decay) {
        return bad(
            "quantiser",
            format!("quantiser.decay is {}; it must be in [0, 1)", q.decay),
        );
    }
    if cfg.encoder.dim == 0 || cfg.encoder.hidden == 0 {
        return bad(
            "encoder",
            "encoder.dim and encoder.hidden must be at least 1".into(),
        );
    }
    if cfg.encoder.downsample > 8 {
        return bad(
            "encoder",
            "encoder.downsample is the exponent s of 2^s; it must be at most 8".into(),
        );
    }
    if let Err(m) = cfg.decoder.mask.check() {
        return bad("decoder", format!("decoder.mask: {m}"));
    }
    Ok(cfg)
}

pub struct TrainVq;

impl StageKind for TrainVq {
    fn name(&self) -> &'static str {
        "train_vq"
    }

    fn version(&self) -> u32 {
        4 // 3: class-stratified validation rows; 4: reconstructions per validation step
    }

    fn input_names(&self) -> Option<&'static [&'static str]> {
        Some(&["table"])
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
        &["val.psnr", "val.accuracy"]
    }

    fn check(&self, stage: &Stage) -> Result<(), ParamError> {
        check_precision(stage, parse_config(&stage.params)?.precision)?;
        if !stage.inputs.contains_key("table") {
            return Err(ParamError::new(
                "inputs",
                "train_vq needs `inputs: {table: STAGE}`, a preprocess or encode stage",
            ));
        }
        Ok(())
    }

    /// The code maps the level makes: the input's size over
    /// 2^`encoder.downsample`, K codes.
    fn output_facts(
        &self,
        stage: &Stage,
        inputs: &std::collections::BTreeMap<String, serde_json::Value>,
    ) -> serde_json::Value {
        let Ok(cfg) = parse_config(&stage.params) else {
            return serde_json::Value::Null;
        };
        let mut facts = serde_json::Map::new();
        facts.insert(CODES_FACT.into(), cfg.quantiser.codebook_size.into());
        if let Some((h, w)) = size_fact(inputs.get("table"))
            && let Ok((ch, cw)) = code_map_size(h, w, cfg.encoder.downsample)
        {
            facts.insert(HEIGHT_FACT.into(), ch.into());
            facts.insert(WIDTH_FACT.into(), cw.into());
        }
        serde_json::Value::Object(facts)
    }

    /// The encoder's downsampling must divide the input's sides, and a
    /// GPU step must fit one GPU ([`check_gpu_batch`]).
    fn check_inputs(
        &self,
        stage: &Stage,
        inputs: &std::collections::BTreeMap<String, serde_json::Value>,
    ) -> Result<(), ParamError> {
        let cfg = parse_config(&stage.params)?;
        let Some((h, w)) = size_fact(inputs.get("table")) else {
            return Ok(());
        };
        code_map_size(h, w, cfg.encoder.downsample).map_err(|most| {
            let from = stage.inputs.get("table").map_or("", String::as_str);
            let s = cfg.encoder.downsample;
            let what = match fact(inputs.get("table"), CODES_FACT) {
                Some(_) => "code maps",
                None => "images",
            };
            ParamError::new(
                "params.encoder.downsample",
                format!(
                    "encoder.downsample is {s}: the code map would be {h}x{w} / 2^{s}, but input `table` (stage `{from}`) holds {h}x{w} {what}, which 2^{s} does not divide into a grid of at least 1x1; use downsample {most} or less"
                ),
            )
        })?;
        let level = cfg.level();
        let positions = h * w;
        let per_image = |precision| level.gpu_bytes_per_image(positions, precision);
        let step = StepMemory {
            per_image: &per_image,
            model: format!(
                "encoder hidden {} and decoder hidden {} on {positions} positions",
                level.encoder.hidden, level.decoder.hidden
            ),
            shrink: "`encoder.hidden` or `decoder.hidden`",
        };
        check_gpu_batch(stage, cfg.batch_size, cfg.precision, step)
    }

    fn run(&self, ctx: &StageContext) -> Result<(), StageError> {
        let cfg = parse_config(&crate::params::object(&ctx.job.params))
            .map_err(|e| Error::Params(e.message))?;
        let device = device(&ctx.job.device)?;
        let table = LevelTable::open(ctx.input("table")?)?;
        at_precision(cfg.precision, &device.clone(), || {
            Trainer::new(ctx, cfg, table, device)?.run()
        })
    }
}

/// The code map of an `h`x`w` input downsampled `s` times (halved each
/// time); else the largest `s` that works.
pub fn code_map_size(h: usize, w: usize, s: usize) -> Result<(usize, usize), usize> {
    let fits = |s: usize| {
        s < usize::BITS as usize
            && (h >> s) << s == h
            && (w >> s) << s == w
            && h >> s > 0
            && w >> s > 0
    };
    if fits(s) {
        return Ok((h >> s, w >> s));
    }
    Err((0..s).rev().find(|&t| fits(t)).unwrap_or(0))
}

/// Everything a checkpoint holds besides tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TrainState {
    step: u64,
    cursor: Cursor,
    mask_rng: u64,
    reseed_rng: u64,
    optimizer_steps: u64,
}

struct Trainer<'a> {
    ctx: &'a StageContext,
    cfg: Config,
    table: LevelTable,
    level: VqLevel,
    opt: AdamW,
    stream: Prefetched,
    mask_rng: SplitMix64,
    reseed_rng: SplitMix64,
    step: u64,
    validation: Rows,
}

impl<'a> Trainer<'a> {
    fn new(
        ctx: &'a StageContext,
        cfg: Config,
        table: LevelTable,
        device: Device,
    ) -> Result<Self, StageError> {
        let level = VqLevel::new(&cfg.level(), &table, cfg.seed, &device)?;
        let opt = AdamW::new(level.trainable(), cfg.optimizer.clone())
            .map_err(Error::candle("optimizer"))?;
        let validation =
            training::validation_rows_of(&table, &cfg.validation_split, cfg.validation_rows)?.0;
        Ok(Trainer {
            stream: Prefetched::new(
                BatchStream::new(&table, "train", cfg.seed, Cursor::default())?,
                cfg.batch_size,
            ),
            mask_rng: SplitMix64::stream(cfg.seed, "mask"),
            reseed_rng: SplitMix64::stream(cfg.seed, "reseed"),
            step: 0,
            ctx,
            level,
            opt,
            table,
            cfg,
            validation,
        })
    }

    fn save_checkpoint(&self) -> Result<(), StageError> {
        let state = TrainState {
            step: self.step,
            cursor: self.stream.cursor(),
            mask_rng: self.mask_rng.0,
            reseed_rng: self.reseed_rng.0,
            optimizer_steps: self.opt.steps,
        };
        let mut tensors = checkpoint::weights_and_moments(&self.level.vars, &self.opt);
        tensors.extend(
            self.level
                .quantiser
                .state("quantiser.")
                .map_err(Error::candle("checkpoint"))?,
        );
        checkpoint::save(self.ctx, self.step, &tensors, &state)
    }

    fn restore(&mut self, dir: &Path) -> Result<(), StageError> {
        let (tensors, state): (_, TrainState) = checkpoint::load(dir, &self.level.device)?;
        checkpoint::restore_weights_and_moments(
            &tensors,
            dir,
            &self.level.vars,
            &mut self.opt,
            state.optimizer_steps,
        )?;
        self.level.quantiser.load_state(&tensors, "quantiser.")?;
        self.stream.seek(state.cursor)?;
        self.mask_rng = SplitMix64(state.mask_rng);
        self.reseed_rng = SplitMix64(state.reseed_rng);
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
        eprintln!(
            "train_vq: {} parameters; input {}x{} {:?} -> codes {}x{} of {}",
            self.level.vars.parameter_count(),
            self.level.info.input_height,
            self.level.info.input_width,
            self.level.info.input,
            self.level.info.code_height,
            self.level.info.code_width,
            self.cfg.quantiser.codebook_size
        );
        if let InputKind::Pixels { .. } = self.table.input {
            ctx.metric(
                "val.pixel_variance",
                0,
                pixel_variance(&self.validation, self.table.values_per_row),
            );
        }
        let schedule = self.cfg.schedule();
        let last = training::train(ctx, &mut self, &schedule)?;
        let out = ctx.out_dir();
        self.level.save(out)?;
        self.write_reconstructions(&out.join("reconstructions.png"))?;
        let summary = match last {
            Some(v) => v,
            None => self.validate()?,
        };
        training::publish_step_images(ctx)?;
        std::fs::write(
            out.join("metrics.json"),
            serde_json::to_vec_pretty(&summary)?,
        )?;
        Ok(())
    }

    /// The reconstructions figure of a pixel level, at `path`: validation
    /// images (one per class where there are enough) above, the auxiliary
    /// decoder's reconstructions from their codes alone below.
    fn write_reconstructions(&self, path: &Path) -> Result<(), StageError> {
        let InputKind::Pixels { channels } = self.table.input else {
            return Ok(());
        };
        let per = self.table.values_per_row;
        let rows = &self.validation;
        // The first row of each class, then the next rows, up to the count.
        let mut seen = std::collections::BTreeSet::new();
        let mut picked: Vec<usize> = (0..rows.len())
            .filter(|&i| seen.insert(rows.labels[i]))
            .take(RECONSTRUCTION_COLUMNS)
            .collect();
        for i in 0..rows.len() {
            if picked.len() >= RECONSTRUCTION_COLUMNS {
                break;
            }
            if !picked.contains(&i) {
                picked.push(i);
            }
        }
        picked.sort_by_key(|&i| (rows.labels[i], i));
        let n = picked.len();
        let mut originals = Rows::default();
        for &i in &picked {
            originals.push_row(rows, i, per);
        }
        let batch = self.level.batch(&originals)?;
        let Some(decoded) = self
            .level
            .reconstruct_pixels(&batch)
            .map_err(Error::candle("reconstructing"))?
        else {
            return Ok(());
        };
        let images: Vec<&[u16]> = originals
            .values
            .chunks_exact(per)
            .chain(decoded.chunks_exact(per))
            .collect();
        let shape = (self.table.height, self.table.width, channels);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        write_grid(path, &images, shape, n.max(1))?;
        Ok(())
    }

    /// Validation on the held-out rows; reports and returns the measures.
    fn validate(&self) -> Result<serde_json::Value, StageError> {
        let rows = &self.validation;
        let per = self.table.values_per_row;
        let k = self.cfg.quantiser.codebook_size;
        let mut hist = vec![0u64; k];
        let mut loss = 0.0;
        let (mut full, mut masked) = (Score::default(), Score::default());
        // The same masks at every validation, for `ff` and `msp` alike:
        // comparable across steps and across the two kinds.
        let mut mask_rng = SplitMix64::stream(self.cfg.seed, "validation/mask");
        let b = self.cfg.batch_size;
        for start in (0..rows.len()).step_by(b) {
            let end = (start + b).min(rows.len());
            let chunk = rows.range(start, end, per);
            let batch = self.level.batch(&chunk)?;
            let mask = self
                .level
                .draw_scoring_mask(chunk.len(), &mut mask_rng)
                .map_err(Error::candle("mask"))?;
            let e = self
                .level
                .evaluate(&batch, &mask)
                .map_err(Error::candle("validation"))?;
            loss += e.loss * chunk.len() as f64;
            full.add(e.full);
            masked.add(e.masked);
            for c in e.codes {
                hist[c as usize] += 1;
            }
        }
        let s = self.step as i64;
        let n = rows.len() as f64;
        let (perplexity, unused) = usage(&hist);
        let mut out = json!({
            "step": self.step,
            "loss": loss / n,
            "perplexity": perplexity,
            "unused_codes": unused,
        });
        self.ctx.metric("val.loss", s, loss / n);
        self.ctx.metric("val.perplexity", s, perplexity);
        self.ctx.metric("val.unused_codes", s, unused as f64);
        // Whole inputs from the codes alone, and the masked region as the
        // decoder trains on it: the same measures for `ff` and `msp`.
        match self.table.input {
            InputKind::Pixels { .. } => {
                let psnr = |mse: f64| 10.0 * (1.0 / mse).log10();
                for (prefix, score) in [("", full), ("masked_", masked)] {
                    let mse = score.mean();
                    self.ctx.metric(&format!("val.{prefix}mse"), s, mse);
                    self.ctx.metric(&format!("val.{prefix}psnr"), s, psnr(mse));
                    out[format!("{prefix}mse")] = json!(mse);
                    out[format!("{prefix}psnr")] = json!(psnr(mse));
                }
            }
            InputKind::Codes { .. } => {
                for (prefix, score) in [("", full), ("masked_", masked)] {
                    self.ctx
                        .metric(&format!("val.{prefix}accuracy"), s, score.mean());
                    out[format!("{prefix}accuracy")] = json!(score.mean());
                }
            }
        }
        self.write_reconstructions(&training::step_image(
            self.ctx,
            "reconstructions",
            self.step,
        ))?;
        eprintln!("step {}: validation {out}", self.step);
        Ok(out)
    }
}

/// The mean over pixel positions and channels of the variance across images,
/// on the [0, 1] scale: the MSE of predicting every value by its mean.
fn pixel_variance(rows: &Rows, per: usize) -> f64 {
    let n = rows.len() as f64;
    let mut sum = vec![0f64; per];
    let mut sum_sq = vec![0f64; per];
    for row in rows.values.chunks_exact(per) {
        for (i, &v) in row.iter().enumerate() {
            let x = v as f64 / 255.0;
            sum[i] += x;
            sum_sq[i] += x * x;
        }
    }
    sum.iter()
        .zip(&sum_sq)
        .map(|(s, q)| q / n - (s / n).powi(2))
        .sum::<f64>()
        / per as f64
}
impl Trainable for Trainer<'_> {
    fn steps_done(&self) -> u64 {
        self.step
    }

    fn train_step(&mut self, total: u64) -> Result<StepReport, StageError> {
        let (rows, _) = self.stream.next_pair()?;
        let batch = self.level.batch(&rows)?;
        let loss = self
            .level
            .loss(&batch, &mut self.mask_rng)
            .map_err(Error::candle("forward"))?;
        if !(loss.reconstruction.is_finite() && loss.commitment.is_finite()) {
            return Err(format!(
                "the loss became {} at step {} (reconstruction {}, commitment {}); lower `optimizer.lr` or set `optimizer.grad_clip` and run again",
                loss.reconstruction + loss.commitment,
                self.step + 1,
                loss.reconstruction,
                loss.commitment
            )
            .into());
        }
        let grads = loss.total.backward().map_err(Error::candle("backward"))?;
        let lr = self.cfg.optimizer.lr_at(self.step, total);
        let grad_norm = self
            .opt
            .step(&grads, lr)
            .map_err(Error::candle("optimizer"))?;
        let q = &mut self.level.quantiser;
        q.ema_update_batch(&loss.z, &loss.codes)
            .map_err(Error::candle("EMA update"))?;
        self.step += 1;
        let reseed = q.cfg.reseed_every;
        let mut always = Vec::new();
        if reseed > 0 && self.step.is_multiple_of(reseed) {
            let reseeded = q
                .reseed_dead_batch(&loss.z, &mut self.reseed_rng)
                .map_err(Error::candle("re-seeding"))?;
            if reseeded > 0 {
                always.push(("train.reseeded_codes", reseeded as f64));
            }
        }
        Ok(StepReport {
            lr,
            grad_norm,
            logged: vec![
                (
                    "train.loss",
                    loss.total.to_scalar::<f32>().unwrap_or(f32::NAN) as f64,
                ),
                ("train.reconstruction", loss.reconstruction),
                ("train.commitment", loss.commitment),
                (
                    "train.dead_codes",
                    self.level
                        .quantiser
                        .dead_codes()
                        .map_err(Error::candle("counting dead codes"))?
                        .len() as f64,
                ),
            ],
            always,
            note: format!("loss {:.4}", loss.reconstruction),
        })
    }

    fn validate(&self) -> Result<serde_json::Value, StageError> {
        Trainer::validate(self)
    }

    fn save_checkpoint(&self) -> Result<(), StageError> {
        Trainer::save_checkpoint(self)
    }
}
