//! `haic-pipe gc`: removes the artifacts that none of the newest runs
//! produced or read, from the store and from the registry.

use std::collections::HashSet;

use crate::error::{Error, Result};
use crate::registry::Registry;
use crate::workspace::Workspace;

/// One artifact `gc` removed (or would remove).
#[derive(Debug, Clone)]
pub struct Collected {
    pub key: String,
    pub bytes: u64,
}

/// Removes every artifact that none of the newest `keep_runs` runs produced
/// or read (only lists them when `dry_run`), calling `each` for each one.
/// Holds the workspace lock, so it never runs beside a `run`.
pub async fn collect(
    ws: &Workspace,
    keep_runs: i64,
    dry_run: bool,
    mut each: impl FnMut(&Collected),
) -> Result<Vec<Collected>> {
    if !ws.registry_path().exists() {
        return Err(Error::Invalid(format!(
            "{}: no registry here; nothing to collect",
            ws.root.display()
        )));
    }
    let _lock = ws.lock(false)?;
    let registry = Registry::open(&ws.registry_path()).await?;
    let keep: HashSet<String> = registry
        .keys_in_recent_runs(keep_runs.max(1))
        .await?
        .into_iter()
        .collect();
    let store = ws.store();
    let mut removed = Vec::new();
    for key in store.keys()? {
        if keep.contains(&key) {
            continue;
        }
        let bytes = store
            .manifest(&key)
            .ok()
            .flatten()
            .map(|m| m.bytes)
            .unwrap_or(0);
        let item = Collected { key, bytes };
        each(&item);
        if !dry_run {
            store.remove(&item.key)?;
            registry.forget_artifact(&item.key).await?;
        }
        removed.push(item);
    }
    registry.checkpoint_wal().await?;
    Ok(removed)
}
