//! `haic-pipe ui`: the dashboard followed in a real browser while a
//! pipeline runs (tests/browser/ui.mjs), a comparison of two runs, no
//! write to the registry from any request, and bad requests refused
//! with 4xx and nothing read outside the workspace.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::{Project, smoke, stderr};
use serde_json::Value;

/// A command stage that prints `printed_at STEP TIME` (the time it printed
/// it) `steps` times, `pause` seconds apart.
const PRINTER: &str = r#"
vars: {steps: 3, pause: 0}
stages:
  slow:
    kind: command
    cmd: "for i in $(seq 1 ${steps}); do echo \"printed_at $i $(date +%s.%N)\" >> \"$HAIC_METRICS\"; sleep ${pause}; done; echo ${steps} > out.txt"
    outs: [out.txt]
"#;

struct Dashboard {
    served: common::Served,
}

impl Dashboard {
    fn start(p: &Project) -> Dashboard {
        let served = common::Served::start(
            p.cmd(&["ui", "-p", "pipeline.yaml", "--port", "0"]),
            "dashboard: ",
        );
        Dashboard { served }
    }

    /// One raw GET (the target sent as written, unnormalised): status and body.
    fn get_as(&self, target: &str, host: &str) -> (u16, Vec<u8>) {
        let mut s = TcpStream::connect(&self.served.addr).unwrap();
        write!(
            s,
            "GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a response head");
        let head = String::from_utf8_lossy(&raw[..split]).to_string();
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no status in {head}"));
        (status, raw[split + 4..].to_vec())
    }

    fn get(&self, target: &str) -> (u16, String) {
        let (status, body) = self.get_as(target, &self.served.addr.clone());
        (status, String::from_utf8_lossy(&body).into_owned())
    }
}

/// The registry's bytes (the database and its write-ahead log; the
/// shared-memory index records readers too, so it is left out).
fn registry_digest(p: &Project) -> String {
    let mut h = blake3::Hasher::new();
    for f in ["registry.db", "registry.db-wal"] {
        if let Ok(bytes) = std::fs::read(p.path(".haic").join(f)) {
            h.update(f.as_bytes());
            h.update(&bytes);
        }
    }
    h.finalize().to_hex().to_string()
}

fn node(script: &std::path::Path, args: &[&str]) -> Value {
    let out = common::node(script, args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn the_dashboard_follows_a_running_pipeline_and_compares_runs_in_a_browser() {
    let Some(script) = common::browser_script("ui.mjs") else {
        return;
    };
    let p = Project::new(PRINTER);
    let out = p.run(&["--name", "quick"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ui = Dashboard::start(&p);

    // Run 2: 16 points half a second apart, watched from the page.
    let mut run = p.spawn(
        &[
            "run",
            "pipeline.yaml",
            "-S",
            "vars.steps=16",
            "-S",
            "vars.pause=0.5",
            "--tag",
            "live",
        ],
        true,
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while p
        .try_query("SELECT 1 FROM stage_runs WHERE run_id = 2 AND status = 'running'")
        .map_or(true, |r| r.is_empty())
    {
        assert!(std::time::Instant::now() < deadline, "run 2 never started");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let live = node(&script, &["live", &ui.served.url, "2", "16"]);
    let status = run.wait().unwrap();
    assert!(status.success(), "run 2 failed");
    assert_eq!(live["status"], "succeeded", "{live}");
    assert_eq!(live["node"], "succeeded", "{live}");
    let (first, last) = (
        live["first"].as_u64().unwrap(),
        live["points"].as_u64().unwrap(),
    );
    assert!(first < last && last == 16, "the curve did not grow: {live}");
    // Each point shown within 2 s of the command printing it.
    let latencies: Vec<f64> = live["latencies"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    assert!(!latencies.is_empty(), "{live}");
    let worst = latencies.iter().cloned().fold(0.0, f64::max);
    eprintln!(
        "{} points seen arrive; worst latency {worst:.2} s",
        latencies.len()
    );
    assert!(worst < 2.0, "a point took {worst:.2} s to appear: {live}");

    // With the run stopped, browsing and comparing write nothing.
    let before = registry_digest(&p);
    let compared = node(&script, &["compare", &ui.served.url, "1", "2"]);
    let (csv_status, csv) = ui.get("/compare.csv?runs=1,2");
    let (by_name, named) = ui.get("/runs/quick");
    assert_eq!(
        registry_digest(&p),
        before,
        "a request wrote to the registry"
    );

    assert!(
        compared["url"]
            .as_str()
            .unwrap()
            .ends_with("/compare?runs=1,2"),
        "{compared}"
    );
    let table = compared["table"].as_array().unwrap();
    let header: Vec<&str> = table[0]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(table.len(), 3, "two runs and a header: {compared}");
    let column = |name: &str| header.iter().position(|h| *h == name);
    let (run, name) = (column("run").unwrap(), column("name").unwrap());
    // Sorted descending by run: run 2, then run 1 (named `quick`).
    assert_eq!(table[1][run], "2", "{compared}");
    assert_eq!(table[2][run], "1", "{compared}");
    assert_eq!(table[2][name], "quick", "{compared}");
    // The differing param is the command (its vars filled in).
    assert!(header.contains(&"slow.cmd"), "{header:?}");
    assert!(compared["curves"].as_u64().unwrap() >= 19, "{compared}");
    // The curves' legend names a named run by its name.
    let (_, series) = ui.get("/api/series?runs=1,2&metric=slow:printed_at");
    let series: Value = serde_json::from_str(&series).unwrap();
    assert_eq!(series["series"][0]["label"], "quick (#1)", "{series}");
    assert_eq!(series["series"][1]["label"], "run 2", "{series}");
    assert_eq!(by_name, 200, "a run by its name: {named}");
    assert!(named.contains("quick <small>#1</small>"), "{named}");
    assert_eq!(csv_status, 200);
    assert!(csv.starts_with("run,name,"), "{csv}");
    assert_eq!(csv.lines().count(), 3, "{csv}");
}

#[test]
fn bad_requests_get_4xx_and_nothing_outside_the_workspace() {
    let p = Project::new(PRINTER);
    let out = p.run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let key = p.query("SELECT key FROM artifacts")[0]["key"]
        .as_str()
        .unwrap()
        .to_string();
    // A file beside the workspace that no URL may reach.
    p.write("secret.txt", "TOP-SECRET");
    let before = registry_digest(&p);
    let ui = Dashboard::start(&p);

    let (status, body) = ui.get(&format!("/artifacts/{key}/out.txt"));
    assert_eq!((status, body.trim()), (200, "3"));
    let (status, body) = ui.get("/runs/1");
    assert_eq!(status, 200);
    assert!(body.contains("data-stage=\"slow\""), "{body}");

    let many: Vec<String> = (0..60).map(|i| i.to_string()).collect();
    let too_many = format!("/compare?runs={}", many.join(","));
    let traversals = [
        format!("/artifacts/{key}/../../secret.txt"),
        format!("/artifacts/{key}/..%2F..%2F..%2Fsecret.txt"),
        format!("/artifacts/{key}/%2Fetc%2Fpasswd"),
        format!("/artifacts/{key}/manifest.json"),
        "/artifacts/..%2F..%2Fsecret.txt/x".to_string(),
        "/artifacts/../registry.db".to_string(),
        "/runs/1/logs/..%2F..%2Fsecret.txt".to_string(),
        "/static/..%2F..%2Fsecret.txt".to_string(),
        "/runs/1/live/slow/..%2F..%2F..%2Fsecret.txt".to_string(),
        "/runs/1/live/slow/printed-000000000001.png".to_string(),
        "/../../secret.txt".to_string(),
    ];
    let cases: Vec<(String, u16)> = [
        ("/runs/999", 404),
        ("/runs/abc", 404),
        ("/runs/99999999999999999999999", 404),
        ("/api/runs/999", 404),
        ("/fragments/runs/-1", 404),
        ("/api/runs?limit=99999999999999999999", 400),
        ("/api/runs?limit=1001", 400),
        ("/api/runs?offset=-5", 400),
        ("/api/runs?status=done", 400),
        ("/api/runs?param=nodot", 400),
        ("/api/runs?limit=%ZZ", 400),
        ("/api/series?runs=1", 400),
        (
            "/api/series?runs=1&metric=slow:printed_at&points=100000000",
            400,
        ),
        ("/api/series?runs=1&metric=slow:printed_at&x=sideways", 400),
        ("/api/series?runs=1,nope&metric=slow:printed_at", 404),
        ("/api/metrics", 400),
        ("/compare?runs=", 400),
        ("/compare?runs=1,999", 404),
        (too_many.as_str(), 400),
        ("/runs/1/logs/nothere", 404),
        ("/nowhere", 404),
    ]
    .iter()
    .map(|(t, s)| (t.to_string(), *s))
    .chain(traversals.iter().map(|t| (t.clone(), 404)))
    .collect();
    for (target, want) in &cases {
        let (status, body) = ui.get(target);
        assert_eq!(status, *want, "{target}: {body}");
        assert!(!body.contains("TOP-SECRET"), "{target} read the secret");
        assert!(
            !body.contains("SQLite format"),
            "{target} read the registry"
        );
        assert!(!body.contains("root:"), "{target} read /etc/passwd");
    }
    // Another site's name for this address (DNS rebinding): refused.
    let (status, _) = ui.get_as("/api/runs", "evil.example:80");
    assert_eq!(status, 421);
    // The good requests still answer, and nothing was written.
    let (status, body) = ui.get("/api/series?runs=1&metric=slow:printed_at&x=time");
    assert_eq!(status, 200, "{body}");
    let series: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(series["series"][0]["points"], 3);
    assert_eq!(series["series"][0]["x"][0], 0.0);
    assert_eq!(
        registry_digest(&p),
        before,
        "a request wrote to the registry"
    );
    eprintln!("{} bad requests refused", cases.len() + 1);
}

#[test]
fn a_levels_reconstructions_at_each_validation_get_a_step_slider() {
    let p = smoke("");
    let out = p.run(&["vq1", "-S", "vq1.validate_every=5"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ui = Dashboard::start(&p);
    let (status, page) = ui.get("/runs/1");
    assert_eq!(status, 200);
    // One frame per validation (steps 5, 10, 15, 20), each a PNG.
    let frames: Value = {
        let at = page.find("data-frames=\"").expect("no step slider") + "data-frames=\"".len();
        let text = &page[at..at + page[at..].find('"').unwrap()];
        serde_json::from_str(&text.replace("&quot;", "\"").replace("&amp;", "&")).unwrap()
    };
    let steps: Vec<u64> = frames
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![5, 10, 15, 20]);
    for f in frames.as_array().unwrap() {
        let (status, body) = ui.get_as(f["src"].as_str().unwrap(), &ui.served.addr.clone());
        assert_eq!(status, 200);
        assert_eq!(&body[1..4], b"PNG");
    }
    let Some(script) = common::browser_script("ui.mjs") else {
        return;
    };
    let seen = node(&script, &["steps", &ui.served.url, "1"]);
    let first = frames[0]["src"].as_str().unwrap();
    let last = frames[3]["src"].as_str().unwrap();
    assert_eq!(seen["seen"][0]["src"], first, "{seen}");
    assert_eq!(seen["seen"][0]["step"], "5", "{seen}");
    assert_eq!(seen["seen"][1]["src"], last, "{seen}");
    assert_eq!(seen["seen"][1]["step"], "20", "{seen}");
}

#[test]
fn the_dashboard_opens_before_the_first_run_and_shows_it_when_it_comes() {
    let p = Project::new(PRINTER);
    let ui = Dashboard::start(&p);
    let (status, page) = ui.get("/");
    assert_eq!(status, 200);
    assert!(page.contains("No runs yet"), "{page}");
    assert!(
        !p.path(".haic/registry.db").exists(),
        "the dashboard made a registry"
    );
    let (status, before) = ui.get("/api/version");
    assert_eq!(status, 200);
    let out = p.run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (_, after) = ui.get("/api/version");
    assert_ne!(before, after, "the version did not move with the first run");
    let (status, table) = ui.get("/fragments/runs");
    assert_eq!(status, 200);
    assert!(table.contains("data-run=\"1\""), "{table}");
}
