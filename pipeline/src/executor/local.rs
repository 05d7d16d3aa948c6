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
//! (`--gpus`, else every visible GPU: see [`super::gpus`]). Free CPU slots
//! go to the waiting stage with the longest chain of stages after it
//! (first come among equals), not to the one that has waited longest: a
//! baseline ready from the start must not hold back the chain of a
//! hierarchy whose next stage became ready later. A
//! worker computes with as many threads as it holds CPU slots
//! (`RAYON_NUM_THREADS`, unless the driver's environment sets it), so stages
//! running side by side do not oversubscribe the cores.

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
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

    fn expect(&self, priority: u32) {
        self.slots.cpus.expect(priority);
    }

    async fn reserve(&self, cpus: u32, gpus: u32, priority: u32) -> Result<Reservation> {
        let slot = self.slots.acquire(cpus, gpus, priority).await?;
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

/// How long free slots are held for a stage expected to ask for them
/// ([`Executor::expect`]) before they go to a lower one: its upstream's
/// artifact is filed and its own key computed first.
const EXPECT_HOLD: Duration = Duration::from_secs(5);

/// CPU slots handed out by priority: the highest waiting first, first come
/// among equals; the head of the queue waits until its share is free (a
/// stage that needs every slot is not passed over for ever). Slots are
/// also held, briefly, for a stage expected to ask (its upstream just
/// finished) over lower ones already waiting.
struct CpuPool {
    state: Mutex<PoolState>,
}

struct PoolState {
    free: u32,
    arrivals: u64,
    /// (highest priority first, arrival) -> (slots wanted, where to hand them).
    waiting: BTreeMap<(Reverse<u32>, u64), (u32, oneshot::Sender<CpuPermit>)>,
    /// Stages expected to ask: their priority, and until when to wait.
    expected: Vec<(u32, Instant)>,
}

impl PoolState {
    /// Whether an expected stage above `priority` still holds the slots
    /// (expired expectations are forgotten).
    fn held_above(&mut self, priority: u32) -> bool {
        let now = Instant::now();
        self.expected.retain(|&(_, until)| until > now);
        self.expected.iter().any(|&(p, _)| p > priority)
    }

    /// An arrival of `priority` meets the highest expectation it reaches.
    fn arrived(&mut self, priority: u32) {
        let met = (0..self.expected.len())
            .filter(|&i| self.expected[i].0 <= priority)
            .max_by_key(|&i| self.expected[i].0);
        if let Some(i) = met {
            self.expected.swap_remove(i);
        }
    }
}

/// Held CPU slots; given back on drop.
struct CpuPermit {
    pool: Arc<CpuPool>,
    slots: u32,
}

impl Drop for CpuPermit {
    fn drop(&mut self) {
        if self.slots > 0 {
            self.pool.give_back(self.slots);
        }
    }
}

impl CpuPool {
    fn new(slots: u32) -> Arc<CpuPool> {
        Arc::new(CpuPool {
            state: Mutex::new(PoolState {
                free: slots,
                arrivals: 0,
                waiting: BTreeMap::new(),
                expected: Vec::new(),
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, PoolState> {
        // The state stays consistent between statements: a panic elsewhere
        // cannot leave it half-updated.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn acquire(self: &Arc<Self>, slots: u32, priority: u32) -> Result<CpuPermit> {
        let handed = {
            let mut s = self.state();
            s.arrived(priority);
            let (send, handed) = oneshot::channel();
            let arrival = s.arrivals;
            s.arrivals += 1;
            s.waiting
                .insert((Reverse(priority), arrival), (slots, send));
            self.hand_out(&mut s);
            handed
        };
        // A waiter dropped before its turn is skipped; one dropped after it
        // drops the permit in the channel, which gives the slots back.
        handed
            .await
            .map_err(|_| Error::Invalid("worker slots closed".into()))
    }

    /// A stage of `priority` is expected to ask soon: hold free slots for
    /// it for [`EXPECT_HOLD`] over lower stages. Outside a runtime (no
    /// timer to end the hold) nothing is held.
    fn expect(self: &Arc<Self>, priority: u32) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        self.state()
            .expected
            .push((priority, Instant::now() + EXPECT_HOLD));
        let pool = self.clone();
        runtime.spawn(async move {
            tokio::time::sleep(EXPECT_HOLD).await;
            pool.give_back(0);
        });
    }

    fn give_back(self: &Arc<Self>, slots: u32) {
        let mut s = self.state();
        s.free += slots;
        self.hand_out(&mut s);
    }

    /// Hands free slots to the head of the queue while it fits and no
    /// expected stage above it holds them.
    fn hand_out(self: &Arc<Self>, s: &mut PoolState) {
        while let Some((&(Reverse(priority), _), &(wanted, _))) = s.waiting.first_key_value() {
            if wanted > s.free || s.held_above(priority) {
                break;
            }
            let Some((_, (wanted, send))) = s.waiting.pop_first() else {
                break;
            };
            s.free -= wanted;
            let permit = CpuPermit {
                pool: self.clone(),
                slots: wanted,
            };
            if let Err(mut unclaimed) = send.send(permit) {
                // The waiter is gone: the slots stay free (without the
                // permit's drop, which would take this lock again).
                unclaimed.slots = 0;
                s.free += wanted;
            }
        }
    }
}

/// CPU and GPU slots; a stage waits for its share.
pub struct Slots {
    cpus: Arc<CpuPool>,
    cpu_total: u32,
    gpus: Vec<(String, Arc<Semaphore>)>,
}

/// A held slot; released on drop.
pub struct SlotGuard {
    _cpu: Option<CpuPermit>,
    _gpus: Vec<OwnedSemaphorePermit>,
    pub device: String,
    /// CPU slots held: the worker's compute threads.
    pub threads: u32,
}

impl Slots {
    pub fn new(jobs: u32, gpu_devices: Vec<String>) -> Slots {
        let jobs = jobs.max(1);
        Slots {
            cpus: CpuPool::new(jobs),
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

    /// Waits for `cpus` CPU slots (the highest `priority` served first) and
    /// `gpus` GPU devices.
    pub async fn acquire(&self, cpus: u32, gpus: u32, priority: u32) -> Result<SlotGuard> {
        if gpus as usize > self.gpus.len() {
            return Err(Error::Invalid(format!(
                "needs {gpus} GPU(s) but this driver has {} (pass --gpus, or run it on a cluster back-end)",
                self.gpus.len()
            )));
        }
        let n = cpus.clamp(1, self.cpu_total);
        let cpu = self.cpus.acquire(n, priority).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(pool: &CpuPool) -> usize {
        pool.state().waiting.len()
    }

    /// Waits (yielding) until `n` acquirers are queued.
    async fn queued(pool: &CpuPool, n: usize) {
        while waiting(pool) < n {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn free_slots_go_to_the_longest_chain_then_first_come() {
        let pool = CpuPool::new(1);
        let held = pool.acquire(1, 0).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        // Arriving in this order; served by priority, ties by arrival.
        for (name, priority) in [("baseline", 2), ("codes1", 6), ("tie", 2), ("vq2", 5)] {
            let (mine, order) = (pool.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let permit = mine.acquire(1, priority).await.unwrap();
                order.lock().unwrap().push(name);
                drop(permit);
            }));
            queued(&pool, tasks.len()).await;
        }
        // A waiter that gives up before its turn is passed over.
        let gone = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.acquire(1, 9).await.map(|_| ()) })
        };
        queued(&pool, 5).await;
        gone.abort();
        let _ = gone.await;
        drop(held);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), ["codes1", "vq2", "baseline", "tie"]);
        let s = pool.state();
        assert_eq!((s.free, s.waiting.len()), (1, 0), "every slot back");
    }

    #[tokio::test]
    async fn a_freed_slot_waits_for_an_expected_longer_chain_until_the_hold_ends() {
        let pool = CpuPool::new(1);
        let held = pool.acquire(1, 0).await.unwrap();
        let short = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.acquire(1, 1).await.unwrap() })
        };
        queued(&pool, 1).await;
        // The stage running finishes; its successor (a chain of 5) will ask.
        pool.expect(5);
        drop(held);
        let free = pool.state().free;
        assert_eq!((free, waiting(&pool)), (1, 1), "held for it");
        let next = pool.acquire(1, 5).await.unwrap();
        drop(next);
        drop(short.await.unwrap());
        // An expectation that is not met ends with its hold.
        let held = pool.acquire(1, 0).await.unwrap();
        pool.state().expected.push((7, Instant::now()));
        let short = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.acquire(1, 1).await.unwrap() })
        };
        queued(&pool, 1).await;
        drop(held);
        assert_eq!(short.await.unwrap().slots, 1);
        assert!(pool.state().expected.is_empty());
    }

    #[tokio::test]
    async fn the_head_of_the_queue_waits_for_its_share_and_is_not_passed_over() {
        let pool = CpuPool::new(2);
        let a = pool.acquire(1, 0).await.unwrap();
        let b = pool.acquire(1, 0).await.unwrap();
        let both = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.acquire(2, 3).await.unwrap() })
        };
        queued(&pool, 1).await;
        let one = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.acquire(1, 1).await.unwrap() })
        };
        queued(&pool, 2).await;
        drop(a);
        // One slot free: the head needs two, so nobody starts yet.
        assert_eq!(pool.state().free, 1);
        assert_eq!(waiting(&pool), 2);
        drop(b);
        let both = both.await.unwrap();
        assert_eq!(both.slots, 2);
        drop(both);
        assert_eq!(one.await.unwrap().slots, 1);
    }
}
