//! `sample`, `evaluate`, `human_eval_export` and `haic-pipe eval` end to
//! end on the smoke pipeline: what the stages write, a killed sampler
//! resuming to the same images, the rating page driven by a real browser
//! (Debian's Chromium through playwright-core), malformed answers refused,
//! a crowd results file imported and the report's screening.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;

use common::{Project, human_eval_package, smoke, stderr};
use serde_json::Value;
use stages::data::level_table::InputKind;
use stages::data::level_table::LevelTable;

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn png_size(path: &Path) -> (u32, u32) {
    let img = image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (img.width(), img.height())
}

#[test]
fn the_smoke_pipeline_samples_evaluates_and_exports_a_rating_package() {
    let p = smoke("");
    let out = p.run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));

    // Samples: 10 classes x 3, class-major, every level's codes.
    let ham = p.artifact_data("stage", "ham_samples");
    let images = LevelTable::open(&ham.join("images")).unwrap();
    assert_eq!(images.input, InputKind::Pixels { channels: 1 });
    let rows = images.read_split("samples", None).unwrap();
    let labels: Vec<i32> = (0..10).flat_map(|c| [c; 3]).collect();
    assert_eq!(rows.labels, labels);
    assert_eq!(rows.ids, (0..30).collect::<Vec<i64>>());
    for (level, side) in [(1, 8), (2, 4)] {
        let codes = LevelTable::open(&ham.join(format!("codes/level{level}"))).unwrap();
        assert_eq!((codes.height, codes.width), (side, side));
        let c = codes.read_split("samples", None).unwrap();
        assert_eq!(c.labels, labels, "level {level}");
    }
    assert_eq!(std::fs::read_dir(ham.join("png")).unwrap().count(), 30);
    assert_eq!(png_size(&ham.join("png/00029.png")), (32, 32));
    // Classes as rows, samples as columns, 2-pixel gaps.
    assert_eq!(png_size(&ham.join("grid.png")), (3 * 34 + 2, 10 * 34 + 2));
    let record = json(&ham.join("sample.json"));
    assert_eq!(
        record["chain"],
        serde_json::json!(["prior", "decoder2", "decoder1"])
    );
    let flat = p.artifact_data("stage", "baseline_samples");
    assert_eq!(
        json(&flat.join("sample.json"))["chain"],
        serde_json::json!(["prior"])
    );
    assert!(!flat.join("codes").exists(), "a flat model draws no codes");

    // Evaluation: into the registry, side by side.
    let metrics: Vec<(String, f64)> = p
        .query("SELECT s.name, s.last_value FROM metric_summaries s JOIN stage_runs r ON r.id = s.stage_run_id WHERE r.stage = 'evaluation' ORDER BY s.name")
        .into_iter()
        .map(|r| (r["name"].as_str().unwrap().to_string(), r["last_value"].as_f64().unwrap()))
        .collect();
    let value = |name: &str| {
        metrics
            .iter()
            .find(|m| m.0 == name)
            .unwrap_or_else(|| panic!("no metric {name} in {metrics:?}"))
            .1
    };
    let mut expected = vec!["eval.real.test_accuracy".to_string()];
    for set in ["ham", "baseline"] {
        for m in ["accuracy", "cas", "real_cas", "frechet", "real_frechet"] {
            expected.push(format!("eval.{set}.{m}"));
        }
    }
    assert_eq!(metrics.len(), 3 * expected.len(), "{metrics:?}");
    for name in &expected {
        let (v, lo, hi) = (
            value(name),
            value(&format!("{name}_lo")),
            value(&format!("{name}_hi")),
        );
        assert!(lo <= hi && v.is_finite(), "{name}: {v} [{lo}, {hi}]");
        if name.ends_with("frechet") {
            assert!(v >= -1e-6, "{name} = {v}: a distance");
        } else {
            // A proportion, inside its own percentile interval.
            assert!(
                (0.0..=1.0).contains(&v) && lo <= v && v <= hi,
                "{name}: {v} [{lo}, {hi}]"
            );
        }
    }
    let table =
        std::fs::read_to_string(p.artifact_data("stage", "evaluation").join("evaluation.md"))
            .unwrap();
    assert!(
        table.contains("| ham | 30 |")
            && table.contains("| baseline | 30 |")
            && table.contains("| real `train`, 30 images with ham's classes | 30 |"),
        "{table}"
    );

    // The package: tasks.csv, the manifest's hashes, balanced sides.
    let pkg = p.artifact_data("stage", "human_eval");
    let manifest = json(&pkg.join("manifest.json"));
    let tasks = manifest["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 14);
    let csv = std::fs::read_to_string(pkg.join("tasks.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "task_id,image_left_url,image_right_url");
    assert_eq!(lines.len(), 15);
    for (line, task) in lines[1..].iter().zip(tasks) {
        let expect = format!(
            "{},https://example.org/eval/{},https://example.org/eval/{}",
            task["id"].as_str().unwrap(),
            task["left"]["image"].as_str().unwrap(),
            task["right"]["image"].as_str().unwrap()
        );
        assert_eq!(*line, expect);
    }
    for (file, hash) in manifest["images"].as_object().unwrap() {
        let bytes = std::fs::read(pkg.join(file)).unwrap();
        assert_eq!(
            blake3::hash(&bytes).to_hex().as_str(),
            hash.as_str().unwrap(),
            "{file}"
        );
    }
    let side = |kind: &str, source: &str| {
        tasks
            .iter()
            .filter(|t| t["kind"] == kind && t["left"]["source"] == source)
            .count()
    };
    assert_eq!(
        side("pair", "baseline"),
        5,
        "A on the left in half the pairs"
    );
    assert_eq!(side("pair", "ham"), 5);
    assert_eq!(side("catch", "broken"), 2);
    assert_eq!(side("catch", "catch"), 2);
    for t in tasks.iter().filter(|t| t["kind"] == "pair") {
        assert_eq!(
            t["left"]["label"], t["right"]["label"],
            "pairs are class-matched"
        );
    }

    // The same tasks for images hosted elsewhere.
    let out = p.haic(&[
        "eval",
        "tasks",
        pkg.to_str().unwrap(),
        "--base-url",
        "https://cdn.example/x/",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        csv.replace("https://example.org/eval/", "https://cdn.example/x/")
    );

    // The report: a page that works from the file system.
    let out = p.haic(&["report", "1", "-p", "pipeline.yaml", "-o", "report"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let page = p.read("report/index.html");
    for section in [
        "id=\"bits\"",
        "id=\"evaluation\"",
        "id=\"samples\"",
        "id=\"reconstructions\"",
        "id=\"human\"",
        "id=\"timeline\"",
        "id=\"curves\"",
    ] {
        assert!(page.contains(section), "no {section} in the report");
    }
    assert!(page.contains("<td>ham</td>") && page.contains("<td>baseline</td>"));
    // Every file the page shows is beside it, and no link leaves the folder.
    let mut shown = 0;
    for src in page
        .split("src=\"")
        .skip(1)
        .map(|s| &s[..s.find('"').unwrap()])
    {
        assert!(!src.contains('/') && !src.contains(':'), "{src}");
        assert!(p.path("report").join(src).is_file(), "{src} missing");
        shown += 1;
    }
    assert!(shown > 10, "{shown} images");
    assert_eq!(
        png_size(&p.path("report/samples-ham-samples.png")),
        (3 * 34 + 2, 10 * 34 + 2)
    );
    // vq1's auxiliary decoder: 10 validation images over their
    // reconstructions; a code level (vq2) draws none.
    assert_eq!(
        png_size(&p.path("report/reconstructions-vq1.png")),
        (10 * 34 + 2, 2 * 34 + 2)
    );
    assert!(p.path("report/reconstructions-decoder1.png").is_file());
    assert!(!p.path("report/reconstructions-vq2.png").exists());
    let svg = p.read("report/curve-decoder1-train-nll.svg");
    assert!(
        svg.starts_with("<svg") && svg.contains("train.nll"),
        "{svg:.200}"
    );
    let out = p.haic(&["report", "99", "-p", "pipeline.yaml"]);
    common::assert_error(&out, 2, "no run 99");
}

#[test]
fn a_killed_sample_stage_resumes_to_the_same_images() {
    let images = |p: &Project| {
        let d = p.artifact_data("stage", "ham_samples");
        (
            std::fs::read(d.join("grid.png")).unwrap(),
            LevelTable::open(&d.join("images"))
                .unwrap()
                .read_split("samples", None)
                .unwrap(),
        )
    };
    let whole = smoke("");
    let out = whole.run(&["ham_samples"]);
    assert!(out.status.success(), "{}", stderr(&out));

    let killed = smoke("");
    killed.kill_worker_after_checkpoint("ham_samples", 1);
    let out = killed.run(&["ham_samples", "--resume"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let log = killed.attempt_log("ham_samples", 2);
    assert!(log.contains("resuming after batch"), "{log}");
    assert!(images(&killed) == images(&whole), "resumed samples differ");
}

/// `haic-pipe eval serve PACKAGE --port 0` in the background, and its URL.
struct Server {
    served: common::Served,
}

impl Server {
    fn start(p: &Project, package: &Path) -> Server {
        let cmd = p.cmd(&["eval", "serve", package.to_str().unwrap(), "--port", "0"]);
        Server {
            served: common::Served::start(cmd, "rating page: "),
        }
    }

    /// One raw HTTP/1.1 POST to /api/answer: (status, body).
    fn post(&self, body: &[u8]) -> (u16, String) {
        self.post_as(body, "application/json")
    }

    fn post_as(&self, body: &[u8], content_type: &str) -> (u16, String) {
        self.post_with(body, content_type, &self.served.addr)
    }

    fn post_with(&self, body: &[u8], content_type: &str, host: &str) -> (u16, String) {
        let mut s = TcpStream::connect(&self.served.addr).unwrap();
        let head = format!(
            "POST /api/answer HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        let _ = s.write_all(body); // the server may refuse before reading it all
        let mut response = String::new();
        let _ = s.read_to_string(&mut response);
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no status in {response:?}"));
        (status, response)
    }
}

fn ratings(p: &Project) -> Vec<Value> {
    p.query("SELECT task_id, kind, rater, choice, chosen, origin FROM ratings ORDER BY id")
}

/// The browser test needs Debian's chromium and playwright-core
/// (`npm ci --prefix tests/browser`). Without them it is skipped with a
/// note, unless `HAIC_REQUIRE_BROWSER` is set: `.ci/run` installs both and
/// sets it, so CI cannot skip it.
/// The addresses listening on TCP `port` (from /proc/net/tcp, IPv4).
fn listening_on(port: u16) -> Vec<String> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let (addr, p) = cols.get(1)?.split_once(':')?;
            // State 0A: LISTEN.
            (u16::from_str_radix(p, 16).ok()? == port && cols.get(3) == Some(&"0A")).then(|| {
                let a = u32::from_str_radix(addr, 16).unwrap_or(0).to_le_bytes();
                format!("{}.{}.{}.{}", a[0], a[1], a[2], a[3])
            })
        })
        .collect()
}

#[test]
fn the_rating_server_listens_on_loopback_and_refuses_malformed_answers() {
    let (p, pkg) = human_eval_package();
    let manifest = json(&pkg.join("manifest.json"));
    let tasks = manifest["tasks"].as_array().unwrap();
    let server = Server::start(&p, &pkg);
    let port: u16 = server
        .served
        .url
        .trim_end_matches('/')
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a port in the URL");
    assert!(
        server.served.url.starts_with("http://127.0.0.1:"),
        "{}",
        server.served.url
    );
    assert_eq!(listening_on(port), ["127.0.0.1"], "bound to loopback only");

    // Malformed answers: 4xx, nothing stored.
    let t = tasks[0]["id"].as_str().unwrap();
    let big = format!(
        r#"{{"task_id":"{t}","choice":"left","rater":"{}"}}"#,
        "a".repeat(10_000)
    );
    for (body, status) in [
        (
            r#"{"task_id":"t9999","choice":"left","rater":"r"}"#.to_string(),
            404,
        ),
        (
            format!(r#"{{"task_id":"{t}","choice":"middle","rater":"r"}}"#),
            422,
        ),
        (
            format!(r#"{{"task_id":"{t}","choice":"left","rater":"no spaces"}}"#),
            422,
        ),
        (format!(r#"{{"task_id":"{t}","choice":"left"}}"#), 422),
        ("not json".to_string(), 400),
        (big, 413),
    ] {
        let (got, response) = server.post(body.as_bytes());
        assert_eq!(got, status, "{body:.80}: {response}");
    }
    // A well-formed answer sent as another content type: 415, as documented.
    let answer = format!(r#"{{"task_id":"{t}","choice":"left","rater":"r"}}"#);
    let (got, response) = server.post_as(answer.as_bytes(), "text/plain");
    assert_eq!(got, 415, "{response}");
    // A good answer from a page another site's name reached (DNS
    // rebinding): 421, and nothing stored.
    let (got, response) = server.post_with(answer.as_bytes(), "application/json", "evil.example");
    assert_eq!(got, 421, "{response}");
    assert!(ratings(&p).is_empty(), "a refused answer stored something");
}

#[test]
fn the_rating_page_stores_what_a_browser_rates() {
    let Some(script) = common::browser_script("rate.mjs") else {
        return;
    };
    let (p, pkg) = human_eval_package();
    let manifest = json(&pkg.join("manifest.json"));
    let server = Server::start(&p, &pkg);

    let out = common::node(&script, &[server.served.url.as_str(), "browser-rater", "5"]);
    let clicked: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(clicked.len(), 5);
    let stored = ratings(&p);
    assert_eq!(stored.len(), 5, "{stored:?}");
    let tasks = manifest["tasks"].as_array().unwrap();
    for (row, click) in stored.iter().zip(&clicked) {
        assert_eq!(row["task_id"], click["task_id"]);
        assert_eq!(row["choice"], click["choice"]);
        assert_eq!(row["rater"], "browser-rater");
        assert_eq!(row["origin"], "local");
        // The stored source is the manifest's for that side.
        let task = tasks.iter().find(|t| t["id"] == row["task_id"]).unwrap();
        let side = row["choice"].as_str().unwrap();
        assert_eq!(row["chosen"], task[side]["source"]);
    }
}

#[test]
fn crowd_results_import_once_and_the_report_screens_out_failed_catch_trials() {
    let (p, pkg) = human_eval_package();
    let manifest = json(&pkg.join("manifest.json"));
    let tasks = manifest["tasks"].as_array().unwrap();
    // Rater good always picks `ham` (and the real image in catch trials);
    // rater bad picks ham too but chooses one broken image.
    let side_of = |t: &Value, source: &str| {
        if t["left"]["source"] == source {
            "left"
        } else {
            "right"
        }
    };
    let mut csv = String::from("HITId,WorkerId,Input.task_id,Input.image_left_url,Answer.choice\n");
    let mut failed_once = false;
    for t in tasks {
        let id = t["id"].as_str().unwrap();
        let (good, bad) = if t["kind"] == "catch" {
            let bad = if failed_once {
                side_of(t, "catch")
            } else {
                side_of(t, "broken")
            };
            failed_once = true;
            (side_of(t, "catch"), bad)
        } else {
            (side_of(t, "ham"), side_of(t, "ham"))
        };
        csv.push_str(&format!(
            "h{id},good,{id},x,{good}\nh{id},bad,{id},x,{bad}\n"
        ));
    }
    p.write("results.csv", &csv);
    let args = [
        "eval",
        "import",
        "results.csv",
        "--package",
        pkg.to_str().unwrap(),
    ];
    let out = p.haic(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("28 answers read from results.csv, 28 new")
    );
    let out = p.haic(&args);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("28 answers read from results.csv, 0 new")
    );
    assert_eq!(ratings(&p).len(), 28, "a second import adds nothing");

    let out = p.haic(&["eval", "report", "-p", "pipeline.yaml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report = String::from_utf8_lossy(&out.stdout);
    // 10 pairs from the one kept rater, all for ham: 10/10, p = 2/1024.
    assert!(report.contains("2 raters, 1 of them excluded"), "{report}");
    assert!(report.contains("10 pair answers kept"), "{report}");
    assert!(
        report.contains("ham          preferred   10 / 10   = 100.0 %"),
        "{report}"
    );
    assert!(report.contains("p = 0.0020"), "{report}");

    // A bad row stores nothing and names the line.
    p.write(
        "bad.csv",
        &format!(
            "WorkerId,Input.task_id,Answer.choice\nnew,{},left\nnew,t9999,left\n",
            tasks[0]["id"].as_str().unwrap()
        ),
    );
    let out = p.haic(&[
        "eval",
        "import",
        "bad.csv",
        "--package",
        pkg.to_str().unwrap(),
    ]);
    common::assert_error(
        &out,
        2,
        "bad.csv:3: no task `t9999` in this package; nothing was imported",
    );
    assert_eq!(ratings(&p).len(), 28);
}

#[test]
fn bad_sampling_params_and_inputs_get_clear_errors() {
    for (params, text) in [
        (
            "{temperature: 0}",
            "params: temperature: 0: must be a positive number",
        ),
        (
            "{temperature: {prior: 1.0, decodr1: 0.9}}",
            "params: temperature: no input `decodr1`",
        ),
        (
            "{samples_per_class: 0}",
            "params: samples_per_class: must be at least 1",
        ),
        (
            "{classes: some}",
            "`some`: give `all` or a list of class names or indices",
        ),
    ] {
        let p = smoke(&format!(
            "\n  bad:\n    kind: sample\n    inputs: {{prior: prior}}\n    params: {params}\n"
        ));
        let out = p.run(&["bad"]);
        common::assert_error(&out, 2, text);
        assert_eq!(p.artifact_count(), 0, "nothing ran for {params}");
    }
    // Known only once the models exist: a class the prior does not have,
    // and a decoder that is not conditioned on the prior's codes.
    let p = smoke(
        "\n  bad_class:\n    kind: sample\n    inputs: {prior: baseline}\n    params: {classes: [Nope]}\n  bad_chain:\n    kind: sample\n    inputs: {prior: prior, decoder1: decoder1}\n",
    );
    let out = p.run(&["bad_class", "bad_chain"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let log = p.attempt_log("bad_class", 1);
    assert!(log.contains("params.classes: no class `Nope`"), "{log}");
    let log = p.attempt_log("bad_chain", 1);
    assert!(
        log.contains("inputs.decoder1: is not conditioned on the codes that `prior` models"),
        "{log}"
    );
}

/// Chain reconstructions: the top codes of real validation images decoded
/// back down by sampling each level's AR decoder, shown beside the images.
#[test]
fn chain_reconstructions_decode_real_images_codes_down_the_hierarchy() {
    let p = smoke(
        "\n  chain:\n    kind: sample\n    inputs: {start: codes2, decoder2: decoder2, decoder1: decoder1, real: prep}\n    params: {samples_per_class: 2, seed: 0}\n  wrong_level:\n    kind: sample\n    inputs: {start: codes1, decoder2: decoder2, decoder1: decoder1}\n",
    );
    let out = p.run(&["chain"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let dir = p.artifact_data("stage", "chain");
    let record = json(&dir.join("sample.json"));
    assert_eq!(
        record["chain"],
        serde_json::json!(["start", "decoder2", "decoder1"])
    );
    assert_eq!(record["start"]["split"], "val");
    let ids: Vec<i64> = record["start"]["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(ids.len(), 20, "2 rows of each of the 10 classes");
    let distinct: std::collections::BTreeSet<_> = ids.iter().collect();
    assert_eq!(distinct.len(), 20, "{ids:?}");
    // One column per class, originals above reconstructions, a pair of
    // rows per sample: 10 x 4 cells of 32x32 (2 px gaps).
    assert_eq!(
        png_size(&dir.join("reconstructions.png")),
        (10 * 34 + 2, 4 * 34 + 2)
    );
    assert_eq!(png_size(&dir.join("grid.png")), (2 * 34 + 2, 10 * 34 + 2));
    // Run again: the same stage key, nothing runs.
    let out = p.run(&["chain"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stderr(&out).contains("chain: started"), "{}", stderr(&out));

    // A start table the top decoder was not conditioned on is named.
    let out = p.run(&["wrong_level"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let log = p.attempt_log("wrong_level", 1);
    assert!(
        log.contains("inputs.start: `decoder2` was not trained conditioned on this code table"),
        "{log}"
    );
    // At load time: both a prior and a start; `real` or `start_split`
    // without a start.
    for (inputs, params, text) in [
        (
            "{prior: prior, start: codes2, decoder1: decoder1}",
            "{}",
            "not both",
        ),
        (
            "{prior: prior, real: prep}",
            "{}",
            "`real` (the images shown beside their reconstructions) goes with `start`",
        ),
        (
            "{prior: prior}",
            "{start_split: val}",
            "start_split: only with a `start` input",
        ),
        (
            "{start: codes2}",
            "{}",
            "`start` needs the decoders below its codes",
        ),
    ] {
        let p = smoke(&format!(
            "\n  bad:\n    kind: sample\n    inputs: {inputs}\n    params: {params}\n"
        ));
        common::assert_error(&p.run(&["bad"]), 2, text);
        assert_eq!(p.artifact_count(), 0, "nothing ran for {inputs}");
    }
}
