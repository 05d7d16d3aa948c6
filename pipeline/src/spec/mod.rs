//! Pipeline YAML -> typed, validated [`Pipeline`].
//!
//! This module owns the file format: what keys exist, how `${...}` references
//! resolve, and which paths are allowed. Every error names the file, line and
//! column and, where there is one, the stage (see [`SpecError`]). Graph-level
//! checks (missing inputs, cycles) live in [`crate::graph`]. `parse` reads
//! the text stage by stage; `resolve` substitutes the references.
//!
//! ```yaml
//! root: ..                         # deps/outs are relative to this (default: the file's folder)
//! vars: {vq_steps: 2000}           # values that `${vq_steps}` refers to
//! sweep: {vq_steps: [1000, 2000]}  # optional: one member per value (see `sweep`)
//! defaults: {resources: {cpus: 1}, timeout: 3600}
//! executor: {kind: slurm, partition: gpu, time: "04:00:00"}  # default: local
//! stages:
//!   words:
//!     kind: command
//!     cmd: "sort words.txt > sorted.txt"
//!     deps: [words.txt]             # files read, relative to the pipeline file
//!     outs: [sorted.txt]            # files written, stored in the artifact store
//!   prep:                          # a built-in kind: image source -> image table
//!     kind: preprocess
//!     params:
//!       source: {format: idx, train: {images: data/fashion-mnist/train-images-idx3-ubyte.gz,
//!                                     labels: data/fashion-mnist/train-labels-idx1-ubyte.gz}}
//!   vq1:
//!     kind: train_vq
//!     inputs: {table: prep}         # another stage's output
//!     params: {steps: "${vq_steps}", quantiser: {codebook_size: 64}}
//!     resources: {gpus: 1}
//! ```
//!
//! References: `${name}` is the stage's own param `name`, else `vars.name`;
//! `${vars.name}` is always the var; `${stage.name}` is param `name` of
//! another stage. A string that is exactly
//! one reference takes the referenced value with its type; inside a longer
//! string the value is spliced in as text. `$${` writes a literal `${`.
//! References resolve in `params`, `cmd`, `inputs`, `deps` and `outs`.
//!
//! Fan-out: a stage with `matrix: {temperature: [0.8, 1.0]}` becomes one
//! copy per combination of the lists' values, `sample@temperature=0.8`
//! and `sample@temperature=1.0`, each reading its values as
//! `${matrix.temperature}`; another stage reads a copy by that name
//! (`inputs: {ham: "sample@temperature=${matrix.temperature}"}` fans out
//! alongside), and a target or `show` naming `sample` means every copy.
//! Copies that would all write the same outs keep them in the artifact
//! store; put `${matrix.NAME}` in an out's path to get each one out.
//!
//! `sweep:` runs the pipeline over several values of its vars as one DAG
//! whose stages are shared by key: see [`sweep`].

mod overrides;
mod parse;
mod resolve;
pub mod sweep;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{IoContext, ParamError, Result, SourcePos, SpecError};

pub use overrides::Override;
pub use parse::{clean_relative, parse, parse_with};
pub use sweep::{Member, Sweep, SweepArg};

/// What a stage needs from a worker slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default)]
    pub gpus: u32,
    #[serde(default = "one")]
    pub cpus: u32,
}

fn one() -> u32 {
    1
}

impl Default for Resources {
    fn default() -> Self {
        Resources { gpus: 0, cpus: 1 }
    }
}

/// Where the stages run (`executor:`); `run --executor` overrides `kind`.
/// The settings after `kind` are the Slurm back-end's; a local run ignores
/// them. None of this enters a stage key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecutorSpec {
    #[serde(default)]
    pub kind: ExecutorKind,
    /// `sbatch --partition`.
    pub partition: Option<String>,
    /// `sbatch --account`.
    pub account: Option<String>,
    /// `sbatch --time`, the time limit of one job (e.g. `"04:00:00"`); a
    /// training stage checkpoints before it and is requeued.
    pub time: Option<String>,
    /// `sbatch --mem`, e.g. `"8G"`.
    pub mem: Option<String>,
    /// Seconds between two polls of the run's jobs (one `squeue` call each).
    #[serde(default = "default_poll_interval")]
    pub poll_interval: f64,
    /// Seconds before the time limit at which Slurm sends SIGUSR1
    /// (`--signal=B:USR1@N`): the worker checkpoints and the job requeues.
    #[serde(default = "default_signal_before_limit")]
    pub signal_before_limit: u64,
    /// More `sbatch` arguments, passed as given.
    #[serde(default)]
    pub sbatch_args: Vec<String>,
    /// An absolute folder on a filesystem the nodes share: the workspace's
    /// artifacts, scratch and logs go there, its registry stays with the
    /// driver (see [`crate::workspace`]).
    pub shared_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecutorKind {
    /// Worker processes on this machine.
    #[default]
    Local,
    /// One `sbatch` job per stage.
    Slurm,
}

fn default_poll_interval() -> f64 {
    5.0
}

fn default_signal_before_limit() -> u64 {
    120
}

impl Default for ExecutorSpec {
    fn default() -> Self {
        ExecutorSpec {
            kind: ExecutorKind::Local,
            partition: None,
            account: None,
            time: None,
            mem: None,
            poll_interval: default_poll_interval(),
            signal_before_limit: default_signal_before_limit(),
            sbatch_args: Vec::new(),
            shared_dir: None,
        }
    }
}

/// One validated stage of a pipeline.
#[derive(Debug, Clone)]
pub struct Stage {
    pub name: String,
    pub kind: String,
    /// Resolved params: references substituted, then the kind's defaults
    /// applied (`StageKind::resolved_params`). For `command` stages the
    /// engine adds `cmd` and `outs` here so that they enter the stage key.
    pub params: serde_json::Map<String, Value>,
    /// Input name -> name of the upstream stage whose artifact it reads.
    pub inputs: IndexMap<String, String>,
    /// Files or folders the stage reads, relative to the pipeline folder.
    pub deps: Vec<String>,
    /// Files or folders the stage writes, relative to the pipeline folder.
    pub outs: Vec<String>,
    pub resources: Resources,
    pub timeout_s: Option<u64>,
    /// Where the stage is declared (its name).
    pub pos: SourcePos,
    /// Where each param, input, dep and out is written, for later errors.
    pub field_pos: HashMap<String, SourcePos>,
    /// Whether the outs are copied into the pipeline folder after the stage
    /// succeeds; not for the copies of a stage in a sweep that would all
    /// write the same paths (their outs stay in the artifact store).
    pub restore_outs: bool,
    /// In a sweep, the stage's name in its members' pipeline (`vq1` for
    /// the copy `vq1@seed=0`); `None` outside sweeps.
    pub sweep_of: Option<String>,
}

impl Stage {
    /// The name the stage works under: its name in the pipeline, not the
    /// sweep's name for its copy (what a member run alone would call it).
    pub fn work_name(&self) -> &str {
        self.sweep_of.as_deref().unwrap_or(&self.name)
    }

    /// Whether a person naming `name` (a target, `show`) means this stage:
    /// its name, its name in a sweep's member, or the name written in the
    /// file for a fan-out or sweep copy (file names cannot hold `@`).
    pub fn answers_to(&self, name: &str) -> bool {
        self.name == name
            || self.sweep_of.as_deref() == Some(name)
            || self.name.split('@').next() == Some(name)
    }

    pub fn pos_of(&self, field: &str) -> SourcePos {
        self.field_pos
            .get(field)
            .cloned()
            .unwrap_or_else(|| self.pos.clone())
    }

    pub fn error(&self, field: &str, message: impl Into<String>) -> SpecError {
        SpecError {
            pos: self.pos_of(field),
            stage: Some(self.name.clone()),
            message: message.into(),
            hint: None,
        }
    }
}

/// A parsed and validated pipeline file.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// The pipeline file, absolute.
    pub path: PathBuf,
    /// The root folder (the file's folder, or its `root:`): deps and outs
    /// are relative to it and may not leave it.
    pub dir: PathBuf,
    pub stages: Vec<Stage>,
    pub index: HashMap<String, usize>,
    pub executor: ExecutorSpec,
    /// The members when the pipeline runs as a sweep; `stages` then holds
    /// one copy of each stage per distinct stage key (see [`sweep`]).
    pub sweep: Option<Sweep>,
}

impl Pipeline {
    pub fn stage(&self, name: &str) -> Option<&Stage> {
        self.index.get(name).map(|&i| &self.stages[i])
    }
}

/// What the spec loader needs to know about the stage kinds that exist.
pub trait KindRules {
    /// The names of all known kinds, for "unknown kind" messages.
    fn kind_names(&self) -> Vec<&'static str>;
    /// Checks a stage of a known kind; `None` if the kind is unknown.
    /// The error names the field (`params.steps`, `cmd`, ...) it is about.
    fn check(&self, stage: &Stage) -> Option<std::result::Result<(), ParamError>>;
    /// The stage's params with the kind's defaults applied (see
    /// `StageKind::resolved_params`); called once `check` passed.
    fn resolve(
        &self,
        stage: &Stage,
    ) -> std::result::Result<serde_json::Map<String, Value>, ParamError> {
        Ok(stage.params.clone())
    }
    /// Paths the stage's params name that it reads (see `StageKind::implicit_deps`).
    fn implicit_deps(&self, _stage: &Stage) -> Vec<String> {
        Vec::new()
    }
    /// What the stage's output will be (see `StageKind::output_facts`).
    fn output_facts(&self, _stage: &Stage, _inputs: &BTreeMap<String, Value>) -> Value {
        Value::Null
    }
    /// The stage against its inputs' facts (see `StageKind::check_inputs`).
    fn check_inputs(
        &self,
        _stage: &Stage,
        _inputs: &BTreeMap<String, Value>,
    ) -> std::result::Result<(), ParamError> {
        Ok(())
    }
}

/// Reads and validates a pipeline file.
pub fn load(path: &Path, kinds: &dyn KindRules) -> Result<Pipeline> {
    load_with(path, kinds, &[], &[])
}

/// [`load`] with `-S` overrides (see [`Override`]) and `--sweep` lists
/// (see [`sweep`]).
pub fn load_with(
    path: &Path,
    kinds: &dyn KindRules,
    overrides: &[Override],
    sweep: &[SweepArg],
) -> Result<Pipeline> {
    let text = std::fs::read_to_string(path).ctx(|| format!("reading {}", path.display()))?;
    let abs = std::path::absolute(path).ctx(|| format!("resolving {}", path.display()))?;
    parse_with(&text, &abs, kinds, overrides, sweep)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Kind rules that know `command` only, for the spec's unit tests.
    pub(crate) struct OnlyCommand;
    impl KindRules for OnlyCommand {
        fn kind_names(&self) -> Vec<&'static str> {
            vec!["command"]
        }
        fn check(&self, stage: &Stage) -> Option<std::result::Result<(), ParamError>> {
            (stage.kind == "command").then_some(Ok(()))
        }
    }

    fn parse_str(s: &str) -> Result<Pipeline> {
        parse(s, Path::new("/p/pipe.yaml"), &OnlyCommand)
    }

    #[test]
    fn the_executor_block_is_read_and_checked() {
        let stage = "stages:\n  a: {kind: command, cmd: x}\n";
        let p = parse_str(stage).unwrap();
        assert_eq!(p.executor, ExecutorSpec::default());
        let p = parse_str(&format!(
            "executor: {{kind: slurm, partition: gpu, time: \"1:00:00\", poll_interval: 0.5, sbatch_args: [--qos=x]}}\n{stage}"
        ))
        .unwrap();
        assert_eq!(p.executor.kind, ExecutorKind::Slurm);
        assert_eq!(p.executor.partition.as_deref(), Some("gpu"));
        assert_eq!(p.executor.poll_interval, 0.5);
        assert_eq!(p.executor.signal_before_limit, 120);
        assert_eq!(p.executor.sbatch_args, ["--qos=x"]);

        let e = parse_str(&format!("executor: {{kind: pbs}}\n{stage}"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("/p/pipe.yaml:1:") && e.contains("pbs"), "{e}");
        let e = parse_str(&format!(
            "executor: {{kind: slurm, partitoin: gpu}}\n{stage}"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("partitoin"), "{e}");
        let e = parse_str(&format!("executor: {{poll_interval: 0}}\n{stage}"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/p/pipe.yaml:1:") && e.contains("executor.poll_interval is 0"),
            "{e}"
        );
    }

    #[test]
    fn references_resolve_with_types() {
        let p = parse_str(
            "vars: {n: 3, name: x}\nstages:\n  a:\n    kind: command\n    cmd: echo ${name} ${n}\n    params: {k: \"${n}\", s: \"n=${n}\", lit: \"$${n}\"}\n  b:\n    kind: command\n    cmd: echo ${a.k}\n",
        )
        .unwrap();
        let a = p.stage("a").unwrap();
        assert_eq!(a.params["k"], serde_json::json!(3));
        assert_eq!(a.params["s"], serde_json::json!("n=3"));
        assert_eq!(a.params["lit"], serde_json::json!("${n}"));
        assert_eq!(a.params["cmd"], serde_json::json!("echo x 3"));
        assert_eq!(
            p.stage("b").unwrap().params["cmd"],
            serde_json::json!("echo 3")
        );
    }

    #[test]
    fn unknown_reference_names_its_line() {
        let e = parse_str("stages:\n  a:\n    kind: command\n    cmd: echo ${nope}\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("/p/pipe.yaml:4:"), "{e}");
        assert!(e.contains("stage `a`") && e.contains("nope"), "{e}");
    }

    #[test]
    fn paths_cannot_escape() {
        assert_eq!(clean_relative("./a/../b/c.txt").unwrap(), "b/c.txt");
        assert!(clean_relative("../x").is_err());
        assert!(clean_relative("/etc/passwd").is_err());
        assert!(clean_relative("a/..").is_err());
    }
}
