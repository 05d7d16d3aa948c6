//! What the training stages (`train_vq`, `train_ar`) share: the defaults of
//! their schedule params and the checks of them, the validation rows, and
//! the training loop ([`train`] over a [`Trainable`]) with its cadence of
//! logging, validation and checkpoints; and the images a stage draws at
//! its validation steps ([`step_image`], [`publish_step_images`]).

use crate::data::level_table::{LevelTable, Rows};
use crate::error::Error;
use pipeline::ParamError;
use pipeline::stage::{StageContext, StageError};

/// The folder, in a stage's scratch folder and then in its artifact, of
/// the images it draws at validation steps: `NAME-STEP.png`, the step in
/// 12 digits (what `haic-pipe ui` shows with a step slider, live from the
/// scratch folder while the stage runs).
pub const STEP_IMAGES: &str = "steps";

/// Where the image `name` of validation step `step` goes. In the scratch
/// folder, which outlives an interrupted attempt: a resumed one (bit-exact)
/// draws the later steps' again, identical, and the artifact ends the same.
pub fn step_image(ctx: &StageContext, name: &str, step: u64) -> std::path::PathBuf {
    ctx.scratch_dir()
        .join(STEP_IMAGES)
        .join(format!("{name}-{step:012}.png"))
}

/// Copies the step images into the artifact's `steps/`, when there are any.
pub fn publish_step_images(ctx: &StageContext) -> Result<(), StageError> {
    let from = ctx.scratch_dir().join(STEP_IMAGES);
    let Ok(entries) = std::fs::read_dir(&from) else {
        return Ok(());
    };
    let to = ctx.out_dir().join(STEP_IMAGES);
    std::fs::create_dir_all(&to)?;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_string_lossy().ends_with(".png") {
            std::fs::copy(entry.path(), to.join(&name))?;
        }
    }
    Ok(())
}

pub fn batch_size() -> usize {
    64
}
pub fn validate_every() -> u64 {
    200
}
pub fn validation_split() -> String {
    "val".into()
}
pub fn validation_rows() -> usize {
    1000
}
pub fn checkpoint_every() -> u64 {
    100
}
pub fn log_every() -> u64 {
    10
}

/// The schedule params of a training stage, for [`check_schedule`].
pub struct Schedule {
    pub steps: u64,
    pub batch_size: usize,
    pub lr: f64,
    pub validate_every: u64,
    pub validation_rows: usize,
    pub checkpoint_every: u64,
    pub log_every: u64,
}

/// The first param out of range, if any.
pub fn check_schedule(s: Schedule) -> Result<(), ParamError> {
    let bad = |field: &str, msg: String| Err(ParamError::new(format!("params.{field}"), msg));
    if s.steps == 0 {
        return bad("steps", "steps must be at least 1".into());
    }
    if s.batch_size == 0 {
        return bad("batch_size", "batch_size must be at least 1".into());
    }
    if s.lr.is_nan() || s.lr <= 0.0 {
        return bad(
            "optimizer",
            format!("optimizer.lr is {}; it must be positive", s.lr),
        );
    }
    if s.validate_every == 0 || s.checkpoint_every == 0 || s.log_every == 0 {
        return bad(
            "validate_every",
            "validate_every, checkpoint_every and log_every must be at least 1".into(),
        );
    }
    if s.validation_rows == 0 {
        return bad(
            "validation_rows",
            "validation_rows must be at least 1".into(),
        );
    }
    Ok(())
}

/// What is due after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    pub log: bool,
    pub validate: bool,
    pub checkpoint: bool,
    /// A checkpoint was requested (SIGUSR1): save it, then stop with
    /// [`Error::Stopped`] after telling the context.
    pub stop: bool,
}

/// When a training loop logs, validates and checkpoints (every N steps and
/// at the last one; no checkpoint at the last, the artifact follows; and
/// when SIGUSR1 asked for one, after which the loop stops), and
/// the metrics every loop logs: `train.lr`, `train.grad_norm` and
/// `train.images_per_s` since the previous log.
pub struct Cadence {
    steps: u64,
    batch_size: usize,
    log_every: u64,
    validate_every: u64,
    checkpoint_every: u64,
    since: (std::time::Instant, u64),
}

impl Cadence {
    /// For a loop that starts (or resumes) at `step`.
    pub fn new(s: &Schedule, step: u64) -> Self {
        Cadence {
            steps: s.steps,
            batch_size: s.batch_size,
            log_every: s.log_every,
            validate_every: s.validate_every,
            checkpoint_every: s.checkpoint_every,
            since: (std::time::Instant::now(), step),
        }
    }

    /// Call once `step` steps are done; logs the common metrics when a log
    /// is due.
    pub fn after_step(
        &mut self,
        ctx: &pipeline::stage::StageContext,
        step: u64,
        lr: f64,
        grad_norm: f64,
    ) -> Due {
        let last = step == self.steps;
        // At the last step the artifact follows at once; no need to stop.
        let stop = !last && ctx.checkpoint_requested();
        let due = Due {
            log: step.is_multiple_of(self.log_every) || last,
            validate: step.is_multiple_of(self.validate_every) || last,
            checkpoint: (step.is_multiple_of(self.checkpoint_every) && !last) || stop,
            stop,
        };
        if due.log {
            let s = step as i64;
            let (t0, s0) = self.since;
            let images = ((step - s0) as usize * self.batch_size) as f64;
            ctx.metric("train.lr", s, lr);
            ctx.metric("train.grad_norm", s, grad_norm);
            ctx.metric(
                "train.images_per_s",
                s,
                images / t0.elapsed().as_secs_f64().max(1e-9),
            );
            self.since = (std::time::Instant::now(), step);
        }
        due
    }
}

/// What one optimiser step of a [`Trainable`] reports to the loop.
pub struct StepReport {
    pub lr: f64,
    pub grad_norm: f64,
    /// Metrics logged when a log is due (`train.loss`, ...).
    pub logged: Vec<(&'static str, f64)>,
    /// Metrics logged at this step whatever the cadence (a rare event).
    pub always: Vec<(&'static str, f64)>,
    /// The progress line's note (`loss 0.0123`).
    pub note: String,
}

/// A model the shared loop ([`train`]) trains: each kind supplies its step,
/// validation and checkpoint; the loop owns the cadence of logs,
/// validations, checkpoints, the stop on SIGUSR1 and progress.
pub trait Trainable {
    /// Steps done so far (after a resume, the checkpoint's).
    fn steps_done(&self) -> u64;
    /// One optimiser step of the `total`: forward, a finite-loss check
    /// (an error that says what to change), backward, update; the step
    /// count moves on by one.
    fn train_step(&mut self, total: u64) -> Result<StepReport, StageError>;
    /// Measures on the validation rows, reported and returned.
    fn validate(&self) -> Result<serde_json::Value, StageError>;
    fn save_checkpoint(&self) -> Result<(), StageError>;
}

/// Trains `model` to `schedule.steps`; returns the last validation's
/// measures (`None` when no step was left to run).
pub fn train(
    ctx: &StageContext,
    model: &mut impl Trainable,
    schedule: &Schedule,
) -> Result<Option<serde_json::Value>, StageError> {
    let total = schedule.steps;
    let mut cadence = Cadence::new(schedule, model.steps_done());
    let mut last = None;
    let hint = |e| with_memory_hint(e, schedule.batch_size);
    while model.steps_done() < total {
        let report = model.train_step(total).map_err(hint)?;
        let step = model.steps_done();
        let s = step as i64;
        let due = cadence.after_step(ctx, step, report.lr, report.grad_norm);
        if due.log {
            for (name, value) in &report.logged {
                ctx.metric(name, s, *value);
            }
        }
        for (name, value) in &report.always {
            ctx.metric(name, s, *value);
        }
        if due.validate {
            last = Some(model.validate().map_err(hint)?);
        }
        if due.checkpoint {
            model.save_checkpoint()?;
        }
        if due.stop {
            ctx.stopping_after_checkpoint(step);
            return Err(Error::Stopped(step).into());
        }
        ctx.progress(step, total, Some(report.note));
    }
    Ok(last)
}

/// A step or validation (both run `batch_size` rows at a time) that ran
/// out of device memory, with the fix added: the batch is the one size a
/// stage's params set that scales the memory a step needs. On an H200,
/// imagenet128.yaml's decoder1 fits 16 but not 32 (docs/benchmarks.md).
fn with_memory_hint(e: StageError, batch_size: usize) -> StageError {
    if !out_of_memory(&*e) {
        return e;
    }
    format!(
        "{e}\nthe device ran out of memory at `params.batch_size: {batch_size}`: lower it (to {}, say) and run again, or make the model smaller (`hidden`, `layers`)",
        (batch_size / 2).max(1)
    )
    .into()
}

/// Whether an error, or one it wraps, is a device allocation that failed
/// (cudarc's `CUDA_ERROR_OUT_OF_MEMORY`, as candle passes it on).
fn out_of_memory(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(err) = cause {
        if err.to_string().contains("CUDA_ERROR_OUT_OF_MEMORY") {
            return true;
        }
        cause = err.source();
    }
    false
}

/// Up to `limit` rows of the validation split, spread over the classes
/// ([`LevelTable::read_stratified`]), and their positions in the split;
/// an empty or missing split is an error that says how to make one.
pub fn validation_rows_of(
    table: &LevelTable,
    split: &str,
    limit: usize,
) -> Result<(Rows, Vec<u64>), Error> {
    if table.splits.get(split).is_none_or(|s| s.rows == 0) {
        return Err(Error::Params(format!(
            "params.validation_split: the input table has no rows in split `{split}`; give preprocess a `validation: {{fraction: 0.1}}` or set `validation_split` to one of: {}",
            table.splits.keys().cloned().collect::<Vec<_>>().join(", ")
        )));
    }
    table.read_stratified(split, limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error whose own message hides its cause (the chain must be read).
    #[derive(Debug)]
    struct Outer(Error);
    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "step failed")
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    fn candle(message: &str) -> Error {
        Error::candle("forward")(candle_core::Error::Msg(message.into()))
    }

    #[test]
    fn an_out_of_memory_error_says_to_lower_the_batch_and_others_pass_unchanged() {
        // How cudarc's error reads once candle passes it on (seen on an H200).
        let oom = r#"DriverError(CUDA_ERROR_OUT_OF_MEMORY, "out of memory")"#;
        let said = with_memory_hint(Box::new(candle(oom)), 64).to_string();
        assert!(said.starts_with("forward: "), "{said}");
        assert!(said.contains(oom), "{said}");
        assert!(
            said.contains("`params.batch_size: 64`: lower it (to 32, say)"),
            "{said}"
        );
        let wrapped = with_memory_hint(Box::new(Outer(candle(oom))), 1).to_string();
        assert!(wrapped.contains("lower it (to 1, say)"), "{wrapped}");

        let other = with_memory_hint(Box::new(candle("shape mismatch in matmul")), 64);
        assert_eq!(other.to_string(), "forward: shape mismatch in matmul");
    }
}
