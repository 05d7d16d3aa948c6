//! Pipeline text -> [`Pipeline`]: the raw YAML shapes, then one stage at a
//! time (references resolved, paths cleaned, the kind's check), then the
//! executor. Every error carries the position of what it is about.

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};

use indexmap::IndexMap;
use serde::Deserialize;
use serde_json::Value;
use serde_saphyr::{Location, Spanned};

use super::overrides::Override;
use super::resolve::Resolver;
use super::sweep::SweepArg;
use super::{ExecutorSpec, KindRules, Pipeline, Resources, Stage};
use crate::error::{Error, ParamError, Result, SourcePos, SpecError};

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPipeline {
    /// The folder that deps and outs are relative to, relative to this file.
    root: Option<Spanned<String>>,
    #[serde(default)]
    vars: IndexMap<Spanned<String>, Spanned<Value>>,
    #[serde(default)]
    defaults: Option<RawDefaults>,
    executor: Option<Spanned<ExecutorSpec>>,
    stages: Option<IndexMap<Spanned<String>, Spanned<RawStage>>>,
    /// Lists of values for some vars: the pipeline runs once per
    /// combination (see [`super::sweep`]).
    pub(super) sweep: Option<Spanned<Value>>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    resources: Option<Resources>,
    timeout: Option<u64>,
}

#[derive(Deserialize, Clone)]
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
    /// Fan-out: one copy of the stage per combination of these values
    /// (`${matrix.NAME}` in the copy), named `stage@NAME=VALUE,...`.
    matrix: Option<Spanned<IndexMap<String, Vec<Value>>>>,
}

/// Parses pipeline text; `path` is used for error positions and relative paths.
pub fn parse(text: &str, path: &Path, kinds: &dyn KindRules) -> Result<Pipeline> {
    parse_with(text, path, kinds, &[], &[])
}

/// [`parse`] with `-S` overrides applied to the file's values first, and
/// `--sweep` lists replacing the file's `sweep:` (see [`super::sweep`]).
pub fn parse_with(
    text: &str,
    path: &Path,
    kinds: &dyn KindRules,
    overrides: &[Override],
    sweep: &[SweepArg],
) -> Result<Pipeline> {
    super::sweep::build_all(read_raw(text, path)?, path, kinds, overrides, sweep)
}

/// The file's YAML shapes, before anything is resolved or checked.
pub(super) fn read_raw(text: &str, path: &Path) -> Result<RawPipeline> {
    serde_saphyr::from_str(text).map_err(|e| {
        let loc = e.location().unwrap_or(Location::UNKNOWN);
        SpecError {
            pos: pos_in(path, &loc),
            stage: stage_at_line(text, loc.line()),
            message: yaml_message(&e),
            hint: Some(
                "see schemas/pipeline.schema.json for the keys a pipeline file takes".into(),
            ),
        }
        .into()
    })
}

/// The names of the vars the file declares, in file order.
pub(super) fn var_names(raw: &RawPipeline) -> Vec<String> {
    raw.vars.keys().map(|k| k.value.clone()).collect()
}

/// The pipeline that `raw` with `overrides` describes: references resolved,
/// every stage checked by its kind.
pub(super) fn build(
    mut raw: RawPipeline,
    path: &Path,
    kinds: &dyn KindRules,
    overrides: &[Override],
) -> Result<Pipeline> {
    let Some(raw_stages) = raw.stages.filter(|s| !s.is_empty()) else {
        return Err(SpecError {
            pos: pos_in(path, &Location::UNKNOWN),
            stage: None,
            message: "the pipeline has no stages".into(),
            hint: Some("add a top-level `stages:` map, one entry per stage".into()),
        }
        .into());
    };
    let mut raw_stages = raw_stages;
    apply_overrides(path, &mut raw.vars, &mut raw_stages, overrides)?;
    let (raw_stages, matrices) = fan_out(path, raw_stages)?;
    let dir = root_dir(path, raw.root.as_ref())?;
    let vars: HashMap<String, (Value, SourcePos)> = raw
        .vars
        .iter()
        .map(|(k, v)| {
            (
                k.value.clone(),
                (v.value.clone(), pos_in(path, &v.referenced)),
            )
        })
        .collect();
    // Every stage's raw params, for `${stage.param}` references.
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
    let mut parser = StageParser {
        path,
        vars: &vars,
        raw_params: &raw_params,
        matrices: &matrices,
        defaults: raw.defaults.unwrap_or_default(),
        kinds,
        all_outs: HashMap::new(),
    };
    let mut stages = Vec::with_capacity(raw_stages.len());
    let mut index = HashMap::new();
    for (name, st) in &raw_stages {
        let stage = parser
            .stage(name, &st.value)
            .map_err(|e| naming_overrides(e, &name.value, overrides))?;
        index.insert(stage.name.clone(), stages.len());
        stages.push(stage);
    }
    super::sweep::refuse_reads_of_shared_outs(&mut stages)?;
    check_against_inputs(&stages, &index, kinds)?;
    let executor = match raw.executor {
        Some(e) => checked_executor(path, e)?,
        None => ExecutorSpec::default(),
    };
    Ok(Pipeline {
        path: path.to_path_buf(),
        dir,
        stages,
        index,
        executor,
        sweep: None,
    })
}

type RawStages = IndexMap<Spanned<String>, Spanned<RawStage>>;

/// A stage's keys beside `params`, which `-S` does not set.
const NOT_PARAMS: &[&str] = &[
    "kind",
    "cmd",
    "inputs",
    "deps",
    "outs",
    "resources",
    "timeout",
];

/// Sets each override's var or param in the file's raw values; an unknown
/// var or stage is an error that names the argument and what there is.
fn apply_overrides(
    path: &Path,
    vars: &mut IndexMap<Spanned<String>, Spanned<Value>>,
    stages: &mut RawStages,
    overrides: &[Override],
) -> Result<()> {
    let err = |message: String, hint: String| -> Error {
        SpecError {
            pos: pos_in(path, &Location::UNKNOWN),
            stage: None,
            message,
            hint: Some(hint),
        }
        .into()
    };
    for o in overrides {
        if o.path[0] == "vars" {
            let names: Vec<&str> = vars.keys().map(|k| k.value.as_str()).collect();
            let names = names.join(", ");
            let Some((_, v)) = vars.iter_mut().find(|(k, _)| k.value == o.path[1]) else {
                return Err(err(
                    format!("`-S {}`: the pipeline has no var `{}`", o.text, o.path[1]),
                    match names.is_empty() {
                        true => "declare it under `vars:` in the file first".into(),
                        false => format!("its vars: {names}"),
                    },
                ));
            };
            v.value = o.value.clone();
            continue;
        }
        let names: Vec<String> = stages.keys().map(|k| k.value.clone()).collect();
        let Some((_, st)) = stages.iter_mut().find(|(k, _)| k.value == o.path[0]) else {
            return Err(err(
                format!("`-S {}`: the pipeline has no stage `{}`", o.text, o.path[0]),
                format!(
                    "write STAGE.PARAM=VALUE or vars.NAME=VALUE; its stages: {}",
                    names.join(", ")
                ),
            ));
        };
        if NOT_PARAMS.contains(&o.path[1].as_str()) {
            return Err(err(
                format!(
                    "`-S {}`: `{}` is not a param; -S sets a stage's params and the vars",
                    o.text, o.path[1]
                ),
                "edit the pipeline file for a stage's cmd, inputs, deps, outs, resources or timeout".into(),
            ));
        }
        let params = &mut st.value.params;
        let here = st.value.kind.referenced;
        let slot = match params.iter_mut().find(|(k, _)| k.value == o.path[1]) {
            Some((_, v)) => v,
            None => {
                // A param the file leaves to its default: a map when the
                // override sets a key inside it.
                let empty = match o.path.len() > 2 {
                    true => Value::Object(Default::default()),
                    false => Value::Null,
                };
                params
                    .entry(Spanned::new(o.path[1].clone(), here, here))
                    .or_insert(Spanned::new(empty, here, here))
            }
        };
        o.set_in(&mut slot.value, &o.path[2..]).map_err(|m| {
            err(
                m,
                "set the whole value instead, e.g. `-S STAGE.PARAM={...}`".into(),
            )
        })?;
    }
    Ok(())
}

/// The stages with each `matrix:` stage replaced by its copies, one per
/// combination of its lists, named `stage@NAME=VALUE,...`; and each
/// copy's values for `${matrix.NAME}`.
#[allow(clippy::type_complexity)]
fn fan_out(
    path: &Path,
    stages: RawStages,
) -> Result<(RawStages, HashMap<String, HashMap<String, Value>>)> {
    if stages.values().all(|st| st.value.matrix.is_none()) {
        return Ok((stages, HashMap::new()));
    }
    let mut out = IndexMap::with_capacity(stages.len());
    let mut matrices = HashMap::new();
    for (name, st) in stages {
        let Some(matrix) = st.value.matrix.clone() else {
            out.insert(name, st);
            continue;
        };
        let err = |message: String| -> Error {
            SpecError {
                pos: pos_in(path, &matrix.referenced),
                stage: Some(name.value.clone()),
                message,
                hint: Some("write e.g. `matrix: {temperature: [0.8, 1.0]}` and `${matrix.temperature}` in the stage".into()),
            }
            .into()
        };
        if matrix.value.is_empty() {
            return Err(err("`matrix` is empty".into()));
        }
        if let Some((k, _)) = matrix.value.iter().find(|(_, v)| v.is_empty()) {
            return Err(err(format!("matrix.{k} is an empty list")));
        }
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (i, combo) in super::sweep::product(&matrix.value).into_iter().enumerate() {
            let label: Vec<String> = combo
                .iter()
                .map(|(k, v)| {
                    format!(
                        "{k}={}",
                        super::sweep::name_safe(&super::sweep::value_text(v))
                    )
                })
                .collect();
            let copy = format!("{}@{}", name.value, label.join(","));
            if let Some(j) = seen.insert(copy.clone(), i) {
                return Err(err(format!(
                    "combinations {j} and {i} of the matrix both make the stage name `{copy}`"
                )));
            }
            let mut st = st.clone();
            st.value.matrix = None;
            matrices.insert(copy.clone(), combo.into_iter().collect());
            out.insert(Spanned::new(copy, name.referenced, name.defined), st);
        }
    }
    Ok((out, matrices))
}

/// A stage's error about a param an override set, with the argument named.
fn naming_overrides(e: Error, stage: &str, overrides: &[Override]) -> Error {
    let Error::Spec(mut spec) = e else { return e };
    let set: Vec<&str> = overrides
        .iter()
        .filter(|o| o.path[0] == stage && spec.message.contains(o.path[1].as_str()))
        .map(|o| o.text.as_str())
        .collect();
    if !set.is_empty() {
        spec.add_note(format!(
            "set on the command line by `-S {}`",
            set.join("`, `-S ")
        ));
    }
    Error::Spec(spec)
}

/// Each stage against what its inputs' kinds say of their outputs
/// (`KindRules::output_facts`), in input order; an input naming no stage
/// (the graph check's error) or a cycle gives no facts.
fn check_against_inputs(
    stages: &[Stage],
    index: &HashMap<String, usize>,
    kinds: &dyn KindRules,
) -> Result<()> {
    let mut memo: HashMap<usize, Value> = HashMap::new();
    for stage in stages {
        let inputs = input_facts(stage, stages, index, kinds, &mut memo, &mut Vec::new());
        if let Err(ParamError { field, message }) = kinds.check_inputs(stage, &inputs) {
            return Err(stage.error(&field, message).into());
        }
    }
    Ok(())
}

/// Input name -> the facts of the stage it names.
fn input_facts(
    stage: &Stage,
    stages: &[Stage],
    index: &HashMap<String, usize>,
    kinds: &dyn KindRules,
    memo: &mut HashMap<usize, Value>,
    visiting: &mut Vec<usize>,
) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for (input, from) in &stage.inputs {
        let Some(&i) = index.get(from) else {
            continue;
        };
        if !memo.contains_key(&i) && !visiting.contains(&i) {
            visiting.push(i);
            let upstream = input_facts(&stages[i], stages, index, kinds, memo, visiting);
            visiting.pop();
            memo.insert(i, kinds.output_facts(&stages[i], &upstream));
        }
        out.insert(input.clone(), memo.get(&i).cloned().unwrap_or(Value::Null));
    }
    out
}

pub(super) fn pos_in(path: &Path, loc: &Location) -> SourcePos {
    SourcePos {
        file: path.to_path_buf(),
        line: loc.line().max(1),
        column: loc.column().max(1),
    }
}

/// The folder deps and outs are relative to: the file's, or its `root:`.
fn root_dir(path: &Path, root: Option<&Spanned<String>>) -> Result<PathBuf> {
    let file_dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let Some(r) = root else {
        return Ok(file_dir);
    };
    let joined = file_dir.join(&r.value);
    std::fs::canonicalize(&joined).map_err(|e| {
        SpecError {
            pos: pos_in(path, &r.referenced),
            stage: None,
            message: format!("root `{}` ({}): {e}", r.value, joined.display()),
            hint: Some("`root` is a folder, relative to the pipeline file".into()),
        }
        .into()
    })
}

fn checked_executor(path: &Path, e: Spanned<ExecutorSpec>) -> Result<ExecutorSpec> {
    let refuse = |message: String| -> Error {
        SpecError {
            pos: pos_in(path, &e.referenced),
            stage: None,
            message,
            hint: None,
        }
        .into()
    };
    if !(e.value.poll_interval.is_finite() && e.value.poll_interval > 0.0) {
        return Err(refuse(format!(
            "executor.poll_interval is {}; it must be a positive number of seconds",
            e.value.poll_interval
        )));
    }
    if let Some(d) = &e.value.shared_dir
        && !d.is_absolute()
    {
        return Err(refuse(format!(
            "executor.shared_dir `{}` must be an absolute path (the nodes see it at the same path)",
            d.display()
        )));
    }
    Ok(e.value)
}

/// What every stage's parse needs: the file, the references' values, the
/// defaults, the kinds, and the outs the stages before it claimed.
struct StageParser<'a> {
    path: &'a Path,
    vars: &'a HashMap<String, (Value, SourcePos)>,
    raw_params: &'a HashMap<String, HashMap<String, Value>>,
    /// A fan-out copy's name -> its `${matrix.NAME}` values.
    matrices: &'a HashMap<String, HashMap<String, Value>>,
    defaults: RawDefaults,
    kinds: &'a dyn KindRules,
    all_outs: HashMap<String, String>,
}

/// One stage's parse in progress: its name, and where each field is.
struct InStage<'a> {
    path: &'a Path,
    name: String,
    field_pos: HashMap<String, SourcePos>,
}

impl InStage<'_> {
    fn at(&self, loc: &Location) -> SourcePos {
        pos_in(self.path, loc)
    }

    fn err(&self, loc: &Location, message: String, hint: Option<String>) -> Error {
        SpecError {
            pos: self.at(loc),
            stage: Some(self.name.clone()),
            message,
            hint,
        }
        .into()
    }

    fn place(&mut self, field: String, loc: &Location) {
        let pos = self.at(loc);
        self.field_pos.insert(field, pos);
    }
}

impl StageParser<'_> {
    fn stage(&mut self, name: &Spanned<String>, st: &RawStage) -> Result<Stage> {
        let mut here = InStage {
            path: self.path,
            name: name.value.clone(),
            field_pos: HashMap::new(),
        };
        let matrix = self.matrices.get(&here.name);
        let written = match matrix {
            Some(_) => here.name.split('@').next().unwrap_or_default(),
            None => here.name.as_str(),
        }
        .to_string();
        check_name(&written).map_err(|m| here.err(&name.referenced, m, Some(name_hint())))?;
        let no_matrix = HashMap::new();
        here.place("kind".into(), &st.kind.referenced);
        let resolver = Resolver {
            own: &self.raw_params[&here.name],
            vars: self.vars,
            stages: self.raw_params,
            matrix: matrix.unwrap_or(&no_matrix),
        };
        let mut params = serde_json::Map::new();
        for (k, v) in &st.params {
            let value = resolver
                .resolve(&v.value)
                .map_err(|m| here.err(&v.referenced, format!("params.{}: {m}", k.value), None))?;
            here.place(format!("params.{}", k.value), &v.referenced);
            params.insert(k.value.clone(), value);
        }
        let mut inputs = IndexMap::new();
        for (k, v) in &st.inputs {
            here.place(format!("inputs.{}", k.value), &v.referenced);
            let from = match v.value.contains("${") {
                true => resolver
                    .resolve(&Value::String(v.value.clone()))
                    .map(|v| super::sweep::value_text(&v))
                    .map_err(|m| {
                        here.err(&v.referenced, format!("inputs.{}: {m}", k.value), None)
                    })?,
                false => v.value.clone(),
            };
            inputs.insert(k.value.clone(), from);
        }
        let deps = paths(&mut here, &resolver, &st.deps, "dep", "deps")?;
        let outs = paths(&mut here, &resolver, &st.outs, "out", "outs")?;
        for (o, p) in st.outs.iter().zip(&outs) {
            if let Some(other) = self.all_outs.insert(p.clone(), here.name.clone())
                // A fan-out's copies may share outs: they stay in the store.
                && !(matrix.is_some() && other.split('@').next() == Some(written.as_str()))
            {
                return Err(here.err(
                    &o.referenced,
                    format!("out `{p}` is already written by stage `{other}`"),
                    Some("each file may be the out of one stage only".into()),
                ));
            }
        }
        command_params(&mut here, st, &resolver, &outs, &mut params)?;
        if let Some(t) = &st.timeout {
            here.place("timeout".into(), &t.referenced);
            if t.value == 0 {
                return Err(here.err(
                    &t.referenced,
                    "timeout must be at least 1 second".into(),
                    None,
                ));
            }
        }
        let stage = Stage {
            name: here.name.clone(),
            kind: st.kind.value.clone(),
            params,
            inputs,
            deps,
            outs,
            resources: st
                .resources
                .clone()
                .or_else(|| self.defaults.resources.clone())
                .unwrap_or_default(),
            timeout_s: st
                .timeout
                .as_ref()
                .map(|t| t.value)
                .or(self.defaults.timeout),
            pos: here.at(&name.referenced),
            field_pos: here.field_pos.clone(),
            restore_outs: true,
            sweep_of: None,
        };
        self.kind_checked(stage, &here, &st.kind)
    }

    /// The kind's verdict on the stage, and the deps its params name.
    fn kind_checked(&self, stage: Stage, here: &InStage, kind: &Spanned<String>) -> Result<Stage> {
        match self.kinds.check(&stage) {
            None => {
                let mut known = self.kinds.kind_names();
                known.sort_unstable();
                return Err(here.err(
                    &kind.referenced,
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
        stage.params = self
            .kinds
            .resolve(&stage)
            .map_err(|ParamError { field, message }| stage.error(&field, message))?;
        for d in self.kinds.implicit_deps(&stage) {
            let p = clean_relative(&d)
                .map_err(|m| stage.error("kind", format!("params name the path `{d}`: {m}")))?;
            if !stage.deps.contains(&p) {
                stage
                    .field_pos
                    .insert(format!("deps.{p}"), stage.pos_of("kind"));
                stage.deps.push(p);
            }
        }
        Ok(stage)
    }
}

/// A stage's deps or outs, cleaned, each placed as `<field>.<path>`.
fn paths(
    here: &mut InStage,
    resolver: &Resolver,
    raw: &[Spanned<String>],
    what: &str,
    field: &str,
) -> Result<Vec<String>> {
    let mut out = Vec::with_capacity(raw.len());
    for d in raw {
        let text = match d.value.contains("${") {
            true => resolver
                .resolve(&Value::String(d.value.clone()))
                .map(|v| super::sweep::value_text(&v))
                .map_err(|m| here.err(&d.referenced, format!("{what} `{}`: {m}", d.value), None))?,
            false => d.value.clone(),
        };
        let p = clean_relative(&text).map_err(|m| {
            here.err(
                &d.referenced,
                format!("{what} `{}`: {m}", d.value),
                Some(path_hint()),
            )
        })?;
        here.place(format!("{field}.{p}"), &d.referenced);
        out.push(p);
    }
    Ok(out)
}

/// `cmd` (resolved) and `outs` into a command stage's params, so that both
/// enter its key; `outs` without a `cmd` refused.
fn command_params(
    here: &mut InStage,
    st: &RawStage,
    resolver: &Resolver,
    outs: &[String],
    params: &mut serde_json::Map<String, Value>,
) -> Result<()> {
    if let Some(cmd) = &st.cmd {
        here.place("cmd".into(), &cmd.referenced);
        let cmd_value = resolver
            .resolve(&Value::String(cmd.value.clone()))
            .map_err(|m| here.err(&cmd.referenced, format!("cmd: {m}"), None))?;
        params.insert("cmd".into(), cmd_value);
        params.insert(
            "outs".into(),
            Value::Array(outs.iter().cloned().map(Value::String).collect()),
        );
    } else if let Some(first) = st.outs.first() {
        return Err(here.err(
            &first.referenced,
            "`outs` is only for stages with a `cmd`".into(),
            Some("built-in kinds write their outputs into the artifact store themselves".into()),
        ));
    }
    Ok(())
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
