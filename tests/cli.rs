//! The read-side commands: registry queries, status, show, gc.

mod common;

use common::{Project, assert_error, stderr};

const TWO: &str = "stages:\n  a:\n    kind: command\n    cmd: echo ${v} > a.txt\n    params: {v: 1}\n    outs: [a.txt]\n  b:\n    kind: command\n    cmd: cat a.txt a.txt > b.txt\n    deps: [a.txt]\n    outs: [b.txt]\n";

#[test]
fn registry_query_speaks_three_formats() {
    let p = Project::new(TWO);
    assert!(p.run(&[]).status.success());
    // Refused queries are in the bad-input corpus (bad_input.rs).
    let csv = p.haic(&[
        "registry",
        "-p",
        "pipeline.yaml",
        "query",
        "SELECT stage, status FROM stage_runs ORDER BY id",
        "--format",
        "csv",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&csv.stdout),
        "stage,status\na,succeeded\nb,succeeded\n"
    );
    let table = p.haic(&[
        "registry",
        "-p",
        "pipeline.yaml",
        "query",
        "SELECT name, value FROM params ORDER BY 1",
    ]);
    let t = String::from_utf8_lossy(&table.stdout);
    assert!(t.contains("cmd") && t.contains("echo 1 > a.txt"), "{t}");
    let runs = p.haic(&["registry", "-p", "pipeline.yaml", "runs"]);
    let r = String::from_utf8_lossy(&runs.stdout);
    let first = r.lines().nth(2).unwrap_or("");
    assert!(
        first.starts_with("1 ") && first.contains(" succeeded "),
        "{r}"
    );
    // The workspace can also be named directly.
    let out = p.haic(&[
        "registry",
        "--workspace",
        ".haic",
        "query",
        "SELECT 7 AS x",
        "--format",
        "json",
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"x\": 7"));
}

#[test]
fn a_reader_that_closes_the_pipe_early_ends_a_query_quietly() {
    use std::io::{BufRead, BufReader};
    let p = Project::new(TWO);
    assert!(p.run(&[]).status.success());
    let mut child = p
        .cmd(&[
            "registry",
            "-p",
            "pipeline.yaml",
            "query",
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 200000) SELECT x FROM c",
            "--format",
            "csv",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting haic-pipe");
    let mut first = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut first)
        .expect("the first line");
    assert_eq!(first, "x\n");
    // The reader is gone (as `| head -1` goes); the command must end
    // without a panic.
    let out = child.wait_with_output().expect("waiting");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_ne!(out.status.code(), Some(101), "{err}");
}

#[test]
fn a_column_name_of_70000_characters_is_cut_in_a_table() {
    let p = Project::new(TWO);
    assert!(p.run(&[]).status.success());
    let name = "a".repeat(70_000);
    let out = p.haic(&[
        "registry",
        "-p",
        "pipeline.yaml",
        "query",
        &format!("SELECT 1 AS \"{name}\""),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let header = text.lines().next().unwrap_or("");
    assert_eq!(
        header,
        format!("{}…", "a".repeat(119)),
        "the header is cut at 120 characters, visibly"
    );
    assert!(stderr(&out).contains("`--format csv` or `--format json` prints them whole"));
}

#[test]
fn a_key_of_64_characters_is_printed_whole() {
    let p = Project::new(TWO);
    assert!(p.run(&[]).status.success());
    let out = p.haic(&[
        "registry",
        "-p",
        "pipeline.yaml",
        "query",
        "SELECT key FROM artifacts LIMIT 1",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let key = text.lines().nth(2).unwrap_or("");
    assert_eq!(key.len(), 64, "{text}");
    // The key as printed finds its row.
    let q = format!("SELECT count(*) AS n FROM artifacts WHERE key = '{key}'");
    let out = p.haic(&[
        "registry",
        "-p",
        "pipeline.yaml",
        "query",
        &q,
        "--format",
        "csv",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "n\n1\n");
    assert!(!stderr(&out).contains("cut"), "no note when nothing is cut");
}

#[test]
fn reads_the_textual_filter_used_to_refuse_are_answered() {
    let p = Project::new(TWO);
    assert!(p.run(&[]).status.success());
    for (sql, expect) in [
        ("values(1)", "1"),
        ("select(7)", "7"),
        ("\n-- the runs\nSELECT 3 AS x", "3"),
        ("/* ; */ SELECT 'a;b' AS x", "a;b"),
        ("SELECT 5 AS attachment", "5"),
    ] {
        let out = p.haic(&[
            "registry",
            "-p",
            "pipeline.yaml",
            "query",
            sql,
            "--format",
            "csv",
        ]);
        assert!(out.status.success(), "{sql}: {}", stderr(&out));
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.lines().nth(1), Some(expect), "{sql}: {text}");
    }
}

/// A runaway query ends with a message and exit 2: an endless count is
/// interrupted at its time limit, endless rows stop at the row limit.
#[test]
fn runaway_queries_stop_at_their_time_and_row_limits() {
    let p = Project::new(TWO);
    assert!(p.run(&[]).status.success());
    let registry_files = || {
        ["registry.db", "registry.db-wal"]
            .map(|f| std::fs::read(p.path(&format!(".haic/{f}"))).unwrap_or_default())
    };
    let before = registry_files();
    let endless = "with recursive c(x) as (select 1 union all select x+1 from c)";
    let started = std::time::Instant::now();
    let out = p.haic(&[
        "registry",
        "-p",
        "pipeline.yaml",
        "query",
        &format!("{endless} select count(*) from c"),
        "--timeout",
        "0.5",
    ]);
    assert_error(&out, 2, "time limit (0.5 s)");
    assert!(started.elapsed().as_secs() < 20, "{:?}", started.elapsed());

    let out = p.haic(&[
        "registry",
        "-p",
        "pipeline.yaml",
        "query",
        &format!("{endless} select x from c"),
        "--limit",
        "5",
        "--format",
        "csv",
    ]);
    assert_error(&out, 2, "more than 5 rows");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "x\n1\n2\n3\n4\n5\n");
    // The default limit holds too: 10,000 rows, then the message.
    let out = p.haic(&[
        "registry",
        "-p",
        "pipeline.yaml",
        "query",
        &format!("{endless} select x from c"),
        "--format",
        "csv",
    ]);
    assert_error(&out, 2, "more than 10000 rows");
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 10_001);
    assert_error(
        &p.haic(&[
            "registry",
            "-p",
            "pipeline.yaml",
            "query",
            "select 1",
            "--timeout",
            "0",
        ]),
        2,
        "positive number of seconds",
    );
    assert!(registry_files() == before, "the registry files changed");
}

/// The schema is discoverable from the CLI, and a query on a table that
/// does not exist says where to look.
#[test]
fn registry_schema_lists_tables_views_and_columns() {
    let p = Project::new(TWO);
    assert!(p.run(&[]).status.success());
    let out = p.haic(&[
        "registry",
        "-p",
        "pipeline.yaml",
        "schema",
        "--format",
        "csv",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let csv = String::from_utf8_lossy(&out.stdout);
    assert!(csv.starts_with("table,kind,column,type,holds\n"), "{csv}");
    assert!(csv.contains("params,table,stage_run_id,INTEGER,"), "{csv}");
    assert!(csv.contains("run_stages,view,producer,"), "{csv}");
    assert!(!csv.contains("_sqlx"), "{csv}");
    let out = p.haic(&[
        "registry",
        "-p",
        "pipeline.yaml",
        "query",
        "SELECT * FROM stage",
    ]);
    assert_error(
        &out,
        2,
        "no such table: stage; `haic-pipe registry schema` lists",
    );
}

#[test]
fn a_registry_that_does_not_exist_is_named() {
    let p = Project::new(TWO);
    let out = p.haic(&["registry", "-p", "pipeline.yaml", "query", "SELECT 1"]);
    assert_error(&out, 2, "no registry here yet");
}

#[test]
fn show_names_the_artifact_and_gc_removes_only_unused_ones() {
    let p = Project::new(TWO);
    assert!(p.run(&[]).status.success());
    let show = p.haic(&["show", "pipeline.yaml", "b"]);
    let s = String::from_utf8_lossy(&show.stdout).to_string();
    assert!(
        s.contains("state:    cached") && s.contains("artifact: "),
        "{s}"
    );
    let art = s.lines().find(|l| l.starts_with("artifact: ")).unwrap()[10..]
        .trim()
        .to_string();
    assert_eq!(
        std::fs::read_to_string(format!("{art}/b.txt")).unwrap(),
        "1\n1\n"
    );

    // Three more runs with other params: the first artifacts fall out of the last 2 runs.
    for v in 2..=4 {
        std::fs::write(p.pipeline(), TWO.replace("{v: 1}", &format!("{{v: {v}}}"))).unwrap();
        assert!(p.run(&[]).status.success());
    }
    assert_eq!(p.artifact_count(), 8);
    let dry = p.haic(&["gc", "pipeline.yaml", "--keep-runs", "2", "--dry-run"]);
    assert!(dry.status.success(), "{}", stderr(&dry));
    assert_eq!(
        String::from_utf8_lossy(&dry.stdout).lines().count(),
        4,
        "{}",
        String::from_utf8_lossy(&dry.stdout)
    );
    assert_eq!(p.artifact_count(), 8, "dry run removes nothing");
    let gc = p.haic(&["gc", "pipeline.yaml", "--keep-runs", "2"]);
    assert!(gc.status.success(), "{}", stderr(&gc));
    assert_eq!(p.artifact_count(), 4);
    // The newest run is still fully cached.
    assert!(p.run(&[]).status.success());
    assert_eq!(
        p.statuses(5).iter().filter(|(_, s)| s == "cached").count(),
        2
    );
    // And the removed one re-runs when asked for again.
    std::fs::write(p.pipeline(), TWO).unwrap();
    let st = String::from_utf8_lossy(&p.haic(&["status", "pipeline.yaml"]).stdout).to_string();
    assert!(st.contains("a      stale"), "{st}");
}

#[test]
fn a_misspelt_stage_gets_the_closest_names() {
    let p = common::smoke("");
    let out = p.run(&["codez1"]);
    assert_error(
        &out,
        2,
        "there is no stage `codez1`; did you mean codes1 or codes2?",
    );
    let out = p.haic(&["show", "pipeline.yaml", "decoderr1"]);
    assert_error(&out, 2, "did you mean decoder1");
    // Nothing close: the names, and how many were left out.
    let out = p.run(&["zzzzzzzzzzzz"]);
    assert_error(&out, 2, "stages in this file: prep, vq1, codes1");
    assert!(stderr(&out).contains(" … and 4 more"), "{}", stderr(&out));
    assert!(
        !p.path(".haic/registry.db").exists(),
        "no run row for a bad target"
    );
}

#[test]
fn report_survives_metric_names_and_values_at_the_edges() {
    let long = "m".repeat(300);
    let p = Project::new(&format!(
        "stages:\n  s:\n    kind: command\n    cmd: |\n      m=\"$HAIC_METRICS\"\n      printf 'a.b 0 1\\na.b 1 2\\na_b 0 5\\na_b 1 3\\n{long} 0 1\\n{long} 1 2\\nhuge 0 1e308\\nhuge 1 -1e308\\ntwice 0 1\\ntwice 1 9\\ntwice 1 4\\ntwice 2 2\\n' >> \"$m\"\n"
    ));
    let out = p.run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let started = std::time::Instant::now();
    let out = p.haic(&["report", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Not a timing test: the ±1e308 axis used to spin forever.
    assert!(started.elapsed().as_secs() < 60);
    let files: Vec<String> = std::fs::read_dir(p.path(".haic/reports/run-1"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    // `a.b` and `a_b` each have their curve; the long name a short file.
    assert!(files.contains(&"curve-s-a-b.svg".to_string()), "{files:?}");
    assert!(
        files.contains(&"curve-s-a-b-2.svg".to_string()),
        "{files:?}"
    );
    assert!(files.iter().all(|f| f.len() < 120), "{files:?}");
    assert_eq!(
        files
            .iter()
            .filter(|f| f.starts_with("curve-s-mmm"))
            .count(),
        1
    );
    // A step given twice: the later value stands, in the points and in
    // their summary alike.
    let rows = p.query(
        "SELECT s.points, s.max_value, (SELECT count(*) FROM metrics WHERE name = 'twice') AS n,
                (SELECT value FROM metrics WHERE name = 'twice' AND step = 1) AS at1
         FROM metric_summaries s WHERE s.name = 'twice'",
    );
    assert_eq!(rows[0]["points"], 3);
    assert_eq!(rows[0]["n"], 3);
    assert_eq!(rows[0]["at1"], 4.0);
    assert_eq!(rows[0]["max_value"], 4.0);
}

#[test]
fn without_p_the_nearest_workspace_above_is_found_and_one_below_is_named() {
    // A pipeline in a subfolder keeps its workspace there (pipelines/.haic,
    // as the README's); from the folder above, the commands say how to
    // reach it instead of "run a pipeline first" alone.
    let p = Project::new(TWO);
    std::fs::remove_file(p.pipeline()).unwrap();
    p.write("pipelines/demo.yaml", TWO);
    assert!(p.haic(&["run", "pipelines/demo.yaml"]).status.success());
    let out = p.haic(&["registry", "runs"]);
    assert_error(&out, 2, "pass `-p pipelines/demo.yaml` (pipelines/.haic)");
    assert!(!p.path(".haic").exists(), "nothing was created");
    // From inside the pipeline's folder, or deeper, it is found upward.
    std::fs::create_dir_all(p.path("pipelines/notes/deeper")).unwrap();
    for dir in ["pipelines", "pipelines/notes/deeper"] {
        let out = p
            .cmd(&["registry", "runs", "--format", "csv"])
            .current_dir(p.path(dir))
            .output()
            .unwrap();
        assert!(out.status.success(), "{dir}: {}", stderr(&out));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.lines().count() == 2 && text.contains("succeeded"),
            "{dir}: {text}"
        );
    }
}

#[test]
fn reading_commands_outside_a_workspace_say_how_to_find_one_and_write_nothing() {
    let p = Project::new(TWO);
    std::fs::remove_file(p.pipeline()).unwrap();
    for args in [
        vec!["eval", "report"],
        vec!["registry", "runs"],
        vec!["report", "1"],
    ] {
        let out = p.haic(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = stderr(&out);
        assert!(
            err.contains("no registry") && err.contains("run a pipeline first"),
            "{args:?}: {err}"
        );
        assert!(!err.contains("code: 14"), "{err}");
    }
    assert!(!p.path(".haic").exists(), "nothing was created");
}
