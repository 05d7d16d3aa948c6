//! HTML pieces the static report (`report`) and the dashboard (`ui`) both
//! draw: the escaping, the style, the bits/dim and evaluation tables, and
//! `compare`'s tables.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The last value of each metric of each stage: what the tables show.
#[derive(Debug, Default)]
pub struct LastValues(pub BTreeMap<String, BTreeMap<String, f64>>);

impl LastValues {
    pub fn get(&self, stage: &str, name: &str) -> Option<f64> {
        self.0.get(stage)?.get(name).copied()
    }

    pub fn set(&mut self, stage: &str, name: &str, value: f64) {
        self.0
            .entry(stage.to_string())
            .or_default()
            .insert(name.to_string(), value);
    }
}

/// Seconds since 1970 of an ISO-8601 UTC time as the registry writes it
/// (`2026-11-28T21:41:09.123Z`).
pub fn seconds(ts: &str) -> Option<f64> {
    let (date, time) = ts.trim_end_matches('Z').split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (h, min, s) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + h * 3600.0 + min * 60.0 + s)
}

/// Text made safe inside HTML elements and quoted attributes.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

pub const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:1.5rem auto;max-width:70rem;padding:0 1rem;color:#222}\
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.3rem .6rem;text-align:left}\
td.n{text-align:right;font-variant-numeric:tabular-nums}.grids{display:flex;gap:2rem;flex-wrap:wrap}\
.grids img{image-rendering:pixelated;width:24rem}.curves img{width:22rem;margin:.2rem}.curves img.wide{width:28rem}div.wide{overflow-x:auto}pre{background:#f6f6f6;padding:.6rem}";

/// The AR models' bits/dim and the bound beside the baseline.
pub fn bits_table(stages: &[(&str, &str)], last: &LastValues) -> String {
    let mut t = String::from(
        "<table><tr><th>model</th><th>bits/dim (per modelled value)</th><th>bits per image</th></tr>\n",
    );
    let mut any = false;
    for (stage, _) in stages.iter().filter(|(_, kind)| *kind == "train_ar") {
        if let Some(bpd) = last.get(stage, "val.bits_per_dim") {
            any = true;
            let bpi = last
                .get(stage, "val.bits_per_image")
                .map(|v| format!("{v:.1}"))
                .unwrap_or_default();
            let _ = writeln!(
                t,
                "<tr><td>{}</td><td class=\"n\">{bpd:.3}</td><td class=\"n\">{bpi}</td></tr>",
                esc(stage)
            );
        }
    }
    for (stage, _) in stages.iter().filter(|(_, kind)| *kind == "bound") {
        for (name, label) in [
            (
                "bound.bits_per_dim",
                "hierarchical bound (bits per image dimension)",
            ),
            (
                "baseline.bits_per_dim",
                "flat baseline (bits per image dimension)",
            ),
        ] {
            if let Some(v) = last.get(stage, name) {
                any = true;
                let _ = writeln!(
                    t,
                    "<tr><th>{} <small>({})</small></th><td class=\"n\"><b>{v:.3}</b></td><td></td></tr>",
                    label,
                    esc(stage)
                );
            }
        }
    }
    t.push_str("</table>");
    if any {
        t
    } else {
        "<p>No AR model in this run.</p>".into()
    }
}

/// Accuracy of the real-data classifier on each sample set, CAS and the
/// Fréchet distance, each with its 95 % interval, beside the same for as
/// many real images.
pub fn evaluation_table(stages: &[(&str, &str)], last: &LastValues) -> String {
    let mut out = String::new();
    for (stage, _) in stages.iter().filter(|(_, kind)| *kind == "evaluate") {
        let Some(m) = last.0.get(*stage) else {
            continue;
        };
        let get = |n: &str| m.get(n).copied();
        // "83.1 % [80.6, 85.4]", or the value alone where no interval was kept.
        let shown = |n: &str, percent: bool| {
            let scale = if percent { 100.0 } else { 1.0 };
            let unit = if percent { " %" } else { "" };
            let digits = if percent { 1 } else { 2 };
            let Some(v) = get(n) else {
                return String::new();
            };
            match (get(&format!("{n}_lo")), get(&format!("{n}_hi"))) {
                (Some(lo), Some(hi)) => format!(
                    "{:.digits$}{unit} [{:.digits$}, {:.digits$}]",
                    scale * v,
                    scale * lo,
                    scale * hi
                ),
                _ => format!("{:.digits$}{unit}", scale * v),
            }
        };
        let mut sets: Vec<&str> = m
            .keys()
            .filter_map(|k| k.strip_prefix("eval.")?.strip_suffix(".cas"))
            .collect();
        sets.sort();
        let _ = writeln!(
            out,
            "<table><tr><th>images</th><th>real-data classifier's accuracy on them</th><th>CAS: trained on them, tested on real test images</th><th>Fréchet distance to real test images (classifier features)</th></tr>"
        );
        if get("eval.real.test_accuracy").is_some() {
            let _ = writeln!(
                out,
                "<tr><td>real (test split)</td><td class=\"n\">{}</td><td></td><td></td></tr>",
                shown("eval.real.test_accuracy", true)
            );
        }
        for set in sets {
            let _ = writeln!(
                out,
                "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
                esc(set),
                shown(&format!("eval.{set}.accuracy"), true),
                shown(&format!("eval.{set}.cas"), true),
                shown(&format!("eval.{set}.frechet"), false),
            );
            if get(&format!("eval.{set}.real_cas")).is_some() {
                let _ = writeln!(
                    out,
                    "<tr><td>real, as many as {}</td><td></td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
                    esc(set),
                    shown(&format!("eval.{set}.real_cas"), true),
                    shown(&format!("eval.{set}.real_frechet"), false),
                );
            }
        }
        let _ = write!(
            out,
            "</table>\n<p><small>from stage {}; 95 % bootstrap intervals in brackets</small></p>\n",
            esc(stage)
        );
    }
    if out.is_empty() {
        "<p>No evaluate stage in this run.</p>".into()
    } else {
        out
    }
}

/// A table of `compare`'s as HTML.
pub fn html_table(r: &pipeline::registry::QueryResult) -> String {
    let mut out = String::from("<table><tr>");
    for c in &r.columns {
        let _ = write!(out, "<th>{}</th>", esc(c));
    }
    out.push_str("</tr>\n");
    for row in &r.rows {
        out.push_str("<tr>");
        for v in row {
            match v {
                serde_json::Value::Number(n) => {
                    let text = match n.as_f64() {
                        Some(f) if n.is_f64() => format!("{f:.4}"),
                        _ => n.to_string(),
                    };
                    let _ = write!(out, "<td class=\"n\">{text}</td>");
                }
                serde_json::Value::Null => out.push_str("<td></td>"),
                serde_json::Value::String(s) => {
                    let _ = write!(out, "<td>{}</td>", esc(s));
                }
                other => {
                    let _ = write!(out, "<td>{}</td>", esc(&other.to_string()));
                }
            }
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</table>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_times_become_seconds() {
        assert_eq!(seconds("1970-01-01T00:00:00.000Z"), Some(0.0));
        assert_eq!(seconds("2000-03-01T00:00:01.500Z"), Some(951_868_801.5));
        let a = seconds("2026-11-28T23:59:59.000Z").unwrap();
        let b = seconds("2026-11-29T00:00:01.000Z").unwrap();
        assert_eq!(b - a, 2.0);
        assert_eq!(seconds("yesterday"), None);
    }
}
