//! Stage keys and the content-addressed artifact store.
//!
//! # When does a stage run again?
//!
//! A stage is *fresh* when an artifact for its current **stage key** is in the
//! store; then it never runs. The key is a blake3 hash (hex, 64 chars) of one
//! canonical JSON document, the *key material*, which the registry keeps
//! beside each stage run so that `haic-pipe status` can say which part
//! changed. The material holds:
//!
//! | part | what | why |
//! | --- | --- | --- |
//! | `kind` | the stage kind (`command`, `train_vq`, ...) | different code |
//! | `version` | the kind's implementation version, bumped by us whenever its output changes for the same inputs | a fixed bug must not be served from cache |
//! | `params` | the resolved params: `${vars}` substituted, then parsed by the kind with every default applied and written back (`StageKind::resolved_params`), keys sorted; for `command` (no defaults) as written plus `cmd` and the list of `outs` | the user's knobs, as the kind reads them: writing a default out (`decay: 0.99`) or `1e-3` for `0.001` changes nothing |
//! | `inputs` | per input name, the **content digest** of the upstream artifact (not the upstream key) | an upstream that re-runs and gives the same bytes does not re-run its dependents (early cut-off) |
//! | `deps` | per dep path, the blake3 digest of the file, or of the folder's listing of relative paths and file digests | the data and scripts the stage reads |
//! | `device` | the device class (`cpu`, `cuda`) for kinds whose results depend on it; absent for the others | GPU and CPU kernels do not give the same bits |
//!
//! Deliberately **not** in the key:
//!
//! | not in the key | why |
//! | --- | --- |
//! | the stage's name | renaming a stage must not throw its results away |
//! | the kind's unkeyed params (`StageKind::unkeyed_params`: `checkpoint_every`, `log_every` of the training kinds) | a resume is bit-exact, so how often a run checkpoints or logs cannot change its output; the registry still records them |
//! | `resources`, `timeout`, `--jobs`, worker slot, cluster back-end, job id | where and how a stage runs does not change what it computes (except the device class, above) |
//! | file modification times | only contents count; mtimes only let us skip re-hashing an unchanged file (the stat cache in the registry's `file_hashes`) |
//! | absolute paths of the pipeline folder or the workspace | moving a project keeps its cache |
//! | the run id, attempt number, wall-clock time, host name | they differ between runs that compute the same thing |
//! | environment variables, tool versions outside haic-pipe | not tracked; a `command` stage that depends on one should name it in its params |
//!
//! Past mistakes to avoid: hashing the upstream *key* instead of its digest
//! loses early cut-off; putting the worker slot or absolute paths in the key
//! makes every machine miss the cache.
//!
//! # The store
//!
//! `artifacts/<key>/` holds `manifest.json` (every file's relative path, size
//! and blake3 digest, and the artifact digest over that list) and `data/`.
//! A stage writes into `artifacts/.staging/<key>.<pid>.<n>/`, and [`ArtifactStore::commit`]
//! publishes it with one `rename`; a half-written artifact is never visible
//! under its key. Published files are made read-only.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, IoContext, Result};

/// Domain separator so that a key can never equal some other blake3 hash.
const KEY_DOMAIN: &[u8] = b"haic-pipe stage key v1\0";

/// Sorts object keys recursively so that equal params hash equally.
pub fn canonical(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let sorted: BTreeMap<&String, Value> =
                m.iter().map(|(k, v)| (k, canonical(v))).collect();
            let mut out = serde_json::Map::new();
            for (k, v) in sorted {
                out.insert(k.clone(), v);
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

/// What changed between two params values, named by dotted path down to
/// the values that differ (`param `quantiser.decay` changed: 0.99 -> 0.9`).
fn param_changes(path: &str, new: &Value, old: &Value, why: &mut Vec<String>) {
    let at = |k: &str| match path {
        "" => k.to_string(),
        _ => format!("{path}.{k}"),
    };
    match (new, old) {
        (Value::Object(n), Value::Object(o)) => {
            for (k, v) in canonical(new).as_object().into_iter().flatten() {
                match o.get(k) {
                    None => why.push(format!("param `{}` added ({v})", at(k))),
                    Some(ov) => param_changes(&at(k), v, ov, why),
                }
            }
            for k in o.keys().filter(|k| !n.contains_key(*k)) {
                why.push(format!("param `{}` removed", at(k)));
            }
        }
        _ if new != old => why.push(format!("param `{path}` changed: {old} -> {new}")),
        _ => {}
    }
}

/// Everything that goes into a stage key (see the module doc).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KeyMaterial {
    pub kind: String,
    pub version: u32,
    pub params: Value,
    pub inputs: BTreeMap<String, String>,
    pub deps: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub device: Option<String>,
}

/// Serialises a JSON value with object keys sorted, without copying it.
struct Canonical<'a>(&'a Value);

impl Serialize for Canonical<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        match self.0 {
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort_unstable();
                let mut map = s.serialize_map(Some(keys.len()))?;
                for k in keys {
                    map.serialize_entry(k, &Canonical(&m[k]))?;
                }
                map.end()
            }
            Value::Array(a) => {
                let mut seq = s.serialize_seq(Some(a.len()))?;
                for v in a {
                    seq.serialize_element(&Canonical(v))?;
                }
                seq.end()
            }
            other => other.serialize(s),
        }
    }
}

/// The key material as it is hashed and stored (field order fixed here).
#[derive(Serialize)]
struct KeyJson<'a> {
    kind: &'a str,
    version: u32,
    params: Canonical<'a>,
    inputs: &'a BTreeMap<String, String>,
    deps: &'a BTreeMap<String, String>,
    device: &'a Option<String>,
}

impl KeyMaterial {
    pub fn to_json(&self) -> String {
        serde_json::to_string(&KeyJson {
            kind: &self.kind,
            version: self.version,
            params: Canonical(&self.params),
            inputs: &self.inputs,
            deps: &self.deps,
            device: &self.device,
        })
        .unwrap_or_default()
    }

    /// The stage key: blake3 over a domain tag and the canonical JSON.
    pub fn key(&self) -> String {
        Self::key_of_json(&self.to_json())
    }

    pub fn key_of_json(json: &str) -> String {
        let mut h = blake3::Hasher::new();
        h.update(KEY_DOMAIN);
        h.update(json.as_bytes());
        h.finalize().to_hex().to_string()
    }

    /// Human-readable reasons why `self` (current) differs from `old`.
    pub fn explain_change(&self, old: &KeyMaterial) -> Vec<String> {
        let mut why = Vec::new();
        if self.kind != old.kind {
            why.push(format!("kind changed: {} -> {}", old.kind, self.kind));
        }
        if self.version != old.version {
            why.push(format!(
                "stage implementation version changed: {} -> {}",
                old.version, self.version
            ));
        }
        param_changes("", &self.params, &old.params, &mut why);
        for (name, d) in &self.deps {
            match old.deps.get(name) {
                None => why.push(format!("dep `{name}` added")),
                Some(od) if od != d => why.push(format!("dep `{name}` changed")),
                _ => {}
            }
        }
        for name in old.deps.keys().filter(|k| !self.deps.contains_key(*k)) {
            why.push(format!("dep `{name}` removed"));
        }
        for (name, d) in &self.inputs {
            match old.inputs.get(name) {
                None => why.push(format!("input `{name}` added")),
                Some(od) if od != d => why.push(format!("input `{name}` changed upstream")),
                _ => {}
            }
        }
        if self.device != old.device {
            why.push(format!(
                "device class changed: {:?} -> {:?}",
                old.device, self.device
            ));
        }
        why
    }
}

/// blake3 of a file's bytes, hex.
pub fn hash_file(path: &Path) -> Result<String> {
    let mut f = fs::File::open(path).ctx(|| format!("opening {}", path.display()))?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f
            .read(&mut buf)
            .ctx(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().to_hex().to_string())
}

/// One file of an artifact or a dep folder.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileEntry {
    pub path: String,
    pub bytes: u64,
    pub digest: String,
}

/// Lists the regular files under `root` (sorted relative paths). Symbolic links are followed.
pub fn list_files(root: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    let mut stack = vec![(String::new(), root.to_path_buf())];
    while let Some((rel, dir)) = stack.pop() {
        let rd = fs::read_dir(&dir).ctx(|| format!("listing {}", dir.display()))?;
        for entry in rd {
            let entry = entry.ctx(|| format!("listing {}", dir.display()))?;
            let name = entry.file_name();
            let name = name.to_str().ok_or_else(|| {
                Error::Invalid(format!(
                    "{}: file name is not valid UTF-8",
                    entry.path().display()
                ))
            })?;
            let child_rel = if rel.is_empty() {
                name.to_string()
            } else {
                format!("{rel}/{name}")
            };
            let path = entry.path();
            let meta = fs::metadata(&path).ctx(|| format!("reading {}", path.display()))?;
            if meta.is_dir() {
                stack.push((child_rel, path));
            } else {
                out.push((child_rel, path));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Digest over a list of entries: the identity of an artifact's contents.
pub fn digest_of_entries(files: &[FileEntry]) -> String {
    let mut h = blake3::Hasher::new();
    for f in files {
        h.update(f.path.as_bytes());
        h.update(b"\0");
        h.update(f.digest.as_bytes());
        h.update(b"\n");
    }
    h.finalize().to_hex().to_string()
}

/// What `artifacts/<key>/manifest.json` holds. `params` and `inputs` make
/// the store describe itself: `registry recover` rebuilds stage runs and
/// lineage from them (manifests written before they existed lack them).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub key: String,
    pub stage: String,
    pub kind: String,
    pub digest: String,
    pub bytes: u64,
    pub files: Vec<FileEntry>,
    /// The stage's resolved params.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub params: Value,
    /// Input name -> the key of the artifact read.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub inputs: BTreeMap<String, String>,
}

/// Who made an artifact, as its manifest records it, and the metric points
/// its stage reported (kept beside the manifest in [`METRIC_POINTS_FILE`]).
#[derive(Debug, Clone, Copy)]
pub struct Provenance<'a> {
    pub stage: &'a str,
    pub kind: &'a str,
    pub params: &'a Value,
    pub inputs: &'a BTreeMap<String, String>,
    pub metrics: &'a [MetricRecord],
}

/// `artifacts/<key>/metric-points.json`: the points the attempt that
/// published the artifact reported (an attempt resumed from a checkpoint
/// holds its own points only). Outside `data/`, so not in the digest: the
/// values include timings.
pub const METRIC_POINTS_FILE: &str = "metric-points.json";

/// One metric point as a stage reported it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricRecord {
    pub name: String,
    pub step: i64,
    pub value: f64,
}

/// A staging folder: write into [`Staging::data`], then [`ArtifactStore::commit`].
#[derive(Debug)]
pub struct Staging {
    pub key: String,
    pub root: PathBuf,
}

impl Staging {
    pub fn data(&self) -> PathBuf {
        self.root.join("data")
    }
}

#[derive(Debug, Clone)]
pub struct ArtifactStore {
    root: PathBuf,
}

static STAGING_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A relative path of plain names (no `..`, `.`, root or prefix).
fn is_plain_relative(path: &str) -> bool {
    !path.is_empty()
        && Path::new(path)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
}

fn is_key(key: &str) -> bool {
    key.len() == 64 && key.bytes().all(|b| b.is_ascii_hexdigit())
}

impl ArtifactStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        ArtifactStore { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn dir(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    pub fn data_dir(&self, key: &str) -> PathBuf {
        self.root.join(key).join("data")
    }

    /// The manifest of a published artifact, or `None` if there is none.
    /// A manifest that cannot be read means a damaged artifact: an
    /// [`Error::Artifact`] (the driver sets it aside and runs the stage again).
    pub fn manifest(&self, key: &str) -> Result<Option<Manifest>> {
        let path = self.dir(key).join("manifest.json");
        let damaged = |why: String| Error::Artifact {
            key: key.to_string(),
            message: format!("{} is damaged ({why})", path.display()),
        };
        match fs::read(&path) {
            Ok(bytes) => {
                let m: Manifest =
                    serde_json::from_slice(&bytes).map_err(|e| damaged(e.to_string()))?;
                // Its paths are joined to the data folder: never a way out.
                if let Some(f) = m.files.iter().find(|f| !is_plain_relative(&f.path)) {
                    return Err(damaged(format!(
                        "file `{}` is not a path inside data/",
                        f.path
                    )));
                }
                Ok(Some(m))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
        }
    }

    pub fn begin(&self, key: &str) -> Result<Staging> {
        let n = STAGING_COUNTER.fetch_add(1, Ordering::Relaxed);
        let root = self
            .root
            .join(".staging")
            .join(format!("{key}.{}.{n}", std::process::id()));
        if root.exists() {
            fs::remove_dir_all(&root).ctx(|| format!("clearing {}", root.display()))?;
        }
        fs::create_dir_all(root.join("data")).ctx(|| format!("creating {}", root.display()))?;
        Ok(Staging {
            key: key.to_string(),
            root,
        })
    }

    /// Hashes the staged files, writes the manifest and publishes the artifact
    /// with one rename. If another process published the same key first, its
    /// artifact is kept and this staging folder is dropped.
    pub fn commit(&self, staging: Staging, made_by: Provenance<'_>) -> Result<Manifest> {
        let data = staging.data();
        let mut files = Vec::new();
        for (rel, path) in list_files(&data)? {
            let meta = fs::metadata(&path).ctx(|| format!("reading {}", path.display()))?;
            files.push(FileEntry {
                digest: hash_file(&path)?,
                bytes: meta.len(),
                path: rel,
            });
            let mut perm = meta.permissions();
            perm.set_readonly(true);
            fs::set_permissions(&path, perm).ctx(|| format!("protecting {}", path.display()))?;
        }
        let manifest = Manifest {
            key: staging.key.clone(),
            stage: made_by.stage.to_string(),
            kind: made_by.kind.to_string(),
            digest: digest_of_entries(&files),
            bytes: files.iter().map(|f| f.bytes).sum(),
            files,
            params: made_by.params.clone(),
            inputs: made_by.inputs.clone(),
        };
        let points = staging.root.join(METRIC_POINTS_FILE);
        let text = serde_json::to_vec(made_by.metrics).unwrap_or_default();
        fs::write(&points, text).ctx(|| format!("writing {}", points.display()))?;
        let mpath = staging.root.join("manifest.json");
        let text = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
        fs::write(&mpath, text).ctx(|| format!("writing {}", mpath.display()))?;
        let target = self.dir(&staging.key);
        match fs::rename(&staging.root, &target) {
            Ok(()) => Ok(manifest),
            Err(_) if target.join("manifest.json").exists() => {
                let _ = remove_tree(&staging.root);
                self.manifest(&staging.key)?.ok_or_else(|| Error::Artifact {
                    key: staging.key.clone(),
                    message: "vanished while publishing".into(),
                })
            }
            Err(e) => Err(Error::io(
                format!(
                    "publishing {} as {}",
                    staging.root.display(),
                    target.display()
                ),
                e,
            )),
        }
    }

    /// The metric points recorded with an artifact; none for one published
    /// before they were kept, or whose file is unreadable.
    pub fn metric_points(&self, key: &str) -> Vec<MetricRecord> {
        fs::read(self.dir(key).join(METRIC_POINTS_FILE))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    /// Re-hashes every file of an artifact against its manifest.
    pub fn verify(&self, key: &str) -> Result<Manifest> {
        let m = self.manifest(key)?.ok_or_else(|| Error::Artifact {
            key: key.to_string(),
            message: "not in the store".into(),
        })?;
        for f in &m.files {
            let path = self.data_dir(key).join(&f.path);
            let d = hash_file(&path)?;
            if d != f.digest {
                return Err(Error::Artifact {
                    key: key.to_string(),
                    message: format!("{} does not match its recorded digest", path.display()),
                });
            }
        }
        Ok(m)
    }

    /// Moves a damaged artifact out of the store (to `.damaged/KEY-N`), so
    /// that its key is missing and its stage runs again. Returns where.
    pub fn set_aside(&self, key: &str) -> Result<PathBuf> {
        let dir = self.root.join(".damaged");
        fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        let mut n = 0;
        let target = loop {
            let t = dir.join(format!("{key}-{n}"));
            if !t.exists() {
                break t;
            }
            n += 1;
        };
        let from = self.dir(key);
        fs::rename(&from, &target)
            .ctx(|| format!("moving {} to {}", from.display(), target.display()))?;
        Ok(target)
    }

    /// Keys of every published artifact.
    pub fn keys(&self) -> Result<Vec<String>> {
        let mut keys = Vec::new();
        let rd = match fs::read_dir(&self.root) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(keys),
            Err(e) => return Err(Error::io(format!("listing {}", self.root.display()), e)),
        };
        for entry in rd.flatten() {
            if let Some(name) = entry.file_name().to_str()
                && is_key(name)
            {
                keys.push(name.to_string());
            }
        }
        keys.sort();
        Ok(keys)
    }

    /// Removes an artifact: renamed aside first so that it vanishes at once.
    pub fn remove(&self, key: &str) -> Result<u64> {
        let dir = self.dir(key);
        let bytes = self
            .manifest(key)
            .ok()
            .flatten()
            .map(|m| m.bytes)
            .unwrap_or(0);
        let trash = self
            .root
            .join(".staging")
            .join(format!("trash.{key}.{}", std::process::id()));
        fs::create_dir_all(self.root.join(".staging")).ctx(|| "creating staging".into())?;
        fs::rename(&dir, &trash).ctx(|| format!("removing {}", dir.display()))?;
        remove_tree(&trash)?;
        Ok(bytes)
    }
}

/// Removes a tree even where files were made read-only.
pub fn remove_tree(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(_) => {
            make_writable(path);
            fs::remove_dir_all(path).ctx(|| format!("removing {}", path.display()))
        }
    }
}

fn make_writable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = fs::symlink_metadata(path) {
        if meta.file_type().is_symlink() {
            return;
        }
        let mut perm = meta.permissions();
        perm.set_mode(perm.mode() | 0o200);
        let _ = fs::set_permissions(path, perm);
        if meta.is_dir()
            && let Ok(rd) = fs::read_dir(path)
        {
            for e in rd.flatten() {
                make_writable(&e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_naming_a_file_outside_its_data_folder_is_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::new(dir.path().join("artifacts"));
        let key = "c".repeat(64);
        fs::create_dir_all(store.data_dir(&key)).unwrap();
        for (path, damaged) in [
            ("../../etc/passwd", true),
            ("/etc/passwd", true),
            ("a/./b", false),
            ("", true),
            ("images/x.png", false),
            ("images/../../x", true),
        ] {
            let text = serde_json::json!({"key": key, "stage": "s", "kind": "k", "digest": "d",
                "bytes": 1, "files": [{"path": path, "bytes": 1, "digest": "d"}]});
            fs::write(store.dir(&key).join("manifest.json"), text.to_string()).unwrap();
            match store.manifest(&key) {
                Err(Error::Artifact { message, .. }) if damaged => {
                    assert!(message.contains("is not a path inside data/"), "{message}")
                }
                Ok(Some(_)) if !damaged => {}
                other => panic!("{path}: {other:?}"),
            }
        }
    }

    #[test]
    fn canonical_params_hash_equal() {
        let a = KeyMaterial {
            kind: "command".into(),
            version: 1,
            params: serde_json::json!({"b": 1, "a": {"y": 2, "x": 3}}),
            inputs: BTreeMap::new(),
            deps: BTreeMap::new(),
            device: None,
        };
        let mut b = a.clone();
        b.params = serde_json::json!({"a": {"x": 3, "y": 2}, "b": 1});
        assert_eq!(a.key(), b.key());
        b.params = serde_json::json!({"a": {"x": 3, "y": 2}, "b": 2});
        assert_ne!(a.key(), b.key());
        assert_eq!(b.explain_change(&a), vec!["param `b` changed: 1 -> 2"]);
    }

    #[test]
    fn commit_is_all_or_nothing_and_readonly() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::new(dir.path().join("artifacts"));
        let key = "a".repeat(64);
        let st = store.begin(&key).unwrap();
        fs::write(st.data().join("x.txt"), b"hello").unwrap();
        assert!(
            store.manifest(&key).unwrap().is_none(),
            "staged is not visible"
        );
        let params = serde_json::json!({"n": 1});
        let inputs = BTreeMap::from([("src".to_string(), "b".repeat(64))]);
        let made_by = Provenance {
            stage: "s",
            kind: "command",
            params: &params,
            inputs: &inputs,
            metrics: &[MetricRecord {
                name: "loss".into(),
                step: 3,
                value: 0.5,
            }],
        };
        let m = store.commit(st, made_by).unwrap();
        assert_eq!(m.files.len(), 1);
        assert_eq!(m.bytes, 5);
        let read = store.manifest(&key).unwrap().unwrap();
        assert_eq!(read.digest, m.digest);
        assert_eq!((&read.params, &read.inputs), (&params, &inputs));
        assert_eq!(store.metric_points(&key), made_by.metrics);
        let meta = fs::metadata(store.data_dir(&key).join("x.txt")).unwrap();
        assert!(meta.permissions().readonly());
        store.verify(&key).unwrap();
        assert_eq!(store.keys().unwrap(), vec![key.clone()]);
        store.remove(&key).unwrap();
        assert!(store.keys().unwrap().is_empty());
    }
}
