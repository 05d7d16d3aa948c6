//! Where stages run: worker slots and the local back-end; the Slurm
//! back-end is [`slurm`].
//!
//! A stage runs as a child process, `haic-pipe worker --job FILE` (the same
//! command a cluster back-end submits), in its own process group so that
//! stopping it stops everything it started. The worker dies with the driver
//! (`PR_SET_PDEATHSIG`), so a killed driver never leaves a stage running
//! unobserved; `run --resume` then re-runs it from its last checkpoint.
//!
//! Slots: `--jobs N` CPU slots (a stage takes `resources.cpus` of them, at most
//! N), and one slot per GPU device for stages with `resources.gpus > 0`
//! (`--gpus`, else every visible GPU: see [`gpus`]). A
//! worker computes with as many threads as it holds CPU slots
//! (`RAYON_NUM_THREADS`, unless the driver's environment sets it), so stages
//! running side by side do not oversubscribe the cores.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, IoContext, Result};
use crate::stage::WorkerEvent;

pub mod gpus;
pub mod slurm;

/// How long a stopped worker gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

pub struct Slots {
    cpus: Arc<Semaphore>,
    cpu_total: u32,
    gpus: Vec<(String, Arc<Semaphore>)>,
}

/// A held slot; released on drop.
pub struct SlotGuard {
    _cpu: Option<OwnedSemaphorePermit>,
    _gpus: Vec<OwnedSemaphorePermit>,
    pub device: String,
    /// CPU slots held: the worker's compute threads.
    pub threads: u32,
}

impl Slots {
    pub fn new(jobs: u32, gpu_devices: Vec<String>) -> Slots {
        let jobs = jobs.max(1);
        Slots {
            cpus: Arc::new(Semaphore::new(jobs as usize)),
            cpu_total: jobs,
            gpus: gpu_devices
                .into_iter()
                .map(|d| (d, Arc::new(Semaphore::new(1))))
                .collect(),
        }
    }

    pub fn gpu_count(&self) -> usize {
        self.gpus.len()
    }

    /// Waits for `cpus` CPU slots and `gpus` GPU devices.
    pub async fn acquire(&self, cpus: u32, gpus: u32) -> Result<SlotGuard> {
        if gpus as usize > self.gpus.len() {
            return Err(Error::Invalid(format!(
                "needs {gpus} GPU(s) but this driver has {} (pass --gpus, or run it on a cluster back-end)",
                self.gpus.len()
            )));
        }
        let n = cpus.clamp(1, self.cpu_total);
        let cpu = self
            .cpus
            .clone()
            .acquire_many_owned(n)
            .await
            .map_err(|_| Error::Invalid("worker slots closed".into()))?;
        let mut held = Vec::new();
        let mut names = Vec::new();
        if gpus > 0 {
            // Take free devices first; wait on the first ones otherwise (in a
            // fixed order, so two stages cannot deadlock holding one each).
            for (name, sem) in &self.gpus {
                if held.len() == gpus as usize {
                    break;
                }
                if let Ok(p) = sem.clone().try_acquire_owned() {
                    held.push(p);
                    names.push(name.clone());
                }
            }
            if held.len() < gpus as usize {
                held.clear();
                names.clear();
                for (name, sem) in self.gpus.iter().take(gpus as usize) {
                    let p = sem
                        .clone()
                        .acquire_owned()
                        .await
                        .map_err(|_| Error::Invalid("GPU slots closed".into()))?;
                    held.push(p);
                    names.push(name.clone());
                }
            }
        }
        Ok(SlotGuard {
            _cpu: Some(cpu),
            _gpus: held,
            threads: n,
            device: if names.is_empty() {
                "cpu".into()
            } else {
                names.join(",")
            },
        })
    }
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

/// What the local back-end needs to start one worker.
pub struct WorkerLaunch<'a> {
    pub exe: &'a Path,
    pub job_file: &'a Path,
    pub log_file: &'a Path,
    pub device: &'a str,
    pub threads: u32,
    pub timeout_s: Option<u64>,
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
    pub(crate) fn line(&mut self, line: &str, on_event: &mut impl FnMut(WorkerEvent)) {
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

/// A started local worker.
pub struct LocalWorker {
    child: tokio::process::Child,
    pub pid: u32,
    log_file: PathBuf,
    timeout_s: Option<u64>,
}

/// Starts a local worker for the job, in its own process group, dying with us.
pub fn spawn_local(launch: WorkerLaunch<'_>) -> Result<LocalWorker> {
    let WorkerLaunch {
        exe,
        job_file,
        log_file,
        device,
        threads,
        timeout_s,
    } = launch;
    let log = std::fs::File::create(log_file).ctx(|| format!("creating {}", log_file.display()))?;
    let mut cmd = Command::new(exe);
    cmd.arg("worker")
        .arg("--job")
        .arg(job_file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .env("HAIC_DEVICE", device)
        .kill_on_drop(true);
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        cmd.env("RAYON_NUM_THREADS", threads.to_string());
    }
    // A worker sees its own GPUs only; a CPU stage sees none (it would
    // otherwise inherit the driver's CUDA_VISIBLE_DEVICES).
    let visible = device
        .strip_prefix("cuda:")
        .map(|gpus| gpus.replace(",cuda:", ","))
        .unwrap_or_default();
    cmd.env("CUDA_VISIBLE_DEVICES", visible);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setpgid(0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().ctx(|| {
        format!(
            "starting worker {} for {}",
            exe.display(),
            job_file.display()
        )
    })?;
    Ok(LocalWorker {
        pid: child.id().unwrap_or(0),
        child,
        log_file: log_file.to_path_buf(),
        timeout_s,
    })
}

impl LocalWorker {
    /// Streams the worker's events to `on_event` and waits for it (or for
    /// `cancel`, or the timeout, which stop its process group).
    pub async fn wait(
        mut self,
        cancel: &CancellationToken,
        mut on_event: impl FnMut(WorkerEvent),
    ) -> Result<WorkerEnd> {
        let (pid, timeout_s) = (self.pid, self.timeout_s);
        let stdout = self
            .child
            .stdout
            .take()
            .ok_or_else(|| Error::Invalid("worker stdout missing".into()))?;
        let mut lines = BufReader::new(stdout).lines();
        let mut report = WorkerReport::default();
        let deadline = async {
            match timeout_s {
                Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline);
        let mut stdout_open = true;
        let status = loop {
            tokio::select! {
                line = lines.next_line(), if stdout_open => match line {
                    Ok(Some(line)) => report.line(&line, &mut on_event),
                    _ => stdout_open = false,
                },
                status = self.child.wait(), if !stdout_open => {
                    break status.ctx(|| format!("waiting for worker {pid}"))?;
                }
                _ = cancel.cancelled() => {
                    stop_group(pid, &mut self.child).await;
                    return Ok(WorkerEnd::Interrupted);
                }
                _ = &mut deadline => {
                    stop_group(pid, &mut self.child).await;
                    return Ok(WorkerEnd::TimedOut(timeout_s.unwrap_or(0)));
                }
            }
        };
        let log_file = &self.log_file;
        Ok(match (status.code(), report.published, report.failure) {
            (Some(0), Some((digest, bytes)), _) => WorkerEnd::Published { digest, bytes },
            (_, _, Some(msg)) => WorkerEnd::Failed(msg),
            (Some(code), _, None) => WorkerEnd::Failed(format!(
                "worker exited with status {code}{}",
                log_tail(log_file)
            )),
            (None, _, None) => {
                use std::os::unix::process::ExitStatusExt;
                WorkerEnd::Failed(format!(
                    "worker was killed by signal {}{}",
                    status.signal().unwrap_or(0),
                    log_tail(log_file)
                ))
            }
        })
    }
}

/// SIGTERM to the worker's process group, SIGKILL after the grace period.
async fn stop_group(pid: u32, child: &mut tokio::process::Child) {
    if pid == 0 {
        let _ = child.kill().await;
        return;
    }
    // SAFETY: plain kill(2) on the process group we created.
    unsafe {
        libc::kill(-(pid as i32), libc::SIGTERM);
    }
    if tokio::time::timeout(STOP_GRACE, child.wait())
        .await
        .is_err()
    {
        unsafe {
            libc::kill(-(pid as i32), libc::SIGKILL);
        }
        let _ = child.wait().await;
    } else {
        // The worker is gone; make sure nothing it started lingers.
        unsafe {
            libc::kill(-(pid as i32), libc::SIGKILL);
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
