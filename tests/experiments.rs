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
    let out = q.haic(&["status", "pipeline.yaml", "-S", "prep.source.format.x=1"]);
    assert_error(&out, 2, "`prep.source.format` is not a map");
    assert!(!q.path(".haic").exists(), "nothing written");
}
