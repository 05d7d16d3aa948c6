//! `haic-pipe eval`: human evaluation of a package that `human_eval_export`
//! wrote. `serve` runs the local rating page, `import` reads a crowd
//! platform's results file, `report` prints preference rates. Answers go
//! to the registry's `ratings` table; the statistics live in
//! `stages::human_eval`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use pipeline::registry::{Rating, RatingPackage, Registry};
use serde::Deserialize;
use stages::human_eval::{
    Answer, BROKEN, BadAnswer, Manifest, binomial_test_two_sided, check_rater, read_manifest,
    wilson_interval,
};

/// The largest answer body the rating page accepts.
const MAX_ANSWER_BYTES: usize = 4096;

/// A package on disk: its manifest and the digest that names it.
pub struct Package {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub digest: String,
}

impl Package {
    pub fn open(dir: &Path) -> Result<Package> {
        let path = dir.join("manifest.json");
        let bytes = std::fs::read(&path).with_context(|| {
            format!(
                "reading {}: PACKAGE must be the folder a human_eval_export stage wrote (`haic-pipe show PIPELINE STAGE` prints it)",
                path.display()
            )
        })?;
        let manifest =
            read_manifest(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(Package {
            dir: std::path::absolute(dir)?,
            digest: blake3::hash(&bytes).to_hex().to_string(),
            manifest,
        })
    }

    fn record(&self) -> RatingPackage {
        RatingPackage {
            digest: self.digest.clone(),
            path: self.dir.display().to_string(),
            set_a: self.manifest.comparison[0].clone(),
            set_b: self.manifest.comparison[1].clone(),
            tasks: self.manifest.tasks.len() as i64,
        }
    }

    /// The rating an answer gives, checked.
    fn rating(&self, a: &Answer, origin: &str) -> Result<Rating, BadAnswer> {
        let (task, chosen) = self.manifest.check_answer(a)?;
        Ok(Rating {
            package: self.digest.clone(),
            task_id: task.id.clone(),
            kind: task.kind.clone(),
            rater: a.rater.clone(),
            choice: a.choice.clone(),
            chosen: chosen.to_string(),
            origin: origin.to_string(),
        })
    }
}

struct Served {
    package: Package,
    registry: Registry,
}

#[derive(Deserialize)]
struct RaterQuery {
    rater: Option<String>,
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        axum::Json(serde_json::json!({"error": message.into()})),
    )
        .into_response()
}

/// Serves the rating page until Ctrl-C. Prints the page's address first
/// (a line `rating page: URL`).
pub async fn serve(registry_path: &Path, package: Package, host: &str, port: u16) -> Result<()> {
    let registry = Registry::open(registry_path).await?;
    registry.register_rating_package(&package.record()).await?;
    let state = Arc::new(Served { package, registry });
    let app = Router::new()
        .route("/", get(page))
        .route("/api/tasks", get(tasks))
        .route("/api/answer", post(answer))
        .route("/images/{file}", get(image))
        .layer(DefaultBodyLimit::max(MAX_ANSWER_BYTES))
        .with_state(state.clone());
    crate::serve::run(host, port, app, |url| {
        format!(
            "rating page: {url}\npackage {} ({} tasks, {} vs {}); answers go to {}; Ctrl-C stops",
            state.package.dir.display(),
            state.package.manifest.tasks.len(),
            state.package.manifest.comparison[0],
            state.package.manifest.comparison[1],
            registry_path.display()
        )
    })
    .await
}

async fn page() -> Html<&'static str> {
    Html(include_str!("rating_page.html"))
}

/// The tasks `rater` has not answered yet: ids and image URLs only, never
/// which set an image came from.
async fn tasks(State(s): State<Arc<Served>>, Query(q): Query<RaterQuery>) -> Response {
    let rater = q.rater.unwrap_or_default();
    if let Err(m) = check_rater(&rater) {
        return error(StatusCode::UNPROCESSABLE_ENTITY, m);
    }
    let done: BTreeSet<String> = match s.registry.ratings(Some(&s.package.digest)).await {
        Ok(r) => r
            .into_iter()
            .filter(|r| r.rater == rater)
            .map(|r| r.task_id)
            .collect(),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let m = &s.package.manifest;
    let open: Vec<serde_json::Value> = m
        .tasks
        .iter()
        .filter(|t| !done.contains(&t.id))
        .map(|t| serde_json::json!({"id": t.id, "left": format!("/{}", t.left.image), "right": format!("/{}", t.right.image)}))
        .collect();
    axum::Json(serde_json::json!({
        "question": m.question,
        "total": m.tasks.len(),
        "answered": done.len(),
        "tasks": open,
    }))
    .into_response()
}

async fn answer(
    State(s): State<Arc<Served>>,
    body: Result<axum::Json<Answer>, JsonRejection>,
) -> Response {
    let axum::Json(a) = match body {
        Ok(b) => b,
        Err(e) => return error(e.status(), format!("not an answer: {}", e.body_text())),
    };
    let rating = match s.package.rating(&a, "local") {
        Ok(r) => r,
        Err(BadAnswer::UnknownTask(m)) => return error(StatusCode::NOT_FOUND, m),
        Err(BadAnswer::Invalid(m)) => return error(StatusCode::UNPROCESSABLE_ENTITY, m),
    };
    match s.registry.insert_ratings(&[rating]).await {
        Ok(added) => axum::Json(serde_json::json!({"stored": added == 1})).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// A PNG of the package, by a name the manifest lists.
async fn image(State(s): State<Arc<Served>>, UrlPath(file): UrlPath<String>) -> Response {
    let rel = format!("images/{file}");
    if !s.package.manifest.images.contains_key(&rel) {
        return error(StatusCode::NOT_FOUND, format!("no image `{file}`"));
    }
    match tokio::fs::read(s.package.dir.join(&rel)).await {
        Ok(bytes) => ([(header::CONTENT_TYPE, "image/png")], bytes).into_response(),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reading {rel}: {e}"),
        ),
    }
}

/// Column names of a results file, in the order tried: the crowd
/// platforms' batch-results names first (`Input.`/`Answer.` prefixes, as
/// Mechanical Turk writes them), then plain ones.
const TASK_COLUMNS: &[&str] = &["Input.task_id", "task_id"];
const CHOICE_COLUMNS: &[&str] = &["Answer.choice", "choice"];
const RATER_COLUMNS: &[&str] = &["WorkerId", "worker_id", "rater"];

/// Reads a results CSV; every row is checked before any is stored, so a
/// bad file stores nothing. Returns (rows, newly stored).
pub async fn import(
    registry_path: &Path,
    package: &Package,
    results: &Path,
) -> Result<(usize, u64)> {
    let text = std::fs::read(results).with_context(|| format!("reading {}", results.display()))?;
    let mut reader = csv::Reader::from_reader(text.as_slice());
    let headers = reader
        .headers()
        .with_context(|| format!("{}: reading the header row", results.display()))?
        .clone();
    let column = |names: &[&str]| -> Result<usize> {
        names
            .iter()
            .find_map(|n| headers.iter().position(|h| h == *n))
            .with_context(|| {
                format!(
                    "{}: no column {}; the header row has {:?}",
                    results.display(),
                    names.join(" or "),
                    headers.iter().collect::<Vec<_>>()
                )
            })
    };
    let (task_col, choice_col, rater_col) = (
        column(TASK_COLUMNS)?,
        column(CHOICE_COLUMNS)?,
        column(RATER_COLUMNS)?,
    );
    let origin = format!(
        "import:{}",
        results.file_name().unwrap_or_default().to_string_lossy()
    );
    let mut ratings = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let line = i + 2;
        let record =
            record.with_context(|| format!("{}:{line}: not a CSV row", results.display()))?;
        let field = |c: usize| record.get(c).unwrap_or("").trim();
        let answer = Answer {
            task_id: field(task_col).to_string(),
            choice: field(choice_col).to_lowercase(),
            rater: field(rater_col).to_string(),
        };
        let rating = package.rating(&answer, &origin).map_err(|m| {
            anyhow::anyhow!("{}:{line}: {m}; nothing was imported", results.display())
        })?;
        ratings.push(rating);
    }
    let registry = Registry::open(registry_path).await?;
    registry.register_rating_package(&package.record()).await?;
    let added = registry.insert_ratings(&ratings).await?;
    Ok((ratings.len(), added))
}

/// One comparison's outcome.
#[derive(Clone)]
pub struct Outcome {
    pub package: RatingPackage,
    pub raters: usize,
    pub excluded_raters: usize,
    pub catch_answers: usize,
    /// Pair answers of kept raters, and how many chose set B.
    pub answers: u64,
    pub chose_b: u64,
}

/// Preference counts per package; raters who chose the broken image in
/// any catch trial are left out entirely.
pub async fn outcomes(registry_path: &Path) -> Result<Vec<Outcome>> {
    // Reading makes nothing: no registry (or `.haic`) where there is none.
    if !registry_path.exists() {
        bail!(
            "no registry at {}: run a pipeline first, or pass `-p PIPELINE` (or `--workspace DIR`) to find its workspace",
            registry_path.display()
        );
    }
    let registry = Registry::open(registry_path).await?;
    let mut out = Vec::new();
    for package in registry.rating_packages().await? {
        let ratings = registry.ratings(Some(&package.digest)).await?;
        let failed: BTreeSet<&str> = ratings
            .iter()
            .filter(|r| r.kind == "catch" && r.chosen == BROKEN)
            .map(|r| r.rater.as_str())
            .collect();
        let raters: BTreeSet<&str> = ratings.iter().map(|r| r.rater.as_str()).collect();
        let kept: Vec<&Rating> = ratings
            .iter()
            .filter(|r| r.kind == "pair" && !failed.contains(r.rater.as_str()))
            .collect();
        let chose_b = kept.iter().filter(|r| r.chosen == package.set_b).count() as u64;
        out.push(Outcome {
            raters: raters.len(),
            excluded_raters: failed.len(),
            catch_answers: ratings.iter().filter(|r| r.kind == "catch").count(),
            answers: kept.len() as u64,
            chose_b,
            package,
        });
    }
    Ok(out)
}

/// The report as text: per package, how often each set was preferred.
pub fn render_report(outcomes: &[Outcome]) -> String {
    if outcomes.is_empty() {
        return "no ratings yet: rate a package with `haic-pipe eval serve PACKAGE` or import a results file with `haic-pipe eval import RESULTS.csv --package PACKAGE`\n".into();
    }
    let mut s = String::new();
    for o in outcomes {
        let p = &o.package;
        s.push_str(&format!(
            "{} vs {} (package {}, {} tasks): {} raters, {} of them excluded for choosing the broken image in a catch trial ({} catch answers); {} pair answers kept\n",
            p.set_a,
            p.set_b,
            short_digest(&p.digest),
            p.tasks,
            o.raters,
            o.excluded_raters,
            o.catch_answers,
            o.answers
        ));
        if o.answers == 0 {
            s.push_str("  no pair answers from raters who passed the catch trials\n");
            continue;
        }
        let pvalue = binomial_test_two_sided(o.chose_b, o.answers);
        for (name, k) in [(&p.set_b, o.chose_b), (&p.set_a, o.answers - o.chose_b)] {
            let (lo, hi) = wilson_interval(k, o.answers);
            s.push_str(&format!(
                "  {name:<12} preferred {k:>4} / {:<4} = {:>5.1} %  95% Wilson CI [{:.1}, {:.1}] %\n",
                o.answers,
                100.0 * k as f64 / o.answers as f64,
                100.0 * lo,
                100.0 * hi
            ));
        }
        s.push_str(&format!(
            "  two-sided binomial test against no preference (p = 1/2): p = {pvalue:.4}\n"
        ));
    }
    s
}

/// The workspace registry a package belongs to: the first folder above it
/// that holds `registry.db` (packages live in a workspace's artifact store).
pub fn registry_above(package: &Path) -> Option<PathBuf> {
    let abs = std::path::absolute(package).ok()?;
    abs.ancestors()
        .map(|d| d.join("registry.db"))
        .find(|p| p.is_file())
}

/// The first 12 characters of a package digest, or all of a shorter one
/// (a digest comes from a file or the registry: never sliced unchecked).
fn short_digest(digest: &str) -> &str {
    match digest.char_indices().nth(12) {
        Some((end, _)) => &digest[..end],
        None => digest,
    }
}

#[cfg(test)]
mod tests {
    use super::short_digest;

    #[test]
    fn a_short_or_odd_digest_is_shown_whole_not_sliced() {
        assert_eq!(short_digest(&"ab".repeat(32)), "abababababab");
        assert_eq!(short_digest("abc"), "abc");
        assert_eq!(short_digest(""), "");
        assert_eq!(short_digest("ééééééééééééé"), "éééééééééééé");
    }
}
