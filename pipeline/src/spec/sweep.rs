//! Sweeps: one pipeline over several values of its vars, run as one DAG.
//!
//! ```yaml
//! vars: {level1_decoder: ff, level2_decoder: msp, seed: 0}
//! sweep:                          # a grid: every combination (4 members)
//!   level1_decoder: [ff, msp]
//!   level2_decoder: [ff, msp]
//! # or a list of members:  sweep: [{level1_decoder: ff, level2_decoder: msp}, {...}]
//! ```
//!
//! `run --sweep seed=0,1,2` (repeatable) gives the grid on the command line
//! and replaces the file's `sweep:`; `-S vars.NAME=VALUE` on a swept var
//! pins it (it leaves the sweep). Every swept var must be declared under
//! `vars:`.
//!
//! Each member is the pipeline with its values set, built and checked as
//! if written by `-S vars.NAME=VALUE`. The members' stages are then merged
//! by what decides a stage key (kind, resolved params, deps, outs and the
//! copies its inputs name): a stage whose inputs and params are equal in
//! two members is one stage and runs once. A stage with several copies
//! gets names that say what differs, `vq2@level1_decoder=ff,level2_decoder=msp`: the
//! swept vars that are the same for every member sharing that copy (values
//! other than letters, digits and `_.+-` written `_`). The
//! copies of a command stage that would all write the same outs keep them
//! in the artifact store (`show` prints where); reading such an out as a
//! file dep is refused at load time (link the stages with `inputs:`).

use indexmap::IndexMap;
use serde_json::Value;
use serde_saphyr::Location;
use std::collections::HashMap;
use std::path::Path;

use super::overrides::Override;
use super::parse::{RawPipeline, build, pos_in, var_names};
use super::{KindRules, Pipeline, Stage};
use crate::error::{Error, Result, SpecError};

/// One `--sweep NAME=V1,V2,...`.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepArg {
    pub var: String,
    pub values: Vec<Value>,
    /// The argument as given, for messages.
    pub text: String,
}

impl SweepArg {
    /// Reads `NAME=V1,V2,...` (each value read as YAML: `0`, `0.5`, `msp`).
    pub fn parse(arg: &str) -> std::result::Result<SweepArg, String> {
        let Some((var, values)) = arg.split_once('=') else {
            return Err(format!(
                "`{arg}`: give NAME=V1,V2,..., e.g. `seed=0,1,2` (NAME is one of the pipeline's vars)"
            ));
        };
        let var = var.trim().strip_prefix("vars.").unwrap_or(var.trim());
        if var.is_empty() {
            return Err(format!("`{arg}`: the var's name is empty"));
        }
        let mut parsed = Vec::new();
        for v in values.split(',') {
            if v.trim().is_empty() {
                return Err(format!(
                    "`{arg}`: an empty value; separate values with single commas"
                ));
            }
            match serde_saphyr::from_str::<Value>(v) {
                Ok(v) => parsed.push(v),
                Err(e) => return Err(format!("`{arg}`: `{v}` is not a YAML value: {e}")),
            }
        }
        Ok(SweepArg {
            var: var.to_string(),
            values: parsed,
            text: arg.to_string(),
        })
    }
}

impl std::str::FromStr for SweepArg {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        SweepArg::parse(s)
    }
}

/// The members of a sweep and which stage copy each member's stage is.
#[derive(Debug, Clone)]
pub struct Sweep {
    /// The swept vars, in the order the sweep names them.
    pub vars: Vec<String>,
    pub members: Vec<Member>,
}

/// One member: the swept vars' values, and for each stage of the file
/// (by its name there) the name of its copy in the merged pipeline.
#[derive(Debug, Clone)]
pub struct Member {
    pub vars: IndexMap<String, Value>,
    pub stages: Vec<(String, String)>,
}

impl Member {
    /// `level1_decoder=ff,seed=0`.
    pub fn label(&self) -> String {
        label_of(&self.vars)
    }

    /// The member's values as `-S` would write them: `vars.seed=0`.
    pub fn as_overrides(&self) -> Vec<String> {
        self.vars.iter().map(|(k, v)| override_text(k, v)).collect()
    }
}

/// How a member is named everywhere (messages, `compare`, `status`):
/// `level1_decoder=ff,seed=0`, in the order given.
pub fn label_of<'a>(vars: impl IntoIterator<Item = (&'a String, &'a Value)>) -> String {
    vars.into_iter()
        .map(|(k, v)| format!("{k}={}", value_text(v)))
        .collect::<Vec<_>>()
        .join(",")
}

/// A member's value of var `k` as `-S` would write it: `vars.seed=0`.
pub fn override_text(k: &str, v: &Value) -> String {
    format!("vars.{k}={}", value_text(v))
}

/// A value as it appears in a generated name: strings bare, the rest as
/// compact JSON.
pub fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The pipeline `raw` describes, as a sweep when it has one (`sweep:` or
/// `cli`), else as one pipeline.
pub(super) fn build_all(
    raw: RawPipeline,
    path: &Path,
    kinds: &dyn KindRules,
    overrides: &[Override],
    cli: &[SweepArg],
) -> Result<Pipeline> {
    let members = members(&raw, path, overrides, cli)?;
    if members.is_empty() {
        return build(raw, path, kinds, overrides);
    }
    let swept: Vec<String> = members[0].keys().cloned().collect();
    let mut built = Vec::with_capacity(members.len());
    for vars in &members {
        let mut all = overrides.to_vec();
        all.extend(vars.iter().map(|(k, v)| Override {
            path: vec!["vars".into(), k.clone()],
            value: v.clone(),
            text: override_text(k, v),
        }));
        let p = build(raw.clone(), path, kinds, &all).map_err(|e| in_member(e, vars))?;
        built.push(p);
    }
    merge(built, members, swept)
}

/// An error in one member's pipeline, with the member named.
fn in_member(e: Error, vars: &IndexMap<String, Value>) -> Error {
    let Error::Spec(mut spec) = e else { return e };
    spec.add_note(format!("in the sweep's member {}", label_of(vars)));
    Error::Spec(spec)
}

/// The members' swept values (none: not a sweep), checked: every var is
/// declared, every list has values, no two members are equal. `-S` on a
/// swept var pins it.
fn members(
    raw: &RawPipeline,
    path: &Path,
    overrides: &[Override],
    cli: &[SweepArg],
) -> Result<Vec<IndexMap<String, Value>>> {
    let declared = var_names(raw);
    let (at, from_file) = match &raw.sweep {
        Some(s) => (pos_in(path, &s.referenced), Some(&s.value)),
        None => (pos_in(path, &Location::UNKNOWN), None),
    };
    let err = |message: String, hint: &str| -> Error {
        SpecError {
            pos: at.clone(),
            stage: None,
            message,
            hint: Some(hint.to_string()),
        }
        .into()
    };
    let unknown = |var: &str, what: &str| {
        err(
            format!("{what}: the pipeline has no var `{var}`"),
            &match declared.is_empty() {
                true => "declare it under `vars:` with its default value".to_string(),
                false => format!(
                    "a sweep sets the vars declared under `vars:`: {}",
                    declared.join(", ")
                ),
            },
        )
    };
    let mut combos: Vec<IndexMap<String, Value>> = if !cli.is_empty() {
        let mut grid = IndexMap::new();
        for a in cli {
            if !declared.contains(&a.var) {
                return Err(unknown(&a.var, &format!("`--sweep {}`", a.text)));
            }
            if grid.insert(a.var.clone(), a.values.clone()).is_some() {
                return Err(err(
                    format!("`--sweep {}`: `{}` is swept twice", a.text, a.var),
                    "give each var's values in one --sweep NAME=V1,V2,...",
                ));
            }
        }
        product(&grid)
    } else {
        match from_file {
            None => return Ok(Vec::new()),
            Some(Value::Object(grid)) => {
                let mut lists = IndexMap::new();
                for (var, values) in grid {
                    if !declared.contains(var) {
                        return Err(unknown(var, "sweep"));
                    }
                    let Value::Array(values) = values else {
                        return Err(err(
                            format!("sweep.{var} must be a list of values"),
                            "write e.g. `seed: [0, 1, 2]`",
                        ));
                    };
                    if values.is_empty() {
                        return Err(err(
                            format!("sweep.{var} is an empty list"),
                            "give at least one value, or leave the var out of the sweep",
                        ));
                    }
                    lists.insert(var.clone(), values.clone());
                }
                product(&lists)
            }
            Some(Value::Array(list)) => {
                let mut combos = Vec::new();
                for (i, m) in list.iter().enumerate() {
                    let Value::Object(m) = m else {
                        return Err(err(
                            format!("sweep[{i}] must be a map of var values"),
                            "write e.g. `- {seed: 0, level1_decoder: ff}`",
                        ));
                    };
                    let mut combo = IndexMap::new();
                    for (var, v) in m {
                        if !declared.contains(var) {
                            return Err(unknown(var, &format!("sweep[{i}]")));
                        }
                        combo.insert(var.clone(), v.clone());
                    }
                    combos.push(combo);
                }
                let names: Vec<&String> = combos.first().map_or(Vec::new(), |c| c.keys().collect());
                if let Some((i, _)) = combos.iter().enumerate().find(|(_, c)| {
                    c.len() != names.len() || !names.iter().all(|n| c.contains_key(*n))
                }) {
                    return Err(err(
                        format!("sweep[{i}] sets other vars than sweep[0]"),
                        "every member of a listed sweep sets the same vars",
                    ));
                }
                combos
            }
            Some(_) => {
                return Err(err(
                    "`sweep` must be a map of lists or a list of maps".into(),
                    "write e.g. `sweep: {seed: [0, 1]}` or `sweep: [{seed: 0}, {seed: 1}]`",
                ));
            }
        }
    };
    if combos.is_empty() || combos.iter().all(|c| c.is_empty()) {
        return Err(err(
            "the sweep has no members".into(),
            "give each swept var at least one value",
        ));
    }
    // `-S vars.NAME=...` pins a swept var: it leaves every member.
    let pinned: Vec<&str> = overrides
        .iter()
        .filter(|o| o.path[0] == "vars")
        .map(|o| o.path[1].as_str())
        .collect();
    if !pinned.is_empty() {
        for c in &mut combos {
            c.retain(|k, _| !pinned.contains(&k.as_str()));
        }
        let mut seen = std::collections::HashSet::new();
        combos.retain(|c| seen.insert(serde_json::to_string(c).unwrap_or_default()));
        if combos.iter().all(|c| c.is_empty()) {
            return Ok(Vec::new());
        }
    }
    let mut seen = HashMap::new();
    for (i, c) in combos.iter().enumerate() {
        let text = serde_json::to_string(c).unwrap_or_default();
        if let Some(j) = seen.insert(text, i) {
            return Err(err(
                format!(
                    "members {j} and {i} of the sweep are the same ({})",
                    label_of(c)
                ),
                "each combination of values may appear once",
            ));
        }
    }
    Ok(combos)
}

/// Every combination of the lists' values, the last var varying fastest.
pub(super) fn product(lists: &IndexMap<String, Vec<Value>>) -> Vec<IndexMap<String, Value>> {
    let mut out = vec![IndexMap::new()];
    for (var, values) in lists {
        let mut next = Vec::with_capacity(out.len() * values.len());
        for combo in &out {
            for v in values {
                let mut c = combo.clone();
                c.insert(var.clone(), v.clone());
                next.push(c);
            }
        }
        out = next;
    }
    out
}

/// The longest `@...` label a copy's name gets; a longer one (many vars,
/// long values) becomes `member=N`, keeping log file names short.
const MAX_LABEL: usize = 120;

/// A value as it may appear in a stage name, which also names log files
/// and Slurm job comments (`:`-separated): letters, digits and `_.+-`,
/// anything else `_` (two values that then read alike make the copies
/// fall back to `member=N`).
pub(super) fn name_safe(value: &str) -> String {
    value
        .chars()
        .map(|c| match c.is_ascii_alphanumeric() || "_.+-".contains(c) {
            true => c,
            false => '_',
        })
        .collect()
}

/// What decides a stage's key besides its upstream artifacts: the merged
/// copies its inputs name stand for those.
fn identity(st: &Stage, inputs: &[(String, usize)]) -> String {
    format!(
        "{}\0{}\0{:?}\0{:?}\0{:?}\0{:?}\0{:?}",
        st.kind,
        Value::Object(st.params.clone()),
        st.deps,
        st.outs,
        (st.resources.cpus, st.resources.gpus),
        st.timeout_s,
        inputs
    )
}

/// The members' pipelines as one, each distinct stage once.
fn merge(
    built: Vec<Pipeline>,
    members: Vec<IndexMap<String, Value>>,
    swept: Vec<String>,
) -> Result<Pipeline> {
    let first = &built[0];
    let n = first.stages.len();
    // Copies in order of first appearance; `copy_of[c]` is the file stage.
    let mut copies: Vec<Stage> = Vec::new();
    let mut copy_of: Vec<usize> = Vec::new();
    let mut by_identity: HashMap<String, usize> = HashMap::new();
    // `member_copy[m][i]`: the copy member m's stage i is.
    let mut member_copy: Vec<Vec<usize>> = Vec::with_capacity(built.len());
    for (m, p) in built.iter().enumerate() {
        // Each member's own order: a var may change which stage an input names.
        let graph = crate::graph::build(p).map_err(|e| in_member(e, &members[m]))?;
        let mut mine = vec![usize::MAX; n];
        for &i in &graph.order {
            let st = &p.stages[i];
            let inputs: Vec<(String, usize)> = st
                .inputs
                .iter()
                .map(|(k, from)| {
                    (
                        k.clone(),
                        p.index.get(from).map_or(usize::MAX, |&j| mine[j]),
                    )
                })
                .collect();
            let c = *by_identity.entry(identity(st, &inputs)).or_insert_with(|| {
                copies.push(st.clone());
                copy_of.push(i);
                copies.len() - 1
            });
            mine[i] = c;
        }
        member_copy.push(mine);
    }
    // Names: the vars every member of a copy shares and the sweep varies.
    let varies: Vec<&String> = swept
        .iter()
        .filter(|v| members.iter().any(|m| m.get(*v) != members[0].get(*v)))
        .collect();
    let mut users: Vec<Vec<usize>> = vec![Vec::new(); copies.len()];
    for (m, mine) in member_copy.iter().enumerate() {
        for &c in mine {
            users[c].push(m);
        }
    }
    let mut copies_of: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (c, &i) in copy_of.iter().enumerate() {
        copies_of[i].push(c);
    }
    let mut names: Vec<String> = vec![String::new(); copies.len()];
    for (i, mine) in copies_of.iter().enumerate() {
        let base = &first.stages[i].name;
        if mine.len() == 1 {
            names[mine[0]] = base.clone();
            continue;
        }
        let labels: Vec<String> = mine
            .iter()
            .map(|&c| {
                let ms = &users[c];
                varies
                    .iter()
                    .filter(|v| {
                        ms.iter()
                            .all(|&m| members[m].get(**v) == members[ms[0]].get(**v))
                    })
                    .map(|v| {
                        let value = members[ms[0]].get(*v).map(value_text).unwrap_or_default();
                        format!("{v}={}", name_safe(&value))
                    })
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .collect();
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for l in &labels {
            *seen.entry(l.as_str()).or_default() += 1;
        }
        for (&c, label) in mine.iter().zip(&labels) {
            // Labels that would not tell the copies apart: the member's number.
            let label =
                match label.is_empty() || seen[label.as_str()] > 1 || label.len() > MAX_LABEL {
                    true => format!("member={}", users[c][0]),
                    false => label.clone(),
                };
            // A fan-out copy's name has its `@` already.
            let sep = if base.contains('@') { ',' } else { '@' };
            names[c] = format!("{base}{sep}{label}");
        }
    }
    // Stages in file order, each stage's copies together.
    let mut order: Vec<usize> = (0..copies.len()).collect();
    order.sort_by_key(|&c| (copy_of[c], c));
    let mut stages = Vec::with_capacity(copies.len());
    for &c in &order {
        let mut st = copies[c].clone();
        st.sweep_of = Some(std::mem::replace(&mut st.name, names[c].clone()));
        let m = users[c][0];
        for (_, from) in st.inputs.iter_mut() {
            if let Some(&j) = first.index.get(from.as_str()) {
                *from = names[member_copy[m][j]].clone();
            }
        }
        stages.push(st);
    }
    refuse_reads_of_shared_outs(&mut stages)?;
    let index = stages
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.clone(), i))
        .collect();
    let file_names: Vec<String> = first.stages.iter().map(|s| s.name.clone()).collect();
    let members = members
        .into_iter()
        .zip(&member_copy)
        .map(|(vars, mine)| Member {
            vars,
            stages: (0..n)
                .map(|i| (file_names[i].clone(), names[mine[i]].clone()))
                .collect(),
        })
        .collect();
    let first = built.into_iter().next().expect("a sweep has members");
    Ok(Pipeline {
        path: first.path,
        dir: first.dir,
        stages,
        index,
        executor: first.executor,
        sweep: Some(Sweep {
            vars: swept,
            members,
        }),
    })
}

/// Copies that write the same outs keep them in the store; a stage that
/// reads one of those paths as a dep could not know which copy's it is.
pub(super) fn refuse_reads_of_shared_outs(stages: &mut [Stage]) -> Result<()> {
    let mut writers: HashMap<&str, usize> = HashMap::new();
    for s in stages.iter() {
        for o in &s.outs {
            *writers.entry(o.as_str()).or_default() += 1;
        }
    }
    let shared: Vec<String> = writers
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(o, _)| o.to_string())
        .collect();
    if shared.is_empty() {
        return Ok(());
    }
    let overlaps = |a: &str, b: &str| {
        a == b
            || a.strip_prefix(b).is_some_and(|r| r.starts_with('/'))
            || b.strip_prefix(a).is_some_and(|r| r.starts_with('/'))
    };
    for s in stages.iter() {
        for d in &s.deps {
            if let Some(o) = shared.iter().find(|o| overlaps(d, o)) {
                let mut e = s.error(
                    &format!("deps.{d}"),
                    format!(
                        "dep `{d}` is an out of a stage the sweep copies (`{o}`), and every copy writes it"
                    ),
                );
                e.hint = Some(
                    "read that stage through `inputs:` (HAIC_INPUT_<NAME> in a command), or put a swept var in the out's path".into(),
                );
                return Err(e.into());
            }
        }
    }
    for s in stages.iter_mut() {
        if s.outs.iter().any(|o| shared.contains(o)) {
            s.restore_outs = false;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::tests::OnlyCommand;

    const CHAIN: &str = "vars: {a: 1, b: x}\nstages:\n  shared: {kind: command, cmd: echo s}\n  by_a: {kind: command, cmd: 'echo ${a}', inputs: {up: shared}}\n  by_both: {kind: command, cmd: 'echo ${b}', inputs: {up: by_a}}\n";

    fn sweep(text: &str, cli: &[&str]) -> Result<Pipeline> {
        let cli: Vec<SweepArg> = cli.iter().map(|a| SweepArg::parse(a).unwrap()).collect();
        super::super::parse_with(text, Path::new("/p/pipe.yaml"), &OnlyCommand, &[], &cli)
    }

    #[test]
    fn copies_are_named_by_the_vars_they_depend_on() {
        let p = sweep(CHAIN, &["a=1,2", "b=x,w"]).unwrap();
        let names: Vec<&str> = p.stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "shared",
                "by_a@a=1",
                "by_a@a=2",
                "by_both@a=1,b=x",
                "by_both@a=1,b=w",
                "by_both@a=2,b=x",
                "by_both@a=2,b=w"
            ]
        );
        // Each copy reads the copy of its member.
        assert_eq!(p.stage("by_both@a=2,b=w").unwrap().inputs["up"], "by_a@a=2");
        let s = p.sweep.as_ref().unwrap();
        assert_eq!(s.vars, ["a", "b"]);
        assert_eq!(s.members.len(), 4);
        assert_eq!(s.members[2].label(), "a=2,b=x");
        assert_eq!(
            s.members[2].stages,
            [
                ("shared".to_string(), "shared".to_string()),
                ("by_a".into(), "by_a@a=2".into()),
                ("by_both".into(), "by_both@a=2,b=x".into())
            ]
        );
        assert_eq!(s.members[2].as_overrides(), ["vars.a=2", "vars.b=x"]);
    }

    #[test]
    fn listed_members_and_pinned_vars() {
        let text = format!("{CHAIN}sweep: [{{a: 1, b: x}}, {{a: 2, b: x}}, {{a: 2, b: w}}]\n");
        let p = sweep(&text, &[]).unwrap();
        assert_eq!(p.sweep.as_ref().unwrap().members.len(), 3);
        assert!(p.stage("by_both@a=2,b=w").is_some());
        // `--sweep` replaces the file's sweep.
        let p = sweep(&text, &["b=x,w,z"]).unwrap();
        assert_eq!(p.sweep.as_ref().unwrap().vars, ["b"]);
        assert_eq!(p.stages.len(), 2 + 3);
        // No sweep: the pipeline as written.
        let p = sweep(CHAIN, &[]).unwrap();
        assert!(p.sweep.is_none() && p.stages.len() == 3);
        // A var swept over one value is not in the names.
        let p = sweep(CHAIN, &["a=1,2", "b=w"]).unwrap();
        assert!(p.stage("by_both@a=2").is_some(), "{:?}", p.index.keys());
        let pinned = Override::parse("vars.a=5").unwrap();
        let p = super::super::parse_with(
            CHAIN,
            Path::new("/p/pipe.yaml"),
            &OnlyCommand,
            &[pinned],
            &[SweepArg::parse("a=1,2").unwrap()],
        )
        .unwrap();
        assert!(p.sweep.is_none());
        assert_eq!(p.stage("by_a").unwrap().params["cmd"], "echo 5");
    }

    #[test]
    fn a_var_may_choose_which_stage_an_input_names() {
        // Member b=x reads `left`, b=w reads `right`, declared after the reader.
        let text = "vars: {b: x}\nstages:\n  reader: {kind: command, cmd: cat, inputs: {up: '${vars.b}_side'}}\n  x_side: {kind: command, cmd: echo l}\n  w_side: {kind: command, cmd: echo r}\n";
        let p = sweep(text, &["b=x,w"]).unwrap();
        assert_eq!(p.stage("reader@b=x").unwrap().inputs["up"], "x_side");
        assert_eq!(p.stage("reader@b=w").unwrap().inputs["up"], "w_side");
        let e = sweep(text, &["b=x,nope"]).unwrap_err().to_string();
        assert!(
            e.contains("`nope_side`") && e.contains("in the sweep's member b=nope"),
            "{e}"
        );
    }

    #[test]
    fn values_that_cannot_name_a_file_are_written_safely() {
        let p = sweep(CHAIN, &["b=a/b,c d"]).unwrap();
        assert!(p.stage("by_both@b=a_b").is_some(), "{:?}", p.index.keys());
        assert!(p.stage("by_both@b=c_d").is_some());
        // Two values that read alike fall back to the member's number.
        let p = sweep(CHAIN, &["b=a/b,a:b"]).unwrap();
        assert!(
            p.stage("by_both@member=0").is_some(),
            "{:?}",
            p.index.keys()
        );
        assert!(p.stage("by_both@member=1").is_some());
        assert_eq!(p.sweep.unwrap().members[1].label(), "b=a:b");
    }

    #[test]
    fn sweep_args_are_read_as_yaml() {
        let a = SweepArg::parse("vars.lr=0.5,1e-3,msp").unwrap();
        assert_eq!(a.var, "lr");
        assert_eq!(
            a.values,
            [
                serde_json::json!(0.5),
                serde_json::json!(0.001),
                serde_json::json!("msp")
            ]
        );
        assert!(SweepArg::parse("=1").is_err());
        assert!(SweepArg::parse("lr=1,").is_err());
    }
}

#[cfg(test)]
mod fan_out_tests {
    use super::*;
    use crate::spec::tests::OnlyCommand;

    fn load(text: &str) -> Result<Pipeline> {
        super::super::parse(text, Path::new("/p/pipe.yaml"), &OnlyCommand)
    }

    const FAN: &str = "vars: {seed: 0}\nstages:\n  up: {kind: command, cmd: echo}\n  gen:\n    kind: command\n    matrix: {t: [0.8, 1.0], n: [1, 2]}\n    cmd: 'echo ${matrix.t} ${matrix.n}'\n    inputs: {up: up}\n    outs: ['g-${matrix.t}.txt']\n  pick:\n    kind: command\n    matrix: {t: [0.8, 1.0]}\n    cmd: cat\n    inputs: {g: 'gen@t=${matrix.t},n=2'}\n";

    #[test]
    fn a_matrix_makes_named_copies_that_others_can_read() {
        let p = load(FAN).unwrap();
        let names: Vec<&str> = p.stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "up",
                "gen@t=0.8,n=1",
                "gen@t=0.8,n=2",
                "gen@t=1.0,n=1",
                "gen@t=1.0,n=2",
                "pick@t=0.8",
                "pick@t=1.0"
            ]
        );
        let g = p.stage("gen@t=1.0,n=2").unwrap();
        assert_eq!(g.params["cmd"], "echo 1.0 2");
        assert_eq!(g.outs, ["g-1.0.txt"]);
        // Two copies write g-1.0.txt: it stays in the store.
        assert!(!g.restore_outs);
        assert_eq!(p.stage("pick@t=1.0").unwrap().inputs["g"], "gen@t=1.0,n=2");
        let g = crate::graph::build(&p).unwrap();
        let keep = g.select(&p, &["pick".into()]).unwrap();
        // pick's two copies, the two gen copies they read, and up.
        assert_eq!(keep.iter().filter(|k| **k).count(), 5);
        // In a sweep, the copies get the sweep's label after theirs.
        let swept = super::super::parse_with(
            &FAN.replace("echo ${matrix.t}", "echo ${vars.seed} ${matrix.t}"),
            Path::new("/p/pipe.yaml"),
            &OnlyCommand,
            &[],
            &[SweepArg::parse("seed=0,1").unwrap()],
        )
        .unwrap();
        let copy = swept.stage("gen@t=0.8,n=1,seed=1").unwrap();
        assert_eq!(copy.work_name(), "gen@t=0.8,n=1");
        assert!(swept.stage("up").is_some() && swept.stage("pick@t=0.8,seed=0").is_some());
    }

    #[test]
    fn bad_matrices_are_refused_with_their_position() {
        for (bad, want) in [
            ("matrix: {}", ":4:13: stage `s`: `matrix` is empty"),
            (
                "matrix: {t: []}",
                ":4:13: stage `s`: matrix.t is an empty list",
            ),
            (
                "matrix: {t: [a/b, a_b]}",
                ":4:13: stage `s`: combinations 0 and 1 of the matrix both make the stage name `s@t=a_b`",
            ),
            (
                "matrix: {t: [1]}\n    cmd: echo ${matrix.u}",
                ":5:10: stage `s@t=1`: cmd: `${matrix.u}`: the stage's `matrix` has no `u`",
            ),
        ] {
            let text = format!("stages:\n  s:\n    kind: command\n    {bad}\n");
            let text = match text.contains("cmd:") {
                true => text,
                false => format!("{text}    cmd: echo\n"),
            };
            let e = load(&text).unwrap_err().to_string();
            assert!(e.starts_with(&format!("/p/pipe.yaml{want}")), "{bad}: {e}");
        }
        // `@` is for generated names only.
        let e = load("stages:\n  a@b: {kind: command, cmd: echo}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a valid stage name"), "{e}");
    }
}
