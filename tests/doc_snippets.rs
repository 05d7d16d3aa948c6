//! Every ```yaml snippet in the README and in the module docs of the engine
//! and the stage kinds loads, and so does every pipeline under
//! `pipelines/`: the docs and presets show what the loader accepts.
//!
//! A snippet is one of three shapes, each loaded in the context a reader
//! would put it in:
//! - a whole pipeline (it has `stages:`): loaded as it is;
//! - top-level keys (`executor:`, `vars:`, ...): merged into the default
//!   pipeline (`pipelines/tiny.yaml`);
//! - one or more stages (`vq1: {kind: ...}`): added to, or replacing their
//!   namesakes in, the default pipeline, whose stages (`prep`, `vq1`, ...)
//!   the snippets' inputs name.

use std::path::{Path, PathBuf};

use pipeline::spec::KindRules;
use serde_json::Value;

const TOP_LEVEL_KEYS: [&str; 6] = ["root", "vars", "defaults", "executor", "stages", "sweep"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The ```yaml blocks of a Markdown text, each with the line it starts on.
fn yaml_blocks(markdown: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut current: Option<(usize, usize, Vec<&str>)> = None;
    for (number, line) in markdown.lines().enumerate() {
        let trimmed = line.trim_start();
        match &mut current {
            None if trimmed.starts_with("```yaml") => {
                let indent = line.len() - trimmed.len();
                current = Some((number + 1, indent, Vec::new()));
            }
            Some((start, indent, lines)) => {
                if trimmed.starts_with("```") {
                    let text: Vec<&str> = lines
                        .iter()
                        .map(|l| l.get(*indent..).unwrap_or(l.trim_start()))
                        .collect();
                    blocks.push((*start, dedent(&text.join("\n"))));
                    current = None;
                } else {
                    lines.push(line);
                }
            }
            None => {}
        }
    }
    assert!(current.is_none(), "an unclosed ```yaml block");
    blocks
}

/// Removes the indentation every non-empty line shares (README snippets of
/// stages are shown indented as they sit under `stages:`).
fn dedent(text: &str) -> String {
    let common = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    text.lines()
        .map(|l| l.get(common..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A Rust file's `//!` module doc as Markdown.
fn module_doc(source: &str) -> String {
    source
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("//!"))
        .map(|l| l.strip_prefix(' ').unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("reading a source folder") {
        let path = entry.expect("a folder entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().and_then(|e| e.to_str()) == Some("rs") {
            out.push(path);
        }
    }
}

fn yaml(text: &str) -> Value {
    serde_saphyr::from_str(text).expect("valid YAML")
}

/// The pipeline a snippet stands for, as YAML text (JSON is YAML).
fn in_context(snippet: &Value) -> String {
    let Value::Object(map) = snippet else {
        panic!("a snippet that is not a mapping: {snippet}");
    };
    if map.contains_key("stages") {
        return snippet.to_string();
    }
    let mut base = yaml(
        &std::fs::read_to_string(repo().join("pipelines/tiny.yaml")).expect("the default pipeline"),
    );
    let top_level = map.keys().all(|k| TOP_LEVEL_KEYS.contains(&k.as_str()));
    let target = if top_level {
        base.as_object_mut().expect("a pipeline is a mapping")
    } else {
        base["stages"]
            .as_object_mut()
            .expect("the default pipeline's stages")
    };
    for (key, value) in map {
        target.insert(key.clone(), value.clone());
    }
    base.to_string()
}

fn check_all(source: &Path, markdown: &str) -> usize {
    let kinds = stages::all();
    let blocks = yaml_blocks(markdown);
    for (line, text) in &blocks {
        let snippet = yaml(text);
        let pipeline = in_context(&snippet);
        // Relative paths resolve as for the default pipeline, whose data
        // files exist in the repository.
        let at = repo().join("pipelines/tiny.yaml");
        let loaded = pipeline::spec::parse(&pipeline, &at, &kinds)
            .and_then(|p| pipeline::graph::build(&p).map(|_| ()));
        if let Err(e) = loaded {
            panic!(
                "{}:{line}: this YAML snippet does not load: {e}\n---\n{text}",
                source.display()
            );
        }
    }
    blocks.len()
}

#[test]
fn every_yaml_snippet_in_the_readme_loads() {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README.md");
    let checked = check_all(Path::new("README.md"), &readme);
    assert!(
        checked >= 5,
        "only {checked} YAML snippets found in README.md"
    );
}

#[test]
fn every_yaml_snippet_in_a_module_doc_loads() {
    let mut files = Vec::new();
    for dir in ["pipeline/src", "stages/src", "src"] {
        rust_files(&repo().join(dir), &mut files);
    }
    let mut checked = 0;
    for file in &files {
        let source = std::fs::read_to_string(file).expect("reading a source file");
        let relative = file.strip_prefix(repo()).unwrap_or(file);
        checked += check_all(relative, &module_doc(&source));
    }
    // The engine's spec and each of the kinds but `command` show one.
    assert!(
        checked >= 9,
        "only {checked} YAML snippets found in module docs"
    );
}

#[test]
fn every_shipped_pipeline_loads() {
    let kinds = stages::all();
    let mut seen = 0;
    for entry in std::fs::read_dir(repo().join("pipelines")).expect("pipelines/") {
        let path = entry.expect("an entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let loaded = pipeline::spec::load(&path, &kinds)
            .and_then(|p| pipeline::graph::build(&p).map(|_| ()));
        if let Err(e) = loaded {
            panic!("{}: {e}", path.display());
        }
        seen += 1;
    }
    assert!(seen >= 4, "only {seen} pipelines under pipelines/");
}

#[test]
fn the_readme_error_example_lists_every_kind() {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README.md");
    let mut names = stages::all().kind_names();
    names.sort_unstable();
    let expected = format!("hint: known kinds: {}", names.join(", "));
    assert!(
        readme.lines().any(|l| l.trim() == expected),
        "README.md's unknown-kind example should read `{expected}`"
    );
}

#[test]
fn the_snippet_reader_finds_indented_blocks_and_their_lines() {
    let md = "text\n\n  ```yaml\n  a:\n    kind: x\n  ```\n```text\nno\n```\n";
    let blocks = yaml_blocks(md);
    assert_eq!(blocks, vec![(3, "a:\n  kind: x".to_string())]);
}
