//! The driver: plans a run, executes what is stale through dagrs, records
//! everything in the registry. Only this code writes the registry.
//!
//! A run goes in two phases:
//!
//! 1. **Plan**, in topological order, without starting anything: a stage
//!    whose upstream stages are all fresh gets its key computed; if the store
//!    has that key's artifact, the stage is `cached`. This is all a no-op
//!    re-run does, in one registry transaction.
//! 2. **Execute** the rest as a dagrs graph. Each node first awaits the
//!    outcome of every upstream node (dagrs edges order nothing by
//!    themselves), then skips itself if one of them did not succeed,
//!    otherwise computes its key (upstream digests are known now), checks the
//!    cache once more, waits for a worker slot and runs a worker process.
//!    Failures never stop independent branches unless `--fail-fast`;
//!    cancellation (Ctrl-C, SIGTERM, `--fail-fast`) is our own token, since
//!    dropping dagrs' future does not stop its nodes.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use dagrs::{
    Action, Content, DefaultNode, EnvVar, Graph as DagGraph, InChannels, Node, NodeId, NodeTable,
    OutChannels, Output, async_trait::async_trait,
};
use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::cache::{ArtifactStore, KeyMaterial, Manifest, digest_of_entries};
use crate::error::{Error, IoContext, Result};
use crate::executor::{Slots, WorkerEnd, WorkerLaunch, current_exe, spawn_local};
use crate::graph::{self, Graph};
use crate::hashing::DepHasher;
use crate::registry::{MetricPoint, NewStageRun, Registry, StageStatus};
use crate::spec::Pipeline;
use crate::stage::{Job, Kinds, WorkerEvent};
use crate::workspace::Workspace;

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Stage names; empty means all. Their upstream stages come along.
    pub targets: Vec<String>,
    pub resume: bool,
    pub jobs: u32,
    pub gpu_devices: Vec<String>,
    pub fail_fast: bool,
    pub wait_lock: bool,
}

/// What the driver reports as it goes; the CLI renders these.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    RunStarted {
        run_id: i64,
        resumed: bool,
        stages: usize,
        workspace: String,
    },
    StageCached {
        stage: String,
    },
    StageStarted {
        stage: String,
        attempt: i64,
        device: String,
        log: String,
    },
    StageProgress {
        stage: String,
        done: u64,
        total: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
    StageFinished {
        stage: String,
        status: StageStatus,
        seconds: f64,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    RunFinished {
        run_id: i64,
        status: String,
        counts: BTreeMap<String, usize>,
        seconds: f64,
    },
    Notice {
        message: String,
    },
}

pub type EventSink = Arc<dyn Fn(&Event) + Send + Sync>;

#[derive(Debug, Clone)]
pub struct RunSummary {
    pub run_id: i64,
    /// `succeeded`, `failed` or `interrupted`.
    pub status: String,
    pub counts: BTreeMap<String, usize>,
}

#[derive(Debug, Clone)]
struct Outcome {
    status: StageStatus,
    key: Option<String>,
    digest: Option<String>,
}

impl Outcome {
    fn ok(&self) -> bool {
        matches!(self.status, StageStatus::Succeeded | StageStatus::Cached)
    }
}

struct Driver {
    p: Pipeline,
    g: Graph,
    kinds: Arc<Kinds>,
    ws: Workspace,
    store: ArtifactStore,
    registry: Arc<Registry>,
    run_id: i64,
    outcomes: Mutex<Vec<Option<Outcome>>>,
    hasher: Mutex<DepHasher>,
    cancel: CancellationToken,
    slots: Slots,
    sink: EventSink,
    fail_fast: bool,
    exe: PathBuf,
    metrics: tokio::sync::mpsc::UnboundedSender<MetricPoint>,
}

/// Runs (or resumes) a pipeline. `cancel` stops it cleanly (Ctrl-C).
pub async fn run(
    p: Pipeline,
    kinds: Arc<Kinds>,
    ws: Workspace,
    opts: RunOptions,
    sink: EventSink,
    cancel: CancellationToken,
) -> Result<RunSummary> {
    let started = Instant::now();
    let g = graph::build(&p)?;
    let _lock = ws.lock(opts.wait_lock)?;
    let registry = Arc::new(Registry::open(&ws.registry_path()).await?);
    let pipeline_key = p.path.display().to_string();
    let text = std::fs::read(&p.path).ctx(|| format!("reading {}", p.path.display()))?;
    let digest = blake3::hash(&text).to_hex().to_string();

    let mut targets = opts.targets.clone();
    let mut resumed = false;
    let run_id = match (opts.resume, registry.newest_run(&pipeline_key).await?) {
        (true, Some((id, status, old_targets))) if status != "succeeded" => {
            registry.reopen_run(id).await?;
            let stopped = registry.reconcile(id).await?;
            if !stopped.is_empty() {
                sink(&Event::Notice {
                    message: format!(
                        "run {id}: {} left running by a stopped driver, marked interrupted: {}",
                        stopped.len(),
                        stopped.join(", ")
                    ),
                });
            }
            if targets.is_empty() && !old_targets.is_empty() {
                targets = old_targets.split(' ').map(str::to_string).collect();
            }
            resumed = true;
            id
        }
        (true, _) => {
            sink(&Event::Notice {
                message:
                    "nothing to resume (no unfinished run of this pipeline); starting a new run"
                        .into(),
            });
            registry
                .begin_run(&pipeline_key, &digest, &targets.join(" "))
                .await?
        }
        (false, _) => {
            registry
                .begin_run(&pipeline_key, &digest, &targets.join(" "))
                .await?
        }
    };
    let selected = g.select(&p, &targets)?;
    let n_selected = selected.iter().filter(|s| **s).count();
    sink(&Event::RunStarted {
        run_id,
        resumed,
        stages: n_selected,
        workspace: ws.root.display().to_string(),
    });

    let (mtx, mrx) = tokio::sync::mpsc::unbounded_channel();
    let metrics_task = tokio::spawn(registry.clone().write_metrics(mrx));
    let hasher = DepHasher::new(registry.load_file_stats().await?);
    let n = p.stages.len();
    let finished_sink = sink.clone();
    let driver = Arc::new(Driver {
        store: ws.store(),
        slots: Slots::new(opts.jobs, opts.gpu_devices.clone()),
        outcomes: Mutex::new(vec![None; n]),
        hasher: Mutex::new(hasher),
        fail_fast: opts.fail_fast,
        exe: current_exe()?,
        metrics: mtx,
        p,
        g,
        kinds,
        ws,
        registry: registry.clone(),
        run_id,
        cancel,
        sink,
    });

    let result = driver.clone().drive(&selected).await;
    // Close the metrics channel (the driver holds the last sender) and flush.
    let counts = driver.counts(&selected);
    let interrupted = driver.cancel.is_cancelled() && !driver.fail_fast;
    let updates = driver.take_file_stats();
    drop(driver);
    let _ = metrics_task.await;
    registry.save_file_stats(&updates).await?;
    if let Err(e) = result {
        // The engine itself failed (not a stage): close the run as failed.
        let _ = registry.finish_run(run_id, "failed").await;
        return Err(e);
    }
    let bad = counts.get("failed").copied().unwrap_or(0)
        + counts.get("skipped").copied().unwrap_or(0)
        + counts.get("interrupted").copied().unwrap_or(0);
    let status = if interrupted {
        "interrupted"
    } else if bad > 0 {
        "failed"
    } else {
        "succeeded"
    };
    registry.finish_run(run_id, status).await?;
    finished_sink(&Event::RunFinished {
        run_id,
        status: status.to_string(),
        counts: counts.clone(),
        seconds: started.elapsed().as_secs_f64(),
    });
    Ok(RunSummary {
        run_id,
        status: status.to_string(),
        counts,
    })
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
    fn outcome(&self, i: usize) -> Option<Outcome> {
        self.outcomes.lock().ok().and_then(|o| o[i].clone())
    }

    fn set_outcome(&self, i: usize, o: Outcome) {
        if let Ok(mut all) = self.outcomes.lock() {
            all[i] = Some(o);
        }
    }

    fn counts(&self, selected: &[bool]) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for (i, _) in selected.iter().enumerate().filter(|(_, s)| **s) {
            let status = self
                .outcome(i)
                .map(|o| o.status.as_str())
                .unwrap_or("skipped");
            *counts.entry(status.to_string()).or_insert(0) += 1;
        }
        counts
    }

    fn take_file_stats(&self) -> Vec<(String, crate::registry::FileStat)> {
        self.hasher
            .lock()
            .map(|mut h| h.take_updates())
            .unwrap_or_default()
    }

    async fn drive(self: Arc<Self>, selected: &[bool]) -> Result<()> {
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
        self.registry.insert_stage_runs(&rows).await?;
        for (i, _) in &cached_rows {
            (self.sink)(&Event::StageCached {
                stage: self.p.stages[*i].name.clone(),
            });
        }
        if pending.is_empty() {
            return Ok(());
        }

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

    /// Copies a command stage's outs from the store into the pipeline folder,
    /// unless they are there already with the same contents. Each out appears
    /// by one rename, never half-written.
    fn restore_outs(&self, i: usize, m: &Manifest) -> Result<()> {
        let st = &self.p.stages[i];
        for out in &st.outs {
            let dst = self.p.dir.join(out);
            let prefix = format!("{out}/");
            let entries: Vec<_> = m
                .files
                .iter()
                .filter(|f| f.path == *out || f.path.starts_with(&prefix))
                .cloned()
                .collect();
            let is_file = entries.len() == 1 && entries[0].path == *out;
            let want = if is_file {
                entries[0].digest.clone()
            } else {
                let rel: Vec<_> = entries
                    .iter()
                    .map(|f| crate::cache::FileEntry {
                        path: f.path[prefix.len()..].to_string(),
                        ..f.clone()
                    })
                    .collect();
                digest_of_entries(&rel)
            };
            if dst.exists() {
                let mut h = self
                    .hasher
                    .lock()
                    .map_err(|_| Error::Invalid("hasher poisoned".into()))?;
                if h.hash_path(&dst).ok().as_deref() == Some(want.as_str()) {
                    continue;
                }
            }
            let src = self.store.data_dir(&m.key).join(out);
            copy_into_place(&src, &dst)?;
        }
        Ok(())
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
            Err(msg) => {
                let s = self
                    .record_unstarted(i, StageStatus::Failed, Some(msg))
                    .await;
                if self.fail_fast {
                    self.cancel.cancel();
                }
                return s;
            }
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
                    if let Err(e) = self.registry.insert_stage_runs(&[row]).await {
                        self.sink_notice(format!("registry: {e}"));
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
            Err(e) => self.sink_notice(format!("stage `{}`: {e}; running it again", st.name)),
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

    async fn run_worker(&self, i: usize, material: &KeyMaterial, key: &str) -> Result<StageStatus> {
        let st = &self.p.stages[i];
        let slot = tokio::select! {
            s = self.slots.acquire(st.resources.cpus, st.resources.gpus) => match s {
                Ok(s) => s,
                Err(e) => {
                    return Ok(self.record_unstarted(i, StageStatus::Failed, Some(e.to_string())).await);
                }
            },
            _ = self.cancel.cancelled() => {
                return Ok(self.record_unstarted(i, StageStatus::Skipped, Some("the run was stopped".into())).await);
            }
        };
        let attempt = self.registry.last_attempt(self.run_id, &st.name).await? + 1;
        let log = self.ws.logs().join(format!(
            "run{:05}-{}-attempt{attempt}.log",
            self.run_id, st.name
        ));
        let log_str = log.display().to_string();
        let mat = material.to_json();
        let id = self
            .registry
            .start_stage_run(
                &NewStageRun {
                    key: Some(key),
                    key_material: Some(&mat),
                    attempt,
                    worker: Some("local"),
                    device: Some(&slot.device),
                    log_path: Some(&log_str),
                    ..NewStageRun::new(self.run_id, &st.name, &st.kind, StageStatus::Running)
                },
                &Value::Object(st.params.clone()),
            )
            .await?;
        (self.sink)(&Event::StageStarted {
            stage: st.name.clone(),
            attempt,
            device: slot.device.clone(),
            log: log_str.clone(),
        });
        let started = Instant::now();

        let scratch = self.ws.scratch(key);
        std::fs::create_dir_all(&scratch).ctx(|| format!("creating {}", scratch.display()))?;
        let job = Job {
            stage: st.name.clone(),
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
            deps: st
                .deps
                .iter()
                .map(|d| (d.clone(), self.p.dir.join(d)))
                .collect(),
            outs: st.outs.clone(),
            pipeline_dir: self.p.dir.clone(),
            artifacts_dir: self.store.root().to_path_buf(),
            scratch_dir: scratch.clone(),
            device: slot.device.clone(),
            attempt,
        };
        let job_file = scratch.join(format!("job-run{}-attempt{attempt}.json", self.run_id));
        let job_json = serde_json::to_vec_pretty(&job).unwrap_or_default();
        std::fs::write(&job_file, job_json).ctx(|| format!("writing {}", job_file.display()))?;

        let on_event = |e| match e {
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
                });
            }
            _ => {}
        };
        let launch = WorkerLaunch {
            exe: &self.exe,
            job_file: &job_file,
            log_file: &log,
            device: &slot.device,
            timeout_s: st.timeout_s,
        };
        let end = match spawn_local(launch) {
            Ok(worker) => {
                // Recorded while it runs, so that a stopped driver's successor
                // (and a person) can see which process it was.
                let _ = self
                    .registry
                    .set_worker(id, &format!("local:{}", worker.pid))
                    .await;
                worker.wait(&self.cancel, on_event).await
            }
            Err(e) => Err(e),
        };
        drop(slot);
        let lineage: Vec<(String, String)> = st
            .inputs
            .iter()
            .filter_map(|(name, up)| {
                let o = self.outcome(self.p.index[up.as_str()])?;
                Some((name.clone(), o.key?))
            })
            .collect();
        let (status, error, digest) = match end {
            Ok(WorkerEnd::Published { .. }) => match self.store.manifest(key) {
                Ok(Some(m)) => {
                    let path = self.store.dir(key).display().to_string();
                    self.registry
                        .record_artifact(id, &m, &path, &lineage)
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
                    "timed out after {s} s (the stage's `timeout`); raise it or make the stage faster; log: {log_str}"
                )),
                None,
            ),
            Ok(WorkerEnd::Interrupted) => (
                StageStatus::Interrupted,
                Some("stopped by the driver; `run --resume` continues it".into()),
                None,
            ),
            Err(e) => (StageStatus::Failed, Some(e.to_string()), None),
        };
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
}

/// The key material of stage `i` (see [`crate::cache`]); `digest_of(j)` gives
/// the artifact digest of upstream stage `j`, if it has one.
pub(crate) fn stage_material(
    p: &Pipeline,
    kinds: &Kinds,
    i: usize,
    digest_of: &dyn Fn(usize) -> Option<String>,
    hasher: &mut DepHasher,
) -> std::result::Result<KeyMaterial, String> {
    let st = &p.stages[i];
    let kind = kinds
        .get(&st.kind)
        .ok_or_else(|| format!("unknown kind `{}`", st.kind))?;
    let mut inputs = BTreeMap::new();
    for (name, up) in &st.inputs {
        let digest = digest_of(p.index[up.as_str()])
            .ok_or_else(|| format!("input `{name}`: stage `{up}` has no artifact yet"))?;
        inputs.insert(name.clone(), digest);
    }
    let mut deps = BTreeMap::new();
    for d in &st.deps {
        let path = p.dir.join(d);
        if !path.exists() {
            return Err(format!(
                "dep `{d}` does not exist ({}); create it, or add the stage that writes it as an out",
                path.display()
            ));
        }
        let digest = hasher.hash_path(&path).map_err(|e| e.to_string())?;
        deps.insert(d.clone(), digest);
    }
    Ok(KeyMaterial {
        kind: st.kind.clone(),
        version: kind.version(),
        params: Value::Object(st.params.clone()),
        inputs,
        deps,
        device: kind
            .device_dependent()
            .then(|| if st.resources.gpus > 0 { "cuda" } else { "cpu" }.to_string()),
    })
}

/// Copies `src` (file or folder) to `dst` through a temporary sibling and one rename.
fn copy_into_place(src: &Path, dst: &Path) -> Result<()> {
    let parent = dst.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).ctx(|| format!("creating {}", parent.display()))?;
    let name = dst
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = parent.join(format!(".{name}.haic-tmp-{}", std::process::id()));
    crate::cache::remove_tree(&tmp)?;
    copy_tree(src, &tmp)?;
    if dst.is_dir() {
        let old = parent.join(format!(".{name}.haic-old-{}", std::process::id()));
        std::fs::rename(dst, &old).ctx(|| format!("replacing {}", dst.display()))?;
        std::fs::rename(&tmp, dst).ctx(|| format!("replacing {}", dst.display()))?;
        crate::cache::remove_tree(&old)?;
    } else {
        std::fs::rename(&tmp, dst).ctx(|| format!("replacing {}", dst.display()))?;
    }
    Ok(())
}

fn copy_tree(src: &Path, dst: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(src).ctx(|| format!("reading {}", src.display()))?;
    if meta.is_dir() {
        std::fs::create_dir_all(dst).ctx(|| format!("creating {}", dst.display()))?;
        for e in std::fs::read_dir(src).ctx(|| format!("listing {}", src.display()))? {
            let e = e.ctx(|| format!("listing {}", src.display()))?;
            copy_tree(&e.path(), &dst.join(e.file_name()))?;
        }
    } else {
        std::fs::copy(src, dst)
            .ctx(|| format!("copying {} to {}", src.display(), dst.display()))?;
        // Store files are read-only; the user's copy is theirs to edit.
        let mode = meta.permissions().mode() | 0o200;
        std::fs::set_permissions(dst, std::fs::Permissions::from_mode(mode))
            .ctx(|| format!("setting permissions of {}", dst.display()))?;
    }
    Ok(())
}
