//! The contract between the engine and a stage kind, and the worker side of it.
//!
//! A stage kind (in the `stages` crate) implements [`StageKind`]. The driver
//! never runs one itself: it writes a [`Job`] file and starts
//! `haic-pipe worker --job FILE`, which calls [`run_job`]. The worker writes
//! its outputs into a staging folder, publishes them as the artifact of the
//! stage key, and reports [`WorkerEvent`]s as JSON lines on stdout (its only
//! use of stdout; diagnostics go to stderr, which the driver sends to the
//! stage's log file).
//!
//! Long stages checkpoint with [`StageContext::save_checkpoint`] into the
//! stage's scratch folder, which is keyed by the stage key and so survives
//! interruptions: the next attempt finds it with
//! [`StageContext::latest_checkpoint`].
//!
//! SIGUSR1 asks a worker to checkpoint and stop (a cluster job's time limit
//! is near): a training loop sees [`StageContext::checkpoint_requested`],
//! saves a checkpoint, calls [`StageContext::stopping_after_checkpoint`] and
//! returns; the worker then exits with [`EXIT_CHECKPOINTED`] and its job is
//! requeued to continue from that checkpoint.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cache::{
    ArtifactStore, FileEntry, MetricRecord, Provenance, hash_file, list_files, remove_tree,
};
use crate::error::{Error, IoContext, ParamError, Result};
use crate::spec::{KindRules, Stage};

/// The error a stage implementation returns; its text ends up in the registry.
pub type StageError = Box<dyn std::error::Error + Send + Sync>;

/// One kind of stage (`command`, `preprocess`, `train_vq`, ...).
pub trait StageKind: Send + Sync {
    fn name(&self) -> &'static str;
    /// Bumped whenever the kind's output changes for the same inputs (in the stage key).
    fn version(&self) -> u32;
    /// Whether the stage's results depend on the device class (cpu vs cuda).
    fn device_dependent(&self) -> bool {
        false
    }
    /// Checks a declared stage when the pipeline is loaded; the error names
    /// the field (`params.steps`, `cmd`, ...) and says what is wrong.
    fn check(&self, stage: &Stage) -> std::result::Result<(), ParamError>;
    /// The params as the kind reads them: parsed with every default
    /// applied and written back (after [`StageKind::check`] passed), so
    /// that writing a default out changes neither the stage key nor what
    /// the registry records. The default keeps the params as written.
    fn resolved_params(
        &self,
        stage: &Stage,
    ) -> std::result::Result<serde_json::Map<String, Value>, ParamError> {
        Ok(stage.params.clone())
    }
    /// Top-level params that cannot change the stage's output (how often
    /// it checkpoints or logs: a resume is bit-exact): recorded, but left
    /// out of the stage key.
    fn unkeyed_params(&self) -> &'static [&'static str] {
        &[]
    }
    /// The metrics `compare` shows when none are asked for (patterns: a
    /// metric name, `*` for any text).
    fn headline_metrics(&self) -> &'static [&'static str] {
        &[]
    }
    /// The input names the kind reads, when it reads a fixed set (`None`:
    /// names of the user's choosing, like `command`'s or `evaluate`'s
    /// sample sets); any other input name is refused at load time.
    fn input_names(&self) -> Option<&'static [&'static str]> {
        None
    }
    /// Files the stage reads that its params name (e.g. a data source), as
    /// written there; the engine adds them to the stage's deps, so their
    /// contents enter the stage key and a stage writing them becomes upstream.
    fn implicit_deps(&self, _stage: &Stage) -> Vec<String> {
        Vec::new()
    }
    /// What the stage's output will be, as far as its params and its
    /// inputs' facts (input name -> that stage's facts) say before anything
    /// runs: JSON the engine passes on without reading (the kinds agree on
    /// its keys, e.g. `{"pixel_channels": 3}`); `Null` when nothing is known.
    fn output_facts(&self, _stage: &Stage, _inputs: &BTreeMap<String, Value>) -> Value {
        Value::Null
    }
    /// Checks the stage against its inputs' facts at load time, so that an
    /// impossible configuration fails in seconds instead of after the
    /// stages upstream trained.
    fn check_inputs(
        &self,
        _stage: &Stage,
        _inputs: &BTreeMap<String, Value>,
    ) -> std::result::Result<(), ParamError> {
        Ok(())
    }
    /// Does the work, in a worker process.
    fn run(&self, ctx: &StageContext) -> std::result::Result<(), StageError>;
}

/// The stage kinds a binary knows.
#[derive(Default)]
pub struct Kinds {
    kinds: Vec<Box<dyn StageKind>>,
}

impl Kinds {
    pub fn new(kinds: Vec<Box<dyn StageKind>>) -> Self {
        Kinds { kinds }
    }

    pub fn get(&self, name: &str) -> Option<&dyn StageKind> {
        self.kinds
            .iter()
            .find(|k| k.name() == name)
            .map(|b| b.as_ref())
    }
}

impl KindRules for Kinds {
    fn kind_names(&self) -> Vec<&'static str> {
        self.kinds.iter().map(|k| k.name()).collect()
    }

    fn check(&self, stage: &Stage) -> Option<std::result::Result<(), ParamError>> {
        let kind = self.get(&stage.kind)?;
        if stage.params.contains_key("cmd")
            && kind.name() != "command"
            && stage.field_pos.contains_key("cmd")
        {
            return Some(Err(ParamError::new(
                "cmd",
                format!("`cmd` is only for `command` stages, not `{}`", stage.kind),
            )));
        }
        if let Some(known) = kind.input_names()
            && let Some(name) = stage.inputs.keys().find(|n| !known.contains(&n.as_str()))
        {
            let reads = match known.is_empty() {
                true => "it reads no inputs".to_string(),
                false => format!("it reads {}", known.join(", ")),
            };
            let hint = crate::graph::did_you_mean(name, known.iter().copied(), "inputs");
            let message = match hint.starts_with("did you mean") {
                true => format!("{} has no input `{name}` ({hint}); {reads}", kind.name()),
                false => format!("{} has no input `{name}`; {reads}", kind.name()),
            };
            return Some(Err(ParamError::new(format!("inputs.{name}"), message)));
        }
        Some(kind.check(stage))
    }

    fn resolve(
        &self,
        stage: &Stage,
    ) -> std::result::Result<serde_json::Map<String, Value>, ParamError> {
        match self.get(&stage.kind) {
            Some(k) => k.resolved_params(stage),
            None => Ok(stage.params.clone()),
        }
    }

    fn implicit_deps(&self, stage: &Stage) -> Vec<String> {
        self.get(&stage.kind)
            .map(|k| k.implicit_deps(stage))
            .unwrap_or_default()
    }

    fn output_facts(&self, stage: &Stage, inputs: &BTreeMap<String, Value>) -> Value {
        self.get(&stage.kind)
            .map_or(Value::Null, |k| k.output_facts(stage, inputs))
    }

    fn check_inputs(
        &self,
        stage: &Stage,
        inputs: &BTreeMap<String, Value>,
    ) -> std::result::Result<(), ParamError> {
        match self.get(&stage.kind) {
            Some(k) => k.check_inputs(stage, inputs),
            None => Ok(()),
        }
    }
}

/// A usable checkpoint: its step and the folder `save_checkpoint` filled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub step: u64,
    pub dir: PathBuf,
}

/// The digest record inside every checkpoint folder.
const CHECKPOINT_RECORD: &str = "CHECKPOINT.json";

/// The `step-N` folders under `dir`, newest first.
fn checkpoint_steps(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut steps: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().to_string();
                    Some((name.strip_prefix("step-")?.parse().ok()?, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    steps.sort_by_key(|s| std::cmp::Reverse(s.0));
    steps
}

/// The step of the newest checkpoint in a stage key's scratch folder, as
/// `status` reports it (not verified: the worker checks it when it loads).
pub fn newest_checkpoint_step(scratch: &Path) -> Option<u64> {
    checkpoint_steps(&scratch.join("checkpoints"))
        .first()
        .map(|s| s.0)
}

/// Checks a checkpoint folder against its digest record.
fn verify_checkpoint(dir: &Path) -> std::result::Result<(), String> {
    let text = std::fs::read(dir.join(CHECKPOINT_RECORD))
        .map_err(|e| format!("no {CHECKPOINT_RECORD}: {e}"))?;
    let record: Value = serde_json::from_slice(&text)
        .map_err(|e| format!("{CHECKPOINT_RECORD} is not valid: {e}"))?;
    let files: Vec<FileEntry> = serde_json::from_value(record["files"].clone())
        .map_err(|e| format!("{CHECKPOINT_RECORD} is not valid: {e}"))?;
    for f in &files {
        let path = dir.join(&f.path);
        let digest = hash_file(&path).map_err(|e| e.to_string())?;
        if digest != f.digest {
            return Err(format!("{} does not match its recorded digest", f.path));
        }
    }
    let on_disk = list_files(dir).map_err(|e| e.to_string())?.len();
    if on_disk != files.len() + 1 {
        return Err("its files differ from the recorded list".into());
    }
    Ok(())
}

/// What the driver hands a worker (written as JSON to a file).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub stage: String,
    pub kind: String,
    pub key: String,
    pub params: Value,
    /// Input name -> folder holding the upstream artifact's data.
    pub inputs: BTreeMap<String, PathBuf>,
    /// Input name -> the stage key of the upstream artifact (how a stage
    /// records which artifacts it was made from).
    #[serde(default)]
    pub input_keys: BTreeMap<String, String>,
    /// Dep path (relative to the pipeline folder) -> absolute path.
    pub deps: BTreeMap<String, PathBuf>,
    pub outs: Vec<String>,
    pub pipeline_dir: PathBuf,
    pub artifacts_dir: PathBuf,
    /// `scratch/<key>`: survives attempts; checkpoints live here.
    pub scratch_dir: PathBuf,
    pub device: String,
    pub attempt: i64,
}

/// What a worker reports on stdout, one JSON object per line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum WorkerEvent {
    Progress {
        done: u64,
        total: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
    Metric {
        name: String,
        step: i64,
        value: f64,
    },
    Checkpoint {
        step: u64,
    },
    Published {
        key: String,
        digest: String,
        bytes: u64,
    },
    Failed {
        message: String,
    },
    /// Checkpointed at `step` on SIGUSR1 and stopped; see [`EXIT_CHECKPOINTED`].
    Stopped {
        step: u64,
    },
    /// Resumes from the checkpoint at `step` (said once, when it loads).
    Resumed {
        step: u64,
    },
    /// Where the worker computes: its device, host and, on a GPU, the
    /// GPU's name (the first event).
    Placed {
        device: String,
        host: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        gpu: Option<String>,
    },
}

/// The exit code of a worker that checkpointed and stopped on SIGUSR1
/// (`EX_TEMPFAIL`): run it again and it continues.
pub const EXIT_CHECKPOINTED: i32 = 75;

/// Set by the SIGUSR1 handler; read by the stage between steps.
static CHECKPOINT_REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigusr1(_: libc::c_int) {
    CHECKPOINT_REQUESTED.store(true, Ordering::SeqCst);
}

/// SIGUSR1 no longer kills this process; it asks the stage to checkpoint.
fn install_checkpoint_signal() {
    // SAFETY: the handler only stores to an atomic (async-signal-safe).
    unsafe {
        libc::signal(
            libc::SIGUSR1,
            on_sigusr1 as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
}

/// No step yet: [`StageContext::stopping_after_checkpoint`] was not called.
const NOT_STOPPING: u64 = u64::MAX;

/// What a running stage sees: its params, inputs, output folder, checkpoints,
/// and a way to report progress and metrics.
pub struct StageContext {
    pub job: Job,
    out_dir: PathBuf,
    events: Mutex<Box<dyn Write + Send>>,
    stopped_at: AtomicU64,
    /// Every metric point reported, kept with the artifact.
    metrics: Mutex<Vec<MetricRecord>>,
}

impl StageContext {
    pub fn new(job: Job, out_dir: PathBuf, events: Box<dyn Write + Send>) -> Self {
        StageContext {
            job,
            out_dir,
            events: Mutex::new(events),
            stopped_at: AtomicU64::new(NOT_STOPPING),
            metrics: Mutex::new(Vec::new()),
        }
    }

    /// Whether SIGUSR1 asked this worker to checkpoint and stop. Stages that
    /// checkpoint poll this between steps; others run on.
    pub fn checkpoint_requested(&self) -> bool {
        CHECKPOINT_REQUESTED.load(Ordering::SeqCst)
    }

    /// The stage saved a checkpoint at `step` because one was requested and
    /// now returns (with any error): the worker exits with
    /// [`EXIT_CHECKPOINTED`] instead of reporting a failure.
    pub fn stopping_after_checkpoint(&self, step: u64) {
        self.stopped_at.store(step, Ordering::SeqCst);
    }

    /// The params, deserialised into the kind's config type.
    pub fn params<T: serde::de::DeserializeOwned>(&self) -> std::result::Result<T, StageError> {
        serde_json::from_value(self.job.params.clone())
            .map_err(|e| format!("stage `{}`: bad params: {e}", self.job.stage).into())
    }

    /// The data folder of an input artifact.
    pub fn input(&self, name: &str) -> std::result::Result<&Path, StageError> {
        self.job
            .inputs
            .get(name)
            .map(PathBuf::as_path)
            .ok_or_else(|| {
                format!(
                    "stage `{}` has no input `{name}`; add it under `inputs:`",
                    self.job.stage
                )
                .into()
            })
    }

    /// The stage key of an input artifact.
    pub fn input_key(&self, name: &str) -> std::result::Result<&str, StageError> {
        self.input(name)?;
        self.job
            .input_keys
            .get(name)
            .map(String::as_str)
            .ok_or_else(|| {
                format!(
                    "stage `{}`: the key of input `{name}` is unknown",
                    self.job.stage
                )
                .into()
            })
    }

    /// Where the stage writes its outputs; published as one artifact on success.
    pub fn out_dir(&self) -> &Path {
        &self.out_dir
    }

    /// A folder that survives interrupted attempts of this stage key.
    pub fn scratch_dir(&self) -> &Path {
        &self.job.scratch_dir
    }

    fn checkpoints_dir(&self) -> PathBuf {
        self.job.scratch_dir.join("checkpoints")
    }

    /// The newest checkpoint whose files all match their recorded digests.
    /// A damaged one (a bit flip, a truncated file) is set aside as
    /// `damaged-step-N` with a warning in the stage log, and the previous good
    /// one is used; with none left the stage starts over, also with a warning.
    pub fn latest_checkpoint(&self) -> Option<Checkpoint> {
        let dir = self.checkpoints_dir();
        let found = checkpoint_steps(&dir);
        let any = !found.is_empty();
        for (step, path) in found {
            match verify_checkpoint(&path) {
                Ok(()) => {
                    self.emit(&WorkerEvent::Resumed { step });
                    return Some(Checkpoint { step, dir: path });
                }
                Err(why) => {
                    eprintln!(
                        "warning: checkpoint {} is damaged ({why}); set aside, trying the previous one",
                        path.display()
                    );
                    let _ = std::fs::rename(&path, dir.join(format!("damaged-step-{step:012}")));
                }
            }
        }
        if any {
            eprintln!("warning: no usable checkpoint is left; the stage starts from the beginning");
        }
        None
    }

    /// Writes a checkpoint atomically: `write` fills a fresh folder, a
    /// `CHECKPOINT.json` records every file's digest, and one rename makes it
    /// visible. The previous checkpoint is kept as a fallback; older ones go.
    pub fn save_checkpoint(
        &self,
        step: u64,
        write: impl FnOnce(&Path) -> std::result::Result<(), StageError>,
    ) -> std::result::Result<PathBuf, StageError> {
        let dir = self.checkpoints_dir();
        std::fs::create_dir_all(&dir)?;
        let name = format!("step-{step:012}");
        let tmp = dir.join(format!(".{name}.tmp"));
        remove_tree(&tmp)?;
        std::fs::create_dir_all(&tmp)?;
        write(&tmp)?;
        let mut files = Vec::new();
        for (rel, path) in list_files(&tmp)? {
            files.push(FileEntry {
                bytes: std::fs::metadata(&path)?.len(),
                digest: hash_file(&path)?,
                path: rel,
            });
        }
        let record = serde_json::json!({"step": step, "files": files});
        std::fs::write(
            tmp.join(CHECKPOINT_RECORD),
            serde_json::to_vec_pretty(&record)?,
        )?;
        let final_dir = dir.join(&name);
        remove_tree(&final_dir)?;
        std::fs::rename(&tmp, &final_dir)?;
        for (_, old) in checkpoint_steps(&dir).iter().skip(2) {
            let _ = remove_tree(old);
        }
        self.emit(&WorkerEvent::Checkpoint { step });
        Ok(final_dir)
    }

    pub fn progress(&self, done: u64, total: u64, message: Option<String>) {
        self.emit(&WorkerEvent::Progress {
            done,
            total,
            message,
        });
    }

    /// Reports a metric point. NaN and infinite values cannot be stored (JSON
    /// has no spelling for them); they are noted in the stage log instead.
    pub fn metric(&self, name: &str, step: i64, value: f64) {
        if !value.is_finite() {
            eprintln!("metric `{name}` at step {step} is {value}; not recorded");
            return;
        }
        if let Ok(mut kept) = self.metrics.lock() {
            kept.push(MetricRecord {
                name: name.to_string(),
                step,
                value,
            });
        }
        self.emit(&WorkerEvent::Metric {
            name: name.to_string(),
            step,
            value,
        });
    }

    fn emit(&self, e: &WorkerEvent) {
        emit_to(&self.events, e);
    }
}

fn emit_to(out: &Mutex<Box<dyn Write + Send>>, e: &WorkerEvent) {
    if let Ok(mut w) = out.lock()
        && let Ok(line) = serde_json::to_string(e)
    {
        // A closed pipe means the driver is gone; the stage ends soon anyway.
        let _ = writeln!(w, "{line}");
        let _ = w.flush();
    }
}

/// Tells the driver (event) and the stage log (stderr) why the stage failed.
fn report_failure(events: &Mutex<Box<dyn Write + Send>>, message: String) {
    eprintln!("haic-pipe worker: {message}");
    emit_to(events, &WorkerEvent::Failed { message });
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Reads a job file.
pub fn read_job(path: &Path) -> Result<Job> {
    let bytes = std::fs::read(path).ctx(|| format!("reading job file {}", path.display()))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Error::Invalid(format!("job file {} is not valid: {e}", path.display())))
}

/// The worker: runs one job, publishes its artifact, reports on `events`.
/// Returns the process exit code (0 success, 1 stage failure, 2 bad job,
/// [`EXIT_CHECKPOINTED`] stopped on request).
pub fn run_job(kinds: &Kinds, mut job: Job, events: Box<dyn Write + Send>) -> i32 {
    install_checkpoint_signal();
    // A cluster job learns its device only when it starts (the GPUs Slurm
    // granted); the launcher says so in HAIC_DEVICE.
    if let Ok(device) = std::env::var("HAIC_DEVICE")
        && !device.is_empty()
    {
        job.device = device;
    }
    let events = Mutex::new(events);
    emit_to(
        &events,
        &WorkerEvent::Placed {
            device: job.device.clone(),
            host: host_name(),
            // The worker sees only its own devices (CUDA_VISIBLE_DEVICES).
            gpu: job
                .device
                .starts_with("cuda")
                .then(|| crate::executor::gpus::gpu_name(0))
                .flatten(),
        },
    );
    let fail = |msg: String| report_failure(&events, msg);
    let Some(kind) = kinds.get(&job.kind) else {
        fail(format!(
            "this haic-pipe binary has no stage kind `{}`",
            job.kind
        ));
        return 2;
    };
    if let Err(e) = std::fs::create_dir_all(&job.scratch_dir) {
        fail(format!("creating {}: {e}", job.scratch_dir.display()));
        return 1;
    }
    let store = ArtifactStore::new(&job.artifacts_dir);
    let staging = match store.begin(&job.key) {
        Ok(s) => s,
        Err(e) => {
            fail(e.to_string());
            return 1;
        }
    };
    let (stage, kind_name, key) = (job.stage.clone(), job.kind.clone(), job.key.clone());
    let (params, input_keys) = (job.params.clone(), job.input_keys.clone());
    let out_events = match events.into_inner() {
        Ok(w) => w,
        Err(p) => p.into_inner(),
    };
    let ctx = StageContext::new(job, staging.data(), out_events);
    let result = kind.run(&ctx);
    let stopped_at = ctx.stopped_at.load(Ordering::SeqCst);
    let metrics = ctx.metrics.into_inner().unwrap_or_else(|p| p.into_inner());
    let events = ctx.events;
    let fail = |msg: String| report_failure(&events, msg);
    if result.is_err() && stopped_at != NOT_STOPPING {
        let _ = remove_tree(&staging.root);
        eprintln!(
            "haic-pipe worker: checkpointed at step {stopped_at} on request (SIGUSR1); run again to continue"
        );
        emit_to(&events, &WorkerEvent::Stopped { step: stopped_at });
        return EXIT_CHECKPOINTED;
    }
    if let Err(e) = result {
        let _ = remove_tree(&staging.root);
        fail(format!("{e}{}", disk_full_hint(&*e)));
        return 1;
    }
    let made_by = Provenance {
        stage: &stage,
        kind: &kind_name,
        params: &params,
        inputs: &input_keys,
        metrics: &metrics,
    };
    match store.commit(staging, made_by) {
        Ok(m) => {
            emit_to(
                &events,
                &WorkerEvent::Published {
                    key,
                    digest: m.digest,
                    bytes: m.bytes,
                },
            );
            0
        }
        Err(e) => {
            fail(format!(
                "publishing the artifact failed: {e}{}",
                disk_full_hint(&e)
            ));
            1
        }
    }
}

/// What to do when the error comes from a full disk (or quota) anywhere in
/// its chain of causes; else nothing. The staging folder is gone by then,
/// so freeing space is all a resume needs.
fn disk_full_hint(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            )
        {
            return format!("\n  hint: {}", crate::error::DISK_FULL_ADVICE);
        }
        cause = c.source();
    }
    String::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(scratch: &Path) -> StageContext {
        let job = Job {
            stage: "s".into(),
            kind: "k".into(),
            key: "0".repeat(64),
            params: serde_json::json!({}),
            inputs: BTreeMap::new(),
            input_keys: BTreeMap::new(),
            deps: BTreeMap::new(),
            outs: vec![],
            pipeline_dir: scratch.to_path_buf(),
            artifacts_dir: scratch.join("artifacts"),
            scratch_dir: scratch.to_path_buf(),
            device: "cpu".into(),
            attempt: 1,
        };
        StageContext::new(job, scratch.join("out"), Box::new(std::io::sink()))
    }

    #[test]
    fn checkpoints_replace_each_other_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path());
        assert!(ctx.latest_checkpoint().is_none());
        for step in 1..=3 {
            ctx.save_checkpoint(step, |d| {
                Ok(std::fs::write(d.join("state"), format!("s{step}"))?)
            })
            .unwrap();
        }
        let latest = ctx.latest_checkpoint().unwrap();
        assert_eq!(latest.step, 3);
        assert_eq!(
            std::fs::read_to_string(latest.dir.join("state")).unwrap(),
            "s3"
        );
        assert!(
            !dir.path().join("checkpoints/step-000000000001").exists(),
            "only two are kept"
        );
        // A checkpoint whose writer fails never becomes visible.
        let failed = ctx.save_checkpoint(4, |d| {
            std::fs::write(d.join("state"), "half")?;
            Err("disk full".into())
        });
        assert!(failed.is_err());
        assert_eq!(ctx.latest_checkpoint().unwrap().step, 3);
        // A new context over the same scratch folder (the next attempt) finds it.
        assert_eq!(context(dir.path()).latest_checkpoint().unwrap().step, 3);
    }

    #[test]
    fn a_damaged_checkpoint_is_set_aside_for_the_previous_one() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path());
        ctx.save_checkpoint(1, |d| Ok(std::fs::write(d.join("w"), [1u8; 64])?))
            .unwrap();
        let two = ctx
            .save_checkpoint(2, |d| Ok(std::fs::write(d.join("w"), [2u8; 64])?))
            .unwrap();
        // Flip one bit of the newest.
        let mut bytes = std::fs::read(two.join("w")).unwrap();
        bytes[10] ^= 1;
        std::fs::write(two.join("w"), bytes).unwrap();
        let got = ctx.latest_checkpoint().unwrap();
        assert_eq!(got.step, 1, "fell back to the previous good checkpoint");
        assert!(
            dir.path()
                .join("checkpoints/damaged-step-000000000002")
                .exists()
        );
        // Truncate the last good one too: nothing usable is left.
        std::fs::write(got.dir.join("w"), [1u8; 10]).unwrap();
        assert!(ctx.latest_checkpoint().is_none());
    }
}
