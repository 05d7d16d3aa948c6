//! The workspace folder (`.haic/` beside the pipeline file by default) and
//! its writer lock.
//!
//! ```text
//! .haic/
//!   registry.db      the experiment registry (SQLite, WAL)
//!   artifacts/       published artifacts, one folder per stage key
//!   scratch/         per stage key: checkpoints, job files, the command sandbox
//!   logs/            one log file per stage attempt
//!   lock             held (flock) by the one process that may write
//!   data-dir         only with `executor.shared_dir`: the folder that holds
//!                    artifacts/, scratch/ and logs/ instead of this one
//! ```
//!
//! With `executor.shared_dir` the stage data lives on a filesystem that
//! cluster nodes share, while the registry and the lock stay here with the
//! driver. The workspace records that folder once (`data-dir`), so every
//! command finds the artifacts; it never moves them.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::cache::ArtifactStore;
use crate::error::{Error, IoContext, Result};

#[derive(Debug, Clone)]
pub struct Workspace {
    pub root: PathBuf,
    /// Where artifacts/, scratch/ and logs/ are: `root`, or the folder that
    /// `root/data-dir` names.
    pub data: PathBuf,
}

const DATA_DIR_FILE: &str = "data-dir";

impl Workspace {
    /// `explicit` (from `--workspace` or `HAIC_WORKSPACE`) or `.haic/` beside the pipeline.
    pub fn locate(pipeline: &Path, explicit: Option<&Path>) -> Result<Workspace> {
        let root = match explicit {
            Some(p) => std::path::absolute(p).ctx(|| format!("resolving {}", p.display()))?,
            None => {
                let abs = std::path::absolute(pipeline)
                    .ctx(|| format!("resolving {}", pipeline.display()))?;
                abs.parent().unwrap_or(Path::new("/")).join(".haic")
            }
        };
        Workspace::open(root)
    }

    /// Without a pipeline file or `--workspace`: the nearest `.haic/` that
    /// holds a registry (or its id: a registry lost beside it is still
    /// that workspace's, for `registry recover`), in `start` (absolute) or
    /// a folder above it, as git finds `.git`. None: an error naming the
    /// workspaces one folder down (`pipelines/.haic` from the repository
    /// root) and how to reach them.
    pub fn find(start: &Path) -> Result<Workspace> {
        for dir in start.ancestors() {
            let root = dir.join(".haic");
            if root.join("registry.db").is_file() || root.join("registry-id").is_file() {
                return Workspace::open(root);
            }
        }
        let mut below: Vec<String> = std::fs::read_dir(start)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().join(".haic/registry.db").is_file())
            .map(|e| {
                let folder = e.file_name().to_string_lossy().into_owned();
                let mut pipelines: Vec<String> = std::fs::read_dir(e.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|f| f.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
                    .collect();
                pipelines.sort();
                match pipelines.first() {
                    Some(p) => format!("`-p {folder}/{p}` ({folder}/.haic)"),
                    None => format!("`--workspace {folder}/.haic`"),
                }
            })
            .collect();
        below.sort();
        let hint = if below.is_empty() {
            "run a pipeline first, or pass `-p PIPELINE` (its workspace is .haic/ beside it) or `--workspace DIR`".to_string()
        } else {
            format!(
                "run a pipeline first, or pass {} for the workspace one folder down",
                below.join(" or ")
            )
        };
        Err(Error::Invalid(format!(
            "no registry in {} or a folder above it: {hint}",
            start.join(".haic").display()
        )))
    }

    /// The workspace at `root` (absolute), reading where its data lives.
    pub fn open(root: PathBuf) -> Result<Workspace> {
        let record = root.join(DATA_DIR_FILE);
        let data = match std::fs::read_to_string(&record) {
            Ok(text) => PathBuf::from(text.trim()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => root.clone(),
            Err(e) => return Err(Error::io(format!("reading {}", record.display()), e)),
        };
        Ok(Workspace { root, data })
    }

    /// Puts this workspace's stage data in `dir` (absolute), recording it
    /// once. Refused when the data already lives elsewhere: nothing moves.
    pub fn use_shared_dir(&mut self, dir: &Path) -> Result<()> {
        if self.data == dir {
            return Ok(());
        }
        let has_artifacts = !self.store().keys()?.is_empty();
        if self.data != self.root || has_artifacts {
            return Err(Error::Invalid(format!(
                "executor.shared_dir is {}, but workspace {} keeps its artifacts in {}; nothing is moved: use a new workspace (--workspace) for the new folder, or set shared_dir back",
                dir.display(),
                self.root.display(),
                self.data.display()
            )));
        }
        std::fs::create_dir_all(&self.root)
            .ctx(|| format!("creating workspace folder {}", self.root.display()))?;
        let record = self.root.join(DATA_DIR_FILE);
        let tmp = self.root.join(format!(".{DATA_DIR_FILE}.tmp"));
        std::fs::write(&tmp, format!("{}\n", dir.display()))
            .ctx(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &record).ctx(|| format!("writing {}", record.display()))?;
        self.data = dir.to_path_buf();
        Ok(())
    }

    pub fn create(&self) -> Result<()> {
        std::fs::create_dir_all(&self.root)
            .ctx(|| format!("creating workspace folder {}", self.root.display()))?;
        for d in ["artifacts/.staging", "scratch", "logs"] {
            let p = self.data.join(d);
            std::fs::create_dir_all(&p)
                .ctx(|| format!("creating workspace folder {}", p.display()))?;
        }
        Ok(())
    }

    pub fn registry_path(&self) -> PathBuf {
        self.root.join("registry.db")
    }

    pub fn store(&self) -> ArtifactStore {
        ArtifactStore::new(self.data.join("artifacts"))
    }

    pub fn scratch(&self, key: &str) -> PathBuf {
        self.data.join("scratch").join(key)
    }

    pub fn logs(&self) -> PathBuf {
        self.data.join("logs")
    }

    /// Takes the writer lock. Without `wait`, fails at once naming the holder.
    pub fn lock(&self, wait: bool) -> Result<WorkspaceLock> {
        std::fs::create_dir_all(&self.root)
            .ctx(|| format!("creating workspace folder {}", self.root.display()))?;
        let path = self.root.join("lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .ctx(|| format!("opening {}", path.display()))?;
        let flags = if wait {
            libc::LOCK_EX
        } else {
            libc::LOCK_EX | libc::LOCK_NB
        };
        // SAFETY: flock on a file descriptor we own; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), flags) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let pid = holder.trim();
                return Err(Error::Locked {
                    workspace: self.root.clone(),
                    pid: if pid.is_empty() {
                        "?".into()
                    } else {
                        pid.to_string()
                    },
                });
            }
            return Err(Error::io(format!("locking {}", path.display()), err));
        }
        file.set_len(0)
            .ctx(|| format!("writing {}", path.display()))?;
        file.rewind()
            .ctx(|| format!("writing {}", path.display()))?;
        write!(file, "{}", std::process::id()).ctx(|| format!("writing {}", path.display()))?;
        Ok(WorkspaceLock { _file: file })
    }
}

/// Held while a process writes the workspace; released on drop or death.
pub struct WorkspaceLock {
    _file: File,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let ws = Workspace::open(dir.path().join(".haic")).unwrap();
        let held = ws.lock(false).unwrap();
        let e = ws.lock(false).err().unwrap().to_string();
        assert!(e.contains(&std::process::id().to_string()), "{e}");
        drop(held);
        ws.lock(false).unwrap();
    }

    #[test]
    fn a_shared_dir_is_recorded_once_and_never_swapped() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join(".haic");
        let shared = dir.path().join("shared");
        let mut ws = Workspace::open(root.clone()).unwrap();
        assert_eq!(ws.data, root);
        ws.use_shared_dir(&shared).unwrap();
        ws.create().unwrap();
        assert!(shared.join("artifacts").is_dir() && !root.join("artifacts").exists());
        let again = Workspace::open(root.clone()).unwrap();
        assert_eq!(again.store().root(), shared.join("artifacts"));
        assert_eq!(again.registry_path(), root.join("registry.db"));
        let mut again = again;
        let e = again
            .use_shared_dir(&dir.path().join("elsewhere"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("keeps its artifacts in") && e.contains("shared"),
            "{e}"
        );

        // A workspace that already has artifacts of its own keeps them there.
        let root2 = dir.path().join(".haic2");
        std::fs::create_dir_all(root2.join("artifacts").join("a".repeat(64))).unwrap();
        let mut ws2 = Workspace::open(root2).unwrap();
        assert!(ws2.use_shared_dir(&shared).is_err());
    }
}
