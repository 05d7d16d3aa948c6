//! Pipeline YAML -> typed, validated [`Pipeline`].
//!
//! This module owns the file format: what keys exist, how `${...}` references
//! resolve, and which paths are allowed. Every error names the file, line and
//! column and, where there is one, the stage (see [`SpecError`]). Graph-level
//! checks (missing inputs, cycles) live in [`crate::graph`].
//!
//! ```yaml
//! root: ..                         # deps/outs are relative to this (default: the file's folder)
//! vars: {vq_steps: 2000}           # values that `${vq_steps}` refers to
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
//! `${stage.name}` is param `name` of another stage. A string that is exactly
//! one reference takes the referenced value with its type; inside a longer
//! string the value is spliced in as text. `$${` writes a literal `${`.

use std::collections::{HashMap, HashSet};
use std::path::{Component, Path, PathBuf};

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_saphyr::{Location, Spanned};

use crate::error::{Error, IoContext, ParamError, Result, SourcePos, SpecError};

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
    /// Resolved params (references substituted). For `command` stages the
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
}

impl Stage {
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
    /// Paths the stage's params name that it reads (see `StageKind::implicit_deps`).
    fn implicit_deps(&self, _stage: &Stage) -> Vec<String> {
        Vec::new()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPipeline {
    /// The folder that deps and outs are relative to, relative to this file.
    root: Option<Spanned<String>>,
    #[serde(default)]
    vars: IndexMap<Spanned<String>, Spanned<Value>>,
    #[serde(default)]
    defaults: Option<RawDefaults>,
    executor: Option<Spanned<ExecutorSpec>>,
    stages: Option<IndexMap<Spanned<String>, Spanned<RawStage>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    resources: Option<Resources>,
    timeout: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStage {
    kind: Spanned<String>,
    #[serde(default)]
    params: IndexMap<Spanned<String>, Spanned<Value>>,
    #[serde(default)]
    inputs: IndexMap<Spanned<String>, Spanned<String>>,
    resources: Option<Resources>,
    timeout: Option<Spanned<u64>>,
    cmd: Option<Spanned<String>>,
    #[serde(default)]
    deps: Vec<Spanned<String>>,
    #[serde(default)]
    outs: Vec<Spanned<String>>,
}

/// Reads and validates a pipeline file.
pub fn load(path: &Path, kinds: &dyn KindRules) -> Result<Pipeline> {
    let text = std::fs::read_to_string(path).ctx(|| format!("reading {}", path.display()))?;
    let abs = std::path::absolute(path).ctx(|| format!("resolving {}", path.display()))?;
    parse(&text, &abs, kinds)
}

/// Parses pipeline text; `path` is used for error positions and relative paths.
pub fn parse(text: &str, path: &Path, kinds: &dyn KindRules) -> Result<Pipeline> {
    let at = |loc: &Location| SourcePos {
        file: path.to_path_buf(),
        line: loc.line().max(1),
        column: loc.column().max(1),
    };
    let raw: RawPipeline = serde_saphyr::from_str(text).map_err(|e| {
        let loc = e.location().unwrap_or(Location::UNKNOWN);
        SpecError {
            pos: at(&loc),
            stage: stage_at_line(text, loc.line()),
            message: yaml_message(&e),
            hint: Some(
                "see schemas/pipeline.schema.json for the keys a pipeline file takes".into(),
            ),
        }
    })?;
    let file_pos = SourcePos {
        file: path.to_path_buf(),
        line: 1,
        column: 1,
    };
    let Some(raw_stages) = raw.stages.filter(|s| !s.is_empty()) else {
        return Err(SpecError {
            pos: file_pos,
            stage: None,
            message: "the pipeline has no stages".into(),
            hint: Some("add a top-level `stages:` map, one entry per stage".into()),
        }
        .into());
    };
    let defaults = raw.defaults.unwrap_or_default();
    let file_dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let dir = match &raw.root {
        None => file_dir,
        Some(r) => {
            let joined = file_dir.join(&r.value);
            std::fs::canonicalize(&joined).map_err(|e| SpecError {
                pos: at(&r.referenced),
                stage: None,
                message: format!("root `{}` ({}): {e}", r.value, joined.display()),
                hint: Some("`root` is a folder, relative to the pipeline file".into()),
            })?
        }
    };

    let vars: HashMap<String, (Value, SourcePos)> = raw
        .vars
        .iter()
        .map(|(k, v)| (k.value.clone(), (v.value.clone(), at(&v.referenced))))
        .collect();

    // First pass: raw params of every stage, for `${stage.param}` references.
    let raw_params: HashMap<String, HashMap<String, Value>> = raw_stages
        .iter()
        .map(|(name, st)| {
            let params = st
                .value
                .params
                .iter()
                .map(|(k, v)| (k.value.clone(), v.value.clone()))
                .collect();
            (name.value.clone(), params)
        })
        .collect();

    let mut stages = Vec::with_capacity(raw_stages.len());
    let mut index = HashMap::new();
    let mut all_outs: HashMap<String, String> = HashMap::new();
    for (name, st) in &raw_stages {
        let stage_name = name.value.clone();
        let spec_err = |loc: &Location, message: String, hint: Option<String>| -> Error {
            SpecError {
                pos: at(loc),
                stage: Some(stage_name.clone()),
                message,
                hint,
            }
            .into()
        };
        check_name(&stage_name).map_err(|m| spec_err(&name.referenced, m, Some(name_hint())))?;
        let st = &st.value;
        let mut field_pos = HashMap::new();
        field_pos.insert("kind".to_string(), at(&st.kind.referenced));

        let resolver = Resolver {
            own: &raw_params[&stage_name],
            vars: &vars,
            stages: &raw_params,
        };
        let mut params = serde_json::Map::new();
        for (k, v) in &st.params {
            let value = resolver
                .resolve(&v.value)
                .map_err(|m| spec_err(&v.referenced, format!("params.{}: {m}", k.value), None))?;
            field_pos.insert(format!("params.{}", k.value), at(&v.referenced));
            params.insert(k.value.clone(), value);
        }
        let mut inputs = IndexMap::new();
        for (k, v) in &st.inputs {
            field_pos.insert(format!("inputs.{}", k.value), at(&v.referenced));
            inputs.insert(k.value.clone(), v.value.clone());
        }
        let mut deps = Vec::new();
        for d in &st.deps {
            let p = clean_relative(&d.value).map_err(|m| {
                spec_err(
                    &d.referenced,
                    format!("dep `{}`: {m}", d.value),
                    Some(path_hint()),
                )
            })?;
            field_pos.insert(format!("deps.{p}"), at(&d.referenced));
            deps.push(p);
        }
        let mut outs = Vec::new();
        for o in &st.outs {
            let p = clean_relative(&o.value).map_err(|m| {
                spec_err(
                    &o.referenced,
                    format!("out `{}`: {m}", o.value),
                    Some(path_hint()),
                )
            })?;
            if let Some(other) = all_outs.insert(p.clone(), stage_name.clone()) {
                return Err(spec_err(
                    &o.referenced,
                    format!("out `{p}` is already written by stage `{other}`"),
                    Some("each file may be the out of one stage only".into()),
                ));
            }
            field_pos.insert(format!("outs.{p}"), at(&o.referenced));
            outs.push(p);
        }
        if let Some(cmd) = &st.cmd {
            field_pos.insert("cmd".into(), at(&cmd.referenced));
            let cmd_value = resolver
                .resolve(&Value::String(cmd.value.clone()))
                .map_err(|m| spec_err(&cmd.referenced, format!("cmd: {m}"), None))?;
            params.insert("cmd".into(), cmd_value);
            params.insert(
                "outs".into(),
                Value::Array(outs.iter().cloned().map(Value::String).collect()),
            );
        } else if !st.outs.is_empty() {
            return Err(spec_err(
                &st.outs[0].referenced,
                "`outs` is only for stages with a `cmd`".into(),
                Some(
                    "built-in kinds write their outputs into the artifact store themselves".into(),
                ),
            ));
        }
        if let Some(t) = &st.timeout {
            field_pos.insert("timeout".into(), at(&t.referenced));
            if t.value == 0 {
                return Err(spec_err(
                    &t.referenced,
                    "timeout must be at least 1 second".into(),
                    None,
                ));
            }
        }
        let stage = Stage {
            name: stage_name.clone(),
            kind: st.kind.value.clone(),
            params,
            inputs,
            deps,
            outs,
            resources: st
                .resources
                .clone()
                .or_else(|| defaults.resources.clone())
                .unwrap_or_default(),
            timeout_s: st.timeout.as_ref().map(|t| t.value).or(defaults.timeout),
            pos: at(&name.referenced),
            field_pos,
        };
        match kinds.check(&stage) {
            None => {
                let mut known = kinds.kind_names();
                known.sort_unstable();
                return Err(spec_err(
                    &st.kind.referenced,
                    format!("unknown kind `{}`", stage.kind),
                    Some(format!("known kinds: {}", known.join(", "))),
                ));
            }
            Some(Err(ParamError { field, message })) => {
                return Err(stage.error(&field, message).into());
            }
            Some(Ok(())) => {}
        }
        let mut stage = stage;
        for d in kinds.implicit_deps(&stage) {
            let p = clean_relative(&d)
                .map_err(|m| stage.error("kind", format!("params name the path `{d}`: {m}")))?;
            if !stage.deps.contains(&p) {
                stage
                    .field_pos
                    .insert(format!("deps.{p}"), stage.pos_of("kind"));
                stage.deps.push(p);
            }
        }
        index.insert(stage_name, stages.len());
        stages.push(stage);
    }
    let executor = match raw.executor {
        Some(e) => {
            if !(e.value.poll_interval.is_finite() && e.value.poll_interval > 0.0) {
                return Err(SpecError {
                    pos: at(&e.referenced),
                    stage: None,
                    message: format!(
                        "executor.poll_interval is {}; it must be a positive number of seconds",
                        e.value.poll_interval
                    ),
                    hint: None,
                }
                .into());
            }
            if let Some(d) = &e.value.shared_dir
                && !d.is_absolute()
            {
                return Err(SpecError {
                    pos: at(&e.referenced),
                    stage: None,
                    message: format!(
                        "executor.shared_dir `{}` must be an absolute path (the nodes see it at the same path)",
                        d.display()
                    ),
                    hint: None,
                }
                .into());
            }
            e.value
        }
        None => ExecutorSpec::default(),
    };
    Ok(Pipeline {
        path: path.to_path_buf(),
        dir,
        stages,
        index,
        executor,
    })
}

/// The YAML library's message without its own position prefix (we print
/// ours), followed by its source snippet with the caret.
fn yaml_message(e: &serde_saphyr::Error) -> String {
    let text = e
        .to_string()
        .replace(", set DuplicateKeyPolicy in Options if acceptable", "")
        .replace("invalid u64", "expected a whole number >= 0")
        .replace("invalid u32", "expected a whole number >= 0")
        .replace(
            "expected mapping start",
            "expected a map (`key: value` entries) here",
        );
    let mut lines = text.lines();
    let first = lines.next().unwrap_or("invalid YAML").trim();
    let first = first.strip_prefix("error: ").unwrap_or(first);
    let msg = match (first.starts_with("line "), first.find(": ")) {
        (true, Some(i)) => &first[i + 2..],
        _ => first,
    };
    let msg = match msg.strip_prefix("duplicate mapping key: ") {
        Some(k) => format!("`{k}` is written twice in the same map; names must be unique"),
        None => msg.to_string(),
    };
    let snippet: Vec<&str> = lines
        .filter(|l| !l.trim_start().starts_with("-->"))
        .collect();
    if snippet.is_empty() {
        msg
    } else {
        format!("{msg}\n{}", snippet.join("\n"))
    }
}

/// The stage whose block holds `line` (1-based), found from the text alone:
/// used for errors the YAML library reports before we know any stage.
fn stage_at_line(text: &str, line: u64) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let stages_at = lines.iter().position(|l| l.trim_end() == "stages:")?;
    let is_content = |l: &str| !l.trim().is_empty() && !l.trim_start().starts_with('#');
    let first = lines[stages_at + 1..].iter().find(|l| is_content(l))?;
    let indent = first.len() - first.trim_start().len();
    if indent == 0 {
        return None;
    }
    let upto = (line as usize).min(lines.len());
    // An error above the stages (in `executor:`, say) is in no stage.
    if upto <= stages_at + 1 {
        return None;
    }
    for l in lines[stages_at + 1..upto].iter().rev() {
        if !is_content(l) {
            continue;
        }
        let this = l.len() - l.trim_start().len();
        if this < indent {
            return None;
        }
        if this == indent {
            let name = l.trim_start().split(':').next()?.trim();
            return Some(name.trim_matches(['"', '\'']).to_string());
        }
    }
    None
}

fn check_name(name: &str) -> std::result::Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && name.chars().next().is_some_and(|c| c.is_ascii_alphabetic());
    if ok {
        Ok(())
    } else {
        Err(format!("`{name}` is not a valid stage name"))
    }
}

fn name_hint() -> String {
    "stage names start with a letter and use letters, digits, `_` and `-`".into()
}

fn path_hint() -> String {
    "paths are relative to the pipeline file's folder and stay inside it".into()
}

/// Normalises a relative path and refuses ones that leave the pipeline folder.
pub fn clean_relative(p: &str) -> std::result::Result<String, String> {
    if p.trim().is_empty() {
        return Err("empty path".into());
    }
    let path = Path::new(p);
    let mut parts: Vec<String> = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(s) => parts.push(
                s.to_str()
                    .ok_or_else(|| "path is not valid UTF-8".to_string())?
                    .to_string(),
            ),
            Component::CurDir => {}
            Component::ParentDir => {
                if parts.pop().is_none() {
                    return Err("path leaves the pipeline folder".into());
                }
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err("absolute paths are not allowed".into());
            }
        }
    }
    if parts.is_empty() {
        return Err("path names the pipeline folder itself".into());
    }
    Ok(parts.join("/"))
}

struct Resolver<'a> {
    own: &'a HashMap<String, Value>,
    vars: &'a HashMap<String, (Value, SourcePos)>,
    stages: &'a HashMap<String, HashMap<String, Value>>,
}

impl Resolver<'_> {
    fn resolve(&self, v: &Value) -> std::result::Result<Value, String> {
        Ok(match v {
            Value::String(s) => self.resolve_str(s)?,
            Value::Array(items) => Value::Array(
                items
                    .iter()
                    .map(|i| self.resolve(i))
                    .collect::<std::result::Result<_, _>>()?,
            ),
            Value::Object(map) => {
                let mut out = serde_json::Map::new();
                for (k, v) in map {
                    out.insert(k.clone(), self.resolve(v)?);
                }
                Value::Object(out)
            }
            other => other.clone(),
        })
    }

    fn lookup(&self, name: &str, seen: &mut HashSet<String>) -> std::result::Result<Value, String> {
        if !seen.insert(name.to_string()) {
            return Err(format!("`${{{name}}}` refers to itself"));
        }
        let found = match name.split_once('.') {
            Some((stage, param)) => self
                .stages
                .get(stage)
                .ok_or_else(|| format!("`${{{name}}}`: there is no stage `{stage}`"))?
                .get(param)
                .ok_or_else(|| format!("`${{{name}}}`: stage `{stage}` has no param `{param}`"))?
                .clone(),
            None => match (self.own.get(name), self.vars.get(name)) {
                (Some(v), _) => v.clone(),
                (None, Some((v, _))) => v.clone(),
                (None, None) => {
                    return Err(format!(
                        "`${{{name}}}` is neither a param of this stage nor a top-level var"
                    ));
                }
            },
        };
        // One level of indirection is allowed (a param that is itself `${var}`).
        match &found {
            Value::String(s) if s.contains("${") && !s.contains("$${") => {
                self.resolve_str_seen(s, seen)
            }
            _ => Ok(found),
        }
    }

    fn resolve_str(&self, s: &str) -> std::result::Result<Value, String> {
        self.resolve_str_seen(s, &mut HashSet::new())
    }

    fn resolve_str_seen(
        &self,
        s: &str,
        seen: &mut HashSet<String>,
    ) -> std::result::Result<Value, String> {
        if !s.contains("${") {
            return Ok(Value::String(s.to_string()));
        }
        // Whole-string reference keeps the value's type.
        if let Some(inner) = s.strip_prefix("${").and_then(|r| r.strip_suffix('}'))
            && !inner.contains(['{', '}', '$'])
            && !s.starts_with("$${")
        {
            return self.lookup(inner.trim(), seen);
        }
        let mut out = String::new();
        let mut rest = s;
        while let Some(i) = rest.find("${") {
            if i > 0 && rest.as_bytes()[i - 1] == b'$' {
                out.push_str(&rest[..i - 1]);
                out.push_str("${");
                rest = &rest[i + 2..];
                continue;
            }
            out.push_str(&rest[..i]);
            let after = &rest[i + 2..];
            let end = after
                .find('}')
                .ok_or_else(|| "unclosed `${` (write `$${` for a literal `${`)".to_string())?;
            let name = after[..end].trim();
            if name.is_empty() {
                return Err("empty reference `${}`".into());
            }
            let mut branch = seen.clone();
            match self.lookup(name, &mut branch)? {
                Value::String(v) => out.push_str(&v),
                Value::Null => return Err(format!("`${{{name}}}` is null")),
                other => out.push_str(&other.to_string()),
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Ok(Value::String(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct OnlyCommand;
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
