//! `haic-pipe status`: per stage, is it cached, stale (and why), running or failed?
//! Reads only; starts nothing and writes nothing.

use std::path::PathBuf;

use serde::Serialize;

use crate::cache::KeyMaterial;
use crate::error::Result;
use crate::graph::Graph;
use crate::hashing::DepHasher;
use crate::registry::{KeyedRun, Registry, StageStatus};
use crate::run::stage_material;
use crate::spec::Pipeline;
use crate::stage::Kinds;
use crate::workspace::Workspace;

/// Where a stage stands for the pipeline as it is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Freshness {
    /// Its artifact for the current key is in the store.
    Cached,
    /// It must run (see `why`).
    Stale,
    /// A live driver runs it now.
    Running,
    /// A driver that is gone was running it.
    Interrupted,
    /// Its last run with the current key failed.
    Failed,
}

impl Freshness {
    pub fn as_str(self) -> &'static str {
        match self {
            Freshness::Cached => "cached",
            Freshness::Stale => "stale",
            Freshness::Running => "running",
            Freshness::Interrupted => "interrupted",
            Freshness::Failed => "failed",
        }
    }
}

impl std::fmt::Display for Freshness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `pad`, so that a width in the format string applies.
        f.pad(self.as_str())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct StageState {
    pub stage: String,
    pub state: Freshness,
    pub why: Vec<String>,
    pub key: Option<String>,
    pub artifact: Option<PathBuf>,
}

pub async fn status(
    p: &Pipeline,
    g: &Graph,
    kinds: &Kinds,
    ws: &Workspace,
) -> Result<Vec<StageState>> {
    let registry = if ws.registry_path().exists() {
        Some(Registry::open(&ws.registry_path()).await?)
    } else {
        None
    };
    let known = match &registry {
        Some(r) => r.load_file_stats().await?,
        None => Default::default(),
    };
    let mut hasher = DepHasher::new(known);
    let store = ws.store();
    let mut digests: Vec<Option<String>> = vec![None; p.stages.len()];
    let mut out: Vec<Option<StageState>> = vec![None; p.stages.len()];
    for &i in &g.order {
        let st = &p.stages[i];
        let stale_up: Vec<&str> = g.upstream[i]
            .iter()
            .filter(|&&u| digests[u].is_none())
            .map(|&u| p.stages[u].name.as_str())
            .collect();
        let mut state = StageState {
            stage: st.name.clone(),
            state: Freshness::Stale,
            why: Vec::new(),
            key: None,
            artifact: None,
        };
        if !stale_up.is_empty() {
            state
                .why
                .push(format!("upstream not up to date: {}", stale_up.join(", ")));
            out[i] = Some(state);
            continue;
        }
        let material = match stage_material(p, kinds, i, &|j| digests[j].clone(), &mut hasher) {
            Ok(m) => m,
            Err(e) => {
                state.why.push(e);
                out[i] = Some(state);
                continue;
            }
        };
        let key = material.key();
        state.key = Some(key.clone());
        if let Err(e) = crate::outs::check_destinations(p, st) {
            // What `run` would fail on: it could not restore the outs.
            state.state = Freshness::Failed;
            state.why.push(e.to_string());
            out[i] = Some(state);
            continue;
        }
        match store.manifest(&key) {
            Ok(Some(m)) => {
                digests[i] = Some(m.digest);
                state.state = Freshness::Cached;
                state.artifact = Some(store.data_dir(&key));
                out[i] = Some(state);
                continue;
            }
            Ok(None) => {}
            Err(crate::Error::Artifact { message, .. }) => {
                state.why.push(format!(
                    "{message}; the next run sets it aside and makes it again"
                ));
                out[i] = Some(state);
                continue;
            }
            Err(e) => return Err(e),
        }
        let last = match &registry {
            Some(r) => r.last_for_key(&st.name, &key).await?,
            None => None,
        };
        if let Some(KeyedRun {
            id,
            status: StageStatus::Interrupted,
            run_id: run,
            ..
        }) = &last
        {
            // Stopped (Ctrl-C, a killed driver found by a later run): how
            // far it got and where a run picks it up.
            state.state = Freshness::Interrupted;
            let at = match registry.as_ref() {
                Some(r) => r.last_metric_step(*id).await?,
                None => None,
            };
            let from = crate::stage::newest_checkpoint_step(&ws.scratch(&key));
            state.why.push(match (at, from) {
                (Some(at), Some(c)) => format!(
                    "interrupted in run {run} at step {at}; resumes from the checkpoint at step {c}"
                ),
                (None, Some(c)) => {
                    format!("interrupted in run {run}; resumes from the checkpoint at step {c}")
                }
                (Some(at), None) => format!(
                    "interrupted in run {run} at step {at}; no checkpoint yet, so it starts over"
                ),
                (None, None) => format!("interrupted in run {run}; it starts over"),
            });
        } else if let Some(KeyedRun {
            status: s @ (StageStatus::Running | StageStatus::Failed),
            error,
            run_id: run,
            driver_pid,
            ..
        }) = &last
        {
            let driver_alive = driver_pid.is_some_and(is_haic_process);
            state.state = match s {
                StageStatus::Running if driver_alive => Freshness::Running,
                StageStatus::Running => Freshness::Interrupted,
                _ => Freshness::Failed,
            };
            state.why.push(match (state.state, error) {
                (Freshness::Failed, Some(e)) => format!("failed in run {run}: {e}"),
                (Freshness::Interrupted, _) => {
                    format!("run {run}'s driver is gone; `haic-pipe run --resume` continues it")
                }
                _ => format!("in run {run}"),
            });
        } else {
            let previous = match &registry {
                Some(r) => r.last_material(&st.name).await?,
                None => None,
            };
            match previous.and_then(|t| serde_json::from_str::<KeyMaterial>(&t).ok()) {
                Some(old) => {
                    let why = material.explain_change(&old);
                    if why.is_empty() {
                        state
                            .why
                            .push("its artifact is no longer in the store".into());
                    } else {
                        state.why.extend(why);
                    }
                }
                None => state.why.push("never run".into()),
            }
        }
        out[i] = Some(state);
    }
    Ok(g.order.iter().filter_map(|&i| out[i].take()).collect())
}

/// Whether `pid` is a live haic-pipe process (a driver that may still write).
fn is_haic_process(pid: i64) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains("haic-pipe"))
        .unwrap_or(false)
}
