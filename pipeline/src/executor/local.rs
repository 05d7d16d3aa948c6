//! The local back-end: worker processes on this machine, in slots.
//!
//! A stage runs as a child process, `haic-pipe worker --job FILE` (the same
//! command a cluster back-end submits), in its own process group so that
//! stopping it stops everything it started. The worker dies with the driver
//! (`PR_SET_PDEATHSIG`), so a killed driver never leaves a stage running
//! unobserved; `run --resume` then re-runs it from its last checkpoint.
//!
//! Slots: `--jobs N` CPU slots (a stage takes `resources.cpus` of them, at most
//! N), and one slot per GPU device for stages with `resources.gpus > 0`
//! (`--gpus`, else every visible GPU: see [`super::gpus`]). A
//! worker computes with as many threads as it holds CPU slots
//! (`RAYON_NUM_THREADS`, unless the driver's environment sets it), so stages
//! running side by side do not oversubscribe the cores.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::{
    Executor, Handle, Launch, Launched, LeftRunning, Reservation, WorkerEnd, WorkerReport, log_tail,
};
use crate::error::{Error, IoContext, Result};
use crate::stage::WorkerEvent;

/// How long a stopped worker gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Worker processes on this machine, `--jobs` CPU slots and a slot per GPU.
pub struct LocalExecutor {
    slots: Slots,
    exe: PathBuf,
}

impl LocalExecutor {
    pub fn new(jobs: u32, gpu_devices: Vec<String>, exe: PathBuf) -> LocalExecutor {
        LocalExecutor {
            slots: Slots::new(jobs, gpu_devices),
            exe,
        }
    }
}

#[async_trait]
impl Executor for LocalExecutor {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn reserve(&self, cpus: u32, gpus: u32) -> Result<Reservation> {
        let slot = self.slots.acquire(cpus, gpus).await?;
        Ok(Reservation {
            device: slot.device.clone(),
            threads: slot.threads,
            _held: Some(Box::new(slot)),
        })
    }

    async fn launch(&self, launch: &Launch<'_>) -> Result<Box<dyn Launched + '_>> {
        let worker = spawn_local(WorkerLaunch {
            exe: &self.exe,
            job_file: launch.job_file,
            log_file: launch.log,
            device: launch.device,
            threads: launch.threads,
            timeout_s: launch.timeout_s,
        })?;
        Ok(Box::new(worker))
    }

    async fn still_running(&self, left: &[LeftRunning]) -> Result<Vec<Option<String>>> {
        // A local worker dies with its driver: nothing outlives it.
        Ok(vec![None; left.len()])
    }

    fn adopt(&self, job: &str, _launch: &Launch<'_>) -> Result<Box<dyn Launched + '_>> {
        Err(Error::Invalid(format!(
            "the local back-end cannot adopt job `{job}`: its workers die with their driver"
        )))
    }

    async fn cancel(&self, _job: &str) {}

    fn placed(&self, device: &str, _host: &str, gpu: Option<&str>) -> Option<String> {
        // The slot's device is known up front; a GPU's name is worth adding.
        gpu.map(|g| format!("{device} ({g})"))
    }
}

/// CPU and GPU slots; a stage waits for its share.
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

/// What the local back-end needs to start one worker.
struct WorkerLaunch<'a> {
    exe: &'a Path,
    job_file: &'a Path,
    log_file: &'a Path,
    device: &'a str,
    threads: u32,
    timeout_s: Option<u64>,
}

/// A started local worker.
struct LocalWorker {
    child: tokio::process::Child,
    pid: u32,
    log_file: PathBuf,
    timeout_s: Option<u64>,
}

/// Starts a local worker for the job, in its own process group, dying with us.
fn spawn_local(launch: WorkerLaunch<'_>) -> Result<LocalWorker> {
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

#[async_trait]
impl Launched for LocalWorker {
    fn handle(&self) -> Handle {
        Handle::Process(self.pid)
    }

    /// Streams the worker's events to `on_event` and waits for it (or for
    /// `cancel`, or the timeout, which stop its process group).
    async fn wait(
        mut self: Box<Self>,
        cancel: &CancellationToken,
        on_event: &mut (dyn FnMut(WorkerEvent) + Send),
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
                    Ok(Some(line)) => report.line(&line, on_event),
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
