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

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::process::Command;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{WorkerEnd, WorkerReport, log_tail};
use crate::error::{Error, IoContext, Result};
use crate::spec::ExecutorSpec;
use crate::stage::{EXIT_CHECKPOINTED, WorkerEvent};

/// How long one client call (`sbatch`, `squeue`, ...) may take.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Tries of a client call before its error is final.
const CLIENT_TRIES: u32 = 5;
/// Polls a watched job may be missing from `squeue` and `sacct` (just
/// submitted, or a slow controller) before it counts as lost.
const MISSING_POLLS: u32 = 10;
/// How often a waiting stage reads its job's events file.
const EVENTS_EVERY: Duration = Duration::from_millis(200);
/// Times the driver requeues a job that ended right after its worker
/// checkpointed (see [`SlurmExecutor::wait`]).
const DRIVER_REQUEUES: u32 = 3;

/// One job as `squeue` or `sacct` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobState {
    pub id: u64,
    /// `PENDING`, `RUNNING`, `COMPLETED`, `FAILED`, ...
    pub state: String,
    /// The batch script's exit code, once it has one.
    pub exit_code: Option<i32>,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    pub reason: String,
    /// `haic:STAGE:KEY:ATTEMPT` for jobs this back-end submitted.
    pub comment: String,
}

impl JobState {
    /// Whether the job will not run again (a requeued job is not finished).
    pub fn finished(&self) -> bool {
        matches!(
            self.state.as_str(),
            "COMPLETED"
                | "FAILED"
                | "CANCELLED"
                | "TIMEOUT"
                | "OUT_OF_MEMORY"
                | "NODE_FAIL"
                | "BOOT_FAIL"
                | "DEADLINE"
                | "PREEMPTED"
                | "REVOKED"
                | "SPECIAL_EXIT"
        )
    }

    /// The stage key in the job's comment, if this back-end submitted it.
    pub fn key(&self) -> Option<&str> {
        let mut parts = self.comment.strip_prefix("haic:")?.split(':');
        let _stage = parts.next()?;
        parts.next()
    }
}

/// What the last poll saw.
#[derive(Debug, Default)]
struct Snapshot {
    jobs: HashMap<u64, JobState>,
    /// Counts polls, so that waiters can tell a new poll from an old one.
    polls: u64,
}

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

/// The events file beside a stage log: `X.log` -> `X.events.jsonl`.
pub fn events_path(log: &Path) -> PathBuf {
    log.with_extension("events.jsonl")
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
        mut on_event: impl FnMut(WorkerEvent),
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
                    events.read(&mut on_event);
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
            events.read(&mut on_event);
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
            events.read(&mut on_event);
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

/// How a finished job ended, from its state and the worker's own events.
fn ending(job: &JobState, events: &EventTail, log: &Path) -> WorkerEnd {
    let id = job.id;
    if job.state == "COMPLETED"
        && let Some((digest, bytes)) = events.report.published.clone()
    {
        return WorkerEnd::Published { digest, bytes };
    }
    if job.state == "TIMEOUT" {
        return WorkerEnd::Failed(format!(
            "Slurm job {id} reached its time limit (executor.time) before the stage finished; raise the limit{}",
            log_tail(log)
        ));
    }
    let how = match (job.exit_code, job.signal) {
        (_, Some(s)) if s != 0 => format!("signal {s}"),
        (Some(c), _) if c == EXIT_CHECKPOINTED => {
            format!("exit code {c} (checkpointed, but the requeue failed)")
        }
        (Some(c), _) => format!("exit code {c}"),
        (None, _) => "no exit code".into(),
    };
    let reason = if job.reason.is_empty() || job.reason == "None" {
        String::new()
    } else {
        format!(", reason {}", job.reason)
    };
    let what = match &events.report.failure {
        Some(msg) => format!(": {msg}"),
        None if job.state == "COMPLETED" => {
            format!(": the worker reported no artifact{}", log_tail(log))
        }
        None => log_tail(log),
    };
    WorkerEnd::Failed(format!(
        "Slurm job {id} {} with {how}{reason}{what}",
        job.state
    ))
}

/// Reads a growing events file line by line from where it left off.
struct EventTail {
    path: PathBuf,
    offset: u64,
    partial: String,
    report: WorkerReport,
}

impl EventTail {
    fn new(path: PathBuf) -> Self {
        EventTail {
            path,
            offset: 0,
            partial: String::new(),
            report: WorkerReport::default(),
        }
    }

    fn read(&mut self, on_event: &mut impl FnMut(WorkerEvent)) {
        use std::io::{Read, Seek, SeekFrom};
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return; // not created yet
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut buf = Vec::new();
        if f.read_to_end(&mut buf).is_err() {
            return;
        }
        self.offset += buf.len() as u64;
        self.partial.push_str(&String::from_utf8_lossy(&buf));
        while let Some(nl) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=nl).collect();
            self.report.line(&line, on_event);
        }
    }
}

/// The batch script: runs the worker, passes SIGUSR1/SIGTERM on to it, and
/// requeues the job when it checkpointed on request.
fn batch_script(exe: &Path, job_file: &Path, gpus: u32) -> String {
    let device = if gpus > 0 {
        // The devices Slurm granted, in the local back-end's spelling.
        r#"HAIC_DEVICE="cuda:${CUDA_VISIBLE_DEVICES//,/,cuda:}""#
    } else {
        // No GPU for a stage that needs none, whatever the submitting
        // shell's CUDA_VISIBLE_DEVICES was (sbatch exports it).
        "HAIC_DEVICE=cpu CUDA_VISIBLE_DEVICES="
    };
    format!(
        r#"#!/bin/bash
# Written by haic-pipe: one stage's worker as a Slurm job.
export {device}
export RAYON_NUM_THREADS="${{RAYON_NUM_THREADS:-${{SLURM_CPUS_PER_TASK:-1}}}}"
{exe} worker --job {job} &
pid=$!
trap 'kill -USR1 $pid 2>/dev/null' USR1
trap 'kill -TERM $pid 2>/dev/null' TERM
# A trapped signal ends `wait` early; wait again until the worker is gone.
while :; do
  wait $pid
  kill -0 $pid 2>/dev/null || break
done
wait $pid
rc=$?
if [ "$rc" = {EXIT_CHECKPOINTED} ]; then
  echo "haic-pipe: the worker checkpointed on request; requeueing job $SLURM_JOB_ID" >&2
  scontrol requeue "$SLURM_JOB_ID" && exit 0
fi
exit $rc
"#,
        exe = shell_quote(&exe.display().to_string()),
        job = shell_quote(&job_file.display().to_string()),
    )
}

/// Single-quotes a string for sh.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn backoff(t: u32) -> Duration {
    Duration::from_millis(500u64 << (t - 1).min(4))
}

/// Runs a Slurm client command with a timeout; its stdout, or what failed.
async fn client(program: &str, args: &[String]) -> std::result::Result<String, String> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            format!("`{program}` is not installed or not on PATH (the Slurm executor needs Slurm's client commands)")
        } else {
            format!("starting `{program}`: {e}")
        }
    })?;
    match tokio::time::timeout(CLIENT_TIMEOUT, child.wait_with_output()).await {
        Err(_) => Err(format!(
            "`{program}` did not answer within {} s",
            CLIENT_TIMEOUT.as_secs()
        )),
        Ok(Err(e)) => Err(format!("waiting for `{program}`: {e}")),
        Ok(Ok(out)) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout).into()),
        Ok(Ok(out)) => Err(format!(
            "`{program}` exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

/// A client call with retries and backoff; each failure is a notice.
async fn retried<T, F, Fut>(
    what: &str,
    notice: &(dyn Fn(String) + Send + Sync),
    mut call: F,
) -> std::result::Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, String>>,
{
    let mut last = String::new();
    for t in 0..CLIENT_TRIES {
        if t > 0 {
            tokio::time::sleep(backoff(t)).await;
        }
        match call().await {
            Ok(v) => return Ok(v),
            Err(e) => {
                notice(format!(
                    "{what} failed (try {} of {CLIENT_TRIES}): {e}",
                    t + 1
                ));
                last = e;
            }
        }
    }
    Err(last)
}

/// All jobs (any state Slurm still lists) named `name`.
async fn squeue(name: &str) -> std::result::Result<Vec<JobState>, String> {
    let args = vec![
        format!("--name={name}"),
        "--states=all".into(),
        "--noheader".into(),
        // `:|` is a field suffix: `|`-separated, unpadded; the comment last,
        // as only it could hold a `|`.
        "--Format=JobID:|,State:|,exit_code:|,Reason:|,Comment:".into(),
    ];
    let out = client("squeue", &args).await?;
    Ok(out.lines().filter_map(parse_squeue_line).collect())
}

fn parse_squeue_line(line: &str) -> Option<JobState> {
    let mut f = line.splitn(5, '|');
    let id = f.next()?.trim().parse().ok()?;
    let state = f.next()?.trim().to_string();
    // A wait status: exit code in the high byte, signal in the low bits.
    let status: Option<i32> = f.next()?.trim().parse().ok();
    let reason = f.next().unwrap_or("").trim().to_string();
    let comment = f.next().unwrap_or("").trim().to_string();
    Some(JobState {
        id,
        state,
        exit_code: status.map(|s| (s >> 8) & 0xff),
        signal: status.map(|s| s & 0x7f),
        reason,
        comment,
    })
}

/// Jobs `ids` from accounting (`sacct`), or from the job-completion log
/// (`sacct -c`) where accounting is off.
async fn sacct(ids: &[u64]) -> std::result::Result<Vec<JobState>, String> {
    let list = ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    let mut args = vec![
        format!("--jobs={list}"),
        "-X".into(),
        "--noheader".into(),
        "--parsable2".into(),
        "--format=JobID,State,ExitCode".into(),
    ];
    let out = match client("sacct", &args).await {
        Ok(out) => out,
        Err(_) => {
            args.insert(0, "-c".into());
            client("sacct", &args).await?
        }
    };
    let wanted: HashSet<u64> = ids.iter().copied().collect();
    Ok(out
        .lines()
        .filter_map(parse_sacct_line)
        .filter(|j| wanted.contains(&j.id))
        .collect())
}

fn parse_sacct_line(line: &str) -> Option<JobState> {
    let mut f = line.split('|');
    let id = f.next()?.trim().parse().ok()?;
    // `CANCELLED by 0` -> `CANCELLED`
    let state = f.next()?.split_whitespace().next()?.to_string();
    let (code, signal) = f.next()?.trim().split_once(':')?;
    Some(JobState {
        id,
        state,
        exit_code: code.parse().ok(),
        signal: signal.parse().ok(),
        reason: String::new(),
        comment: String::new(),
    })
}

/// Polls the run's jobs while any is watched and publishes what it saw.
async fn poll_loop(
    name: String,
    interval: Duration,
    watched: Arc<Mutex<HashSet<u64>>>,
    tx: watch::Sender<Arc<Snapshot>>,
    notice: Arc<dyn Fn(String) + Send + Sync>,
) {
    let mut polls = 0u64;
    let mut failures = 0u32;
    loop {
        tokio::time::sleep(interval).await;
        let wanted: Vec<u64> = watched
            .lock()
            .map(|w| w.iter().copied().collect())
            .unwrap_or_default();
        if wanted.is_empty() {
            continue;
        }
        let mut jobs: HashMap<u64, JobState> = match squeue(&name).await {
            Ok(list) => list.into_iter().map(|j| (j.id, j)).collect(),
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(10) {
                    notice(format!(
                        "polling Slurm failed ({failures} in a row; the jobs are not taken as failed, polling goes on): {e}"
                    ));
                }
                continue;
            }
        };
        failures = 0;
        let gone: Vec<u64> = wanted
            .into_iter()
            .filter(|id| !jobs.contains_key(id))
            .collect();
        if !gone.is_empty()
            && let Ok(found) = sacct(&gone).await
        {
            jobs.extend(found.into_iter().map(|j| (j.id, j)));
        }
        polls += 1;
        tx.send_replace(Arc::new(Snapshot { jobs, polls }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squeue_lines_give_state_exit_code_and_key() {
        let j = parse_squeue_line("12|FAILED|768|NonZeroExitCode|haic:vq1:abc:2").unwrap();
        assert_eq!(j.id, 12);
        assert_eq!(j.state, "FAILED");
        assert_eq!(j.exit_code, Some(3));
        assert_eq!(j.signal, Some(0));
        assert_eq!(j.key(), Some("abc"));
        assert!(j.finished());
        let j = parse_squeue_line("13|CANCELLED|15|None|").unwrap();
        assert_eq!((j.exit_code, j.signal), (Some(0), Some(15)));
        assert_eq!(j.key(), None);
        let j = parse_squeue_line("14|PENDING|0|Priority|haic:a:k:1").unwrap();
        assert!(!j.finished());
        assert!(parse_squeue_line("garbage").is_none());
    }

    #[test]
    fn sacct_lines_drop_the_cancelling_user() {
        let j = parse_sacct_line("7|CANCELLED by 0|0:15").unwrap();
        assert_eq!(j.state, "CANCELLED");
        assert_eq!((j.exit_code, j.signal), (Some(0), Some(15)));
        let j = parse_sacct_line("8|FAILED|3:0").unwrap();
        assert_eq!(j.exit_code, Some(3));
    }

    #[test]
    fn the_batch_script_quotes_paths_and_names_the_granted_gpus() {
        let s = batch_script(
            Path::new("/opt/it's/haic-pipe"),
            Path::new("/w/job.json"),
            1,
        );
        assert!(s.contains(r"'/opt/it'\''s/haic-pipe' worker --job '/w/job.json' &"));
        assert!(s.contains("cuda:${CUDA_VISIBLE_DEVICES//,/,cuda:}"));
        assert!(
            batch_script(Path::new("/x"), Path::new("/j"), 0)
                .contains("export HAIC_DEVICE=cpu CUDA_VISIBLE_DEVICES=\n")
        );
    }

    #[test]
    fn the_events_file_is_read_as_it_grows() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("a.log");
        let path = events_path(&log);
        assert_eq!(path, dir.path().join("a.events.jsonl"));
        let mut tail = EventTail::new(path.clone());
        let mut seen = Vec::new();
        tail.read(&mut |e| seen.push(e)); // no file yet
        std::fs::write(
            &path,
            "{\"event\":\"progress\",\"done\":1,\"total\":2}\n{\"event\":\"fail",
        )
        .unwrap();
        tail.read(&mut |e| seen.push(e));
        assert_eq!(seen.len(), 1);
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        write!(
            f,
            "ed\",\"message\":\"boom\"}}\n{{\"event\":\"stopped\",\"step\":5}}\n"
        )
        .unwrap();
        tail.read(&mut |e| seen.push(e));
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert_eq!(
            tail.report.failure, None,
            "a stop clears the earlier failure"
        );
        assert!(tail.report.stopped);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        writeln!(f, "{{\"event\":\"progress\",\"done\":6,\"total\":9}}").unwrap();
        tail.read(&mut |e| seen.push(e));
        assert!(!tail.report.stopped, "it ran again");
    }
}
