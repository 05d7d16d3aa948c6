//! The README's commands work as written from the repository root.
//!
//! Each ```sh block that shows `cargo run --release -- ...` or `haic-pipe
//! ...` runs through bash, unchanged, in a copy of the repository's layout
//! (`pipelines/` copied, `data/` linked, a git repository so that `git
//! checkout` works), with `cargo run --release --` and `haic-pipe` meaning
//! this build's binary. Blocks on the smoke pipeline run for real, in README
//! order, sharing the default workspace (`pipelines/.haic`) as a reader's
//! would. Blocks on the default pipeline (15 minutes of training) run with
//! each haic-pipe command given `--help` at the end, which checks every
//! argument before it, and that pipeline's `status` runs for real. The
//! setup block (it runs the test suite) and the synopsis of `eval`
//! (placeholders in capitals) are left out.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{bin, repo};

/// The ```sh blocks of the README, each with the line it starts on.
fn sh_blocks(markdown: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (number, line) in markdown.lines().enumerate() {
        match (&mut current, line.trim_end()) {
            (None, "```sh") => current = Some((number + 1, String::new())),
            (Some(_), "```") => blocks.extend(current.take()),
            (Some((_, text)), _) => {
                text.push_str(line);
                text.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

/// How a block is tried.
#[derive(Debug, PartialEq)]
enum Mode {
    Run,
    ParseOnly,
    Skip(&'static str),
}

fn mode(block: &str) -> Mode {
    if block.contains("cargo test") {
        return Mode::Skip("the setup block: it runs this test suite");
    }
    if block.contains("PACKAGE") {
        return Mode::Skip("a synopsis with placeholders");
    }
    if !block.contains("cargo run --release --") && !block.contains("haic-pipe ") {
        return Mode::Skip("no haic-pipe command");
    }
    if block.contains("pipelines/tiny.yaml") {
        Mode::ParseOnly
    } else {
        Mode::Run
    }
}

/// A folder laid out like the repository: what the README's paths name.
fn layout() -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("a scratch folder");
    let pipelines = root.path().join("pipelines");
    std::fs::create_dir(&pipelines).unwrap();
    for entry in std::fs::read_dir(repo().join("pipelines"))
        .unwrap()
        .flatten()
    {
        let path = entry.path();
        if path.is_file() {
            std::fs::copy(&path, pipelines.join(entry.file_name())).unwrap();
        }
    }
    std::os::unix::fs::symlink(repo().join("data"), root.path().join("data")).unwrap();
    let git = |args: &[&str]| {
        let ok = Command::new("git")
            .args(["-c", "user.name=t", "-c", "user.email=t@t"])
            .args(args)
            .current_dir(root.path())
            .output()
            .unwrap()
            .status
            .success();
        assert!(ok, "git {args:?}");
    };
    git(&["init", "-q"]);
    git(&["add", "pipelines"]);
    git(&["commit", "-q", "-m", "layout"]);
    root
}

/// `cargo` and `haic-pipe` on PATH, both this build's binary; with
/// `parse_only`, every haic-pipe command gets `--help` last.
fn shims(dir: &Path, parse_only: bool) -> PathBuf {
    let shim_dir = dir.join(if parse_only { "shims-parse" } else { "shims" });
    std::fs::create_dir_all(&shim_dir).unwrap();
    let tail = if parse_only { " --help" } else { "" };
    let haic = format!("#!/bin/bash\nexec '{}' \"$@\"{tail}\n", bin());
    let cargo = format!(
        "#!/bin/bash\nif [ \"$1 $2 $3\" = 'run --release --' ]; then shift 3; exec '{}' \"$@\"{tail}; fi\necho \"the README's cargo command is not run --release --: $*\" >&2; exit 99\n",
        bin()
    );
    for (name, text) in [("haic-pipe", haic), ("cargo", cargo)] {
        let path = shim_dir.join(name);
        std::fs::write(&path, text).unwrap();
        let mut perm = std::fs::metadata(&path).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
        std::fs::set_permissions(&path, perm).unwrap();
    }
    shim_dir
}

fn bash(root: &Path, shim_dir: &Path, script: &str) -> std::process::Output {
    let path = format!(
        "{}:{}",
        shim_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .current_dir(root)
        .env("PATH", path)
        .env_remove("HAIC_WORKSPACE")
        .output()
        .unwrap()
}

#[test]
fn every_readme_command_works_as_written_from_the_repository_root() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let root = layout();
    let scratch = tempfile::tempdir().unwrap();
    let (run, parse) = (shims(scratch.path(), false), shims(scratch.path(), true));
    let mut tried = (0, 0);
    for (line, block) in sh_blocks(&readme) {
        let shim_dir = match mode(&block) {
            Mode::Run => {
                tried.0 += 1;
                &run
            }
            Mode::ParseOnly => {
                tried.1 += 1;
                &parse
            }
            Mode::Skip(_) => continue,
        };
        let out = bash(root.path(), shim_dir, &block);
        assert!(
            out.status.success(),
            "README.md:{line}: the block failed ({:?}):\n{block}\nstdout:\n{}\nstderr:\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(
        tried.0 >= 5 && tried.1 >= 3,
        "blocks run / parsed: {tried:?}"
    );
    // The default pipeline loads from the root and finds its data: every
    // stage stale (status exits 1 then), nothing wrong.
    let out = bash(root.path(), &run, "haic-pipe status pipelines/tiny.yaml");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("ham_samples") && text.contains("stale"),
        "{text}"
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The README's words about what those commands leave behind.
    assert!(root.path().join("pipelines/.haic/registry.db").is_file());
    let reports = root.path().join("pipelines/.haic/reports");
    let pages: Vec<String> = std::fs::read_dir(&reports)
        .unwrap()
        .flatten()
        .filter(|e| e.path().join("index.html").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        pages.len(),
        2,
        "first-try's and smoke-grid's pages: {pages:?}"
    );
    let sweep_pages = pages
        .iter()
        .filter(|p| reports.join(p).join("compare.html").is_file())
        .count();
    assert_eq!(sweep_pages, 1, "{pages:?}");
}

#[test]
fn the_block_reader_finds_blocks_and_decides_how_to_try_them() {
    let text = "a\n```sh\ncargo run --release -- run pipelines/smoke.yaml\n```\n```sh\ncargo run --release -- status pipelines/tiny.yaml\n```\n```sh\ncargo test --workspace\n```\n```sh\nhaic-pipe eval serve PACKAGE\n```\n";
    let blocks = sh_blocks(text);
    assert_eq!(blocks.len(), 4);
    assert_eq!(blocks[0].0, 2);
    let modes: Vec<Mode> = blocks.iter().map(|(_, b)| mode(b)).collect();
    assert_eq!(modes[0], Mode::Run);
    assert_eq!(modes[1], Mode::ParseOnly);
    assert!(matches!(modes[2], Mode::Skip(_)));
    assert!(matches!(modes[3], Mode::Skip(_)));
}
