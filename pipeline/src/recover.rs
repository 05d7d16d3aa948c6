//! `haic-pipe registry recover`: the registry's record of what exists,
//! rebuilt from the artifact store when the registry file is lost or
//! damaged.
//!
//! Every published artifact's `manifest.json` names its stage, kind,
//! resolved params and the keys of the inputs it was made from, and
//! `metric-points.json` beside it holds the metric points its stage
//! reported. From them `recover` writes a new registry with one run (named
//! `recovered`) holding one succeeded stage run per artifact, in dependency
//! order: its params, metrics, the artifact row and its lineage. The old
//! file and its `-wal` and `-shm` are renamed aside, never deleted, and the
//! workspace keeps its identity (`registry-id`), so the next `run` finds
//! every stage whose artifact exists cached.
//!
//! Gone with the old file: the runs themselves (their order, names, tags,
//! overrides), failed and interrupted attempts, cached stage rows, timings,
//! and human-evaluation answers. Artifacts published before manifests
//! recorded params and inputs come back without them (counted).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::cache::Manifest;
use crate::error::{Error, IoContext, Result};
use crate::registry::{
    MetricPoint, NewStageRun, Registry, RunLabel, RunStatus, StageStatus, identity_file,
};
use crate::workspace::Workspace;

/// What `recover` rebuilt.
#[derive(Debug, Clone)]
pub struct Recovered {
    pub run_id: i64,
    pub artifacts: usize,
    pub lineage: usize,
    pub metric_points: usize,
    /// Artifacts whose manifest predates params and inputs.
    pub without_provenance: usize,
    /// Keys whose manifest cannot be read (the next run sets them aside).
    pub unreadable: Vec<String>,
    /// Where the replaced registry files went.
    pub set_aside: Vec<PathBuf>,
}

/// The registry file and the two SQLite keeps beside it.
const REGISTRY_FILES: [&str; 3] = ["", "-wal", "-shm"];

/// Rebuilds the registry of `ws` from its artifact store. `pipeline` (the
/// file the artifacts came from) is what the recovered run names; a
/// registry that opens and passes its check is replaced only with `force`.
/// Holds the workspace lock, so it never runs beside a `run`.
pub async fn recover(ws: &Workspace, pipeline: Option<&Path>, force: bool) -> Result<Recovered> {
    let _lock = ws.lock(false)?;
    let path = ws.registry_path();
    let has_file = std::fs::metadata(&path).is_ok_and(|m| m.len() > 0);
    if has_file
        && !force
        && let Ok(healthy) = Registry::open(&path).await
    {
        let runs = healthy.run_count().await?;
        healthy.close().await?;
        return Err(Error::Invalid(format!(
            "{} opens and passes its integrity check ({runs} run(s)): nothing to recover. To rebuild it from the artifact store anyway, pass --force (the current file is kept beside it)",
            path.display()
        )));
    }
    let store = ws.store();
    let mut manifests = BTreeMap::new();
    let mut unreadable = Vec::new();
    for key in store.keys()? {
        match store.manifest(&key) {
            Ok(Some(m)) if m.key == key => {
                manifests.insert(key, m);
            }
            Ok(None) => {} // a folder without a manifest was never published
            Ok(Some(_)) | Err(_) => unreadable.push(key),
        }
    }
    let id = std::fs::read_to_string(identity_file(&path))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| crate::registry::fresh_identity(&path));
    let fresh = path.with_file_name("registry.db.recovering");
    for suffix in REGISTRY_FILES {
        let f = suffixed(&fresh, suffix);
        if f.exists() {
            std::fs::remove_file(&f).ctx(|| format!("removing {}", f.display()))?;
        }
    }
    let registry = Registry::create_with_identity(&fresh, &id).await?;
    let mut summary = fill(&registry, &store, &manifests, pipeline).await?;
    summary.unreadable = unreadable;
    registry.close().await?;

    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let aside = |from: &Path, n: u32| {
        let tail = if n == 0 {
            String::new()
        } else {
            format!("-{n}")
        };
        suffixed(from, &format!(".before-recover-{secs}{tail}"))
    };
    let files = REGISTRY_FILES.map(|suffix| suffixed(&path, suffix));
    // One name for the files kept, taken by none of them yet.
    let n = (0..)
        .find(|&n| files.iter().all(|f| !aside(f, n).exists()))
        .unwrap_or(0);
    for (i, from) in files.iter().enumerate() {
        let Ok(meta) = std::fs::metadata(from) else {
            continue;
        };
        // The -shm is an index SQLite rebuilds; an empty -wal holds nothing.
        // Neither may stay to be read with the new file.
        let keep = i == 0 || (i == 1 && meta.len() > 0);
        if keep {
            let to = aside(from, n);
            std::fs::rename(from, &to)
                .ctx(|| format!("moving {} aside to {}", from.display(), to.display()))?;
            summary.set_aside.push(to);
        } else {
            std::fs::remove_file(from).ctx(|| format!("removing {}", from.display()))?;
        }
    }
    std::fs::rename(&fresh, &path)
        .ctx(|| format!("putting {} in place as {}", fresh.display(), path.display()))?;
    // Opening it checks it and writes the identity beside it if missing.
    Registry::open(&path).await?.close().await?;
    Ok(summary)
}

/// `path` with `suffix` added to its file name (`registry.db` + `-wal`).
fn suffixed(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Writes the recovered run into `registry`.
async fn fill(
    registry: &Registry,
    store: &crate::cache::ArtifactStore,
    manifests: &BTreeMap<String, Manifest>,
    pipeline: Option<&Path>,
) -> Result<Recovered> {
    let (name, digest) = match pipeline {
        Some(p) => {
            let abs = std::path::absolute(p).ctx(|| format!("resolving {}", p.display()))?;
            let digest = std::fs::read(&abs)
                .map(|t| blake3::hash(&t).to_hex().to_string())
                .unwrap_or_default();
            (abs.display().to_string(), digest)
        }
        None => (
            "(recovered from the artifact store)".to_string(),
            String::new(),
        ),
    };
    let run_id = registry.begin_run(&name, &digest, "").await?;
    let label = RunLabel {
        name: Some("recovered".into()),
        note: Some(format!(
            "rebuilt by `haic-pipe registry recover` from {} artifact(s) in the store; earlier runs, attempts and timings are not recorded",
            manifests.len()
        )),
        ..RunLabel::default()
    };
    registry.label_run(run_id, &label).await?;
    let mut summary = Recovered {
        run_id,
        artifacts: 0,
        lineage: 0,
        metric_points: 0,
        without_provenance: 0,
        unreadable: Vec::new(),
        set_aside: Vec::new(),
    };
    for key in dependency_order(manifests) {
        let m = &manifests[&key];
        let row = NewStageRun {
            key: Some(&m.key),
            worker: Some("recovered"),
            ..NewStageRun::new(run_id, &m.stage, &m.kind, StageStatus::Running)
        };
        let id = registry.start_stage_run(&row, &m.params).await?;
        let lineage: Vec<(String, String)> = m
            .inputs
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let at = store.dir(&key).display().to_string();
        registry.record_artifact(id, m, &at, &lineage).await?;
        let points: Vec<MetricPoint> = store
            .metric_points(&key)
            .into_iter()
            .map(|p| MetricPoint {
                stage_run_id: id,
                name: p.name,
                step: p.step,
                value: p.value,
                at: None,
            })
            .collect();
        if !points.is_empty() {
            registry.insert_metrics(&points).await?;
        }
        registry
            .finish_stage_run(id, StageStatus::Succeeded, None)
            .await?;
        summary.artifacts += 1;
        summary.lineage += lineage.len();
        summary.metric_points += points.len();
        if m.params.is_null() {
            summary.without_provenance += 1;
        }
    }
    registry.finish_run(run_id, RunStatus::Succeeded).await?;
    Ok(summary)
}

/// Keys ordered so that each comes after the inputs it names that are in
/// the store; ties by stage name, then key.
fn dependency_order(manifests: &BTreeMap<String, Manifest>) -> Vec<String> {
    let mut waiting: BTreeMap<&str, usize> = BTreeMap::new();
    let mut readers: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (key, m) in manifests {
        let inside: BTreeSet<&str> = m
            .inputs
            .values()
            .map(String::as_str)
            .filter(|k| manifests.contains_key(*k) && *k != key)
            .collect();
        waiting.insert(key, inside.len());
        for input in inside {
            readers.entry(input).or_default().push(key);
        }
    }
    let mut ready: BTreeSet<(&str, &str)> = waiting
        .iter()
        .filter(|(_, n)| **n == 0)
        .map(|(k, _)| (manifests[*k].stage.as_str(), *k))
        .collect();
    let mut order = Vec::with_capacity(manifests.len());
    while let Some(next) = ready.pop_first() {
        let key = next.1;
        order.push(key.to_string());
        for reader in readers.get(key).into_iter().flatten() {
            if let Some(n) = waiting.get_mut(reader) {
                *n -= 1;
                if *n == 0 {
                    ready.insert((manifests[*reader].stage.as_str(), reader));
                }
            }
        }
    }
    // Inputs naming each other (only a hand-edited store can) come last.
    for key in manifests.keys() {
        if !order.contains(key) {
            order.push(key.clone());
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(key: &str, stage: &str, inputs: &[(&str, &str)]) -> Manifest {
        Manifest {
            key: key.into(),
            stage: stage.into(),
            kind: "command".into(),
            digest: String::new(),
            bytes: 0,
            files: Vec::new(),
            params: serde_json::Value::Null,
            inputs: inputs
                .iter()
                .map(|(n, k)| (n.to_string(), k.to_string()))
                .collect(),
        }
    }

    #[test]
    fn inputs_come_before_their_readers_whatever_the_names() {
        let all: BTreeMap<String, Manifest> = [
            manifest("1", "a_last", &[("x", "3"), ("gone", "9")]),
            manifest("2", "b", &[]),
            manifest("3", "c", &[("x", "2")]),
            manifest("4", "loop", &[("x", "5")]),
            manifest("5", "loop2", &[("x", "4")]),
        ]
        .into_iter()
        .map(|m| (m.key.clone(), m))
        .collect();
        assert_eq!(dependency_order(&all), ["2", "3", "1", "4", "5"]);
    }
}
