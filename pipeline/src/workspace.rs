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
//! ```

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::cache::ArtifactStore;
use crate::error::{Error, IoContext, Result};

#[derive(Debug, Clone)]
pub struct Workspace {
    pub root: PathBuf,
}

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
        Ok(Workspace { root })
    }

    pub fn create(&self) -> Result<()> {
        for d in ["artifacts/.staging", "scratch", "logs"] {
            let p = self.root.join(d);
            std::fs::create_dir_all(&p)
                .ctx(|| format!("creating workspace folder {}", p.display()))?;
        }
        Ok(())
    }

    pub fn registry_path(&self) -> PathBuf {
        self.root.join("registry.db")
    }

    pub fn store(&self) -> ArtifactStore {
        ArtifactStore::new(self.root.join("artifacts"))
    }

    pub fn scratch(&self, key: &str) -> PathBuf {
        self.root.join("scratch").join(key)
    }

    pub fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }

    /// Takes the writer lock. Without `wait`, fails at once naming the holder.
    pub fn lock(&self, wait: bool) -> Result<WorkspaceLock> {
        self.create()?;
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
        let ws = Workspace {
            root: dir.path().join(".haic"),
        };
        let held = ws.lock(false).unwrap();
        let e = ws.lock(false).err().unwrap().to_string();
        assert!(e.contains(&std::process::id().to_string()), "{e}");
        drop(held);
        ws.lock(false).unwrap();
    }
}
