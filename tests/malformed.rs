//! A corpus of malformed pipeline files. Each must give its clear error (file,
//! line and column, the stage where there is one, what is wrong), exit with
//! status 2, not panic, and publish nothing.

mod common;

use common::{Project, assert_error, stderr};

struct Case {
    name: &'static str,
    yaml: &'static str,
    /// Substrings the error must contain, the position first.
    expect: &'static [&'static str],
}

const CASES: &[Case] = &[
    Case {
        name: "unknown key in a stage",
        yaml: "stages:\n  a:\n    kind: command\n    cmd: x\n    bogus: 1\n",
        expect: &["pipeline.yaml:5:5", "stage `a`", "unknown field `bogus`"],
    },
    Case {
        name: "unknown top-level key",
        yaml: "stagez:\n  a: {kind: command, cmd: x}\n",
        expect: &["pipeline.yaml:1:1", "unknown field `stagez`"],
    },
    Case {
        name: "unknown kind",
        yaml: "stages:\n  a:\n    kind: trian_vq\n",
        expect: &[
            "pipeline.yaml:3:11",
            "stage `a`",
            "unknown kind `trian_vq`",
            "known kinds: bound, command, encode",
        ],
    },
    Case {
        name: "missing kind",
        yaml: "stages:\n  a:\n    cmd: echo\n",
        expect: &["pipeline.yaml:3:", "stage `a`", "missing field `kind`"],
    },
    Case {
        name: "input names a missing stage",
        yaml: "stages:\n  a:\n    kind: command\n    cmd: x\n    inputs: {images: prep}\n",
        expect: &[
            "pipeline.yaml:5:22",
            "stage `a`",
            "names stage `prep`, which does not exist",
        ],
    },
    Case {
        name: "cmd of the wrong type",
        yaml: "stages:\n  a:\n    kind: command\n    cmd: [1, 2]\n",
        expect: &["pipeline.yaml:4:10", "stage `a`", "expected string"],
    },
    Case {
        name: "gpus of the wrong type",
        yaml: "stages:\n  a:\n    kind: command\n    cmd: x\n    resources: {gpus: many}\n",
        expect: &[
            "pipeline.yaml:5:",
            "stage `a`",
            "expected a whole number >= 0",
        ],
    },
    Case {
        name: "negative timeout",
        yaml: "stages:\n  a:\n    kind: command\n    cmd: x\n    timeout: -5\n",
        expect: &[
            "pipeline.yaml:5:14",
            "stage `a`",
            "expected a whole number >= 0",
        ],
    },
    Case {
        name: "zero timeout",
        yaml: "stages:\n  a:\n    kind: command\n    cmd: x\n    timeout: 0\n",
        expect: &["pipeline.yaml:5:14", "stage `a`", "at least 1 second"],
    },
    Case {
        name: "duplicate stage names",
        yaml: "stages:\n  a: {kind: command, cmd: x}\n  a: {kind: command, cmd: y}\n",
        expect: &["pipeline.yaml:3:3", "`a` is written twice"],
    },
    Case {
        name: "three-stage cycle",
        yaml: "stages:\n  a: {kind: command, cmd: x, inputs: {i: c}}\n  b: {kind: command, cmd: x, inputs: {i: a}}\n  c: {kind: command, cmd: x, inputs: {i: b}}\n",
        expect: &[
            "pipeline.yaml:",
            "the stages form a cycle:",
            "a -> b -> c -> a",
        ],
    },
    Case {
        name: "cycle through files",
        yaml: "stages:\n  a: {kind: command, cmd: x, deps: [b.txt], outs: [a.txt]}\n  b: {kind: command, cmd: x, deps: [a.txt], outs: [b.txt]}\n",
        expect: &["pipeline.yaml:", "the stages form a cycle:"],
    },
    Case {
        name: "stage reads itself",
        yaml: "stages:\n  a: {kind: command, cmd: x, inputs: {i: a}}\n",
        expect: &[
            "pipeline.yaml:2:",
            "stage `a`",
            "cannot read its own output",
        ],
    },
    Case {
        name: "two stages write the same out",
        yaml: "stages:\n  a: {kind: command, cmd: x, outs: [o.txt]}\n  b: {kind: command, cmd: y, outs: [o.txt]}\n",
        expect: &[
            "pipeline.yaml:3:",
            "stage `b`",
            "already written by stage `a`",
        ],
    },
    Case {
        name: "dep escapes the pipeline folder",
        yaml: "stages:\n  a:\n    kind: command\n    cmd: x\n    deps: [../../etc/passwd]\n",
        expect: &[
            "pipeline.yaml:5:12",
            "stage `a`",
            "leaves the pipeline folder",
        ],
    },
    Case {
        name: "absolute out",
        yaml: "stages:\n  a:\n    kind: command\n    cmd: x\n    outs: [/tmp/x]\n",
        expect: &["pipeline.yaml:5:12", "absolute paths are not allowed"],
    },
    Case {
        name: "unknown reference",
        yaml: "stages:\n  a:\n    kind: command\n    cmd: echo ${steps}\n",
        expect: &[
            "pipeline.yaml:4:10",
            "stage `a`",
            "`${steps}` is neither a param of this stage nor a top-level var",
        ],
    },
    Case {
        name: "reference to a missing stage param",
        yaml: "stages:\n  a:\n    kind: command\n    cmd: x\n  b:\n    kind: command\n    cmd: echo ${a.lr}\n",
        expect: &[
            "pipeline.yaml:7:10",
            "stage `b`",
            "stage `a` has no param `lr`",
        ],
    },
    Case {
        name: "unclosed reference",
        yaml: "stages:\n  a:\n    kind: command\n    cmd: echo ${x\n",
        expect: &["pipeline.yaml:4:10", "unclosed `${`"],
    },
    Case {
        name: "self reference",
        yaml: "vars: {}\nstages:\n  a:\n    kind: command\n    cmd: x\n    params: {n: \"${n}\"}\n",
        expect: &["pipeline.yaml:6:", "refers to itself"],
    },
    Case {
        name: "command without cmd",
        yaml: "stages:\n  a:\n    kind: command\n    outs: [x]\n",
        expect: &[
            "pipeline.yaml:4:",
            "stage `a`",
            "only for stages with a `cmd`",
        ],
    },
    Case {
        name: "empty cmd",
        yaml: "stages:\n  a:\n    kind: command\n    cmd: \"  \"\n",
        expect: &["pipeline.yaml:4:10", "stage `a`", "`cmd` is empty"],
    },
    Case {
        name: "bad stage name",
        yaml: "stages:\n  9lives:\n    kind: command\n    cmd: x\n",
        expect: &["pipeline.yaml:2:3", "`9lives` is not a valid stage name"],
    },
    Case {
        name: "no stages",
        yaml: "vars: {a: 1}\n",
        expect: &["pipeline.yaml:1:1", "the pipeline has no stages"],
    },
    Case {
        name: "empty file",
        yaml: "",
        expect: &["pipeline.yaml:1:1", "the pipeline has no stages"],
    },
    Case {
        name: "stages is a list",
        yaml: "stages:\n  - a\n  - b\n",
        expect: &["pipeline.yaml:2:3", "expected a map"],
    },
    Case {
        name: "broken YAML",
        yaml: "stages:\n  a: {kind: command, cmd: x\n",
        expect: &["pipeline.yaml:"],
    },
    Case {
        name: "tab indentation",
        yaml: "stages:\n\ta:\n\t\tkind: command\n",
        expect: &["pipeline.yaml:2:"],
    },
    Case {
        name: "a type error above the stages (this panicked once)",
        yaml: "defaults: {timeout: x}\nstages:\n  a:\n    kind: command\n    cmd: x\n",
        expect: &["pipeline.yaml:1:21", "expected a whole number >= 0"],
    },
    Case {
        name: "an unknown executor",
        yaml: "executor: {kind: pbs}\nstages:\n  a:\n    kind: command\n    cmd: x\n",
        expect: &["pipeline.yaml:1:", "pbs"],
    },
    Case {
        name: "an out inside another stage's out",
        yaml: "stages:\n  a: {kind: command, cmd: mkdir -p d, outs: [d]}\n  b:\n    kind: command\n    cmd: echo x > d/x.txt\n    outs: [d/x.txt]\n",
        expect: &[
            "pipeline.yaml:6:12",
            "stage `b`",
            "out `d/x.txt` lies inside stage `a`'s out `d`",
        ],
    },
    Case {
        name: "a dep inside the stage's own out",
        yaml: "stages:\n  a:\n    kind: command\n    cmd: mkdir -p d\n    deps: [d/x]\n    outs: [d]\n",
        expect: &[
            "pipeline.yaml:5:12",
            "stage `a`",
            "dep `d/x` lies inside the stage's own out `d`",
        ],
    },
];

#[test]
fn every_malformed_pipeline_gets_its_error_and_nothing_is_published() {
    assert!(CASES.len() >= 15);
    let mut failures = Vec::new();
    for case in CASES {
        let p = Project::new(case.yaml);
        let out = p.run(&[]);
        let err = stderr(&out);
        let mut problems = Vec::new();
        if out.status.code() != Some(2) {
            problems.push(format!("exit status {:?}, want 2", out.status.code()));
        }
        if err.contains("panicked") {
            problems.push("panicked".into());
        }
        for want in case.expect {
            if !err.contains(want) {
                problems.push(format!("missing `{want}`"));
            }
        }
        if p.artifact_count() != 0 || p.path(".haic/registry.db").exists() {
            problems.push("something was written to the workspace".into());
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{}: {}\n--- stderr:\n{err}",
                case.name,
                problems.join("; ")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn status_of_a_malformed_pipeline_fails_the_same_way() {
    let p = Project::new(CASES[0].yaml);
    let out = p.haic(&["status", "pipeline.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("unknown field `bogus`"));
}

#[test]
fn a_missing_pipeline_file_is_named() {
    let p = Project::new("stages: {}\n");
    let out = p.haic(&["run", "nope.yaml"]);
    assert_error(&out, 2, "reading nope.yaml");
}
