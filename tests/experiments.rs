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
    // The report of several runs is their comparison.
    let out = p.haic(&["report", "1", "2", "3", "4", "--metric", "score"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let page = p.read(".haic/reports/compare-1-2-3-4/index.html");
    assert!(
        page.contains("Runs 1, 2, 3, 4 compared") && page.contains("train:score ci95_hi"),
        "{page}"
    );
    assert_eq!(page.matches("<tr>").count(), 1 + 4 + 1 + 2, "{page}");
    // The table form says what the intervals are.
    let out = p.haic(&["compare", "1", "2", "3", "4", "--metric", "score"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("95 % interval"));
    assert_error(&p.haic(&["compare", "1", "nope"]), 2, "no run nope");
}

/// `stage -> artifact digest` of each stage of sweep member `member` (the
/// copy it used), or of run 1's stages when `member` is `None`.
fn member_digests(p: &common::Project, member: Option<usize>) -> Vec<(String, String)> {
    let sql = match member {
        Some(m) => format!(
            "SELECT ms.stage, a.digest FROM member_stages ms JOIN artifacts a ON a.key = ms.key
             WHERE ms.run_id = 1 AND ms.member = {m} ORDER BY ms.stage"
        ),
        None => "SELECT rs.stage, a.digest FROM run_stages rs JOIN artifacts a ON a.key = rs.key
                 WHERE rs.run_id = 1 ORDER BY rs.stage"
            .into(),
    };
    p.query(&sql)
        .into_iter()
        .map(|r| {
            (
                r["stage"].as_str().unwrap().into(),
                r["digest"].as_str().unwrap().into(),
            )
        })
        .collect()
}

#[test]
fn a_sweep_runs_shared_stages_once_and_each_member_as_alone() {
    let p = common::smoke("");
    let out = p.run(&[
        "--sweep",
        "level1_decoder=ff,msp",
        "--sweep",
        "seed=0,1",
        "--name",
        "grid",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));

    // The stages that read neither var ran once, under their own names;
    // every other stage once per member (vq1 reads both vars).
    let ran = p.query(
        "SELECT stage, count(*) AS n FROM stage_runs WHERE run_id = 1 AND status = 'succeeded' GROUP BY stage",
    );
    let names: Vec<&str> = ran.iter().map(|r| r["stage"].as_str().unwrap()).collect();
    assert!(ran.iter().all(|r| r["n"] == 1), "{ran:?}");
    for shared in ["prep", "baseline", "baseline_samples"] {
        assert!(names.contains(&shared), "{names:?}");
    }
    for copied in ["vq1", "decoder1", "ham_samples", "evaluation"] {
        let copies: Vec<&&str> = names
            .iter()
            .filter(|n| n.starts_with(&format!("{copied}@")))
            .collect();
        assert_eq!(copies.len(), 4, "{copied}: {names:?}");
    }
    assert!(
        names.contains(&"vq1@level1_decoder=msp,seed=1"),
        "{names:?}"
    );
    assert_eq!(names.len(), 3 + 11 * 4, "{names:?}");
    let members =
        p.query("SELECT member, vars FROM sweep_members WHERE run_id = 1 ORDER BY member");
    assert_eq!(members.len(), 4);
    assert_eq!(members[3]["vars"], r#"{"level1_decoder":"msp","seed":1}"#);

    // Member 3 (msp, seed 1) run alone in a fresh folder gives the same
    // artifacts, byte for byte.
    let alone = common::smoke("");
    let out = alone.run(&["-S", "vars.level1_decoder=msp", "-S", "vars.seed=1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let swept = member_digests(&p, Some(3));
    assert_eq!(swept.len(), 14, "{swept:?}");
    assert_eq!(swept, member_digests(&alone, None));

    // A re-run finds the whole sweep cached.
    let out = p.run(&["--sweep", "level1_decoder=ff,msp", "--sweep", "seed=0,1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let rerun = p.query("SELECT DISTINCT status FROM stage_runs WHERE run_id = 2");
    assert_eq!(rerun, vec![serde_json::json!({"status": "cached"})]);

    // The sweep's report links its members' comparison, with each
    // training curve overlaid across the four members.
    let out = p.haic(&["report", "grid"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        p.read(".haic/reports/run-1/index.html")
            .contains("href=\"compare.html\"")
    );
    let page = p.read(".haic/reports/run-1/compare.html");
    assert!(page.contains("level1_decoder=msp,seed=1"), "{page}");
    let svgs: Vec<String> = std::fs::read_dir(p.path(".haic/reports/run-1"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("compare-") && n.ends_with(".svg"))
        .collect();
    assert_eq!(svgs.len(), 6, "{svgs:?}");
    let vq1 = svgs.iter().find(|n| n.contains("vq1-train-loss")).unwrap();
    let svg = p.read(&format!(".haic/reports/run-1/{vq1}"));
    assert_eq!(
        svg.matches("level1_decoder=").count(),
        4,
        "a legend entry per member"
    );

    // compare: one row per member, two groups (the decoders) of n = 2 seeds.
    let c = json(&p.haic(&["compare", "grid", "--format", "json"]));
    assert_eq!(c["runs"].as_array().unwrap().len(), 4);
    let groups = c["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 2, "{groups:?}");
    for (g, kind) in groups.iter().zip(["ff", "msp"]) {
        assert_eq!(g["vars.level1_decoder"], kind);
        assert_eq!(g["n"], 2);
        let (lo, hi) = (&g["vq1:val.psnr ci95_lo"], &g["vq1:val.psnr ci95_hi"]);
        assert!(lo.as_f64().unwrap() < hi.as_f64().unwrap(), "{g}");
    }
}

#[test]
fn bad_sweeps_are_refused_before_anything_runs() {
    let p = Project::new(SCORED);
    for (args, code, text) in [
        (
            vec!["--sweep", "nope=1,2"],
            2,
            "the pipeline has no var `nope`",
        ),
        (vec!["--sweep", "lr=1,,2"], 2, "an empty value"),
        (vec!["--sweep", "lr"], 2, "give NAME=V1,V2"),
        (
            vec!["--sweep", "lr=1,1"],
            2,
            "members 0 and 1 of the sweep are the same",
        ),
        (
            vec!["--sweep", "lr=1", "--sweep", "lr=2"],
            2,
            "`lr` is swept twice",
        ),
    ] {
        let mut all = vec!["status", "pipeline.yaml"];
        all.extend(args);
        assert_error(&p.haic(&all), code, text);
    }
    for (sweep, text) in [
        ("sweep: {lr: []}", "sweep.lr is an empty list"),
        ("sweep: {lr: 3}", "sweep.lr must be a list"),
        (
            "sweep: [{lr: 1}, {seed: 1}]",
            "sweep[1] sets other vars than sweep[0]",
        ),
        (
            "sweep: {rate: [1]}",
            "pipeline.yaml:12:8: sweep: the pipeline has no var `rate`",
        ),
    ] {
        let q = Project::new(&format!("{SCORED}{sweep}\n"));
        assert_error(&q.haic(&["status", "pipeline.yaml"]), 2, text);
    }
    assert!(!p.path(".haic").exists(), "nothing written");
}

#[test]
fn a_sweep_in_the_file_shares_stages_and_keeps_shared_outs_in_the_store() {
    let p = Project::new(&format!("{SCORED}sweep: {{lr: [1, 2], seed: [0, 1]}}\n"));
    let out = p.run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ran = p.query("SELECT stage FROM stage_runs WHERE run_id = 1 ORDER BY id");
    let names: Vec<&str> = ran.iter().map(|r| r["stage"].as_str().unwrap()).collect();
    assert_eq!(names.len(), 5, "{names:?}");
    assert!(
        names.contains(&"other") && names.contains(&"train@lr=2,seed=1"),
        "{names:?}"
    );
    // `other` has one copy and writes its out; the four copies of `train`
    // would all write out.txt, so it stays in the store.
    assert_eq!(p.read("other.txt"), "fixed\n");
    assert!(!p.path("out.txt").exists());
    // A target named as in the file selects every copy.
    let out = p.run(&["train"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        p.query("SELECT stage FROM stage_runs WHERE run_id = 2")
            .len(),
        4
    );
    // -S on a swept var pins it: two members left.
    let out = p.haic(&["status", "pipeline.yaml", "-S", "vars.lr=2", "--json"]);
    let states = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        states.contains("train@seed=1") && !states.contains("lr="),
        "{states}"
    );

    // A file dep on an out every copy writes is refused at load.
    let q = Project::new(&format!(
        "{SCORED}  reader:\n    kind: command\n    cmd: cat out.txt\n    deps: [out.txt]\nsweep: {{lr: [1, 2]}}\n"
    ));
    assert_error(
        &q.haic(&["status", "pipeline.yaml"]),
        2,
        "dep `out.txt` is an out of a stage the sweep copies",
    );
}

#[test]
fn a_fanned_out_stage_runs_per_value_and_shares_keys_with_its_equal() {
    // Sampling at two temperatures; at 1.0 the copy is `ham_samples` itself
    // (same kind, inputs and resolved params), so it is found cached.
    let p = common::smoke(
        "
  tempered:
    kind: sample
    matrix: {temperature: [0.8, 1.0]}
    inputs: {prior: prior, decoder2: decoder2, decoder1: decoder1}
    params: {samples_per_class: 3, batch_size: 8, seed: 1, temperature: \"${matrix.temperature}\"}
",
    );
    let out = p.run(&["ham_samples"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = p.run(&["tempered"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ran = p.query("SELECT stage, status, key FROM stage_runs WHERE run_id = 2 AND stage LIKE 'tempered%' ORDER BY stage");
    assert_eq!(ran.len(), 2, "{ran:?}");
    assert_eq!(ran[0]["stage"], "tempered@temperature=0.8");
    assert_eq!(ran[0]["status"], "succeeded");
    assert_eq!(ran[1]["stage"], "tempered@temperature=1.0");
    assert_eq!(ran[1]["status"], "cached");
    let ham = p.query("SELECT key FROM stage_runs WHERE run_id = 1 AND stage = 'ham_samples'");
    assert_eq!(ran[1]["key"], ham[0]["key"]);
    let out = p.haic(&["show", "pipeline.yaml", "tempered"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("stage:    tempered@temperature=0.8")
            && text.contains("stage:    tempered@temperature=1.0"),
        "{text}"
    );
    assert!(text.contains("temperature        0.8"), "{text}");
}

#[test]
fn a_failed_member_does_not_stop_the_others() {
    let p = Project::new(
        // Each train copy writes its own output, so the after copies have
        // distinct keys (equal artifacts would make one find the other's).
        "vars: {lr: 1}\nstages:\n  train: {kind: command, cmd: \"test ${lr} -ne 2 && echo ${lr} > o.txt\", outs: [o.txt]}\n  after: {kind: command, cmd: \"true\", inputs: {up: train}}\nsweep: {lr: [1, 2, 3]}\n",
    );
    let out = p.run(&[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let states = common::sorted(p.statuses(1));
    assert_eq!(
        states,
        common::pairs(&[
            ("after@lr=1", "succeeded"),
            ("after@lr=2", "skipped"),
            ("after@lr=3", "succeeded"),
            ("train@lr=1", "succeeded"),
            ("train@lr=2", "failed"),
            ("train@lr=3", "succeeded"),
        ])
    );
    // The member's line in `status` says what is not cached.
    let out = p.haic(&["status", "pipeline.yaml"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("lr=2  0/2 cached; not: train, after"),
        "{text}"
    );
    assert!(text.contains("lr=3  2/2 cached"), "{text}");
}
