//! The driver's state and its two phases (see the module doc of
//! [`crate::run`]): planning fresh stages, and executing the rest as dagrs
//! nodes that run worker processes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use dagrs::{
    Action, Content, DefaultNode, EnvVar, Graph as DagGraph, InChannels, Node, NodeId, NodeTable,
    OutChannels, Output, async_trait::async_trait,
};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::cache::{ArtifactStore, KeyMaterial, Manifest};
use crate::error::{Error, IoContext, Result};
use crate::executor::{Executor, Handle, Launch, Launched, WorkerEnd};
use crate::graph::Graph;
use crate::hashing::DepHasher;
use crate::registry::{MetricPoint, NewStageRun, Registry, StageStatus};
use crate::spec::Pipeline;
use crate::stage::{Job, Kinds, WorkerEvent};
use crate::workspace::Workspace;

use super::{Event, EventSink, stage_material};

#[derive(Debug, Clone)]
pub(super) struct Outcome {
    status: StageStatus,
    key: Option<String>,
    digest: Option<String>,
}

impl Outcome {
    fn ok(&self) -> bool {
        matches!(self.status, StageStatus::Succeeded | StageStatus::Cached)
    }
}

/// A job a stopped driver left running, taken over on resume.
#[derive(Debug, Clone)]
pub(super) struct Adopted {
    pub(super) row_id: i64,
    pub(super) job_id: String,
    pub(super) attempt: i64,
    pub(super) log: PathBuf,
}

pub(super) struct Driver {
    pub(super) p: Pipeline,
    pub(super) g: Graph,
    /// Per stage, its place in the queue for slots ([`Graph::chain_lengths`]).
    pub(super) priority: Vec<u32>,
    pub(super) kinds: Arc<Kinds>,
    pub(super) ws: Workspace,
    pub(super) store: ArtifactStore,
    pub(super) registry: Arc<Registry>,
    pub(super) run_id: i64,
    pub(super) outcomes: Mutex<Vec<Option<Outcome>>>,
    pub(super) hasher: Mutex<DepHasher>,
    pub(super) cancel: CancellationToken,
    pub(super) executor: Box<dyn Executor>,
    /// Stage key -> a job to adopt instead of launching (resume).
    pub(super) adoptable: Mutex<HashMap<String, Adopted>>,
    pub(super) sink: EventSink,
    pub(super) fail_fast: bool,
    pub(super) metrics: tokio::sync::mpsc::UnboundedSender<MetricPoint>,
}

struct StageAction {
    driver: Arc<Driver>,
    index: usize,
}

#[async_trait]
impl Action for StageAction {
    async fn run(&self, inputs: &mut InChannels, out: &mut OutChannels, _: Arc<EnvVar>) -> Output {
        // An edge orders nothing unless the node reads it: await every upstream.
        for id in inputs.get_sender_ids() {
            let _ = inputs.recv_from(&id).await;
        }
        let status = self.driver.clone().execute(self.index).await;
        out.broadcast(Content::new(status)).await;
        Output::empty()
    }
}

impl Driver {
    pub(super) fn outcome(&self, i: usize) -> Option<Outcome> {
        self.outcomes.lock().ok().and_then(|o| o[i].clone())
    }

    fn set_outcome(&self, i: usize, o: Outcome) {
        if let Ok(mut all) = self.outcomes.lock() {
            all[i] = Some(o);
        }
    }

    pub(super) fn counts(&self, selected: &[bool]) -> BTreeMap<StageStatus, usize> {
        let mut counts = BTreeMap::new();
        for (i, _) in selected.iter().enumerate().filter(|(_, s)| **s) {
            let status = self
                .outcome(i)
                .map(|o| o.status)
                .unwrap_or(StageStatus::Skipped);
            *counts.entry(status).or_insert(0) += 1;
        }
        counts
    }

    pub(super) fn take_file_stats(&self) -> Vec<(String, crate::registry::FileStat)> {
        self.hasher
            .lock()
            .map(|mut h| h.take_updates())
            .unwrap_or_default()
    }

    pub(super) async fn drive(self: Arc<Self>, selected: &[bool]) -> Result<()> {
        let finished_before = self.registry.finished_stages(self.run_id).await?;
        let mut pending = Vec::new();
        // Cached rows carry no key material: the stage run that produced the
        // artifact has it, and `status` reads it from there.
        let mut cached_rows: Vec<(usize, String)> = Vec::new();
        for &i in &self.g.order {
            if !selected[i] {
                continue;
            }
            let ups_fresh = self.g.upstream[i]
                .iter()
                .all(|&u| self.outcome(u).is_some_and(|o| o.ok()));
            if !ups_fresh {
                pending.push(i);
                continue;
            }
            let material = match self.material(i) {
                Ok(m) => m,
                Err(_) => {
                    pending.push(i); // the execute phase records the error
                    continue;
                }
            };
            let key = material.key();
            match self.store.manifest(&key) {
                Ok(Some(m)) => {
                    if let Err(e) = self.restore_outs(i, &m) {
                        self.sink_notice(format!("stage `{}`: {e}", self.p.stages[i].name));
                        pending.push(i);
                        continue;
                    }
                    self.set_outcome(
                        i,
                        Outcome {
                            status: StageStatus::Cached,
                            key: Some(key.clone()),
                            digest: Some(m.digest),
                        },
                    );
                    if finished_before.get(&self.p.stages[i].name) != Some(&key) {
                        cached_rows.push((i, key));
                    }
                }
                _ => pending.push(i),
            }
        }
        let rows: Vec<NewStageRun> = cached_rows
            .iter()
            .map(|(i, key)| {
                let st = &self.p.stages[*i];
                NewStageRun {
                    key: Some(key),
                    ..NewStageRun::new(self.run_id, &st.name, &st.kind, StageStatus::Cached)
                }
            })
            .collect();
        let ids = self.registry.insert_stage_runs(&rows).await?;
        let known = if cached_rows.is_empty() {
            HashSet::new()
        } else {
            self.registry.artifact_keys().await?
        };
        for ((i, key), id) in cached_rows.iter().zip(ids) {
            if !known.contains(key)
                && let Ok(Some(m)) = self.store.manifest(key)
            {
                self.record_found_artifact(*i, id, &m).await?;
            }
            (self.sink)(&Event::StageCached {
                stage: self.p.stages[*i].name.clone(),
            });
        }
        if pending.is_empty() {
            return Ok(());
        }
        // The stages ready at once ask for slots in whatever order their
        // tasks start: have the slots wait for the longest chains first.
        self.expect_ready(pending.iter().copied(), None);

        let mut table = NodeTable::new();
        let mut dag = DagGraph::new();
        let mut ids: HashMap<usize, NodeId> = HashMap::new();
        for &i in &pending {
            let node = DefaultNode::with_action(
                self.p.stages[i].name.clone(),
                StageAction {
                    driver: self.clone(),
                    index: i,
                },
                &mut table,
            );
            ids.insert(i, node.id());
            dag.add_node(node)
                .map_err(|e| Error::Invalid(format!("building the stage graph: {e}")))?;
        }
        for &i in &pending {
            let ups: Vec<NodeId> = self.g.upstream[i]
                .iter()
                .filter_map(|u| ids.get(u).copied())
                .collect();
            for u in ups {
                dag.add_edge(u, [ids[&i]])
                    .map_err(|e| Error::Invalid(format!("building the stage graph: {e}")))?;
            }
        }
        dag.async_start()
            .await
            .map_err(|e| Error::Invalid(format!("executing the stage graph: {e}")))?;
        Ok(())
    }

    fn sink_notice(&self, message: String) {
        (self.sink)(&Event::Notice { message });
    }

    /// The key material of stage `i`; its upstream outcomes must be known.
    fn material(&self, i: usize) -> std::result::Result<KeyMaterial, String> {
        let mut hasher = self
            .hasher
            .lock()
            .map_err(|_| "hasher poisoned".to_string())?;
        stage_material(
            &self.p,
            &self.kinds,
            i,
            &|j| self.outcome(j)?.digest,
            &mut hasher,
        )
    }

    /// `(input name, artifact key)` of what stage `i` reads.
    fn lineage(&self, i: usize) -> Vec<(String, String)> {
        self.p.stages[i]
            .inputs
            .iter()
            .filter_map(|(name, up)| {
                let o = self.outcome(self.p.index[up.as_str()])?;
                Some((name.clone(), o.key?))
            })
            .collect()
    }

    /// A stage found cached whose artifact the registry does not know: a
    /// driver died after its worker published and before recording it.
    /// The artifact gets its row, made by the stage run `id` that found it.
    async fn record_found_artifact(&self, i: usize, id: i64, m: &Manifest) -> Result<()> {
        let path = self.store.dir(&m.key).display().to_string();
        self.registry
            .record_found_artifact(id, m, &path, &self.lineage(i))
            .await?;
        Ok(())
    }

    fn restore_outs(&self, i: usize, m: &Manifest) -> Result<()> {
        if !self.p.stages[i].restore_outs {
            return Ok(());
        }
        crate::outs::restore(&self.p, &self.p.stages[i], &self.store, m, &self.hasher)
    }

    async fn record_unstarted(
        &self,
        i: usize,
        status: StageStatus,
        error: Option<String>,
    ) -> StageStatus {
        let st = &self.p.stages[i];
        let row = NewStageRun {
            error: error.as_deref(),
            ..NewStageRun::new(self.run_id, &st.name, &st.kind, status)
        };
        if let Err(e) = self.registry.insert_stage_runs(&[row]).await {
            self.sink_notice(format!("registry: {e}"));
        }
        self.set_outcome(
            i,
            Outcome {
                status,
                key: None,
                digest: None,
            },
        );
        (self.sink)(&Event::StageFinished {
            stage: st.name.clone(),
            status,
            seconds: 0.0,
            error,
        });
        status
    }

    /// Stage `i` failed before a worker started (`--fail-fast` stops the rest).
    async fn fail_unstarted(&self, i: usize, msg: String) -> StageStatus {
        let s = self
            .record_unstarted(i, StageStatus::Failed, Some(msg))
            .await;
        if self.fail_fast {
            self.cancel.cancel();
        }
        s
    }

    /// Runs stage `i` if it must; records and returns its status.
    async fn execute(self: Arc<Self>, i: usize) -> StageStatus {
        let st = &self.p.stages[i];
        for &u in &self.g.upstream[i] {
            match self.outcome(u) {
                Some(o) if o.ok() => {}
                other => {
                    let why = other.map(|o| o.status.as_str()).unwrap_or("did not finish");
                    return self
                        .record_unstarted(
                            i,
                            StageStatus::Skipped,
                            Some(format!("upstream stage `{}` {why}", self.p.stages[u].name)),
                        )
                        .await;
                }
            }
        }
        if self.cancel.is_cancelled() {
            return self
                .record_unstarted(i, StageStatus::Skipped, Some("the run was stopped".into()))
                .await;
        }
        let material = match self.material(i) {
            Ok(m) => m,
            Err(msg) => return self.fail_unstarted(i, msg).await,
        };
        let key = material.key();
        match self.store.manifest(&key) {
            Ok(Some(m)) => {
                let restored = self.restore_outs(i, &m);
                if restored.is_ok() {
                    let row = NewStageRun {
                        key: Some(&key),
                        ..NewStageRun::new(self.run_id, &st.name, &st.kind, StageStatus::Cached)
                    };
                    match self.registry.insert_stage_runs(&[row]).await {
                        Ok(ids) => {
                            for id in ids {
                                if let Err(e) = self.record_found_artifact(i, id, &m).await {
                                    self.sink_notice(format!("registry: {e}"));
                                }
                            }
                        }
                        Err(e) => self.sink_notice(format!("registry: {e}")),
                    }
                    self.set_outcome(
                        i,
                        Outcome {
                            status: StageStatus::Cached,
                            key: Some(key),
                            digest: Some(m.digest),
                        },
                    );
                    (self.sink)(&Event::StageCached {
                        stage: st.name.clone(),
                    });
                    return StageStatus::Cached;
                }
            }
            Ok(None) => {}
            // A damaged manifest: set aside like damaged data, made again.
            Err(e @ Error::Artifact { .. }) if self.store.dir(&key).exists() => {
                match self.store.set_aside(&key) {
                    Ok(to) => self.sink_notice(format!(
                        "stage `{}`: {e}; set aside as {}, running it again",
                        st.name,
                        to.display()
                    )),
                    Err(moving) => return self.fail_unstarted(i, format!("{e}; {moving}")).await,
                }
            }
            Err(e) => self.sink_notice(format!("stage `{}`: {e}; running it again", st.name)),
        }
        if let Err(msg) = self.verify_inputs(i).await {
            return self.fail_unstarted(i, msg).await;
        }
        if let Err(e) = crate::outs::check_destinations(&self.p, st) {
            return self.fail_unstarted(i, e.to_string()).await;
        }
        match self.run_worker(i, &material, &key).await {
            Ok(s) => s,
            Err(e) => {
                self.set_outcome(
                    i,
                    Outcome {
                        status: StageStatus::Failed,
                        key: Some(key),
                        digest: None,
                    },
                );
                (self.sink)(&Event::StageFinished {
                    stage: st.name.clone(),
                    status: StageStatus::Failed,
                    seconds: 0.0,
                    error: Some(e.to_string()),
                });
                StageStatus::Failed
            }
        }
    }

    /// Re-hashes the artifacts stage `i` reads against their manifests, so
    /// that a damaged one (a flipped bit, a truncated file) is never used. A
    /// damaged artifact is set aside under `artifacts/.damaged/`; the stage
    /// fails saying so, and the next run re-creates the artifact.
    async fn verify_inputs(&self, i: usize) -> std::result::Result<(), String> {
        let st = &self.p.stages[i];
        for (name, up) in &st.inputs {
            let u = self.p.index[up.as_str()];
            let Some(key) = self.outcome(u).and_then(|o| o.key) else {
                continue;
            };
            let store = self.store.clone();
            let k = key.clone();
            let checked = tokio::task::spawn_blocking(move || store.verify(&k))
                .await
                .map_err(|e| format!("verifying input `{name}`: {e}"))?;
            let Err(e) = checked else { continue };
            let aside = self.store.set_aside(&key);
            return Err(format!(
                "input `{name}` (the artifact of stage `{up}`) is damaged: {e}; {}; `run --resume` (or `run`) makes it again",
                match aside {
                    Ok(path) => format!("it was moved to {}", path.display()),
                    // A sibling stage found it first and moved it.
                    Err(_) if !self.store.dir(&key).exists() => "it is out of the store".into(),
                    Err(e) => format!(
                        "moving it aside failed too ({e}); remove {} by hand",
                        self.store.dir(&key).display()
                    ),
                }
            ));
        }
        Ok(())
    }

    /// Jobs left to adopt after the run (their stage was cached by then, not
    /// selected, or its key changed): cancelled, their rows closed as
    /// interrupted.
    pub(super) async fn release_unadopted(&self) -> Result<()> {
        let left: Vec<Adopted> = self
            .adoptable
            .lock()
            .map(|mut a| a.drain().map(|(_, v)| v).collect())
            .unwrap_or_default();
        for a in left {
            self.executor.cancel(&a.job_id).await;
            self.registry
                .finish_stage_run(
                    a.row_id,
                    StageStatus::Interrupted,
                    Some(&format!(
                        "the resumed run did not wait for {} job {} (its stage was cached by then, not selected, or its key changed); cancelled if it still ran",
                        self.executor.name(),
                        a.job_id
                    )),
                )
                .await?;
        }
        Ok(())
    }

    /// Runs stage `i`'s worker on the executor (or follows the job a
    /// stopped driver left running) and records how it ended.
    async fn run_worker(&self, i: usize, material: &KeyMaterial, key: &str) -> Result<StageStatus> {
        let st = &self.p.stages[i];
        let reserved = tokio::select! {
            r = self.executor.reserve(st.resources.cpus, st.resources.gpus, self.priority[i]) => r,
            _ = self.cancel.cancelled() => {
                return Ok(self.record_unstarted(i, StageStatus::Skipped, Some("the run was stopped".into())).await);
            }
        };
        let reservation = match reserved {
            Ok(r) => r,
            Err(e) => {
                return Ok(self
                    .record_unstarted(i, StageStatus::Failed, Some(e.to_string()))
                    .await);
            }
        };
        let adopted = self.adoptable.lock().ok().and_then(|mut a| a.remove(key));
        let (id, attempt, log) = match &adopted {
            Some(a) => (a.row_id, a.attempt, a.log.clone()),
            None => {
                let attempt = self.registry.last_attempt(self.run_id, &st.name).await? + 1;
                let log = self.ws.logs().join(format!(
                    "run{:05}-{}-attempt{attempt}.log",
                    self.run_id, st.name
                ));
                let row = self
                    .start_row(i, material, key, attempt, &log, &reservation.device)
                    .await?;
                (row, attempt, log)
            }
        };
        let log_str = log.display().to_string();
        (self.sink)(&Event::StageStarted {
            stage: st.name.clone(),
            attempt,
            device: match &adopted {
                Some(a) => format!("{} job {} (adopted)", self.executor.name(), a.job_id),
                None => reservation.device.clone(),
            },
            log: log_str.clone(),
        });
        let started = Instant::now();

        let scratch = self.ws.scratch(key);
        std::fs::create_dir_all(&scratch).ctx(|| format!("creating {}", scratch.display()))?;
        let job_file = scratch.join(format!("job-run{}-attempt{attempt}.json", self.run_id));
        if adopted.is_none() {
            let job = self.job(i, key, &scratch, &reservation.device, attempt);
            let job_json = serde_json::to_vec_pretty(&job).unwrap_or_default();
            std::fs::write(&job_file, job_json)
                .ctx(|| format!("writing {}", job_file.display()))?;
        }
        let launch = Launch {
            stage: &st.name,
            key,
            attempt,
            job_file: &job_file,
            scratch: &scratch,
            run_id: self.run_id,
            log: &log,
            cpus: st.resources.cpus,
            gpus: st.resources.gpus,
            device: &reservation.device,
            threads: reservation.threads,
            timeout_s: st.timeout_s,
        };
        let placed = Mutex::new(None);
        let end = match self.start(id, &launch, adopted.as_ref()).await {
            Ok(worker) => {
                worker
                    .wait(&self.cancel, &mut |e| {
                        self.on_worker_event(i, id, &placed, e)
                    })
                    .await
            }
            Err(e) => Err(e),
        };
        if end.is_ok() {
            self.expect_successors(i);
        }
        drop(reservation);
        if let Some(dev) = placed.lock().ok().and_then(|mut p| p.take()) {
            let _ = self.registry.set_device(id, &dev).await;
        }
        let (status, error, digest) = self.settle(i, id, key, end, &log_str).await?;
        self.registry
            .finish_stage_run(id, status, error.as_deref())
            .await?;
        self.set_outcome(
            i,
            Outcome {
                status,
                key: Some(key.to_string()),
                digest,
            },
        );
        (self.sink)(&Event::StageFinished {
            stage: st.name.clone(),
            status,
            seconds: started.elapsed().as_secs_f64(),
            error,
        });
        if status == StageStatus::Failed && self.fail_fast {
            self.cancel.cancel();
        }
        Ok(status)
    }

    /// Tells the executor which stages after `i` become ready with it (their
    /// other upstream stages are done), before `i`'s slot is freed: the slot
    /// then waits for the longest of their chains rather than going to a
    /// stage of a shorter one that has waited longer.
    fn expect_successors(&self, i: usize) {
        self.expect_ready(self.g.downstream[i].iter().copied(), Some(i));
    }

    /// Tells the executor to expect those of `stages` whose upstream stages
    /// have all succeeded (`finishing` counted as done).
    fn expect_ready(&self, stages: impl Iterator<Item = usize>, finishing: Option<usize>) {
        let Ok(outcomes) = self.outcomes.lock() else {
            return;
        };
        for t in stages {
            let ready = self.g.upstream[t]
                .iter()
                .all(|&u| Some(u) == finishing || outcomes[u].as_ref().is_some_and(Outcome::ok));
            if ready {
                self.executor.expect(self.priority[t]);
            }
        }
    }

    /// Records stage `i` as running (before anything is dispatched, so that
    /// a resumed driver can reconcile); the row's id.
    async fn start_row(
        &self,
        i: usize,
        material: &KeyMaterial,
        key: &str,
        attempt: i64,
        log: &std::path::Path,
        device: &str,
    ) -> Result<i64> {
        let st = &self.p.stages[i];
        let mat = material.to_json();
        let log_str = log.display().to_string();
        self.registry
            .start_stage_run(
                &NewStageRun {
                    key: Some(key),
                    key_material: Some(&mat),
                    attempt,
                    worker: Some(self.executor.name()),
                    device: Some(device),
                    log_path: Some(&log_str),
                    ..NewStageRun::new(self.run_id, &st.name, &st.kind, StageStatus::Running)
                },
                &Value::Object(st.params.clone()),
            )
            .await
    }

    /// Launches the worker, or follows the adopted job; records which
    /// process or job it is while it runs, so that a stopped driver's
    /// successor (and a person) can find it.
    async fn start(
        &self,
        id: i64,
        launch: &Launch<'_>,
        adopted: Option<&Adopted>,
    ) -> Result<Box<dyn Launched + '_>> {
        if let Some(a) = adopted {
            return self.executor.adopt(&a.job_id, launch);
        }
        let worker = self.executor.launch(launch).await?;
        match worker.handle() {
            Handle::Process(pid) => {
                let _ = self.registry.set_worker(id, &format!("local:{pid}")).await;
            }
            Handle::Job(job) => self.registry.set_job_id(id, &job).await?,
        }
        Ok(worker)
    }

    /// A worker's event while stage `i` (row `id`) runs: progress and
    /// metrics go on; where it computes is kept in `placed`.
    fn on_worker_event(&self, i: usize, id: i64, placed: &Mutex<Option<String>>, e: WorkerEvent) {
        let st = &self.p.stages[i];
        match e {
            WorkerEvent::Progress {
                done,
                total,
                message,
            } => (self.sink)(&Event::StageProgress {
                stage: st.name.clone(),
                done,
                total,
                message,
            }),
            WorkerEvent::Metric { name, step, value } => {
                let _ = self.metrics.send(MetricPoint {
                    stage_run_id: id,
                    name,
                    step,
                    value,
                    at: Some(crate::registry::unix_now()),
                });
            }
            WorkerEvent::Placed { device, host, gpu } => {
                if let Ok(mut p) = placed.lock() {
                    *p = self.executor.placed(&device, &host, gpu.as_deref());
                }
            }
            WorkerEvent::Resumed { step } => self.sink_notice(format!(
                "stage `{}` resumes from its checkpoint at step {step}",
                st.name
            )),
            WorkerEvent::Stopped { step } => self.sink_notice(format!(
                "stage `{}` checkpointed at step {step} before its time limit; the {} back-end requeues it",
                st.name,
                self.executor.name()
            )),
            _ => {}
        }
    }

    /// How the worker of stage `i` (row `id`) ended: its status, error and
    /// artifact digest; a published artifact is recorded and its outs
    /// restored.
    async fn settle(
        &self,
        i: usize,
        id: i64,
        key: &str,
        end: Result<WorkerEnd>,
        log: &str,
    ) -> Result<(StageStatus, Option<String>, Option<String>)> {
        Ok(match end {
            Ok(WorkerEnd::Published { .. }) => match self.store.manifest(key) {
                Ok(Some(m)) => {
                    let path = self.store.dir(key).display().to_string();
                    self.registry
                        .record_artifact(id, &m, &path, &self.lineage(i))
                        .await?;
                    match self.restore_outs(i, &m) {
                        Ok(()) => (StageStatus::Succeeded, None, Some(m.digest)),
                        Err(e) => (
                            StageStatus::Failed,
                            Some(format!("restoring outs: {e}")),
                            None,
                        ),
                    }
                }
                Ok(None) => (
                    StageStatus::Failed,
                    Some("the worker reported an artifact that is not in the store".into()),
                    None,
                ),
                Err(e) => (StageStatus::Failed, Some(e.to_string()), None),
            },
            Ok(WorkerEnd::Failed(msg)) => (StageStatus::Failed, Some(msg), None),
            Ok(WorkerEnd::TimedOut(s)) => (
                StageStatus::Failed,
                Some(format!(
                    "timed out after {s} s (the stage's `timeout`); raise it or make the stage faster; log: {log}"
                )),
                None,
            ),
            Ok(WorkerEnd::Interrupted) => (
                StageStatus::Interrupted,
                Some("stopped by the driver; `run --resume` continues it".into()),
                None,
            ),
            Err(e) => (StageStatus::Failed, Some(e.to_string()), None),
        })
    }

    /// The job file's contents for stage `i`.
    fn job(
        &self,
        i: usize,
        key: &str,
        scratch: &std::path::Path,
        device: &str,
        attempt: i64,
    ) -> Job {
        let st = &self.p.stages[i];
        Job {
            // A sweep copy works under its name in the file, so that what it
            // writes equals what the member run alone writes.
            stage: st.work_name().to_string(),
            kind: st.kind.clone(),
            key: key.to_string(),
            params: Value::Object(st.params.clone()),
            inputs: st
                .inputs
                .iter()
                .filter_map(|(name, up)| {
                    let o = self.outcome(self.p.index[up.as_str()])?;
                    Some((name.clone(), self.store.data_dir(o.key.as_deref()?)))
                })
                .collect(),
            input_keys: st
                .inputs
                .iter()
                .filter_map(|(name, up)| {
                    let o = self.outcome(self.p.index[up.as_str()])?;
                    Some((name.clone(), o.key.clone()?))
                })
                .collect(),
            deps: st
                .deps
                .iter()
                .map(|d| (d.clone(), self.p.dir.join(d)))
                .collect(),
            outs: st.outs.clone(),
            pipeline_dir: self.p.dir.clone(),
            artifacts_dir: self.store.root().to_path_buf(),
            scratch_dir: scratch.to_path_buf(),
            device: device.to_string(),
            attempt,
        }
    }
}
