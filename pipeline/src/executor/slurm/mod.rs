//! The Slurm back-end: one `sbatch` job per stage, running the same
//! `haic-pipe worker --job FILE` command as the local back-end.
//!
//! - **Names.** Every job of a run carries one run-unique name
//!   ([`SlurmExecutor::job_name`]), so one `squeue --name` call polls the
//!   whole run (every `poll_interval` seconds, only while jobs are watched)
//!   and one `scancel --name` stops it. A job's comment names its stage, key
//!   and attempt (`haic:STAGE:KEY:ATTEMPT`): a resumed driver finds the jobs
//!   its predecessor left running by key and adopts them.
//! - **Files.** The job's stdout is the worker's event stream (JSON lines,
//!   read as it grows, every 0.2 s), its stderr the stage log; both append,
//!   so a requeued job continues them. A `published` event ends the stage at
//!   once: dependents need not wait for the next poll. The workspace must be on a filesystem the nodes
//!   share; only the driver writes the registry.
//! - **Time limits.** `--signal=B:USR1@N` reaches the batch script, which
//!   passes it to the worker; a training stage checkpoints and exits with
//!   [`EXIT_CHECKPOINTED`], and the script requeues the job (`--requeue`):
//!   the same job id runs again and continues from the checkpoint.
//! - **Client trouble.** Every client call has a timeout; failed or timed-out
//!   calls are retried with backoff and reported as notices, never taken as
//!   a job's failure. A job that Slurm no longer lists is looked up with
//!   `sacct` (or `sacct -c`, the job-completion log) before it is declared
//!   lost.

mod client;
mod events;
mod script;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use async_trait::async_trait;

use super::{Executor, Handle, Launch, Launched, LeftRunning, Reservation, WorkerEnd, log_tail};
use crate::error::{Error, IoContext, Result};
use crate::spec::ExecutorSpec;
use crate::stage::WorkerEvent;
pub use client::JobState;
use client::{CLIENT_TRIES, Snapshot, backoff, client, poll_loop, retried, squeue};
pub use events::events_path;
use events::{EventTail, ending};
use script::batch_script;

/// Polls a watched job may be missing from `squeue` and `sacct` (just
/// submitted, or a slow controller) before it counts as lost.
const MISSING_POLLS: u32 = 10;
/// How often a waiting stage reads its job's events file.
const EVENTS_EVERY: Duration = Duration::from_millis(200);
/// Times the driver requeues a job that ended right after its worker
/// checkpointed (see [`SlurmExecutor::wait`]).
const DRIVER_REQUEUES: u32 = 3;

/// What a stage needs submitted.
pub struct Submission<'a> {
    pub stage: &'a str,
    pub key: &'a str,
    pub attempt: i64,
    pub job_file: &'a Path,
    /// The batch script to write.
    pub script: &'a Path,
    pub events: &'a Path,
    pub log: &'a Path,
    pub cpus: u32,
    pub gpus: u32,
}

pub struct SlurmExecutor {
    spec: ExecutorSpec,
    /// Every job of this run has this name.
    pub job_name: String,
    exe: PathBuf,
    watched: Arc<Mutex<HashSet<u64>>>,
    states: watch::Receiver<Arc<Snapshot>>,
    poller: tokio::task::JoinHandle<()>,
    cancelled: AtomicBool,
    notice: Arc<dyn Fn(String) + Send + Sync>,
}

impl Drop for SlurmExecutor {
    fn drop(&mut self) {
        self.poller.abort();
    }
}

/// The comment that ties a job to its stage run (see [`JobState::key`]).
pub fn job_comment(stage: &str, key: &str, attempt: i64) -> String {
    format!("haic:{stage}:{key}:{attempt}")
}

impl SlurmExecutor {
    /// `run_tag` makes the job name unique to this run (and workspace).
    pub fn new(
        spec: ExecutorSpec,
        run_tag: &str,
        exe: PathBuf,
        notice: Arc<dyn Fn(String) + Send + Sync>,
    ) -> SlurmExecutor {
        let job_name = format!("haic-{run_tag}");
        let watched = Arc::new(Mutex::new(HashSet::new()));
        let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
        let poller = tokio::spawn(poll_loop(
            job_name.clone(),
            Duration::from_secs_f64(spec.poll_interval),
            watched.clone(),
            tx,
            notice.clone(),
        ));
        SlurmExecutor {
            spec,
            job_name,
            exe,
            watched,
            states: rx,
            poller,
            cancelled: AtomicBool::new(false),
            notice,
        }
    }

    /// The run's jobs as Slurm lists them now (one `squeue` call, retried).
    pub async fn jobs(&self) -> Result<Vec<JobState>> {
        let name = self.job_name.clone();
        retried("squeue", &*self.notice, || squeue(&name))
            .await
            .map_err(Error::Slurm)
    }

    /// Writes the batch script and submits it; returns the job id. If a try
    /// fails after Slurm took the job (a timeout), the next try finds that
    /// job by its comment instead of submitting a second one.
    pub async fn submit(&self, s: &Submission<'_>) -> Result<u64> {
        std::fs::write(s.script, batch_script(&self.exe, s.job_file, s.gpus))
            .ctx(|| format!("writing {}", s.script.display()))?;
        let comment = job_comment(s.stage, s.key, s.attempt);
        let mut args: Vec<String> = vec![
            "--parsable".into(),
            format!("--job-name={}", self.job_name),
            format!("--comment={comment}"),
            format!("--output={}", s.events.display()),
            format!("--error={}", s.log.display()),
            "--open-mode=append".into(),
            format!("--cpus-per-task={}", s.cpus.max(1)),
            "--requeue".into(),
            format!("--signal=B:USR1@{}", self.spec.signal_before_limit),
        ];
        if s.gpus > 0 {
            args.push(format!("--gres=gpu:{}", s.gpus));
        }
        for (flag, value) in [
            ("partition", &self.spec.partition),
            ("account", &self.spec.account),
            ("time", &self.spec.time),
            ("mem", &self.spec.mem),
        ] {
            if let Some(v) = value {
                args.push(format!("--{flag}={v}"));
            }
        }
        args.extend(self.spec.sbatch_args.iter().cloned());
        args.push(s.script.display().to_string());

        let mut last = String::new();
        for t in 0..CLIENT_TRIES {
            if t > 0 {
                // Did the failed try submit after all?
                if let Ok(jobs) = squeue(&self.job_name).await
                    && let Some(j) = jobs.iter().find(|j| j.comment == comment)
                {
                    return Ok(self.watch(j.id));
                }
                tokio::time::sleep(backoff(t)).await;
            }
            match client("sbatch", &args).await {
                Ok(out) => {
                    let id = out.trim().split(';').next().unwrap_or("").trim();
                    return match id.parse::<u64>() {
                        Ok(id) => Ok(self.watch(id)),
                        Err(_) => Err(Error::Slurm(format!(
                            "sbatch printed `{}` where a job id was expected",
                            out.trim()
                        ))),
                    };
                }
                Err(e) => {
                    (self.notice)(format!(
                        "sbatch for stage `{}` failed (try {} of {CLIENT_TRIES}): {e}",
                        s.stage,
                        t + 1
                    ));
                    last = e;
                }
            }
        }
        Err(Error::Slurm(format!(
            "submitting stage `{}` failed {CLIENT_TRIES} times; last: {last}",
            s.stage
        )))
    }

    /// Starts watching a job (one just submitted, or one adopted).
    pub fn watch(&self, id: u64) -> u64 {
        if let Ok(mut w) = self.watched.lock() {
            w.insert(id);
        }
        id
    }

    fn unwatch(&self, id: u64) {
        if let Ok(mut w) = self.watched.lock() {
            w.remove(&id);
        }
    }

    /// Follows job `id` to its end: streams its events to `on_event`, stops
    /// it on `cancel` (the whole run, in one call) or after `timeout_s`.
    pub async fn wait(
        &self,
        id: u64,
        log: &Path,
        timeout_s: Option<u64>,
        cancel: &CancellationToken,
        on_event: &mut (dyn FnMut(WorkerEvent) + Send),
    ) -> Result<WorkerEnd> {
        self.watch(id);
        let mut rx = self.states.clone();
        let mut events = EventTail::new(events_path(log));
        let mut missing = 0u32;
        let mut requeues = 0u32;
        // Polls during which a finished state is taken as stale, after the
        // driver requeued the job.
        let mut settling = 0u32;
        let mut seen_poll = rx.borrow().polls;
        let deadline = async {
            match timeout_s {
                Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline);
        // The events file is read more often than Slurm is polled: progress
        // streams, and a published artifact ends the wait at once (the job
        // may still be exiting; the artifact is committed either way).
        let mut tail_tick = tokio::time::interval(EVENTS_EVERY);
        let end = loop {
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() {
                        break Err(Error::Slurm("the poller stopped".into()));
                    }
                }
                _ = tail_tick.tick() => {
                    events.read(on_event);
                    if let Some((digest, bytes)) = events.report.published.clone() {
                        break Ok(WorkerEnd::Published { digest, bytes });
                    }
                    continue;
                }
                _ = cancel.cancelled() => {
                    self.cancel_run().await;
                    break Ok(WorkerEnd::Interrupted);
                }
                _ = &mut deadline => {
                    self.cancel_job(id).await;
                    break Ok(WorkerEnd::TimedOut(timeout_s.unwrap_or(0)));
                }
            }
            events.read(on_event);
            let snapshot = rx.borrow_and_update().clone();
            if snapshot.polls == seen_poll {
                continue;
            }
            seen_poll = snapshot.polls;
            let Some(job) = snapshot.jobs.get(&id) else {
                missing += 1;
                if missing >= MISSING_POLLS {
                    break Ok(WorkerEnd::Failed(format!(
                        "Slurm job {id} is gone: neither squeue nor sacct lists it{}",
                        log_tail(log)
                    )));
                }
                continue;
            };
            missing = 0;
            if !job.finished() {
                settling = 0;
                continue;
            }
            if settling > 0 {
                settling -= 1;
                continue;
            }
            events.read(on_event);
            let done = job.state == "COMPLETED" && events.report.published.is_some();
            // The worker checkpointed and its script requeued the job, but
            // the job ended anyway: a restart in the same second as the
            // requeue finds its credential revoked ("Job credential
            // revoked"). The checkpoint is there; requeue it once more.
            if events.report.stopped && !done && requeues < DRIVER_REQUEUES {
                requeues += 1;
                (self.notice)(format!(
                    "Slurm job {id} ended {} after its worker checkpointed; requeueing it ({requeues} of {DRIVER_REQUEUES})",
                    job.state
                ));
                tokio::time::sleep(Duration::from_secs(2)).await;
                let args = vec!["requeue".to_string(), id.to_string()];
                match retried("scontrol requeue", &*self.notice, || {
                    client("scontrol", &args)
                })
                .await
                {
                    Ok(_) => {
                        events.report.stopped = false;
                        settling = MISSING_POLLS;
                        continue;
                    }
                    Err(e) => (self.notice)(format!("requeueing Slurm job {id} failed: {e}")),
                }
            }
            break Ok(ending(job, &events, log));
        };
        self.unwatch(id);
        end
    }

    /// `scancel --name`: every job of this run, once.
    pub async fn cancel_run(&self) {
        if self.cancelled.swap(true, Ordering::SeqCst) {
            return;
        }
        let args = vec![format!("--name={}", self.job_name)];
        if let Err(e) = retried("scancel", &*self.notice, || client("scancel", &args)).await {
            (self.notice)(format!(
                "cancelling the run's Slurm jobs ({}) failed: {e}; cancel them by hand: scancel --name={}",
                self.job_name, self.job_name
            ));
        }
    }

    /// `scancel ID`.
    pub async fn cancel_job(&self, id: u64) {
        let args = vec![id.to_string()];
        if let Err(e) = retried("scancel", &*self.notice, || client("scancel", &args)).await {
            (self.notice)(format!("cancelling Slurm job {id} failed: {e}"));
        }
    }
}

#[async_trait]
impl Executor for SlurmExecutor {
    fn name(&self) -> &'static str {
        "slurm"
    }

    async fn reserve(&self, _cpus: u32, _gpus: u32, _priority: u32) -> Result<Reservation> {
        // Slurm queues the job; the worker reports where it ran.
        Ok(Reservation {
            device: "slurm".into(),
            threads: 1,
            _held: None,
        })
    }

    async fn launch(&self, l: &Launch<'_>) -> Result<Box<dyn Launched + '_>> {
        let id = self
            .submit(&Submission {
                stage: l.stage,
                key: l.key,
                attempt: l.attempt,
                job_file: l.job_file,
                script: &l
                    .scratch
                    .join(format!("job-run{}-attempt{}.sh", l.run_id, l.attempt)),
                events: &events_path(l.log),
                log: l.log,
                cpus: l.cpus,
                gpus: l.gpus,
            })
            .await?;
        Ok(Box::new(SlurmJob {
            ex: self,
            id,
            log: l.log.to_path_buf(),
            timeout_s: l.timeout_s,
        }))
    }

    async fn still_running(&self, left: &[LeftRunning]) -> Result<Vec<Option<String>>> {
        if left.is_empty() {
            return Ok(Vec::new());
        }
        let jobs = self.jobs().await.map_err(|e| {
            Error::Slurm(format!(
                "cannot see this run's jobs to resume it ({e}); nothing was resubmitted, try again when Slurm answers"
            ))
        })?;
        Ok(left
            .iter()
            .map(|r| {
                let comment = job_comment(&r.stage, &r.key, r.attempt);
                jobs.iter()
                    .find(|j| j.comment == comment && !j.finished())
                    .map(|j| j.id.to_string())
            })
            .collect())
    }

    fn adopt(&self, job: &str, l: &Launch<'_>) -> Result<Box<dyn Launched + '_>> {
        let id = parse_job_id(job)?;
        Ok(Box::new(SlurmJob {
            ex: self,
            id: self.watch(id),
            log: l.log.to_path_buf(),
            timeout_s: l.timeout_s,
        }))
    }

    async fn cancel(&self, job: &str) {
        match parse_job_id(job) {
            Ok(id) => self.cancel_job(id).await,
            Err(e) => (self.notice)(e.to_string()),
        }
    }

    fn placed(&self, device: &str, host: &str, gpu: Option<&str>) -> Option<String> {
        Some(match gpu {
            None => format!("{device}@{host}"),
            Some(g) => format!("{device}@{host} ({g})"),
        })
    }
}

fn parse_job_id(job: &str) -> Result<u64> {
    job.parse()
        .map_err(|_| Error::Slurm(format!("`{job}` is not a Slurm job id")))
}

/// A submitted or adopted job of this run.
struct SlurmJob<'a> {
    ex: &'a SlurmExecutor,
    id: u64,
    log: PathBuf,
    timeout_s: Option<u64>,
}

#[async_trait]
impl Launched for SlurmJob<'_> {
    fn handle(&self) -> Handle {
        Handle::Job(self.id.to_string())
    }

    async fn wait(
        self: Box<Self>,
        cancel: &CancellationToken,
        on_event: &mut (dyn FnMut(WorkerEvent) + Send),
    ) -> Result<WorkerEnd> {
        self.ex
            .wait(self.id, &self.log, self.timeout_s, cancel, on_event)
            .await
    }
}
