//! `haic-pipe report RUN`: one run as a static HTML page that opens from
//! the file system (no server, no script): the stage timeline, loss and
//! metric curves per stage (SVG, drawn with plotters), the bits/dim table,
//! the sample grids, the evaluation table and the human-eval preferences.
//! Everything comes from the registry and the run's artifacts; the page and
//! its images go to one folder. `tables.html` holds the two tables alone
//! (what docs/ screenshots).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use pipeline::compare;
use pipeline::registry::{Reader, RunFacts, StageStatus};
use plotters::prelude::*;

use crate::eval;
use crate::html::{LastValues, STYLE, bits_table, esc, evaluation_table, html_table, seconds};

/// One run's points of a metric on a comparison plot: its label, (step, value).
type Line = (String, Vec<(i64, f64)>);

/// Per stage, per metric: (step, value) in step order.
type Metrics = BTreeMap<String, BTreeMap<String, Vec<(i64, f64)>>>;

/// One stage of the run (its latest attempt).
struct StageRow {
    stage: String,
    kind: String,
    status: StageStatus,
    started: Option<f64>,
    finished: Option<f64>,
    /// The stage run whose metrics describe the artifact (the producing
    /// run for a cached stage).
    metrics_from: i64,
    artifact: Option<PathBuf>,
}

/// A file name part from a stage or metric name: at most 48 characters,
/// letters and digits kept, the rest `-`. Two names can give one slug
/// (`a.b`, `a_b`): [`FileNames`] keeps their files apart.
fn slug(s: &str) -> String {
    s.chars()
        .take(48)
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

/// The report's file names so far: a name given twice gets `-2`, `-3`...
#[derive(Default)]
struct FileNames(std::collections::HashSet<String>);

impl FileNames {
    fn unique(&mut self, stem: &str, ext: &str) -> String {
        let mut name = format!("{stem}.{ext}");
        let mut n = 1;
        while !self.0.insert(name.clone()) {
            n += 1;
            name = format!("{stem}-{n}.{ext}");
        }
        name
    }
}

/// Writes the report of run `run` into `out`; returns the page's path.
/// `compared`: a page beside it that compares the run's sweep members.
pub async fn write(
    registry: &Path,
    run: i64,
    out: &Path,
    compared: Option<&str>,
) -> Result<PathBuf> {
    let mut reader = Reader::open(registry).await?;
    let Some(detail) = reader.run_detail(run).await? else {
        bail!(
            "no run {run} in {}; `haic-pipe registry runs` lists the runs",
            registry.display()
        );
    };
    let head = detail.run;
    let (pipeline, status) = (head.pipeline, head.status);
    let run_start = seconds(&head.started_at);
    let run_end = head.finished_at.as_deref().and_then(seconds);

    let stages: Vec<StageRow> = detail
        .stages
        .into_iter()
        .map(|r| {
            Ok(StageRow {
                started: r.started_at.as_deref().and_then(seconds),
                finished: r.finished_at.as_deref().and_then(seconds),
                status: r
                    .status
                    .parse::<StageStatus>()
                    .map_err(anyhow::Error::msg)?,
                stage: r.stage,
                kind: r.kind,
                metrics_from: r.producer,
                artifact: r.artifact.map(|a| PathBuf::from(a.path).join("data")),
            })
        })
        .collect::<Result<_>>()?;

    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut metrics: Metrics = BTreeMap::new();
    for s in &stages {
        let points = reader.metric_points(s.metrics_from).await?;
        let m = metrics.entry(s.stage.clone()).or_default();
        for p in points {
            m.entry(p.name).or_default().push((p.step, p.value));
        }
    }
    let mut last = LastValues::default();
    for (stage, m) in &metrics {
        for (name, points) in m {
            if let Some((_, v)) = points.last() {
                last.set(stage, name, *v);
            }
        }
    }
    let names: Vec<(&str, &str)> = stages
        .iter()
        .map(|s| (s.stage.as_str(), s.kind.as_str()))
        .collect();

    let mut files = FileNames::default();
    let mut html = String::new();
    let _ = write!(
        html,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>haic-pipe run {run}</title>\n<style>{STYLE}</style></head><body>\n<h1>Run {run}</h1>\n<p>{} &middot; {} &middot; {}</p>\n",
        esc(&pipeline),
        esc(&status),
        match (run_start, run_end) {
            (Some(a), Some(b)) => format!("{:.0} s", b - a),
            _ => "not finished".into(),
        }
    );

    if let Some(page) = compared {
        let _ = writeln!(
            html,
            "<p><a href=\"{page}\">The sweep's members compared</a>: params, metrics, groups over seeds, curves overlaid.</p>"
        );
    }

    // Tables first: what a reader wants to see.
    let bits = bits_table(&names, &last);
    let evaluation = evaluation_table(&names, &last);
    let _ = write!(
        html,
        "<h2 id=\"bits\">Bits per dimension</h2>\n{bits}\n<h2 id=\"evaluation\">Sample quality</h2>\n{evaluation}\n"
    );

    // Sample grids.
    let samples: Vec<&StageRow> = stages.iter().filter(|s| s.kind == "sample").collect();
    if !samples.is_empty() {
        html.push_str(
            "<h2 id=\"samples\">Samples</h2>\n<p>One row per class.</p>\n<div class=\"grids\">\n",
        );
        for s in samples {
            let Some(dir) = &s.artifact else { continue };
            let name = files.unique(&format!("samples-{}", slug(&s.stage)), "png");
            if std::fs::copy(dir.join("grid.png"), out.join(&name)).is_ok() {
                let _ = writeln!(
                    html,
                    "<figure><img src=\"{name}\" alt=\"samples of {0}\"><figcaption>{0}</figcaption></figure>",
                    esc(&s.stage)
                );
            }
        }
        html.push_str("</div>\n");
    }

    // Reconstructions: any stage that drew them (an auxiliary decoder from
    // its codes, an AR decoder given true codes, a chain down the levels).
    let recons: Vec<(&StageRow, String)> = stages
        .iter()
        .filter_map(|s| {
            let dir = s.artifact.as_ref()?;
            let name = files.unique(&format!("reconstructions-{}", slug(&s.stage)), "png");
            std::fs::copy(dir.join("reconstructions.png"), out.join(&name))
                .ok()
                .map(|_| (s, name))
        })
        .collect();
    if !recons.is_empty() {
        html.push_str(
            "<h2 id=\"reconstructions\">Reconstructions</h2>\n<p>Real validation images above, what each stage made of them below.</p>\n<div class=\"grids\">\n",
        );
        for (s, name) in recons {
            let _ = writeln!(
                html,
                "<figure><img src=\"{name}\" alt=\"reconstructions of {0}\"><figcaption>{0} ({1})</figcaption></figure>",
                esc(&s.stage),
                esc(&s.kind)
            );
        }
        html.push_str("</div>\n");
    }

    // Human evaluation.
    let packages: Vec<PathBuf> = stages
        .iter()
        .filter(|s| s.kind == "human_eval_export")
        .filter_map(|s| s.artifact.clone())
        .collect();
    if !packages.is_empty() {
        let outcomes = eval::outcomes(registry).await?;
        html.push_str("<h2 id=\"human\">Human evaluation</h2>\n");
        for dir in packages {
            let Ok(p) = eval::Package::open(&dir) else {
                continue;
            };
            let mine: Vec<eval::Outcome> = outcomes
                .iter()
                .filter(|o| o.package.digest == p.digest)
                .cloned()
                .collect();
            let body = if mine.is_empty() {
                format!(
                    "{} tasks, no answers yet: `haic-pipe eval serve {}`\n",
                    p.manifest.tasks.len(),
                    dir.display()
                )
            } else {
                eval::render_report(&mine)
            };
            let _ = writeln!(html, "<pre>{}</pre>", esc(&body));
        }
    }

    // Timeline.
    if let Some(origin) =
        run_start.or_else(|| stages.iter().filter_map(|s| s.started).reduce(f64::min))
    {
        let file = "timeline.svg";
        timeline(&out.join(file), &stages, origin)?;
        let _ = write!(
            html,
            "<h2 id=\"timeline\">Timeline</h2>\n<img src=\"{file}\" alt=\"stage timeline\">\n"
        );
        html.push_str("<table><tr><th>stage</th><th>kind</th><th>status</th><th>start (s)</th><th>duration (s)</th></tr>\n");
        for s in &stages {
            let (start, dur) = match (s.started, s.finished) {
                (Some(a), Some(b)) => (format!("{:.1}", a - origin), format!("{:.1}", b - a)),
                (Some(a), None) => (format!("{:.1}", a - origin), String::new()),
                _ => (String::new(), String::new()),
            };
            let _ = writeln!(
                html,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"n\">{start}</td><td class=\"n\">{dur}</td></tr>",
                esc(&s.stage),
                esc(&s.kind),
                esc(s.status.as_str())
            );
        }
        html.push_str("</table>\n");
    }

    // Curves.
    html.push_str("<h2 id=\"curves\">Curves</h2>\n");
    for s in &stages {
        let Some(m) = metrics.get(&s.stage) else {
            continue;
        };
        let series: Vec<(&String, &Vec<(i64, f64)>)> =
            m.iter().filter(|(_, p)| p.len() >= 2).collect();
        if series.is_empty() {
            continue;
        }
        let _ = write!(
            html,
            "<h3>{} <small>({})</small></h3>\n<div class=\"curves\">\n",
            esc(&s.stage),
            esc(&s.kind)
        );
        for (name, points) in series {
            let file = files.unique(&format!("curve-{}-{}", slug(&s.stage), slug(name)), "svg");
            curve(&out.join(&file), name, points)?;
            let _ = writeln!(
                html,
                "<img src=\"{file}\" alt=\"{} of {}\">",
                esc(name),
                esc(&s.stage)
            );
        }
        html.push_str("</div>\n");
    }
    html.push_str("</body></html>\n");

    let tables = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>run {run}: tables</title><style>{STYLE}</style></head><body>\n<h2>Bits per dimension (run {run})</h2>\n{bits}\n<h2>Sample quality</h2>\n{evaluation}\n</body></html>\n"
    );
    for (file, body) in [("index.html", &html), ("tables.html", &tables)] {
        let p = out.join(file);
        std::fs::write(&p, body).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(out.join("index.html"))
}

fn plot_err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("drawing a plot: {e}")
}

fn curve(path: &Path, name: &str, points: &[(i64, f64)]) -> Result<()> {
    plot_lines(
        path,
        name,
        (440, 260),
        &[(name.to_string(), points.to_vec())],
    )
}

fn timeline(path: &Path, stages: &[StageRow], origin: f64) -> Result<()> {
    let end = stages
        .iter()
        .filter_map(|s| s.finished.or(s.started))
        .fold(origin + 1.0, f64::max);
    let n = stages.len().max(1);
    let root = SVGBackend::new(path, (900, (40 + 22 * n) as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut chart = ChartBuilder::on(&root)
        .margin(8)
        .x_label_area_size(28)
        .y_label_area_size(8)
        .build_cartesian_2d(0.0..(end - origin) * 1.15, 0.0..n as f64)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the run started")
        .y_labels(0)
        .disable_y_mesh()
        .draw()
        .map_err(plot_err)?;
    chart
        .draw_series(stages.iter().enumerate().filter_map(|(i, s)| {
            let a = s.started? - origin;
            let b = s.finished.map(|f| f - origin).unwrap_or(end - origin);
            let y = (n - i - 1) as f64;
            let color = match s.status {
                StageStatus::Succeeded => RGBColor(66, 133, 244),
                StageStatus::Cached => RGBColor(170, 170, 170),
                StageStatus::Failed => RGBColor(219, 68, 55),
                _ => RGBColor(244, 180, 0),
            };
            Some(Rectangle::new(
                [(a, y + 0.15), (b.max(a + 0.05), y + 0.85)],
                color.filled(),
            ))
        }))
        .map_err(plot_err)?;
    // Each bar's stage name just right of it.
    chart
        .draw_series(stages.iter().enumerate().filter_map(|(i, s)| {
            let b = s.finished.or(s.started)? - origin;
            let y = (n - i - 1) as f64;
            Some(Text::new(
                s.stage.clone(),
                (b + 0.005 * (end - origin), y + 0.75),
                ("sans-serif", 13),
            ))
        }))
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

/// How the comparison page names a run or sweep member.
fn run_label(f: &RunFacts) -> String {
    match &f.name {
        Some(n) => n.clone(),
        None => format!("run {}", f.id),
    }
}

/// Writes the comparison of `runs` (runs or a sweep's members) into
/// `out/file`: `compare`'s tables for the metrics `patterns` name, then
/// each of those metrics' curves (two points or more) with one line per
/// run. Returns the page's path.
pub async fn write_comparison(
    registry: &Path,
    runs: &[RunFacts],
    patterns: &[String],
    out: &Path,
    file: &str,
) -> Result<PathBuf> {
    let mut reader = Reader::open(registry).await?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let c = compare::compare(runs, patterns, &compare::GroupBy::VaryingExceptSeeds);
    let ids: Vec<String> = runs
        .iter()
        .map(|r| r.id.to_string())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut html = String::new();
    let _ = write!(
        html,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>haic-pipe: {0}</title>\n<style>{STYLE}</style></head><body>\n<h1>{0}</h1>\n<p>{1} rows: the params that differ and the metrics compared.</p>\n<div class=\"wide\">{2}</div>",
        esc(&match ids.as_slice() {
            [one] => format!("Run {one}: the sweep's members compared"),
            _ => format!("Runs {} compared", ids.join(", ")),
        }),
        runs.len(),
        html_table(&c.runs)
    );
    if let Some(g) = &c.groups {
        let _ = write!(
            html,
            "<h2 id=\"groups\">Groups</h2>\n<p>Over the runs of each group (all but seeds alike): mean, standard deviation and the 95 % interval of the mean (Student's t, n - 1 degrees of freedom).</p>\n<div class=\"wide\">{}</div>",
            html_table(g)
        );
    }

    // (stage, metric) -> one line per run that has two points or more.
    let mut curves: BTreeMap<(String, String), Vec<Line>> = BTreeMap::new();
    let mut points_of: std::collections::HashMap<i64, Vec<pipeline::registry::MetricPoint>> =
        std::collections::HashMap::new();
    for r in runs {
        for (stage, producer) in &r.producers {
            if !points_of.contains_key(producer) {
                points_of.insert(*producer, reader.metric_points(*producer).await?);
            }
            let mut by_name: BTreeMap<&str, Vec<(i64, f64)>> = BTreeMap::new();
            for p in &points_of[producer] {
                if patterns
                    .iter()
                    .any(|pat| compare::matches(pat, stage, &p.name))
                {
                    by_name.entry(&p.name).or_default().push((p.step, p.value));
                }
            }
            for (name, points) in by_name.into_iter().filter(|(_, p)| p.len() >= 2) {
                curves
                    .entry((stage.clone(), name.to_string()))
                    .or_default()
                    .push((run_label(r), points));
            }
        }
    }
    if !curves.is_empty() {
        html.push_str("<h2 id=\"curves\">Curves</h2>\n<div class=\"curves\">\n");
        let mut files = FileNames::default();
        for ((stage, name), lines) in &curves {
            let svg = files.unique(&format!("compare-{}-{}", slug(stage), slug(name)), "svg");
            overlaid(&out.join(&svg), &format!("{stage}: {name}"), lines)?;
            let _ = writeln!(
                html,
                "<img class=\"wide\" src=\"{svg}\" alt=\"{} of {} per run\">",
                esc(name),
                esc(stage)
            );
        }
        html.push_str("</div>\n");
    }
    html.push_str("</body></html>\n");
    let page = out.join(file);
    std::fs::write(&page, html).with_context(|| format!("writing {}", page.display()))?;
    Ok(page)
}

/// One metric's curves, one line (and legend entry) per run.
fn overlaid(path: &Path, title: &str, lines: &[Line]) -> Result<()> {
    plot_lines(path, title, (560, 320), lines)
}

/// Lines over steps in an SVG of `size` pixels: one line in blue, or
/// several in the palette with a legend (up to 12 of them).
fn plot_lines(path: &Path, title: &str, size: (u32, u32), lines: &[Line]) -> Result<()> {
    let (mut x0, mut x1, mut y0, mut y1) = (
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::INFINITY,
        f64::NEG_INFINITY,
    );
    for &(s, v) in lines.iter().flat_map(|(_, p)| p.iter()) {
        if v.is_finite() {
            (x0, x1) = (x0.min(s as f64), x1.max(s as f64));
            (y0, y1) = (y0.min(v), y1.max(v));
        }
    }
    // A range no axis can span (values near ±1e308) draws nothing
    // rather than looping over an infinite number of ticks.
    if !(x0.is_finite()
        && x1.is_finite()
        && y0.is_finite()
        && y1.is_finite()
        && (y1 - y0).is_finite())
    {
        return Ok(());
    }
    if y1 - y0 < 1e-12 {
        (y0, y1) = (y0 - 0.5, y1 + 0.5);
    }
    let pad = 0.05 * (y1 - y0);
    let root = SVGBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 16))
        .margin(8)
        .x_label_area_size(28)
        .y_label_area_size(56)
        .build_cartesian_2d(x0..x1.max(x0 + 1.0), (y0 - pad)..(y1 + pad))
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .light_line_style(WHITE)
        .draw()
        .map_err(plot_err)?;
    for (i, (label, points)) in lines.iter().enumerate() {
        let color = match lines.len() {
            1 => BLUE.to_rgba(),
            _ => Palette99::pick(i).to_rgba(),
        };
        chart
            .draw_series(LineSeries::new(
                points
                    .iter()
                    .filter(|p| p.1.is_finite())
                    .map(|&(s, v)| (s as f64, v)),
                color.stroke_width(2),
            ))
            .map_err(plot_err)?
            .label(label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 14, y)], color.stroke_width(2))
            });
    }
    // A legend of hundreds of runs would cover the plot.
    if (2..=12).contains(&lines.len()) {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK.mix(0.3))
            .draw()
            .map_err(plot_err)?;
    }
    root.present().map_err(plot_err)?;
    Ok(())
}
