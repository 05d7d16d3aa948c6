//! Human evaluation: the package `human_eval_export` writes (its manifest)
//! and the statistics of the answers: preference rates with a 95% Wilson
//! score interval and a two-sided exact binomial test against 1/2.
//!
//! A package holds pairwise tasks ("which image is more realistic?"), each
//! showing one image of set A and one of set B in a recorded, randomised
//! left/right order, and catch trials (a real image against an obviously
//! broken one) that screen out raters who click at random.

use serde::{Deserialize, Serialize};

pub const MANIFEST_FORMAT: &str = "haic human eval package v1";
/// The source of a catch trial's broken image.
pub const BROKEN: &str = "broken";

/// `manifest.json` of a package.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub question: String,
    /// The two compared sets (input names), A first.
    pub comparison: [String; 2],
    pub seed: u64,
    pub base_url: String,
    pub tasks: Vec<Task>,
    /// Image file (relative to the package) -> blake3 of its bytes.
    pub images: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub id: String,
    /// `pair` or `catch`.
    pub kind: String,
    pub left: Shown,
    pub right: Shown,
}

/// One image of a task: where it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Shown {
    /// Input name of its set, or [`BROKEN`] (catch trials).
    pub source: String,
    /// Row id in its table.
    pub row: i64,
    pub label: i32,
    /// Relative path of the PNG in the package.
    pub image: String,
}

impl Task {
    /// The source of the image a `choice` (`left` / `right`) picks.
    pub fn chosen(&self, choice: &str) -> Option<&str> {
        match choice {
            "left" => Some(&self.left.source),
            "right" => Some(&self.right.source),
            _ => None,
        }
    }
}

/// Reads a package's `manifest.json`: JSON of this format.
pub fn read_manifest(bytes: &[u8]) -> Result<Manifest, String> {
    let manifest: Manifest =
        serde_json::from_slice(bytes).map_err(|e| format!("not a human-eval manifest: {e}"))?;
    if manifest.format != MANIFEST_FORMAT {
        return Err(format!(
            "format `{}` is not `{MANIFEST_FORMAT}`",
            manifest.format
        ));
    }
    Ok(manifest)
}

/// What the rating page posts for one task (JSON).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Answer {
    pub task_id: String,
    pub choice: String,
    pub rater: String,
}

/// Why an answer is refused.
#[derive(Debug, Clone, PartialEq)]
pub enum BadAnswer {
    /// No task of that id in the package (HTTP 404).
    UnknownTask(String),
    /// A field out of its range (HTTP 422).
    Invalid(String),
}

impl std::fmt::Display for BadAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            BadAnswer::UnknownTask(m) | BadAnswer::Invalid(m) => f.write_str(m),
        }
    }
}

/// Rater names: 1-64 characters of letters, digits, `-`, `_`, `.`, `@`.
pub fn check_rater(rater: &str) -> Result<(), String> {
    let ok = !rater.is_empty()
        && rater.len() <= 64
        && rater
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c));
    match ok {
        true => Ok(()),
        false => Err(format!(
            "rater `{rater}`: use 1-64 letters, digits, `-`, `_`, `.` or `@`"
        )),
    }
}

impl Manifest {
    /// The task an answer is for and the source of the image it chose,
    /// every field checked.
    pub fn check_answer(&self, a: &Answer) -> Result<(&Task, &str), BadAnswer> {
        let task = self
            .tasks
            .iter()
            .find(|t| t.id == a.task_id)
            .ok_or_else(|| {
                BadAnswer::UnknownTask(format!("no task `{}` in this package", a.task_id))
            })?;
        let chosen = task.chosen(&a.choice).ok_or_else(|| {
            BadAnswer::Invalid(format!("choice `{}`: answer `left` or `right`", a.choice))
        })?;
        check_rater(&a.rater).map_err(BadAnswer::Invalid)?;
        Ok((task, chosen))
    }
}

/// `tasks.csv`: one row per task, `task_id,image_left_url,image_right_url`
/// (the batch-file format of crowd platforms), URLs under `base_url`.
pub fn tasks_csv(manifest: &Manifest, base_url: &str) -> Result<Vec<u8>, csv::Error> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(["task_id", "image_left_url", "image_right_url"])?;
    for t in &manifest.tasks {
        w.write_record([
            t.id.clone(),
            format!("{base_url}{}", t.left.image),
            format!("{base_url}{}", t.right.image),
        ])?;
    }
    w.into_inner().map_err(|e| csv::Error::from(e.into_error()))
}

/// 95% Wilson score interval of `k` successes in `n` trials.
pub fn wilson_interval(k: u64, n: u64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let z = 1.959_963_984_540_054_f64;
    let (n, p) = (n as f64, k as f64 / n as f64);
    let denom = 1.0 + z * z / n;
    let centre = (p + z * z / (2.0 * n)) / denom;
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / denom;
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// Two-sided exact binomial test of `k` in `n` against p = 1/2: the
/// probability of an outcome at most as likely as `k` (for p = 1/2, twice
/// the smaller tail, capped at 1).
pub fn binomial_test_two_sided(k: u64, n: u64) -> f64 {
    if n == 0 {
        return 1.0;
    }
    let lo = k.min(n - k);
    // P(X <= lo) for X ~ Bin(n, 1/2), with log terms for large n.
    let ln_half_n = n as f64 * 0.5f64.ln();
    let mut ln_choose = 0.0; // ln C(n, 0)
    let mut tail = 0.0;
    for i in 0..=lo {
        if i > 0 {
            ln_choose += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        tail += (ln_choose + ln_half_n).exp();
    }
    (2.0 * tail).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() < tol
    }

    /// Known values: Wilson intervals as computed by
    /// statsmodels' `proportion_confint(k, n, method="wilson")`, binomial
    /// p-values as by scipy's `binomtest(k, n).pvalue` (and by hand:
    /// 8 of 10 is 2 * 56 / 1024).
    #[test]
    fn wilson_interval_and_binomial_test_give_known_values() {
        let (lo, hi) = wilson_interval(8, 10);
        assert!(
            close(lo, 0.4901625, 1e-6) && close(hi, 0.9433178, 1e-6),
            "{lo} {hi}"
        );
        let (lo, hi) = wilson_interval(0, 10);
        assert!(
            close(lo, 0.0, 1e-12) && close(hi, 0.2775328, 1e-6),
            "{lo} {hi}"
        );
        let (lo, hi) = wilson_interval(50, 100);
        assert!(
            close(lo, 0.4038315, 1e-6) && close(hi, 0.5961685, 1e-6),
            "{lo} {hi}"
        );
        assert_eq!(wilson_interval(0, 0), (0.0, 1.0));

        assert!(close(binomial_test_two_sided(8, 10), 0.109375, 1e-12));
        assert!(close(binomial_test_two_sided(2, 10), 0.109375, 1e-12));
        assert!(close(binomial_test_two_sided(5, 10), 1.0, 1e-12));
        assert!(close(binomial_test_two_sided(10, 10), 2.0 / 1024.0, 1e-15));
        assert!(close(
            binomial_test_two_sided(60, 100),
            0.056887933640980,
            1e-9
        ));
        assert_eq!(binomial_test_two_sided(0, 0), 1.0);
    }
}
