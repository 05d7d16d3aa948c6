//! Experiments end to end: `-S` overrides, named runs, the `run_stages`
//! view and `compare` over runs that differ in a var and a seed.

mod common;

use common::{Project, assert_error, stderr};
use serde_json::Value;

/// One stage whose metric depends on two vars; `seed` adds noise-like
/// offsets, `lr` the effect.
const SCORED: &str = r#"
vars: {lr: 1, seed: 0}
stages:
  train:
    kind: command
    cmd: "echo ${lr} ${seed} > out.txt; echo \"score 0 $((${lr} * 10 + ${seed}))\" >> \"$HAIC_METRICS\""
    outs: [out.txt]
  other:
    kind: command
    cmd: "echo fixed > other.txt"
    outs: [other.txt]
"#;

fn json(out: &std::process::Output) -> Value {
    assert!(out.status.success(), "{}", stderr(out));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn overrides_set_vars_and_are_recorded_on_the_run() {
    let p = Project::new(SCORED);
    let out = p.run(&[
        "-S",
        "vars.lr=3",
        "--name",
        "lr3",
        "--tag",
        "a",
        "--tag",
        "b",
        "--note",
        "first try",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(p.read("out.txt"), "3 0\n");
    let runs = json(&p.haic(&["registry", "runs", "--format", "json"]));
    let r = &runs[0];
    assert_eq!(r["name"], "lr3");
    assert_eq!(r["tags"], "a b");
    assert_eq!(r["note"], "first try");
    assert_eq!(r["overrides"], "vars.lr=3");

    // `status` with the same override: cached; without it: stale.
    let same = p.haic(&["status", "pipeline.yaml", "-S", "vars.lr=3"]);
    assert!(
        same.status.success(),
        "{}",
        String::from_utf8_lossy(&same.stdout)
    );
    let plain = p.haic(&["status", "pipeline.yaml"]);
    assert_eq!(plain.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&plain.stdout).contains("cmd"));

    // A name is unique; a number is not a name.
    assert_error(&p.run(&["--name", "lr3"]), 2, "run 1 has that name");
    assert_error(&p.run(&["--name", "12"]), 2, "would read as a run id");
    // The report takes the name.
    let out = p.haic(&["report", "lr3", "-p", "pipeline.yaml", "-o", "rep"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(p.read("rep/index.html").contains("Run 1"));
}

#[test]
fn bad_overrides_name_the_argument() {
    let p = Project::new(SCORED);
    for (args, says) in [
        (vec!["-S", "vars.nope=1"], "the pipeline has no var `nope`"),
        (
            vec!["-S", "nostage.x=1"],
            "the pipeline has no stage `nostage`",
        ),
        (vec!["-S", "lr=1"], "names no param"),
        (vec!["-S", "vars.lr"], "give PATH=VALUE"),
        (vec!["-S", "train.cmd=ls"], "`cmd` is not a param"),
    ] {
        let mut all = vec!["status", "pipeline.yaml"];
        all.extend(args.iter().copied());
        assert_error(&p.haic(&all), 2, says);
    }
    // A built-in kind checks an overridden param like one in the file, and
    // the error names the argument.
    let q = Project::new(
        "stages:\n  prep:\n    kind: preprocess\n    params:\n      source: {format: image_folder, train: imgs}\n",
    );
    let out = q.haic(&["status", "pipeline.yaml", "-S", "prep.subsett=5"]);
    assert_error(&out, 2, "subsett");
    assert!(
        stderr(&out).contains("-S prep.subsett=5"),
        "{}",
        stderr(&out)
    );
    // A param the file leaves to its default takes nested keys.
    let out = q.haic(&[
        "status",
        "pipeline.yaml",
        "-S",
        "prep.validation.fraction=2",
    ]);
    assert_error(
        &out,
        2,
        "validation.fraction must be between 0 and 1, not 2",
    );
    let out = q.haic(&["status", "pipeline.yaml", "-S", "prep.source.format.x=1"]);
    assert_error(&out, 2, "`prep.source.format` is not a map");
    assert!(!q.path(".haic").exists(), "nothing written");
}

#[test]
fn compare_pools_seeds_and_gives_intervals() {
    let p = Project::new(SCORED);
    for (lr, seed) in [(1, 0), (1, 1), (2, 0), (2, 1)] {
        let (lr, seed) = (format!("vars.lr={lr}"), format!("vars.seed={seed}"));
        let out = p.run(&["-S", &lr, "-S", &seed]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    // `other` ran once: the later runs found it cached, and the view gives
    // its producer, the first run's stage run, for every run.
    let other = p.query(
        "SELECT run_id, status, producer FROM run_stages WHERE stage = 'other' ORDER BY run_id",
    );
    assert_eq!(other.len(), 4);
    assert!(other[1..].iter().all(|r| r["status"] == "cached"));
    assert!(other.iter().all(|r| r["producer"] == other[0]["producer"]));

    let c = json(&p.haic(&[
        "compare", "1", "2", "3", "4", "--metric", "score", "--format", "json",
    ]));
    let runs = c["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 4);
    assert_eq!(runs[3]["train:score"], 21.0);
    let groups = c["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 2, "{groups:?}");
    for (g, lr, mean) in [(&groups[0], "1", 10.5), (&groups[1], "2", 20.5)] {
        assert_eq!(g["vars.lr"], lr);
        assert_eq!(g["n"], 2);
        assert_eq!(g["train:score mean"], mean);
        // sd 0.7071; half-width 12.706 * 0.7071 / sqrt(2) = 6.353
        let hi = g["train:score ci95_hi"].as_f64().unwrap();
        assert!((hi - mean - 6.353).abs() < 1e-3, "{g}");
    }
    // The table form says what the intervals are.
    let out = p.haic(&["compare", "1", "2", "3", "4", "--metric", "score"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("95 % interval"));
    assert_error(&p.haic(&["compare", "1", "nope"]), 2, "no run nope");
}
