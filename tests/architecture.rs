//! The house rules that keep the code livable, checked on the source tree:
//! the engine imports nothing of the stages or the binary, all SQL lives in
//! `pipeline/src/registry/`, and the driver talks to back-ends through the
//! `Executor` trait only. (That no stage kind imports another is checked
//! beside the kinds, in `stages/src/kinds/mod.rs`.)

use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).expect("reading a source folder") {
            let path = entry.expect("a folder entry").path();
            if path.is_dir() {
                todo.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    assert!(!out.is_empty(), "no sources under {}", dir.display());
    out
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).expect("reading a source file")
}

#[test]
fn the_engine_imports_nothing_of_the_stages_or_the_binary() {
    let manifest = read(&root().join("pipeline/Cargo.toml"));
    for line in manifest.lines().map(str::trim) {
        assert!(
            !line.starts_with("stages") && !line.starts_with("haic-pipe"),
            "pipeline/Cargo.toml depends on the stages or the binary: {line}"
        );
    }
    for file in rust_files(&root().join("pipeline/src")) {
        let text = read(&file);
        for word in [
            "stages::",
            "haic_pipe::",
            "candle_core",
            "candle_nn",
            "arrow_",
            "parquet::",
        ] {
            assert!(
                !text.contains(word),
                "{} names `{word}`: the engine knows nothing of images or models",
                file.display()
            );
        }
    }
}

/// A string literal that starts an SQL statement, e.g. `"SELECT ...`.
fn sql_literal(text: &str) -> Option<&'static str> {
    [
        "\"SELECT ",
        "\"INSERT ",
        "\"UPDATE ",
        "\"DELETE ",
        "\"WITH ",
        "\"PRAGMA ",
        "\"CREATE ",
    ]
    .into_iter()
    .find(|start| text.contains(start))
}

#[test]
fn all_sql_lives_in_the_registry_module() {
    let registry = root().join("pipeline/src/registry");
    let mut checked = 0;
    for dir in ["src", "pipeline/src", "stages/src"] {
        for file in rust_files(&root().join(dir)) {
            if file.starts_with(&registry) {
                continue;
            }
            checked += 1;
            if let Some(found) = sql_literal(&read(&file)) {
                panic!(
                    "{} holds SQL ({found}...): give the registry a typed function in pipeline/src/registry/",
                    file.display()
                );
            }
        }
    }
    assert!(checked > 50, "only {checked} files checked");
    assert!(
        rust_files(&registry)
            .iter()
            .any(|f| sql_literal(&read(f)).is_some()),
        "the check finds the registry's own SQL"
    );
}

#[test]
fn the_driver_knows_no_back_end_by_name() {
    let driver = read(&root().join("pipeline/src/run/driver.rs"));
    for word in [
        "ExecutorKind",
        "Slurm",
        "LocalExecutor",
        "slurm::",
        "local::",
    ] {
        assert!(
            !driver.contains(word),
            "pipeline/src/run/driver.rs names `{word}`: go through the Executor trait"
        );
    }
}
