//! The readers take paths: each input is written to a file in one folder
//! per fuzzing process.

use std::path::PathBuf;
use std::sync::OnceLock;

pub fn file(name: &str, bytes: &[u8]) -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = DIR.get_or_init(|| tempfile::tempdir().expect("a scratch folder"));
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).expect("writing the input");
    path
}
