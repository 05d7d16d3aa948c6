//! Faults in the artifact store: a damaged artifact is detected by digest
//! when a stage is about to read it, never used, set aside, and made again
//! by the next run; a deleted artifact folder simply re-runs its stage.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::{Project, stderr};

const PIPELINE: &str = "stages:
  a:
    kind: command
    cmd: \"seq 1 1000 > a.txt\"
    outs: [a.txt]
  b:
    kind: command
    cmd: \"wc -l < $HAIC_INPUT_SRC/a.txt > b.txt; echo ${n} >> b.txt\"
    inputs: {src: a}
    params: {n: 1}
    outs: [b.txt]
";

/// The published copy of `a.txt` (read-only in the store).
fn stored_a(p: &Project) -> PathBuf {
    p.artifact_data("stage", "a").join("a.txt")
}

fn writable(path: &Path) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
}

/// Runs the pipeline, damages `a`'s artifact with `damage`, changes `b`'s
/// param so that `b` must read it again, and checks what happens.
fn damaged_input_is_never_used(damage: impl Fn(&Path)) {
    let p = Project::new(PIPELINE);
    let out = p.run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let digest = p.query("SELECT digest FROM artifacts WHERE stage = 'a'")[0]["digest"].clone();
    let file = stored_a(&p);
    writable(&file);
    damage(&file);

    std::fs::write(p.pipeline(), PIPELINE.replace("{n: 1}", "{n: 2}")).unwrap();
    let out = p.run(&[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("input `src` (the artifact of stage `a`) is damaged")
            && err.contains("does not match its recorded digest")
            && err.contains(".damaged/"),
        "{err}"
    );
    assert_eq!(
        p.read("b.txt"),
        "1000\n1\n",
        "b's output is the old one, not made from damage"
    );
    assert!(!file.exists(), "the damaged artifact left the store");

    let out = p.run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(p.read("b.txt"), "1000\n2\n");
    let rows = p.query("SELECT digest FROM artifacts WHERE stage = 'a' ORDER BY rowid DESC");
    assert_eq!(
        rows[0]["digest"], digest,
        "a was made again, to the same bytes"
    );
}

#[test]
fn a_bit_flipped_input_artifact_is_set_aside_and_made_again() {
    damaged_input_is_never_used(|file| {
        let mut bytes = std::fs::read(file).unwrap();
        bytes[100] ^= 0x04;
        std::fs::write(file, bytes).unwrap();
    });
}

#[test]
fn a_truncated_input_artifact_is_set_aside_and_made_again() {
    damaged_input_is_never_used(|file| {
        let f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
        f.set_len(10).unwrap();
    });
}

#[test]
fn a_deleted_artifact_folder_reruns_its_stage() {
    let p = Project::new(PIPELINE);
    let out = p.run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let dir = stored_a(&p)
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    for entry in walk(&dir) {
        let mode = if entry.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    std::fs::remove_dir_all(&dir).unwrap();
    let out = p.run(&[]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("a: succeeded") && err.contains("b: cached"),
        "{err}"
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut all = vec![dir.to_path_buf()];
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.path().is_dir() {
            all.extend(walk(&e.path()));
        } else {
            all.push(e.path());
        }
    }
    all
}
