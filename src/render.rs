//! How the CLI shows things: progress bars on a terminal, plain lines
//! otherwise, JSON lines for scripts; tables for registry queries.

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use pipeline::registry::QueryResult;
use pipeline::run::{Event, EventSink};
use pipeline::status::{Freshness, StageState};
use pipeline::workspace::Workspace;
use serde_json::Value;

use crate::Format;

#[derive(Clone, Copy, PartialEq)]
pub enum Mode {
    Tty,
    Plain,
    Json,
}

struct Bars {
    multi: MultiProgress,
    overall: ProgressBar,
    stages: HashMap<String, ProgressBar>,
}

static BARS: OnceLock<Mutex<Bars>> = OnceLock::new();

/// How often plain output reports a stage's progress: at most once per
/// `every` per stage (and its last step), or never (`quiet`); stage and
/// run events always print.
#[derive(Debug, Clone, Copy)]
pub struct ProgressLines {
    pub every: std::time::Duration,
    pub quiet: bool,
}

impl ProgressLines {
    /// Whether a progress line for `stage` is due now; records it if so.
    fn due(
        &self,
        last: &Mutex<HashMap<String, Instant>>,
        stage: &str,
        done: u64,
        total: u64,
    ) -> bool {
        if self.quiet {
            return false;
        }
        let Ok(mut last) = last.lock() else {
            return true;
        };
        let now = Instant::now();
        let due = done >= total
            || last
                .get(stage)
                .is_none_or(|t| now.duration_since(*t) >= self.every);
        if due {
            last.insert(stage.to_string(), now);
        }
        due
    }
}

pub fn sink(mode: Mode, progress: ProgressLines) -> EventSink {
    let start = Instant::now();
    let last_progress: Mutex<HashMap<String, Instant>> = Mutex::new(HashMap::new());
    match mode {
        Mode::Json => Arc::new(|e: &Event| {
            if let Ok(line) = serde_json::to_string(e) {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{line}");
            }
        }),
        Mode::Plain => Arc::new(move |e: &Event| {
            if let Event::StageProgress {
                stage, done, total, ..
            } = e
                && !progress.due(&last_progress, stage, *done, *total)
            {
                return;
            }
            if let Some(line) = plain_line(e) {
                // One write per line: stderr is unbuffered, and a 10,000-stage
                // no-op run prints 10,000 lines.
                let text = format!("[{:>7.2}s] {line}\n", start.elapsed().as_secs_f64());
                let _ = std::io::stderr().lock().write_all(text.as_bytes());
            }
        }),
        Mode::Tty => Arc::new(move |e: &Event| tty_event(e)),
    }
}

fn plain_line(e: &Event) -> Option<String> {
    Some(match e {
        Event::RunStarted {
            run_id,
            resumed,
            stages,
            workspace,
        } => format!(
            "{} run {run_id}: {stages} stage(s), workspace {workspace}",
            if *resumed { "resuming" } else { "starting" }
        ),
        Event::StageCached { stage } => format!("{stage}: cached"),
        Event::StageStarted {
            stage,
            attempt,
            device,
            log,
        } => format!("{stage}: started (attempt {attempt}, {device}), log {log}"),
        Event::StageProgress {
            stage,
            done,
            total,
            message,
        } => format!(
            "{stage}: {done}/{total}{}",
            message
                .as_deref()
                .map(|m| format!(" {m}"))
                .unwrap_or_default()
        ),
        Event::StageFinished {
            stage,
            status,
            seconds,
            error,
        } => format!(
            "{stage}: {} in {seconds:.2}s{}",
            status.as_str(),
            error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        ),
        Event::RunFinished {
            run_id,
            status,
            counts,
            seconds,
        } => {
            let parts: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
            format!(
                "run {run_id} {status} in {seconds:.2}s: {}",
                parts.join(", ")
            )
        }
        Event::Notice { message } => message.clone(),
    })
}

fn tty_event(e: &Event) {
    let bars = BARS.get_or_init(|| {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let overall = multi.add(ProgressBar::new(0));
        overall.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} stages {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Mutex::new(Bars {
            multi,
            overall,
            stages: HashMap::new(),
        })
    });
    let Ok(mut b) = bars.lock() else { return };
    match e {
        Event::RunStarted { stages, .. } => {
            b.overall.set_length(*stages as u64);
            if let Some(line) = plain_line(e) {
                let _ = b.multi.println(line);
            }
        }
        Event::StageCached { .. } => b.overall.inc(1),
        Event::StageStarted { stage, .. } => {
            let pb = b.multi.add(ProgressBar::new(0));
            pb.set_style(
                ProgressStyle::with_template("  {prefix:20} [{bar:20}] {pos}/{len} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            pb.set_prefix(stage.clone());
            b.stages.insert(stage.clone(), pb);
        }
        Event::StageProgress {
            stage,
            done,
            total,
            message,
        } => {
            if let Some(pb) = b.stages.get(stage) {
                pb.set_length(*total);
                pb.set_position(*done);
                if let Some(m) = message {
                    pb.set_message(m.clone());
                }
            }
        }
        Event::StageFinished { stage, .. } => {
            if let Some(pb) = b.stages.remove(stage) {
                pb.finish_and_clear();
                b.multi.remove(&pb);
            }
            b.overall.inc(1);
            if let Some(line) = plain_line(e) {
                let _ = b.multi.println(line);
            }
        }
        Event::RunFinished { .. } | Event::Notice { .. } => {
            if let Some(line) = plain_line(e) {
                let _ = b.multi.println(line);
            }
        }
    }
}

pub fn finish(mode: Mode) {
    if mode == Mode::Tty
        && let Some(b) = BARS.get()
        && let Ok(b) = b.lock()
    {
        b.overall.finish();
    }
}

/// What `registry recover` rebuilt, and what it could not.
pub fn recovered(r: &pipeline::recover::Recovered, registry: &std::path::Path) {
    println!(
        "recovered {} artifact(s) into run {} (`recovered`) of {}: {} lineage link(s), {} metric point(s)",
        r.artifacts,
        r.run_id,
        registry.display(),
        r.lineage,
        r.metric_points
    );
    if r.without_provenance > 0 {
        println!(
            "{} artifact(s) were published before manifests recorded params and inputs: they come back without params, lineage or metrics",
            r.without_provenance
        );
    }
    for key in &r.unreadable {
        println!(
            "artifact {key}: its manifest cannot be read; the next run sets it aside and makes it again"
        );
    }
    for p in &r.set_aside {
        println!("kept the replaced file as {}", p.display());
    }
}

pub fn status(states: &[StageState], json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(states).unwrap_or_default()
        );
        return;
    }
    let width = states
        .iter()
        .map(|s| s.stage.len())
        .max()
        .unwrap_or(5)
        .max(5);
    for s in states {
        let why = if s.why.is_empty() {
            String::new()
        } else {
            format!("  ({})", s.why.join("; "))
        };
        let line = format!("{:width$}  {:8}{why}", s.stage, s.state);
        println!("{}", line.trim_end());
    }
}

pub async fn show(
    state: &StageState,
    ws: &Workspace,
    p: &pipeline::spec::Pipeline,
) -> anyhow::Result<()> {
    println!("stage:    {}", state.stage);
    println!("state:    {}", state.state);
    if let Some(k) = &state.key {
        println!("key:      {k}");
    }
    match &state.artifact {
        Some(a) => println!("artifact: {}", a.display()),
        None => println!(
            "artifact: none for the current key ({})",
            state.why.join("; ")
        ),
    }
    if let Some(st) = p.stage(&state.stage) {
        for o in &st.outs {
            match st.restore_outs {
                true => println!("out:      {}", p.dir.join(o).display()),
                false => {
                    println!("out:      {o} (in the artifact: the sweep's copies share the path)")
                }
            }
        }
        let mut params = Vec::new();
        pipeline::registry::flatten_params("", &Value::Object(st.params.clone()), &mut params);
        println!("params (resolved, defaults applied):");
        let width = params.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (k, v) in &params {
            println!("  {k:width$}  {v}");
        }
    }
    if ws.registry_path().exists() {
        let mut reader = pipeline::registry::Reader::open(&ws.registry_path()).await?;
        if let (Some(key), Some(_)) = (&state.key, &state.artifact) {
            let m = reader.artifact_metrics(key).await?;
            if !m.rows.is_empty() {
                println!("metrics (of the stage run that made the artifact):");
                table(&m, Format::Table);
            }
        }
        let r = reader.recent_stage_runs(&state.stage, 5).await?;
        println!("recent runs:");
        table(&r, Format::Table);
    }
    Ok(())
}

/// A sweep's members: per member, how many of its stages are cached and
/// which are not, with why (the first reason of each).
pub fn sweep_members(sweep: &pipeline::spec::Sweep, states: &[StageState]) {
    let by_name: HashMap<&str, &StageState> =
        states.iter().map(|s| (s.stage.as_str(), s)).collect();
    println!("\nmembers of the sweep ({}):", sweep.members.len());
    let width = sweep
        .members
        .iter()
        .map(|m| m.label().len())
        .max()
        .unwrap_or(0);
    for m in &sweep.members {
        let mine: Vec<&StageState> = m
            .stages
            .iter()
            .filter_map(|(_, copy)| by_name.get(copy.as_str()).copied())
            .collect();
        let cached = mine.iter().filter(|s| s.state == Freshness::Cached).count();
        let stale: Vec<&str> = m
            .stages
            .iter()
            .filter(|(_, copy)| {
                by_name
                    .get(copy.as_str())
                    .is_some_and(|s| s.state != Freshness::Cached)
            })
            .map(|(file, _)| file.as_str())
            .collect();
        let line = match stale.is_empty() {
            true => format!("{:width$}  {cached}/{} cached", m.label(), mine.len()),
            false => format!(
                "{:width$}  {cached}/{} cached; not: {}",
                m.label(),
                mine.len(),
                stale.join(", ")
            ),
        };
        println!("{line}");
    }
}

fn cell_text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A table's rows as JSON objects keyed by column name.
fn objects(r: &QueryResult) -> Vec<serde_json::Map<String, Value>> {
    r.rows
        .iter()
        .map(|row| r.columns.iter().cloned().zip(row.iter().cloned()).collect())
        .collect()
}

/// `compare`'s output: the runs, and the groups where there are any (JSON:
/// `{"runs": [...], "groups": [...]}`; CSV: the groups when there are
/// any, else the runs).
pub fn comparison(c: &pipeline::compare::Comparison, format: Format) {
    match format {
        Format::Json => {
            let doc = serde_json::json!({
                "runs": objects(&c.runs),
                "groups": c.groups.as_ref().map(objects).unwrap_or_default(),
            });
            println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
        }
        Format::Csv => table(c.groups.as_ref().unwrap_or(&c.runs), Format::Csv),
        Format::Table => {
            table(&c.runs, Format::Table);
            if let Some(g) = &c.groups {
                println!(
                    "\nover the runs of each group: mean, standard deviation, 95 % interval of the mean (t, n - 1 df)"
                );
                table(g, Format::Table);
            }
        }
    }
}

/// A table as CSV text (RFC 4180 quoting), a header line first.
pub fn csv_text(r: &QueryResult) -> String {
    let esc = |s: String| {
        if s.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s
        }
    };
    let mut out = String::new();
    let line = |cells: Vec<String>| cells.into_iter().map(esc).collect::<Vec<_>>().join(",");
    out.push_str(&line(r.columns.clone()));
    out.push('\n');
    for row in &r.rows {
        out.push_str(&line(row.iter().map(cell_text).collect()));
        out.push('\n');
    }
    out
}

pub fn table(r: &QueryResult, format: Format) {
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => {
            let rows = objects(r);
            let _ = writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(&rows).unwrap_or_default()
            );
        }
        Format::Csv => {
            let _ = write!(out, "{}", csv_text(r));
        }
        Format::Table => {
            if r.columns.is_empty() {
                let _ = writeln!(out, "(no rows)");
                return;
            }
            let texts: Vec<Vec<String>> = r
                .rows
                .iter()
                .map(|row| {
                    row.iter()
                        .map(|v| cell_text(v).replace('\n', " "))
                        .collect()
                })
                .collect();
            // A cell or column name longer than CELL_MAX is cut with a
            // visible `…` (never silently: a cut key finds no rows); a name
            // SQLite made from a long expression must not become a width
            // that `format!` refuses (over 65,535 panics).
            let mut cut = false;
            let mut shown = |c: &str| -> String {
                if c.chars().count() <= CELL_MAX {
                    return c.to_string();
                }
                cut = true;
                let mut s: String = c.chars().take(CELL_MAX - 1).collect();
                s.push('…');
                s
            };
            let columns: Vec<String> = r.columns.iter().map(|c| shown(c)).collect();
            let texts: Vec<Vec<String>> = texts
                .iter()
                .map(|row| row.iter().map(|c| shown(c)).collect())
                .collect();
            let mut widths: Vec<usize> = columns.iter().map(|c| c.chars().count()).collect();
            for row in &texts {
                for (w, c) in widths.iter_mut().zip(row) {
                    *w = (*w).max(c.chars().count());
                }
            }
            let line = |cells: &[String]| {
                cells
                    .iter()
                    .zip(&widths)
                    .map(|(c, w)| format!("{c:w$}"))
                    .collect::<Vec<_>>()
                    .join("  ")
                    .trim_end()
                    .to_string()
            };
            let _ = writeln!(out, "{}", line(&columns));
            let _ = writeln!(
                out,
                "{}",
                widths
                    .iter()
                    .map(|w| "-".repeat(*w))
                    .collect::<Vec<_>>()
                    .join("  ")
            );
            for row in &texts {
                let _ = writeln!(out, "{}", line(row));
            }
            if cut {
                eprintln!(
                    "haic-pipe: cells longer than {CELL_MAX} characters are cut and end in `…`; `--format csv` or `--format json` prints them whole"
                );
            }
        }
    }
}

/// The widest a table cell is printed (see [`table`]).
const CELL_MAX: usize = 120;
