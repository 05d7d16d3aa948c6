//! Content digests of deps (files and folders), with a stat cache so that an
//! unchanged file is not read again on every run.
//!
//! A file's cached digest is reused only when its size, mtime (ns) and inode
//! all match what was recorded. Files modified in the last two seconds are
//! hashed but not cached: a write in the same mtime tick as our read could
//! otherwise go unnoticed (git's "racy clean" problem).

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::cache::{FileEntry, digest_of_entries, hash_file, list_files};
use crate::error::{IoContext, Result};
use crate::registry::FileStat;

const RACY_NS: i64 = 2_000_000_000;

pub struct DepHasher {
    known: HashMap<String, FileStat>,
    updates: Vec<(String, FileStat)>,
    now_ns: i64,
}

impl DepHasher {
    pub fn new(known: HashMap<String, FileStat>) -> Self {
        let now_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        DepHasher {
            known,
            updates: Vec::new(),
            now_ns,
        }
    }

    /// Digest of a file, or of a folder (its sorted listing of relative paths
    /// and file digests, the same digest an artifact of that folder has).
    pub fn hash_path(&mut self, path: &Path) -> Result<String> {
        let meta = std::fs::metadata(path).ctx(|| format!("reading {}", path.display()))?;
        if !meta.is_dir() {
            return self.hash_file(path, &meta);
        }
        let mut entries = Vec::new();
        for (rel, p) in list_files(path)? {
            let m = std::fs::metadata(&p).ctx(|| format!("reading {}", p.display()))?;
            entries.push(FileEntry {
                digest: self.hash_file(&p, &m)?,
                bytes: m.len(),
                path: rel,
            });
        }
        Ok(digest_of_entries(&entries))
    }

    fn hash_file(&mut self, path: &Path, meta: &std::fs::Metadata) -> Result<String> {
        let key = path.display().to_string();
        let mtime_ns = meta.mtime() * 1_000_000_000 + meta.mtime_nsec();
        let stat = (meta.len() as i64, mtime_ns, meta.ino() as i64);
        if let Some(k) = self.known.get(&key)
            && (k.size, k.mtime_ns, k.inode) == stat
        {
            return Ok(k.digest.clone());
        }
        let digest = hash_file(path)?;
        if self.now_ns - mtime_ns > RACY_NS {
            let fs = FileStat {
                size: stat.0,
                mtime_ns: stat.1,
                inode: stat.2,
                digest: digest.clone(),
            };
            self.known.insert(key.clone(), fs.clone());
            self.updates.push((key, fs));
        }
        Ok(digest)
    }

    /// New or changed cache entries, to be saved in the registry.
    pub fn take_updates(&mut self) -> Vec<(String, FileStat)> {
        std::mem::take(&mut self.updates)
    }
}
