//! `haic-pipe ui`: a live dashboard over a workspace's registry. Pages are
//! drawn on the server from the pieces the static report uses
//! (`crate::html`); `ui/app.js` draws the curves (uPlot, vendored) and
//! keeps the pages live.
//!
//! Live means short polling: the page asks `/api/version` once a second
//! for SQLite's `data_version`, one number that changes when the driver
//! commits, and fetches its live parts again only then. The writer is
//! another process and SQLite tells no one of a commit, so a server push
//! would itself have to poll; polling from the page keeps the server
//! without per-client state and costs one PRAGMA per tab per second.
//!
//! Read-only: every connection is opened read-only (SQLite refuses
//! writes), files are served only when the artifact's manifest lists them,
//! the registry names them as a stage's log inside the workspace, or they
//! are a running stage's step images (by their name's form) in the scratch
//! folder of its key.

mod lttb;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Result;
use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use pipeline::cache::ArtifactStore;
use pipeline::compare::{GroupBy, compare};
use pipeline::registry::{Reader, RunDetail, RunFilter, RunRow, RunStatus, RunsPage, StageRow};
use pipeline::stage::Kinds;
use pipeline::workspace::Workspace;
use serde::Deserialize;

use crate::html::{LastValues, STYLE, bits_table, esc, evaluation_table, html_table};

/// The most runs a page lists at once, and the most a comparison takes.
const MAX_LIMIT: i64 = 1000;
const MAX_COMPARED: usize = 50;
/// The most points a curve is drawn with (downsampled to that on the server).
const MAX_POINTS: usize = 20_000;
const DEFAULT_POINTS: usize = 2000;
/// How much of a log's end the log page shows.
const LOG_TAIL_BYTES: u64 = 64 * 1024;
/// The most files an artifact's list shows.
const FILES_SHOWN: usize = 20;

const UPLOT_JS: &str = include_str!("ui/vendor/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("ui/vendor/uPlot.min.css");
const UPLOT_LICENSE: &str = include_str!("ui/vendor/uPlot.LICENSE");
const APP_JS: &str = include_str!("ui/app.js");
const UI_STYLE: &str = include_str!("ui/ui.css");

struct App {
    ws: Workspace,
    registry: PathBuf,
    store: ArtifactStore,
    kinds: Arc<Kinds>,
    /// The connection whose `data_version` the pages poll: it must be the
    /// same one each time for the number to mean anything. Opened at the
    /// first poll that finds a registry (there is none before the first run).
    version: tokio::sync::Mutex<Option<Reader>>,
}

/// A request the dashboard refuses or cannot answer: a status and why.
struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (
            self.0,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            self.1,
        )
            .into_response()
    }
}

impl From<pipeline::Error> for Failure {
    fn from(e: pipeline::Error) -> Self {
        Failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

fn bad(message: impl Into<String>) -> Failure {
    Failure(StatusCode::BAD_REQUEST, message.into())
}

fn not_found(message: impl Into<String>) -> Failure {
    Failure(StatusCode::NOT_FOUND, message.into())
}

type Answer<T> = std::result::Result<T, Failure>;

/// Serves the dashboard until Ctrl-C; prints its address first (a line
/// `dashboard: URL`).
pub async fn serve(ws: &Workspace, kinds: Arc<Kinds>, host: &str, port: u16) -> Result<()> {
    let app = Arc::new(App {
        ws: ws.clone(),
        registry: ws.registry_path(),
        store: ws.store(),
        kinds,
        version: tokio::sync::Mutex::new(None),
    });
    crate::serve::run(host, port, router(app), |url| {
        format!(
            "dashboard: {url}\nworkspace {} (read-only); Ctrl-C stops",
            ws.root.display()
        )
    })
    .await
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(runs_page))
        .route("/runs/{run}", get(run_page))
        .route("/runs/{run}/logs/{stage}", get(log_tail))
        .route("/runs/{run}/live/{stage}/{file}", get(live_step_image))
        .route("/compare", get(compare_page))
        .route("/compare.csv", get(compare_csv))
        .route("/fragments/runs", get(runs_fragment))
        .route("/fragments/runs/{run}", get(run_fragment))
        .route("/fragments/runs/{run}/images", get(images_fragment))
        .route("/artifacts/{key}/{*file}", get(artifact_file))
        .route("/api/version", get(version))
        .route("/api/runs", get(runs_json))
        .route("/api/runs/{run}", get(run_json))
        .route("/api/metrics", get(metrics_json))
        .route("/api/series", get(series_json))
        .route("/static/{file}", get(static_file))
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .fallback(|| async { not_found("no such page; the runs are at /") })
        .with_state(app)
}

impl App {
    async fn reader(&self) -> Answer<Reader> {
        Ok(Reader::open(&self.registry).await?)
    }
}

// ---- query strings ----

#[derive(Deserialize, Default)]
struct RunsQuery {
    tag: Option<String>,
    status: Option<String>,
    param: Option<String>,
    limit: Option<String>,
    offset: Option<String>,
}

/// A query string that did not parse: 400 saying so.
fn query<T: Default>(q: std::result::Result<Query<T>, QueryRejection>) -> Answer<T> {
    match q {
        Ok(Query(t)) => Ok(t),
        Err(e) => Err(bad(format!("malformed query string: {}", e.body_text()))),
    }
}

/// A form field: absent and empty alike are unset.
fn given(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

fn number(name: &str, v: &Option<String>, default: i64, max: i64) -> Answer<i64> {
    match given(v) {
        None => Ok(default),
        Some(text) => match text.parse::<i64>() {
            Ok(n) if (0..=max).contains(&n) => Ok(n),
            _ => Err(bad(format!(
                "`{name}` must be a whole number from 0 to {max}, not `{text}`"
            ))),
        },
    }
}

impl RunsQuery {
    fn filter(&self) -> Answer<(RunFilter, i64, i64)> {
        let status = match given(&self.status) {
            None => None,
            Some(s) => Some(s.parse::<RunStatus>().map_err(|_| {
                bad(format!(
                    "`status` must be running, succeeded, failed or interrupted, not `{s}`"
                ))
            })?),
        };
        let param = match given(&self.param) {
            None => None,
            Some(p) => {
                let parsed = p.split_once('=').and_then(|(name, value)| {
                    let (stage, name) = name.trim().split_once('.')?;
                    Some((
                        stage.to_string(),
                        name.to_string(),
                        value.trim().to_string(),
                    ))
                });
                Some(parsed.ok_or_else(|| {
                    bad(format!(
                        "`param` must be STAGE.PARAM=VALUE (e.g. vq1.quantiser.codebook_size=64), not `{p}`"
                    ))
                })?)
            }
        };
        let filter = RunFilter {
            tag: given(&self.tag).map(str::to_string),
            status,
            param,
        };
        let limit = number("limit", &self.limit, 50, MAX_LIMIT)?.max(1);
        let offset = number("offset", &self.offset, 0, i64::from(i32::MAX))?;
        Ok((filter, limit, offset))
    }

    /// The query string that gives this page again, `offset` changed.
    fn with_offset(&self, offset: i64) -> String {
        let mut parts = Vec::new();
        for (k, v) in [
            ("tag", &self.tag),
            ("status", &self.status),
            ("param", &self.param),
            ("limit", &self.limit),
        ] {
            if let Some(v) = given(v) {
                parts.push(format!("{k}={}", encode(v)));
            }
        }
        parts.push(format!("offset={offset}"));
        parts.join("&")
    }
}

/// Percent-encoding for a query value.
fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

/// The run a URL names by id or name; 404 when there is none.
async fn find_run(reader: &mut Reader, which: &str) -> Answer<i64> {
    reader
        .find_run(which)
        .await?
        .ok_or_else(|| not_found(format!("no run `{which}` in this workspace")))
}

/// The runs `runs=1,2,x` names (ids or names), each there, at most
/// MAX_COMPARED.
async fn named_runs(reader: &mut Reader, runs: &Option<String>) -> Answer<Vec<i64>> {
    let Some(list) = given(runs) else {
        return Err(bad("name the runs: ?runs=ID,ID (ids or names)"));
    };
    let names: Vec<&str> = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if names.len() > MAX_COMPARED {
        return Err(bad(format!(
            "{} runs named; at most {MAX_COMPARED} at once",
            names.len()
        )));
    }
    let mut ids = Vec::with_capacity(names.len());
    for which in names {
        match reader.find_run(which).await? {
            Some(id) if !ids.contains(&id) => ids.push(id),
            Some(_) => {}
            None => return Err(not_found(format!("no run `{which}` in this workspace"))),
        }
    }
    if ids.is_empty() {
        return Err(bad("name the runs: ?runs=ID,ID (ids or names)"));
    }
    Ok(ids)
}

// ---- pages ----

/// A whole page around `body`. `version` is the registry's version read
/// before `body` was: the page's first poll refreshes only if it moved.
fn page(app: &App, version: i64, title: &str, body: &str) -> Html<String> {
    Html(format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t} · haic-pipe</title>\
<link rel=\"stylesheet\" href=\"/static/uplot.css\"><style>{STYLE}{UI_STYLE}</style></head><body data-version=\"{version}\">\n\
<nav><a href=\"/\">haic-pipe</a> · <span title=\"the workspace\">{ws}</span> · <span id=\"live\">live</span></nav>\n\
<main>\n{body}\n</main>\n<script src=\"/static/uplot.js\"></script><script src=\"/static/app.js\"></script></body></html>\n",
        t = esc(title),
        ws = esc(&app.ws.root.display().to_string()),
    ))
}

async fn runs_page(
    State(app): State<Arc<App>>,
    q: std::result::Result<Query<RunsQuery>, QueryRejection>,
) -> Answer<Html<String>> {
    let q = query(q)?;
    let version = app.version().await?;
    let table = runs_table(&app, &q).await?;
    let selected = |v: &str| match given(&q.status) == Some(v) {
        true => " selected",
        false => "",
    };
    let mut body = String::from("<h1>Runs</h1>\n<form id=\"filter\" method=\"get\" action=\"/\">");
    let _ = writeln!(
        body,
        "<label>tag <input name=\"tag\" value=\"{}\"></label> \
<label>status <select name=\"status\"><option value=\"\">any</option>{}</select></label> \
<label>param <input name=\"param\" size=\"34\" placeholder=\"vq1.quantiser.codebook_size=64\" value=\"{}\"></label> \
<button>filter</button></form>",
        esc(given(&q.tag).unwrap_or_default()),
        ["running", "succeeded", "failed", "interrupted"]
            .iter()
            .map(|s| format!("<option{}>{s}</option>", selected(s)))
            .collect::<String>(),
        esc(given(&q.param).unwrap_or_default()),
    );
    body.push_str("<p><button id=\"compare-selected\" disabled>compare selected</button> <small>tick two runs or more</small></p>\n");
    let _ = write!(
        body,
        "<div id=\"runs\" data-live=\"/fragments/runs?{}\">{table}</div>",
        esc(&q.with_offset(number("offset", &q.offset, 0, i64::from(i32::MAX))?))
    );
    Ok(page(&app, version, "runs", &body))
}

async fn runs_fragment(
    State(app): State<Arc<App>>,
    q: std::result::Result<Query<RunsQuery>, QueryRejection>,
) -> Answer<Html<String>> {
    let q = query(q)?;
    Ok(Html(runs_table(&app, &q).await?))
}

fn status_badge(status: &str) -> String {
    format!("<span class=\"st st-{0}\">{0}</span>", esc(status))
}

fn duration(seconds: Option<f64>) -> String {
    match seconds {
        Some(s) if s >= 3600.0 => format!("{:.1} h", s / 3600.0),
        Some(s) if s >= 60.0 => format!("{:.1} min", s / 60.0),
        Some(s) => format!("{s:.1} s"),
        None => String::new(),
    }
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

fn run_label(r: &RunRow) -> String {
    match &r.name {
        Some(n) => format!("{} <small>#{}</small>", esc(n), r.id),
        None => format!("#{}", r.id),
    }
}

async fn runs_table(app: &App, q: &RunsQuery) -> Answer<String> {
    let (filter, limit, offset) = q.filter()?;
    if !app.registry.exists() {
        return Ok(format!(
            "<p class=\"count\" data-total=\"0\">No runs yet in {}: <code>haic-pipe run PIPELINE</code> starts one, and this page shows it.</p>",
            esc(&app.ws.root.display().to_string())
        ));
    }
    let RunsPage { total, rows } = app
        .reader()
        .await?
        .runs_page(&filter, limit, offset)
        .await?;
    let mut t = format!(
        "<p class=\"count\" data-total=\"{total}\">{total} run(s){}</p>\n",
        match rows.is_empty() {
            true => String::new(),
            false => format!(", showing {} to {}", offset + 1, offset + rows.len() as i64),
        }
    );
    t.push_str("<table class=\"runs\"><tr><th></th><th>run</th><th>status</th><th>started (UTC)</th><th>duration</th><th>stages</th><th>tags</th><th>sweep</th><th>-S</th><th>pipeline</th></tr>\n");
    for r in &rows {
        let stages: Vec<String> = r.stages.iter().map(|(s, n)| format!("{n} {s}")).collect();
        let _ = writeln!(
            t,
            "<tr data-run=\"{id}\" data-status=\"{st}\"><td><input type=\"checkbox\" class=\"pick\" value=\"{id}\" aria-label=\"select run {id}\"></td>\
<td><a href=\"/runs/{id}\">{label}</a></td><td>{badge}</td><td>{start}</td><td class=\"n\">{dur}</td><td>{stages}</td><td>{tags}</td><td>{sweep}</td><td>{ovr}</td><td title=\"{pfull}\">{pname}</td></tr>",
            id = r.id,
            st = esc(&r.status),
            label = run_label(r),
            badge = status_badge(&r.status),
            start = esc(r.started_at.get(..19).unwrap_or(&r.started_at)),
            dur = duration(r.seconds),
            stages = esc(&stages.join(" · ")),
            tags = r
                .tags
                .iter()
                .map(|t| format!(
                    "<a class=\"tag\" href=\"/?tag={}\">{}</a>",
                    encode(t),
                    esc(t)
                ))
                .collect::<Vec<_>>()
                .join(" "),
            sweep = esc(&r.swept.join(", ")),
            ovr = esc(&r.overrides.join(" ")),
            pfull = esc(&r.pipeline),
            pname = esc(file_name(&r.pipeline)),
        );
    }
    t.push_str("</table>\n<p class=\"pages\">");
    if offset > 0 {
        let _ = write!(
            t,
            "<a href=\"/?{}\">newer</a> ",
            esc(&q.with_offset((offset - limit).max(0)))
        );
    }
    if offset + (rows.len() as i64) < total {
        let _ = write!(
            t,
            "<a href=\"/?{}\">older</a>",
            esc(&q.with_offset(offset + limit))
        );
    }
    t.push_str("</p>\n");
    Ok(t)
}

async fn detail(app: &App, run: &str) -> Answer<RunDetail> {
    let mut reader = app.reader().await?;
    let id = find_run(&mut reader, run).await?;
    reader
        .run_detail(id)
        .await?
        .ok_or_else(|| not_found(format!("no run {id} in this workspace")))
}

async fn run_page(
    State(app): State<Arc<App>>,
    UrlPath(run): UrlPath<String>,
) -> Answer<Html<String>> {
    let version = app.version().await?;
    let d = detail(&app, &run).await?;
    let id = d.run.id;
    let r = &d.run;
    let mut body = format!("<h1>Run {}</h1>\n<p>", run_label(r));
    let _ = write!(
        body,
        "{} · <span title=\"{}\">{}</span> · started {} UTC",
        status_badge(&r.status),
        esc(&r.pipeline),
        esc(file_name(&r.pipeline)),
        esc(r.started_at.get(..19).unwrap_or(&r.started_at)),
    );
    for t in &r.tags {
        let _ = write!(
            body,
            " <a class=\"tag\" href=\"/?tag={}\">{}</a>",
            encode(t),
            esc(t)
        );
    }
    body.push_str("</p>\n");
    if !r.overrides.is_empty() {
        let _ = writeln!(body, "<p>-S {}</p>", esc(&r.overrides.join(" -S ")));
    }
    if let Some(n) = &r.note {
        let _ = writeln!(body, "<p class=\"note\">{}</p>", esc(n));
    }
    let _ = writeln!(
        body,
        "<div id=\"stages\" data-live=\"/fragments/runs/{id}\">{}</div>",
        run_live_part(&app, &d)
    );
    body.push_str("<h2 id=\"curves\">Curves</h2>\n");
    body.push_str(&chart_widget(&[id]));
    let _ = writeln!(
        body,
        "<div id=\"images\" data-live=\"/fragments/runs/{id}/images\">{}</div>",
        images_part(&app, &d)
    );
    body.push_str(&params_part(&d));
    Ok(page(&app, version, &format!("run {id}"), &body))
}

async fn run_fragment(
    State(app): State<Arc<App>>,
    UrlPath(run): UrlPath<String>,
) -> Answer<Html<String>> {
    let d = detail(&app, &run).await?;
    Ok(Html(run_live_part(&app, &d)))
}

async fn images_fragment(
    State(app): State<Arc<App>>,
    UrlPath(run): UrlPath<String>,
) -> Answer<Html<String>> {
    let d = detail(&app, &run).await?;
    Ok(Html(images_part(&app, &d)))
}

/// The ETA of a running stage from its steps so far: (elapsed / step) per
/// remaining step.
fn eta(s: &StageRow) -> Option<f64> {
    match (s.status.as_str(), s.step, s.steps, s.seconds) {
        ("running", Some(step), Some(steps), Some(secs)) if step > 0 && steps > step => {
            Some(secs * (steps - step) as f64 / step as f64)
        }
        _ => None,
    }
}

/// The columns of the stage graph: each stage one column right of the
/// last of its inputs' stages (stages not started yet at the end).
fn graph_layers(stages: &[StageRow]) -> Vec<Vec<usize>> {
    let by_digest: HashMap<&str, usize> = stages
        .iter()
        .enumerate()
        .filter_map(|(i, s)| Some((s.artifact.as_ref()?.digest.as_str(), i)))
        .collect();
    let deps: Vec<Vec<usize>> = stages
        .iter()
        .map(|s| {
            s.inputs
                .iter()
                .filter_map(|k| by_digest.get(k.as_str()).copied())
                .collect()
        })
        .collect();
    fn depth(
        i: usize,
        deps: &[Vec<usize>],
        memo: &mut [Option<usize>],
        seen: &mut [bool],
    ) -> usize {
        if let Some(d) = memo[i] {
            return d;
        }
        if seen[i] {
            return 0; // a cycle cannot be, but must not loop
        }
        seen[i] = true;
        let d = deps[i]
            .iter()
            .map(|&j| depth(j, deps, memo, seen) + 1)
            .max()
            .unwrap_or(0);
        memo[i] = Some(d);
        d
    }
    let mut memo = vec![None; stages.len()];
    let mut seen = vec![false; stages.len()];
    let mut layers: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    let unplaced = usize::MAX;
    for (i, s) in stages.iter().enumerate() {
        let d = match s.inputs.is_empty() && s.status == "pending" {
            true => unplaced,
            false => depth(i, &deps, &mut memo, &mut seen),
        };
        layers.entry(d).or_default().push(i);
    }
    layers.into_values().collect()
}

fn run_live_part(app: &App, d: &RunDetail) -> String {
    let id = d.run.id;
    let mut h = format!(
        "<p class=\"run-status\" data-status=\"{}\">run {}{}</p>\n<h2 id=\"graph\">Stages</h2>\n<div class=\"graph\">",
        esc(&d.run.status),
        status_badge(&d.run.status),
        match d.run.seconds {
            Some(_) => format!(" · {}", duration(d.run.seconds)),
            None => String::new(),
        }
    );
    let names: HashMap<&str, &str> = d
        .stages
        .iter()
        .filter_map(|s| Some((s.artifact.as_ref()?.digest.as_str(), s.stage.as_str())))
        .collect();
    for layer in graph_layers(&d.stages) {
        h.push_str("<div class=\"layer\">");
        for i in layer {
            let s = &d.stages[i];
            let inputs: Vec<&str> = s
                .inputs
                .iter()
                .filter_map(|k| names.get(k.as_str()).copied())
                .collect();
            let _ = write!(
                h,
                "<a class=\"node st-{st}\" href=\"#stage-{name}\" data-stage=\"{name}\" data-status=\"{st}\" title=\"{title}\">{name}<small>{kind} · {st}</small></a>",
                st = esc(&s.status),
                name = esc(&s.stage),
                kind = esc(&s.kind),
                title = esc(&match inputs.is_empty() {
                    true => "no inputs".to_string(),
                    false => format!("inputs: {}", inputs.join(", ")),
                }),
            );
        }
        h.push_str("</div>");
    }
    h.push_str("</div>\n<table class=\"stages\"><tr><th>stage</th><th>kind</th><th>status</th><th>progress</th><th>ETA</th><th>duration</th><th>where</th><th>error / log</th></tr>\n");
    for s in &d.stages {
        let progress = match (s.step, s.steps) {
            (Some(step), Some(steps)) if steps > 0 => format!(
                "step {step} / {steps} ({:.0} %)",
                100.0 * step as f64 / steps as f64
            ),
            (Some(step), _) if step > 0 => format!("step {step}"),
            _ => String::new(),
        };
        let place = [s.worker.as_deref(), s.device.as_deref()]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(" · ");
        let mut trouble = String::new();
        if let Some(e) = &s.error {
            let short: String = e.chars().take(400).collect();
            let _ = write!(trouble, "<pre class=\"error\">{}</pre>", esc(&short));
        }
        if s.has_log {
            let _ = write!(
                trouble,
                "<a href=\"/runs/{id}/logs/{}\">log tail</a>",
                encode(&s.stage)
            );
        }
        let _ = writeln!(
            h,
            "<tr id=\"stage-{name}\" data-stage=\"{name}\" data-status=\"{st}\" data-step=\"{step}\"><td>{name}</td><td>{kind}</td><td>{badge}{attempt}</td><td>{progress}</td><td class=\"n\">{eta}</td><td class=\"n\">{dur}</td><td>{place}</td><td>{trouble}</td></tr>",
            name = esc(&s.stage),
            st = esc(&s.status),
            step = s.step.map_or(String::new(), |v| v.to_string()),
            kind = esc(&s.kind),
            badge = status_badge(&s.status),
            attempt = match s.attempt > 1 {
                true => format!(" <small>attempt {}</small>", s.attempt),
                false => String::new(),
            },
            eta = eta(s).map_or(String::new(), |e| format!("~{}", duration(Some(e)))),
            dur = duration(s.seconds),
            place = esc(&place),
        );
    }
    h.push_str("</table>\n");

    // The report's tables, from the final values.
    let mut last = LastValues::default();
    for m in &d.metrics {
        last.set(&m.stage, &m.name, m.last);
    }
    let pairs: Vec<(&str, &str)> = d
        .stages
        .iter()
        .map(|s| (s.stage.as_str(), s.kind.as_str()))
        .collect();
    if pairs
        .iter()
        .any(|(_, k)| matches!(*k, "train_ar" | "bound"))
    {
        let _ = write!(
            h,
            "<h2 id=\"bits\">Bits per dimension</h2>\n{}\n",
            bits_table(&pairs, &last)
        );
    }
    if pairs.iter().any(|(_, k)| *k == "evaluate") {
        let _ = write!(
            h,
            "<h2 id=\"evaluation\">Sample quality</h2>\n{}\n",
            evaluation_table(&pairs, &last)
        );
    }

    h.push_str("<h2 id=\"metrics\">Final metrics</h2>\n<table class=\"metrics sortable\"><tr><th>stage</th><th>metric</th><th>last</th><th>at step</th><th>min</th><th>max</th><th>points</th></tr>\n");
    for m in &d.metrics {
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td class=\"n\">{:.6}</td><td class=\"n\">{}</td><td class=\"n\">{:.6}</td><td class=\"n\">{:.6}</td><td class=\"n\">{}</td></tr>",
            esc(&m.stage),
            esc(&m.name),
            m.last,
            m.last_step,
            m.min,
            m.max,
            m.points
        );
    }
    h.push_str("</table>\n");

    h.push_str("<h2 id=\"artifacts\">Artifacts</h2>\n<table class=\"artifacts\"><tr><th>stage</th><th>key</th><th>size</th><th>digest</th><th>made in</th><th>files</th></tr>\n");
    for s in &d.stages {
        let Some(a) = &s.artifact else { continue };
        let files = app
            .store
            .manifest(&a.key)
            .ok()
            .flatten()
            .map(|m| {
                let mut list: Vec<String> = m
                    .files
                    .iter()
                    .take(FILES_SHOWN)
                    .map(|f| {
                        format!(
                            "<a href=\"/artifacts/{}/{}\">{}</a> <small>{}</small>",
                            esc(&a.key),
                            esc(&f.path),
                            esc(&f.path),
                            bytes(f.bytes as i64)
                        )
                    })
                    .collect();
                if m.files.len() > FILES_SHOWN {
                    list.push(format!("and {} more", m.files.len() - FILES_SHOWN));
                }
                format!(
                    "<details><summary>{} file(s)</summary>{}</details>",
                    m.files.len(),
                    list.join("<br>")
                )
            })
            .unwrap_or_else(|| "<small>not in the store</small>".into());
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td title=\"{key}\"><code>{}</code></td><td class=\"n\">{}</td><td title=\"{digest}\"><code>{}</code></td><td>{}</td><td>{files}</td></tr>",
            esc(&s.stage),
            esc(a.key.get(..12).unwrap_or(&a.key)),
            bytes(a.bytes),
            esc(a.digest.get(..12).unwrap_or(&a.digest)),
            match a.made_in_run {
                Some(r) if r == id => "this run".to_string(),
                Some(r) => format!("<a href=\"/runs/{r}\">run {r}</a> (cached here)"),
                None => String::new(),
            },
            key = esc(&a.key),
            digest = esc(&a.digest),
        );
    }
    h.push_str("</table>\n");

    if !d.lineage.is_empty() {
        h.push_str("<h2 id=\"lineage\">Lineage</h2>\n<table class=\"lineage\"><tr><th>stage</th><th>input</th><th>read the artifact of</th></tr>\n");
        for l in &d.lineage {
            let from = match (&l.from_stage, l.from_run) {
                (Some(s), Some(r)) if r == id => format!("{} (this run)", esc(s)),
                (Some(s), Some(r)) => format!("{} of <a href=\"/runs/{r}\">run {r}</a>", esc(s)),
                (Some(s), None) => esc(s),
                _ => format!(
                    "<code>{}</code> (not in the registry)",
                    esc(l.artifact.get(..12).unwrap_or(&l.artifact))
                ),
            };
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{from}</td></tr>",
                esc(&l.stage),
                esc(&l.input)
            );
        }
        h.push_str("</table>\n");
    }
    h
}

fn bytes(n: i64) -> String {
    let n = n as f64;
    match n {
        n if n >= 1e9 => format!("{:.2} GB", n / 1e9),
        n if n >= 1e6 => format!("{:.1} MB", n / 1e6),
        n if n >= 1e3 => format!("{:.1} kB", n / 1e3),
        n => format!("{n:.0} B"),
    }
}

/// The class names of a sample stage's image table (`images/table.json`),
/// the rows of its grid.
fn class_names(app: &App, key: &str) -> Vec<String> {
    let path = app.store.data_dir(key).join("images/table.json");
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| {
            Some(
                v.get("class_names")?
                    .as_array()?
                    .iter()
                    .filter_map(|c| Some(c.as_str()?.to_string()))
                    .collect(),
            )
        })
        .unwrap_or_default()
}

/// Whether `file` is a step image's name (`NAME-STEP.png`, see
/// `stages::training::STEP_IMAGES`): its name and step.
fn step_image_name(file: &str) -> Option<(&str, u64)> {
    let (name, step) = file.strip_suffix(".png")?.rsplit_once('-')?;
    let plain = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    };
    match plain(name) && step.len() == 12 && step.bytes().all(|b| b.is_ascii_digit()) {
        true => Some((name, step.parse().ok()?)),
        false => None,
    }
}

/// A stage's step images by name: (step, URL) in step order. From its
/// artifact once published; while it runs, from its scratch folder.
fn step_frames(app: &App, run: i64, s: &StageRow) -> BTreeMap<String, Vec<(u64, String)>> {
    let mut frames: BTreeMap<String, Vec<(u64, String)>> = BTreeMap::new();
    if let Some(a) = &s.artifact {
        if let Ok(Some(m)) = app.store.manifest(&a.key) {
            for f in &m.files {
                let Some((name, step)) = f.path.strip_prefix("steps/").and_then(step_image_name)
                else {
                    continue;
                };
                frames
                    .entry(name.to_string())
                    .or_default()
                    .push((step, format!("/artifacts/{}/{}", a.key, f.path)));
            }
        }
    } else if let (Some(key), "running") = (&s.key, s.status.as_str()) {
        let dir = app.ws.scratch(key).join("steps");
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            if let Some((name, step)) = step_image_name(&file) {
                frames.entry(name.to_string()).or_default().push((
                    step,
                    format!("/runs/{run}/live/{}/{file}", encode(&s.stage)),
                ));
            }
        }
    }
    for f in frames.values_mut() {
        f.sort();
    }
    frames
}

fn images_part(app: &App, d: &RunDetail) -> String {
    let mut grids = String::new();
    let mut recons = String::new();
    let mut stepped = String::new();
    for s in &d.stages {
        for (name, frames) in step_frames(app, d.run.id, s) {
            let Some((last_step, last_src)) = frames.last() else {
                continue;
            };
            let list: Vec<serde_json::Value> = frames
                .iter()
                .map(|(step, src)| serde_json::json!({"step": step, "src": src}))
                .collect();
            let _ = writeln!(
                stepped,
                "<figure class=\"stepped\" data-stage=\"{stage}\" data-frames=\"{json}\"><img src=\"{src}\" alt=\"{name} of {stage}\"><figcaption>{stage}: {name} at step <span class=\"at\">{last_step}</span><br><input type=\"range\" class=\"step\" min=\"0\" max=\"{max}\" value=\"{max}\" aria-label=\"validation step\"></figcaption></figure>",
                stage = esc(&s.stage),
                name = esc(&name),
                json = esc(&serde_json::Value::from(list).to_string()),
                src = esc(last_src),
                max = frames.len() - 1,
            );
        }
        let Some(a) = &s.artifact else { continue };
        let Ok(Some(m)) = app.store.manifest(&a.key) else {
            continue;
        };
        let has = |p: &str| m.files.iter().any(|f| f.path == p);
        if s.kind == "sample" && has("grid.png") {
            let classes = class_names(app, &a.key);
            let labels: String = classes
                .iter()
                .map(|c| format!("<span>{}</span>", esc(c)))
                .collect();
            let _ = writeln!(
                grids,
                "<figure class=\"grid\"><div class=\"rows\" style=\"--rows:{n}\">{labels}</div><img src=\"/artifacts/{key}/grid.png\" alt=\"samples of {name}, one row per class\"><figcaption>{name}</figcaption></figure>",
                n = classes.len().max(1),
                key = esc(&a.key),
                name = esc(&s.stage),
            );
        }
        if has("reconstructions.png") {
            let _ = writeln!(
                recons,
                "<figure><img src=\"/artifacts/{}/reconstructions.png\" alt=\"reconstructions of {1}\"><figcaption>{1} ({2})</figcaption></figure>",
                esc(&a.key),
                esc(&s.stage),
                esc(&s.kind)
            );
        }
    }
    let mut h = String::new();
    if !stepped.is_empty() {
        let _ = write!(
            h,
            "<h2 id=\"steps\">At each validation</h2>\n<p>What a stage drew at its validation steps; the slider goes back through them.</p>\n<div class=\"grids\">{stepped}</div>\n"
        );
    }
    if !grids.is_empty() {
        let _ = write!(
            h,
            "<h2 id=\"samples\">Samples</h2>\n<p>One row per class.</p>\n<div class=\"grids\">{grids}</div>\n"
        );
    }
    if !recons.is_empty() {
        let _ = write!(
            h,
            "<h2 id=\"reconstructions\">Reconstructions</h2>\n<p>Real validation images above, what each stage made of them below.</p>\n<div class=\"grids\">{recons}</div>\n"
        );
    }
    h
}

fn params_part(d: &RunDetail) -> String {
    let mut h = String::from(
        "<h2 id=\"params\">Params</h2>\n<details open><summary>resolved params of each stage</summary><table class=\"params\"><tr><th>stage</th><th>param</th><th>value</th></tr>\n",
    );
    for (stage, name, value) in &d.params {
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(stage),
            esc(name),
            esc(value)
        );
    }
    h.push_str("</table></details>\n");
    h
}

/// The curve panel: a metric picker, x axis, log scale and smoothing;
/// `app.js` fills it from `/api/metrics` and `/api/series`.
fn chart_widget(runs: &[i64]) -> String {
    let runs: Vec<String> = runs.iter().map(i64::to_string).collect();
    format!(
        "<div class=\"chart\" data-runs=\"{}\"><div class=\"controls\">\
<label>metric <select class=\"metric\"></select></label> \
<label>x <select class=\"x\"><option value=\"step\">step</option><option value=\"time\">wall-clock (s)</option></select></label> \
<label><input type=\"checkbox\" class=\"log\"> log y</label> \
<label>smoothing <input type=\"range\" class=\"smooth\" min=\"0\" max=\"0.99\" step=\"0.01\" value=\"0\"></label> \
<span class=\"points\"></span></div><div class=\"plot\"></div></div>\n",
        runs.join(",")
    )
}

#[derive(Deserialize, Default)]
struct CompareQuery {
    runs: Option<String>,
}

async fn comparison(
    app: &App,
    q: &CompareQuery,
) -> Answer<(Vec<i64>, pipeline::compare::Comparison)> {
    let mut reader = app.reader().await?;
    let ids = named_runs(&mut reader, &q.runs).await?;
    let facts = crate::facts_of(&mut reader, &ids)
        .await
        .map_err(|e| Failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let patterns = crate::headline_patterns(&facts, &app.kinds);
    Ok((
        ids,
        compare(&facts, &patterns, &GroupBy::VaryingExceptSeeds),
    ))
}

async fn compare_page(
    State(app): State<Arc<App>>,
    q: std::result::Result<Query<CompareQuery>, QueryRejection>,
) -> Answer<Html<String>> {
    let q = query(q)?;
    let version = app.version().await?;
    let (ids, c) = comparison(&app, &q).await?;
    let list: Vec<String> = ids.iter().map(i64::to_string).collect();
    let mut body = format!(
        "<h1>Compare runs {}</h1>\n<p>The params that differ and each stage's headline metrics (the stage run behind each artifact, cached or not). Click a column to sort. <a id=\"csv\" href=\"/compare.csv?runs={}\">CSV</a></p>\n",
        ids.iter()
            .map(|i| format!("<a href=\"/runs/{i}\">{i}</a>"))
            .collect::<Vec<_>>()
            .join(", "),
        list.join(",")
    );
    let _ = writeln!(
        body,
        "<div class=\"wide sortable\" id=\"comparison\">{}</div>",
        html_table(&c.runs)
    );
    if let Some(g) = &c.groups {
        let _ = write!(
            body,
            "<h2>Groups</h2>\n<p>Runs pooled by what they were told to vary (seeds aside): n, mean, standard deviation and the 95 % interval of the mean (Student's t).</p>\n<div class=\"wide sortable\" id=\"groups\">{}</div>\n",
            html_table(g)
        );
    }
    body.push_str("<h2>Curves</h2>\n");
    body.push_str(&chart_widget(&ids));
    Ok(page(&app, version, "compare", &body))
}

async fn compare_csv(
    State(app): State<Arc<App>>,
    q: std::result::Result<Query<CompareQuery>, QueryRejection>,
) -> Answer<Response> {
    let q = query(q)?;
    let (ids, c) = comparison(&app, &q).await?;
    let name: Vec<String> = ids.iter().map(i64::to_string).collect();
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"compare-{}.csv\"", name.join("-")),
            ),
        ],
        crate::render::csv_text(&c.runs),
    )
        .into_response())
}

async fn log_tail(
    State(app): State<Arc<App>>,
    UrlPath((run, stage)): UrlPath<(String, String)>,
) -> Answer<Response> {
    let mut reader = app.reader().await?;
    let id = find_run(&mut reader, &run).await?;
    let Some(path) = reader.log_path(id, &stage).await? else {
        return Err(not_found(format!(
            "run {id} has no log of a stage `{stage}`"
        )));
    };
    // The registry names the file; it is read only inside the logs folder.
    let inside = std::fs::canonicalize(&path)
        .ok()
        .filter(|p| std::fs::canonicalize(app.ws.logs()).is_ok_and(|logs| p.starts_with(logs)));
    let Some(path) = inside else {
        return Err(not_found(format!(
            "the log of `{stage}` is not in the workspace's logs folder (moved or removed)"
        )));
    };
    let text = tail(&path, LOG_TAIL_BYTES).map_err(|e| {
        Failure(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reading the log: {e}"),
        )
    })?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

/// A step image of a running stage, from its scratch folder: only a name
/// of the step images' form, in the folder of the stage's own key.
async fn live_step_image(
    State(app): State<Arc<App>>,
    UrlPath((run, stage, file)): UrlPath<(String, String, String)>,
) -> Answer<Response> {
    if step_image_name(&file).is_none() {
        return Err(not_found(format!("no step image `{file}`")));
    }
    let d = detail(&app, &run).await?;
    let id = d.run.id;
    let key = d
        .stages
        .iter()
        .find(|s| s.stage == stage)
        .and_then(|s| s.key.clone())
        .filter(|k| k.len() == 64 && k.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| not_found(format!("run {id} has no stage `{stage}` with a key")))?;
    let bytes = tokio::fs::read(app.ws.scratch(&key).join("steps").join(&file))
        .await
        .map_err(|_| not_found(format!("no step image `{file}` of `{stage}` (yet)")))?;
    Ok(([(header::CONTENT_TYPE, "image/png")], bytes).into_response())
}

/// The last `max` bytes of a file, as text (a cut character replaced).
fn tail(path: &Path, max: u64) -> std::io::Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    if len > max {
        f.seek(SeekFrom::Start(len - max))?;
    }
    let mut buf = Vec::new();
    f.take(max).read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

async fn artifact_file(
    State(app): State<Arc<App>>,
    UrlPath((key, file)): UrlPath<(String, String)>,
) -> Answer<Response> {
    // The registry must know the artifact and its manifest list the file:
    // a name that is not listed (`..`, absolute, anything else) is never
    // joined to a path.
    if app.reader().await?.artifact_path(&key).await?.is_none() {
        return Err(not_found(format!("no artifact `{key}` in this workspace")));
    }
    let manifest = app
        .store
        .manifest(&key)
        .map_err(|e| Failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .ok_or_else(|| not_found(format!("artifact `{key}` is not in the store")))?;
    if !manifest.files.iter().any(|f| f.path == file) {
        return Err(not_found(format!("artifact `{key}` has no file `{file}`")));
    }
    let bytes = tokio::fs::read(app.store.data_dir(&key).join(&file))
        .await
        .map_err(|e| {
            Failure(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reading `{file}`: {e}"),
            )
        })?;
    let kind = match file.rsplit('.').next() {
        Some("png") => "image/png",
        Some("svg") => "image/svg+xml",
        Some("json") => "application/json",
        Some("md" | "txt" | "csv" | "log") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    };
    Ok((
        [
            (header::CONTENT_TYPE, kind),
            // An artifact never changes under its key.
            (header::CACHE_CONTROL, "max-age=31536000, immutable"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        bytes,
    )
        .into_response())
}

impl App {
    /// The registry's version as the polling connection sees it; -1 while
    /// there is no registry (the first run's commit moves it).
    async fn version(&self) -> Answer<i64> {
        let mut slot = self.version.lock().await;
        if slot.is_none() && self.registry.exists() {
            *slot = Some(self.reader().await?);
        }
        Ok(match slot.as_mut() {
            Some(reader) => reader.data_version().await?,
            None => -1,
        })
    }
}

async fn version(State(app): State<Arc<App>>) -> Answer<Response> {
    let v = app.version().await?;
    Ok(axum::Json(serde_json::json!({ "version": v })).into_response())
}

async fn runs_json(
    State(app): State<Arc<App>>,
    q: std::result::Result<Query<RunsQuery>, QueryRejection>,
) -> Answer<Response> {
    let q = query(q)?;
    let (filter, limit, offset) = q.filter()?;
    let page = app
        .reader()
        .await?
        .runs_page(&filter, limit, offset)
        .await?;
    Ok(axum::Json(page).into_response())
}

async fn run_json(State(app): State<Arc<App>>, UrlPath(run): UrlPath<String>) -> Answer<Response> {
    Ok(axum::Json(detail(&app, &run).await?).into_response())
}

async fn metrics_json(
    State(app): State<Arc<App>>,
    q: std::result::Result<Query<CompareQuery>, QueryRejection>,
) -> Answer<Response> {
    let q = query(q)?;
    let mut reader = app.reader().await?;
    let ids = named_runs(&mut reader, &q.runs).await?;
    let names: Vec<String> = reader
        .metric_names(&ids)
        .await?
        .into_iter()
        .map(|(s, m)| format!("{s}:{m}"))
        .collect();
    Ok(axum::Json(names).into_response())
}

#[derive(Deserialize, Default)]
struct SeriesQuery {
    runs: Option<String>,
    metric: Option<String>,
    x: Option<String>,
    points: Option<String>,
}

async fn series_json(
    State(app): State<Arc<App>>,
    q: std::result::Result<Query<SeriesQuery>, QueryRejection>,
) -> Answer<Response> {
    let q = query(q)?;
    let Some((stage, metric)) = given(&q.metric).and_then(|m| m.split_once(':')) else {
        return Err(bad("name the metric: ?metric=STAGE:METRIC"));
    };
    let by_time = match given(&q.x) {
        None | Some("step") => false,
        Some("time") => true,
        Some(other) => return Err(bad(format!("`x` is step or time, not `{other}`"))),
    };
    let points = number(
        "points",
        &q.points,
        DEFAULT_POINTS as i64,
        MAX_POINTS as i64,
    )? as usize;
    let mut reader = app.reader().await?;
    let ids = named_runs(&mut reader, &q.runs).await?;
    let mut series = Vec::new();
    for id in ids {
        let Some(producer) = reader.producer_of(id, stage).await? else {
            continue;
        };
        let total = reader.point_count(producer, metric).await?;
        // SQLite cuts a long series to its envelope, LTTB that to `points`.
        let s = reader.series_envelope(producer, metric, points).await?;
        let (x, y): (Vec<f64>, Vec<f64>) = match by_time {
            false => (s.steps.iter().map(|&v| v as f64).collect(), s.values),
            true => {
                let start = s.at.iter().flatten().copied().fold(f64::INFINITY, f64::min);
                s.at.iter()
                    .zip(s.values)
                    .filter_map(|(at, v)| Some((at.as_ref()? - start, v)))
                    .unzip()
            }
        };
        let keep = lttb::lttb(&x, &y, points);
        let label = match reader.run_name(id).await? {
            Some(name) => format!("{name} (#{id})"),
            None => format!("run {id}"),
        };
        series.push(serde_json::json!({
            "run": id,
            "label": label,
            "points": total,
            "x": keep.iter().map(|&i| x[i]).collect::<Vec<_>>(),
            "y": keep.iter().map(|&i| y[i]).collect::<Vec<_>>(),
        }));
    }
    Ok(axum::Json(serde_json::json!({
        "metric": format!("{stage}:{metric}"),
        "x": if by_time { "seconds since its first point" } else { "step" },
        "series": series,
    }))
    .into_response())
}

async fn static_file(UrlPath(file): UrlPath<String>) -> Answer<Response> {
    let (kind, body) = match file.as_str() {
        "uplot.js" => ("text/javascript; charset=utf-8", UPLOT_JS),
        "uplot.css" => ("text/css; charset=utf-8", UPLOT_CSS),
        "uplot.LICENSE" => ("text/plain; charset=utf-8", UPLOT_LICENSE),
        "app.js" => ("text/javascript; charset=utf-8", APP_JS),
        _ => return Err(not_found(format!("no static file `{file}`"))),
    };
    Ok(([(header::CONTENT_TYPE, kind)], body).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(name: &str, digest: Option<&str>, inputs: &[&str], status: &str) -> StageRow {
        StageRow {
            id: 0,
            stage: name.into(),
            kind: "k".into(),
            status: status.into(),
            attempt: 1,
            worker: None,
            device: None,
            started_at: None,
            finished_at: None,
            seconds: Some(10.0),
            error: None,
            has_log: false,
            producer: 0,
            key: None,
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            artifact: digest.map(|d| pipeline::registry::ArtifactRow {
                key: format!("key-{d}"),
                path: String::new(),
                digest: d.to_string(),
                bytes: 0,
                made_in_run: None,
            }),
            step: Some(25),
            steps: Some(100),
        }
    }

    #[test]
    fn the_graph_puts_each_stage_right_of_its_inputs() {
        let stages = vec![
            stage("prep", Some("a"), &[], "cached"),
            stage("vq1", Some("b"), &["a"], "succeeded"),
            stage("codes", Some("c"), &["a", "b"], "running"),
            stage("later", None, &[], "pending"),
        ];
        assert_eq!(
            graph_layers(&stages),
            vec![vec![0], vec![1], vec![2], vec![3]]
        );
        // 10 s for 25 of 100 steps: 30 s to go.
        assert_eq!(eta(&stages[2]), Some(30.0));
        assert_eq!(eta(&stages[1]), None);
    }

    #[test]
    fn query_values_are_read_and_refused_with_reasons() {
        let q = RunsQuery {
            param: Some("vq1.quantiser.codebook_size=64".into()),
            limit: Some("10".into()),
            ..Default::default()
        };
        let (f, limit, offset) = q.filter().ok().unwrap();
        assert_eq!(
            f.param,
            Some(("vq1".into(), "quantiser.codebook_size".into(), "64".into()))
        );
        assert_eq!((limit, offset), (10, 0));
        for bad_query in [
            RunsQuery {
                limit: Some("99999999999999999999".into()),
                ..Default::default()
            },
            RunsQuery {
                limit: Some("1001".into()),
                ..Default::default()
            },
            RunsQuery {
                offset: Some("-1".into()),
                ..Default::default()
            },
            RunsQuery {
                status: Some("done".into()),
                ..Default::default()
            },
            RunsQuery {
                param: Some("nodot=1".into()),
                ..Default::default()
            },
        ] {
            let Err(Failure(status, message)) = bad_query.filter() else {
                panic!("accepted");
            };
            assert_eq!(status, StatusCode::BAD_REQUEST, "{message}");
        }
        assert_eq!(encode("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
        assert_eq!(
            step_image_name("reconstructions-000000000200.png"),
            Some(("reconstructions", 200))
        );
        for refused in [
            "../reconstructions-000000000200.png",
            "reconstructions-200.png",
            "a/b-000000000200.png",
            "-000000000200.png",
            "x-000000000200.png.exe",
        ] {
            assert_eq!(step_image_name(refused), None, "{refused}");
        }
    }
}
