//! `haic-pipe compare`: runs side by side, from what the registry holds
//! ([`RunFacts`]: the params and metrics of the stage run behind each
//! stage's artifact, cached or not).
//!
//! - **Runs**: one row per run (per member, for a sweep's run: named by
//!   its values, which count as its `-S vars.NAME=VALUE` overrides) with
//!   the params whose values differ between the runs (`STAGE.PARAM`,
//!   nested keys dotted) and the metrics asked for (`STAGE:METRIC`).
//! - **Groups**: runs pooled by what they were told to vary (default: their
//!   `-S` overrides, e.g. `vars.level1_decoder=msp`, except seeds, those
//!   whose last part contains `seed`; and their pipeline text), or by the
//!   values of the `--group-by` params: per metric n, mean, standard
//!   deviation and a 95 % confidence interval of the mean (Student's t
//!   with n - 1 degrees of freedom: the spread over seeds, not one run's
//!   noise).
//!
//! Metric patterns are a metric name (`val.bits_per_dim`: every stage that
//! has it) or `STAGE:METRIC`, `*` matching any text.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::Value;

use crate::registry::{QueryResult, RunFacts};

/// How runs are pooled into groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupBy {
    /// The runs' overrides except seeds, and their pipeline text.
    VaryingExceptSeeds,
    /// These params (`STAGE.PARAM`), or a suffix of them (`decoder.kind`).
    Params(Vec<String>),
}

/// The comparison: the runs' table and, where some group pools two or
/// more runs, the groups' table.
#[derive(Debug, Clone)]
pub struct Comparison {
    pub runs: QueryResult,
    pub groups: Option<QueryResult>,
}

/// How a group names its run `r`: the run id, or for a sweep's member
/// (its run has several rows: `rows_of[id]` > 1) `RUN/NAME`.
fn run_label(r: &RunFacts, rows_of: &HashMap<i64, usize>) -> String {
    match (&r.name, rows_of.get(&r.id).is_some_and(|n| *n > 1)) {
        (Some(name), true) => format!("{}/{name}", r.id),
        _ => r.id.to_string(),
    }
}

/// Compares `runs`; `patterns` name the metrics (see the module doc).
pub fn compare(runs: &[RunFacts], patterns: &[String], group_by: &GroupBy) -> Comparison {
    let params: Vec<BTreeMap<String, String>> = runs.iter().map(param_map).collect();
    let names: BTreeSet<&String> = params.iter().flat_map(|p| p.keys()).collect();
    let differing: Vec<String> = names
        .into_iter()
        .filter(|n| {
            let first = params[0].get(*n);
            params.iter().any(|p| p.get(*n) != first)
        })
        .cloned()
        .collect();
    let metrics: Vec<BTreeMap<String, f64>> = runs
        .iter()
        .map(|r| {
            r.metrics
                .iter()
                .filter(|(stage, _, name, _)| patterns.iter().any(|p| matches(p, stage, name)))
                .map(|(stage, _, name, v)| (format!("{stage}:{name}"), *v))
                .collect()
        })
        .collect();
    let metric_names: Vec<String> = metrics
        .iter()
        .flat_map(|m| m.keys().cloned())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();

    let mut columns = vec!["run".to_string(), "name".to_string()];
    columns.extend(differing.iter().cloned());
    columns.extend(metric_names.iter().cloned());
    let rows = runs
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut row = vec![
                Value::from(r.id),
                r.name.clone().map_or(Value::Null, Value::from),
            ];
            row.extend(differing.iter().map(|n| text(params[i].get(n))));
            row.extend(metric_names.iter().map(|m| number(metrics[i].get(m))));
            row
        })
        .collect();
    let table = QueryResult { columns, rows };

    // A run's group: what it was told to vary (its `-S` overrides, a sweep
    // member's vars) except seeds, and its pipeline text; or the values of
    // the params asked for.
    let overrides: Vec<BTreeMap<String, String>> = runs.iter().map(override_map).collect();
    let keys: Vec<String> = match group_by {
        GroupBy::VaryingExceptSeeds => {
            let mut keys: Vec<String> = overrides
                .iter()
                .flat_map(|o| o.keys())
                .filter(|path| !path.rsplit('.').next().unwrap_or("").contains("seed"))
                .cloned()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            if runs
                .iter()
                .any(|r| r.pipeline_digest != runs[0].pipeline_digest)
            {
                keys.push(PIPELINE.into());
            }
            keys
        }
        GroupBy::Params(wanted) => overrides
            .iter()
            .flat_map(|o| o.keys())
            .chain(params.iter().flat_map(|p| p.keys()))
            .filter(|n| {
                wanted
                    .iter()
                    .any(|w| *n == w || n.ends_with(&format!(".{w}")))
            })
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
    };
    let mut groups: BTreeMap<Vec<String>, Vec<usize>> = BTreeMap::new();
    for (i, r) in runs.iter().enumerate() {
        let key = keys
            .iter()
            .map(|k| match k.as_str() {
                PIPELINE => r.pipeline_digest.chars().take(12).collect(),
                _ => overrides[i]
                    .get(k)
                    .or_else(|| params[i].get(k))
                    .cloned()
                    .unwrap_or_default(),
            })
            .collect();
        groups.entry(key).or_default().push(i);
    }
    let grouped = groups.values().any(|members| members.len() > 1);
    let groups = grouped.then(|| {
        let mut rows_of: HashMap<i64, usize> = HashMap::new();
        for r in runs {
            *rows_of.entry(r.id).or_default() += 1;
        }
        let mut columns = keys.clone();
        columns.push("n".into());
        columns.push("runs".into());
        for m in &metric_names {
            for part in ["mean", "sd", "ci95_lo", "ci95_hi"] {
                columns.push(format!("{m} {part}"));
            }
        }
        let rows = groups
            .iter()
            .map(|(key, members)| {
                let mut row: Vec<Value> = key.iter().map(|v| Value::from(v.clone())).collect();
                row.push(Value::from(members.len()));
                row.push(Value::from(
                    members
                        .iter()
                        .map(|&i| run_label(&runs[i], &rows_of))
                        .collect::<Vec<_>>()
                        .join(" "),
                ));
                for m in &metric_names {
                    let values: Vec<f64> = members
                        .iter()
                        .filter_map(|&i| metrics[i].get(m).copied())
                        .collect();
                    let s = Summary::of(&values);
                    row.extend([s.mean, s.sd, s.lo, s.hi].map(|v| number(v.as_ref())));
                }
                row
            })
            .collect();
        QueryResult { columns, rows }
    });
    Comparison {
        runs: table,
        groups,
    }
}

/// The group column of runs from different pipeline texts.
const PIPELINE: &str = "pipeline";

/// `PATH` -> `VALUE` of a run's `-S PATH=VALUE` overrides.
fn override_map(r: &RunFacts) -> BTreeMap<String, String> {
    r.overrides
        .iter()
        .filter_map(|o| o.split_once('='))
        .map(|(path, value)| (path.trim().to_string(), value.trim().to_string()))
        .collect()
}

/// `STAGE.PARAM` -> value, for one run.
fn param_map(r: &RunFacts) -> BTreeMap<String, String> {
    r.params
        .iter()
        .map(|(stage, _, name, v)| (format!("{stage}.{name}"), v.clone()))
        .collect()
}

fn text(v: Option<&String>) -> Value {
    v.map_or(Value::Null, |s| Value::from(s.clone()))
}

fn number(v: Option<&f64>) -> Value {
    v.and_then(|x| serde_json::Number::from_f64(*x))
        .map_or(Value::Null, Value::Number)
}

/// Whether metric `name` of `stage` is one `pattern` asks for.
pub fn matches(pattern: &str, stage: &str, name: &str) -> bool {
    match pattern.split_once(':') {
        Some((s, m)) => glob(s, stage) && glob(m, name),
        None => glob(pattern, name),
    }
}

/// `*` matches any text (none included); everything else itself.
fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    // Both ends matched first, so the cuts fall on character boundaries.
    if !text.starts_with(first) || !text.ends_with(last) || text.len() < first.len() + last.len() {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

/// Mean, standard deviation and the 95 % interval of the mean; the spread
/// and interval need two or more values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub mean: Option<f64>,
    pub sd: Option<f64>,
    pub lo: Option<f64>,
    pub hi: Option<f64>,
}

impl Summary {
    pub fn of(values: &[f64]) -> Summary {
        let n = values.len();
        if n == 0 {
            return Summary {
                mean: None,
                sd: None,
                lo: None,
                hi: None,
            };
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        if n < 2 {
            return Summary {
                mean: Some(mean),
                sd: None,
                lo: None,
                hi: None,
            };
        }
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        let sd = var.sqrt();
        let half = t_975(n - 1) * sd / (n as f64).sqrt();
        Summary {
            mean: Some(mean),
            sd: Some(sd),
            lo: Some(mean - half),
            hi: Some(mean + half),
        }
    }
}

/// The 97.5th percentile of Student's t with `df` degrees of freedom.
fn t_975(df: usize) -> f64 {
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::NAN,
        d if d <= 30 => T[d - 1],
        d if d <= 60 => 2.000 + (2.042 - 2.000) * (60 - d) as f64 / 30.0,
        d if d <= 120 => 1.980 + (2.000 - 1.980) * (120 - d) as f64 / 60.0,
        _ => 1.960,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(id: i64, kind: &str, seed: &str, bits: f64) -> RunFacts {
        RunFacts {
            id,
            overrides: vec![format!("vars.kind={kind}"), format!("vars.seed={seed}")],
            params: vec![
                (
                    "vq1".into(),
                    "train_vq".into(),
                    "decoder.kind".into(),
                    kind.into(),
                ),
                ("vq1".into(), "train_vq".into(), "seed".into(), seed.into()),
                ("vq1".into(), "train_vq".into(), "steps".into(), "20".into()),
            ],
            metrics: vec![
                (
                    "decoder1".into(),
                    "train_ar".into(),
                    "val.bits_per_dim".into(),
                    bits,
                ),
                (
                    "decoder1".into(),
                    "train_ar".into(),
                    "train.nll".into(),
                    9.0,
                ),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn differing_params_and_asked_metrics_make_the_rows() {
        let runs = [run(1, "ff", "0", 2.0), run(2, "msp", "0", 3.0)];
        let c = compare(
            &runs,
            &["val.bits_per_dim".into()],
            &GroupBy::VaryingExceptSeeds,
        );
        assert_eq!(
            c.runs.columns,
            [
                "run",
                "name",
                "vq1.decoder.kind",
                "decoder1:val.bits_per_dim"
            ]
        );
        assert_eq!(c.runs.rows[1][2], "msp");
        assert_eq!(c.runs.rows[1][3], 3.0);
        assert!(c.groups.is_none(), "every group has one run");
    }

    #[test]
    fn seeds_pool_into_groups_with_intervals() {
        let runs = [
            run(1, "ff", "0", 2.0),
            run(2, "ff", "1", 2.2),
            run(3, "msp", "0", 3.0),
            run(4, "msp", "1", 3.4),
        ];
        let c = compare(
            &runs,
            &["decoder1:val.*".into()],
            &GroupBy::VaryingExceptSeeds,
        );
        let g = c.groups.unwrap();
        assert_eq!(g.columns[..3], ["vars.kind", "n", "runs"]);
        assert_eq!(g.rows.len(), 2);
        assert_eq!(
            (g.rows[0][0].as_str(), g.rows[0][1].as_u64()),
            (Some("ff"), Some(2))
        );
        let mean = g.rows[0][3].as_f64().unwrap();
        let (lo, hi) = (
            g.rows[0][5].as_f64().unwrap(),
            g.rows[0][6].as_f64().unwrap(),
        );
        assert!((mean - 2.1).abs() < 1e-12);
        // sd 0.1414; half-width 12.706 * 0.1414 / sqrt(2) = 1.2706
        assert!((hi - mean - 1.2706).abs() < 1e-3, "{lo} {hi}");
        assert!((mean - lo - 1.2706).abs() < 1e-3);
    }

    #[test]
    fn patterns_match_stage_and_metric() {
        assert!(matches(
            "eval.*.accuracy",
            "evaluation",
            "eval.ham.accuracy"
        ));
        assert!(!matches(
            "eval.*.accuracy",
            "evaluation",
            "eval.ham.accuracy_lo"
        ));
        assert!(matches(
            "decoder*:val.bits_per_dim",
            "decoder2",
            "val.bits_per_dim"
        ));
        assert!(!matches(
            "prior:val.bits_per_dim",
            "decoder2",
            "val.bits_per_dim"
        ));
        assert!(matches("*", "a", "b"));
    }

    #[test]
    fn summaries_need_two_values_for_a_spread() {
        assert_eq!(Summary::of(&[1.0]).sd, None);
        assert_eq!(Summary::of(&[]).mean, None);
        let s = Summary::of(&[1.0, 2.0, 3.0]);
        assert_eq!((s.mean, s.sd), (Some(2.0), Some(1.0)));
    }
}
