//! Where stages run: the [`Executor`] trait and its back-ends, [`local`]
//! (worker processes on this machine) and [`slurm`] (one batch job per
//! stage). The driver talks to the trait only; a new back-end (a Kubernetes
//! Job, a Ray task) is one new module implementing it, plus its arm in
//! `run::executor_for`.
//!
//! Every back-end runs the same command, `haic-pipe worker --job FILE`, and
//! reads the worker's JSON event lines ([`WorkerReport`]); it decides where
//! and when that command runs, how it is stopped, and whether a job outlives
//! its driver (Slurm's do: a resumed driver adopts them).

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::error::{IoContext, Result};
use crate::stage::WorkerEvent;

pub mod gpus;
pub mod local;
pub mod slurm;

/// A back-end that runs stage workers.
#[async_trait]
pub trait Executor: Send + Sync {
    /// Recorded as a stage run's `worker` (`local`, `slurm`).
    fn name(&self) -> &'static str;

    /// Waits for room to run a stage needing `cpus` CPU slots and `gpus`
    /// GPUs; among stages waiting, the one of highest `priority` (the
    /// longest chain of stages from it, `Graph::chain_lengths`) goes first.
    /// A back-end that queues elsewhere (a cluster) answers at once.
    async fn reserve(&self, cpus: u32, gpus: u32, priority: u32) -> Result<Reservation>;

    /// A stage of `priority` will ask for room soon (the stage it waited
    /// for just finished): a back-end with slots holds them for it briefly
    /// rather than hand them to a lower stage already waiting.
    fn expect(&self, _priority: u32) {}

    /// Starts the stage's worker.
    async fn launch(&self, launch: &Launch<'_>) -> Result<Box<dyn Launched + '_>>;

    /// For each stage run a stopped driver left running, the job that still
    /// runs it, if any (resume); `None` for runs whose worker is gone.
    async fn still_running(&self, left: &[LeftRunning]) -> Result<Vec<Option<String>>>;

    /// Follows a job [`Executor::still_running`] found, instead of
    /// launching the stage again.
    fn adopt(&self, job: &str, launch: &Launch<'_>) -> Result<Box<dyn Launched + '_>>;

    /// Stops a job found running that this run did not adopt.
    async fn cancel(&self, job: &str);

    /// The device to record once the worker says where it computes
    /// (`placed` event); `None` keeps the reserved one.
    fn placed(&self, device: &str, host: &str, gpu: Option<&str>) -> Option<String>;
}

/// Room a back-end set aside for one stage; released on drop.
pub struct Reservation {
    /// Where the worker computes (`cpu`, `cuda:0`), or the back-end's name
    /// when only the worker will know (a cluster job).
    pub device: String,
    /// The worker's compute threads.
    pub threads: u32,
    pub(crate) _held: Option<Box<dyn Send + Sync>>,
}

/// One stage's worker, as the driver asks for it.
pub struct Launch<'a> {
    pub stage: &'a str,
    pub key: &'a str,
    pub attempt: i64,
    pub job_file: &'a Path,
    /// The stage's scratch folder (a back-end may write its files there).
    pub scratch: &'a Path,
    pub run_id: i64,
    pub log: &'a Path,
    pub cpus: u32,
    pub gpus: u32,
    pub device: &'a str,
    pub threads: u32,
    pub timeout_s: Option<u64>,
}

/// A stage run the registry says was running when its driver stopped.
pub struct LeftRunning {
    pub stage: String,
    pub key: String,
    pub attempt: i64,
}

/// A started (or adopted) worker.
#[async_trait]
pub trait Launched: Send {
    /// What identifies it, for the registry and a person.
    fn handle(&self) -> Handle;

    /// Streams the worker's events to `on_event` until it ends, `cancel`
    /// fires (stop it: [`WorkerEnd::Interrupted`]) or the launch's timeout
    /// passes ([`WorkerEnd::TimedOut`]).
    async fn wait(
        self: Box<Self>,
        cancel: &CancellationToken,
        on_event: &mut (dyn FnMut(WorkerEvent) + Send),
    ) -> Result<WorkerEnd>;
}

/// How a started worker is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handle {
    /// A local process (its group leader).
    Process(u32),
    /// A cluster job id.
    Job(String),
}

/// How a worker ended.
#[derive(Debug)]
pub enum WorkerEnd {
    /// Exit code 0 and a `published` event.
    Published {
        digest: String,
        bytes: u64,
    },
    Failed(String),
    TimedOut(u64),
    Interrupted,
}

/// What a worker's event lines say about how it ends; every other event
/// goes on to the driver. Both back-ends read a worker's events through it.
#[derive(Debug, Default)]
pub(crate) struct WorkerReport {
    pub(crate) published: Option<(String, u64)>,
    pub(crate) failure: Option<String>,
    /// The last event was that the worker checkpointed and stopped.
    pub(crate) stopped: bool,
}

impl WorkerReport {
    /// Takes one line of the worker's stdout; a line that is no event (the
    /// worker's contract says there are none; a cluster may add its own) is
    /// skipped.
    pub(crate) fn line(&mut self, line: &str, on_event: &mut dyn FnMut(WorkerEvent)) {
        let Ok(event) = serde_json::from_str::<WorkerEvent>(line.trim()) else {
            return;
        };
        self.stopped = matches!(event, WorkerEvent::Stopped { .. });
        match event {
            WorkerEvent::Published { digest, bytes, .. } => self.published = Some((digest, bytes)),
            WorkerEvent::Failed { message } => self.failure = Some(message),
            // A requeued job starts over: an earlier run's failure no
            // longer describes it.
            e @ WorkerEvent::Stopped { .. } => {
                self.failure = None;
                on_event(e)
            }
            e => on_event(e),
        }
    }
}

/// The last lines of a log, for error messages.
pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return format!(" (log: {})", path.display());
    }
    let tail = &lines[lines.len().saturating_sub(5)..];
    format!(
        "; last lines of {}:\n    {}",
        path.display(),
        tail.join("\n    ")
    )
}

/// The path of this executable, for starting workers.
pub fn current_exe() -> Result<PathBuf> {
    std::env::current_exe().ctx(|| "finding the haic-pipe executable".into())
}
