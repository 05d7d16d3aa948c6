//! Command stages' outs in the pipeline folder: restored from the artifact
//! store after a stage succeeds or is found cached (DVC's checkout), unless
//! they are there already with the same contents. Each out appears by one
//! rename, never half-written.

use std::path::Path;
use std::sync::Mutex;

use crate::cache::{ArtifactStore, FileEntry, Manifest, digest_of_entries};
use crate::error::{Error, IoContext, Result};
use crate::hashing::DepHasher;
use crate::spec::{Pipeline, Stage};

/// Copies `stage`'s outs from artifact `m` into the pipeline folder where they differ.
pub fn restore(
    p: &Pipeline,
    stage: &Stage,
    store: &ArtifactStore,
    m: &Manifest,
    hasher: &Mutex<DepHasher>,
) -> Result<()> {
    for out in &stage.outs {
        let dst = p.dir.join(out);
        let prefix = format!("{out}/");
        let entries: Vec<&FileEntry> = m
            .files
            .iter()
            .filter(|f| f.path == *out || f.path.starts_with(&prefix))
            .collect();
        let want = if entries.len() == 1 && entries[0].path == *out {
            entries[0].digest.clone()
        } else {
            // A folder out: the digest of its listing, as DepHasher computes it.
            let rel: Vec<FileEntry> = entries
                .iter()
                .map(|f| FileEntry {
                    path: f.path[prefix.len()..].to_string(),
                    ..(*f).clone()
                })
                .collect();
            digest_of_entries(&rel)
        };
        if dst.exists() {
            let mut h = hasher
                .lock()
                .map_err(|_| Error::Invalid("hasher poisoned".into()))?;
            if h.hash_path(&dst).ok().as_deref() == Some(want.as_str()) {
                continue;
            }
        }
        stays_inside(&p.dir, &dst, out)?;
        copy_into_place(&store.data_dir(&m.key).join(out), &dst)?;
    }
    Ok(())
}

/// Whether every out of `stage` can be restored where it is declared: no
/// folder on the way is a symlink leading out of the pipeline folder.
/// Checked before a stage runs, so nothing is stored that could never be
/// restored, and by `status`, so that it and `run` agree.
pub fn check_destinations(p: &Pipeline, stage: &Stage) -> Result<()> {
    if !stage.restore_outs {
        return Ok(());
    }
    for out in &stage.outs {
        stays_inside(&p.dir, &p.dir.join(out), out)?;
    }
    Ok(())
}

/// An out's path is inside the pipeline folder (the spec refuses `..` and
/// absolute paths), but a folder on the way may be a symlink that leads
/// elsewhere; nothing is written through one.
fn stays_inside(root: &Path, dst: &Path, out: &str) -> Result<()> {
    let mut existing = dst.parent().unwrap_or(root);
    while !existing.exists() {
        match existing.parent() {
            Some(up) => existing = up,
            None => break,
        }
    }
    let real = existing
        .canonicalize()
        .ctx(|| format!("resolving {}", existing.display()))?;
    let real_root = root
        .canonicalize()
        .ctx(|| format!("resolving {}", root.display()))?;
    if real.starts_with(&real_root) {
        return Ok(());
    }
    Err(Error::Invalid(format!(
        "out `{out}` would be written to {} through a symlink that leaves the pipeline folder; outs stay inside it: replace the link with a folder or write the out elsewhere",
        real.display()
    )))
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
