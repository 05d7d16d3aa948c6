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
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::cache::KeyMaterial;
use crate::error::{Error, IoContext, Result};
use crate::executor::local::LocalExecutor;
use crate::executor::slurm::SlurmExecutor;
use crate::executor::{Executor, LeftRunning, current_exe};
use crate::graph;
use crate::hashing::DepHasher;
use crate::registry::{Registry, RunLabel, RunStatus, StageStatus};
use crate::spec::{ExecutorKind, Pipeline};
use crate::stage::Kinds;
use crate::workspace::Workspace;

mod driver;

use driver::{Adopted, Driver};

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Stage names; empty means all. Their upstream stages come along.
    pub targets: Vec<String>,
    pub resume: bool,
    pub jobs: u32,
    pub gpu_devices: Vec<String>,
    pub fail_fast: bool,
    pub wait_lock: bool,
    /// Overrides the pipeline's `executor.kind` (`run --executor`).
    pub executor: Option<ExecutorKind>,
    /// The run's name, tags, note and `-S` overrides, recorded on it.
    pub label: RunLabel,
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
        status: RunStatus,
        counts: BTreeMap<StageStatus, usize>,
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
    pub status: RunStatus,
    pub counts: BTreeMap<StageStatus, usize>,
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
    // Bad targets or labels fail before anything is written: no run row
    // that no driver will finish.
    g.select(&p, &opts.targets)?;
    opts.label.check().map_err(Error::Invalid)?;
    let mut ws = ws;
    let _lock = ws.lock(opts.wait_lock)?;
    if let Some(dir) = &p.executor.shared_dir {
        ws.use_shared_dir(dir)?;
    }
    ws.create()?;
    let registry = Arc::new(Registry::open(&ws.registry_path()).await?);
    let pipeline_key = p.path.display().to_string();
    let text = std::fs::read(&p.path).ctx(|| format!("reading {}", p.path.display()))?;
    let digest = blake3::hash(&text).to_hex().to_string();

    let mut targets = opts.targets.clone();
    let mut resumed = false;
    let exe = current_exe()?;
    let kind = opts.executor.unwrap_or(p.executor.kind);
    let notice_sink = sink.clone();
    let notice: Arc<dyn Fn(String) + Send + Sync> =
        Arc::new(move |message| notice_sink(&Event::Notice { message }));
    let newest = registry.newest_run(&pipeline_key).await?;
    if let Some(name) = &opts.label.name
        && let Some(other) = registry.run_named(name).await?
        && !(opts.resume
            && newest
                .as_ref()
                .is_some_and(|n| n.0 == other && n.1 != RunStatus::Succeeded))
    {
        return Err(Error::Invalid(format!(
            "--name `{name}`: run {other} has that name; pick another, or `run --resume` continues run {other} if it is this pipeline's newest"
        )));
    }
    let run_id = match (opts.resume, newest) {
        (true, Some((id, status, old_targets))) if status != RunStatus::Succeeded => {
            registry.reopen_run(id).await?;
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
    registry.label_run(run_id, &opts.label).await?;
    if let Some(sweep) = &p.sweep {
        registry.record_sweep(run_id, sweep).await?;
    }
    let executor = executor_for(kind, &p, &ws, &opts, run_id, exe, notice);
    let mut adoptable = HashMap::new();
    if resumed {
        adoptable = adoptable_jobs(&registry, executor.as_ref(), run_id).await?;
        let keep: Vec<i64> = adoptable.values().map(|a: &Adopted| a.row_id).collect();
        let stopped = registry.reconcile(run_id, &keep).await?;
        if !stopped.is_empty() {
            sink(&Event::Notice {
                message: format!(
                    "run {run_id}: {} left running by a stopped driver, marked interrupted: {}",
                    stopped.len(),
                    stopped.join(", ")
                ),
            });
        }
    }
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
        executor,
        adoptable: Mutex::new(adoptable),
        outcomes: Mutex::new(vec![None; n]),
        hasher: Mutex::new(hasher),
        fail_fast: opts.fail_fast,
        metrics: mtx,
        p,
        priority: g.chain_lengths(),
        g,
        kinds,
        ws,
        registry: registry.clone(),
        run_id,
        cancel,
        sink,
    });

    let mut result = driver.clone().drive(&selected).await;
    if let Err(e) = driver.release_unadopted().await
        && result.is_ok()
    {
        result = Err(e);
    }
    // Close the metrics channel (the driver holds the last sender) and flush.
    let counts = driver.counts(&selected);
    let interrupted = driver.cancel.is_cancelled() && !driver.fail_fast;
    let updates = driver.take_file_stats();
    drop(driver);
    let _ = metrics_task.await;
    registry.save_file_stats(&updates).await?;
    if let Err(e) = result {
        // The engine itself failed (not a stage): close the run as failed.
        let _ = registry.finish_run(run_id, RunStatus::Failed).await;
        return Err(e);
    }
    let bad = [
        StageStatus::Failed,
        StageStatus::Skipped,
        StageStatus::Interrupted,
    ]
    .iter()
    .map(|s| counts.get(s).copied().unwrap_or(0))
    .sum::<usize>();
    let status = if interrupted {
        RunStatus::Interrupted
    } else if bad > 0 {
        RunStatus::Failed
    } else {
        RunStatus::Succeeded
    };
    registry.finish_run(run_id, status).await?;
    // The history into the database file itself: `registry.db` copied or
    // kept alone must hold it, not the write-ahead log beside it.
    if let Err(e) = registry.checkpoint_wal().await {
        finished_sink(&Event::Notice {
            message: format!("folding the registry's write-ahead log into the database: {e}"),
        });
    }
    finished_sink(&Event::RunFinished {
        run_id,
        status,
        counts: counts.clone(),
        seconds: started.elapsed().as_secs_f64(),
    });
    Ok(RunSummary {
        run_id,
        status,
        counts,
    })
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
        params: Value::Object(
            st.params
                .iter()
                .filter(|(name, _)| !kind.unkeyed_params().contains(&name.as_str()))
                .map(|(name, v)| (name.clone(), v.clone()))
                .collect(),
        ),
        inputs,
        deps,
        device: kind
            .device_dependent()
            .then(|| if st.resources.gpus > 0 { "cuda" } else { "cpu" }.to_string()),
    })
}

/// The back-end of run `run_id`: the one place that names each kind. A
/// Slurm back-end's job name is unique to the run and the workspace, so a
/// resumed driver polls the same jobs.
fn executor_for(
    kind: ExecutorKind,
    p: &Pipeline,
    ws: &Workspace,
    opts: &RunOptions,
    run_id: i64,
    exe: std::path::PathBuf,
    notice: Arc<dyn Fn(String) + Send + Sync>,
) -> Box<dyn Executor> {
    match kind {
        ExecutorKind::Local => {
            Box::new(LocalExecutor::new(opts.jobs, opts.gpu_devices.clone(), exe))
        }
        ExecutorKind::Slurm => {
            let ws_tag = blake3::hash(ws.root.as_os_str().as_encoded_bytes()).to_hex();
            Box::new(SlurmExecutor::new(
                p.executor.clone(),
                &format!("{}-r{run_id}", &ws_tag[..10]),
                exe,
                notice,
            ))
        }
    }
}

/// Stage runs a stopped driver left running whose job still runs, by stage
/// key: the resumed driver follows these jobs instead of starting them
/// again. The back-end matches them by stage, key and attempt, so a job
/// submitted just before its driver died, whose id never reached the
/// registry, is found too.
async fn adoptable_jobs(
    registry: &Registry,
    executor: &dyn Executor,
    run_id: i64,
) -> Result<HashMap<String, Adopted>> {
    let rows: Vec<_> = registry
        .running_stage_runs(run_id)
        .await?
        .into_iter()
        .filter(|r| r.worker == executor.name())
        .collect();
    let left: Vec<LeftRunning> = rows
        .iter()
        .map(|r| LeftRunning {
            stage: r.stage.clone(),
            key: r.key.clone(),
            attempt: r.attempt,
        })
        .collect();
    let jobs = executor.still_running(&left).await?;
    let mut found = HashMap::new();
    for (r, job) in rows.iter().zip(jobs) {
        let Some(job) = job else { continue };
        if r.job_id.is_none() {
            registry.set_job_id(r.id, &job).await?;
        }
        found.insert(
            r.key.clone(),
            Adopted {
                row_id: r.id,
                job_id: job,
                attempt: r.attempt,
                log: r.log_path.clone().into(),
            },
        );
    }
    Ok(found)
}
