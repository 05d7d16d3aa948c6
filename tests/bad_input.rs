//! The bad-input corpus beyond the pipeline file's own (`malformed.rs`):
//! stage params, data files, code tables, model checkpoints, registry
//! queries and rating answers. Each case states its input, the exit status
//! and the error text it must get; the test checks the text and the status,
//! that nothing panicked, and that nothing was published or stored.
//!
//! Code tables and checkpoints reach a stage as another stage's artifact, so
//! their cases make the bad one with a `command` stage (`fake`) from a
//! real one: what a researcher gets who feeds a stage a hand-made or
//! damaged model.

mod common;

use std::path::Path;

use common::{Project, human_eval_package, repo, stderr};

const LABELS: &str = "data/fashion-mnist/train-labels-idx1-ubyte.gz";
const IMAGES: &str = "data/fashion-mnist/train-images-idx3-ubyte.gz";
const TEST_LABELS: &str = "data/fashion-mnist/t10k-labels-idx1-ubyte.gz";

/// A case run as `haic-pipe run pipeline.yaml bad`.
struct StageCase {
    name: &'static str,
    /// Stages after the smoke pipeline's (`Smoke`) or alone (`Bare`, in a
    /// folder of its own with the files `files` writes).
    stages: &'static str,
    setup: Setup,
    code: i32,
    expect: &'static [&'static str],
}

#[derive(Clone, Copy)]
enum Setup {
    Smoke,
    Bare(fn(&Project)),
}

fn copy(p: &Project, from: &str, to: &str) {
    std::fs::copy(repo().join(from), p.path(to)).expect("copying a shipped file");
}

fn idx_pair(p: &Project) {
    copy(p, LABELS, "labels.gz");
    copy(p, IMAGES, "images.gz");
    copy(p, TEST_LABELS, "test-labels.gz");
    let images = std::fs::read(p.path("images.gz")).expect("images");
    std::fs::write(p.path("truncated.gz"), &images[..5000]).expect("write");
    std::fs::write(p.path("garbage.gz"), b"garbage, not IDX").expect("write");
}

fn bad_cifar(p: &Project) {
    // 3,000 bytes: not a whole number of 3,073-byte records.
    p.write("cifar/data_batch_1.bin", &"x".repeat(3000));
}

fn bad_folder(p: &Project) {
    p.write("folder/coat/a.png", "not a PNG");
    std::fs::create_dir_all(p.path("empty")).expect("mkdir");
}

fn nothing(_: &Project) {}

const STAGE_CASES: &[StageCase] = &[
    // Params: checked before anything runs.
    StageCase {
        name: "train_vq with zero steps",
        stages: "  bad:\n    kind: train_vq\n    inputs: {table: prep}\n    params: {steps: 0}\n",
        setup: Setup::Smoke,
        code: 2,
        expect: &["stage `bad`", "steps must be at least 1"],
    },
    StageCase {
        name: "a misspelt train_vq param",
        stages: "  bad:\n    kind: train_vq\n    inputs: {table: prep}\n    params: {steps: 5, batch_sise: 4}\n",
        setup: Setup::Smoke,
        code: 2,
        expect: &[
            "stage `bad`",
            "unknown field `batch_sise`",
            "expected one of `steps`, `batch_size`",
        ],
    },
    StageCase {
        name: "a misspelt input name",
        stages: "  bad:\n    kind: train_vq\n    inputs: {tabel: prep}\n    params: {steps: 5}\n",
        setup: Setup::Smoke,
        code: 2,
        expect: &[
            "stage `bad`",
            "train_vq has no input `tabel` (did you mean table?); it reads table",
        ],
    },
    StageCase {
        name: "two input names that are one variable to a command",
        stages: "  bad:\n    kind: command\n    cmd: ls $HAIC_INPUT_A_B\n    inputs: {a-b: prep, a_b: vq1}\n",
        setup: Setup::Smoke,
        code: 2,
        expect: &[
            "stage `bad`",
            "inputs `a-b` and `a_b` would both be HAIC_INPUT_A_B in the command; rename one",
        ],
    },
    StageCase {
        name: "train_vq without steps",
        stages: "  bad:\n    kind: train_vq\n    inputs: {table: prep}\n    params: {quantiser: {codebook_size: 4}}\n",
        setup: Setup::Smoke,
        code: 2,
        expect: &["stage `bad`", "missing field `steps`"],
    },
    StageCase {
        name: "an unknown source format",
        stages: "  bad:\n    kind: preprocess\n    params:\n      source: {format: png, train: {images: x}}\n",
        setup: Setup::Bare(nothing),
        code: 2,
        expect: &[
            "pipeline.yaml:",
            "unknown variant `png`",
            "`idx`, `cifar10`, `cifar100`, `image_folder`, `parquet`",
        ],
    },
    StageCase {
        name: "a validation fraction above 1",
        stages: "  bad:\n    kind: preprocess\n    params:\n      source: {format: idx, train: {images: images.gz, labels: labels.gz}}\n      validation: {fraction: 1.5}\n",
        setup: Setup::Bare(idx_pair),
        code: 2,
        expect: &["validation.fraction must be between 0 and 1, not 1.5"],
    },
    StageCase {
        name: "a Parquet source without class names",
        stages: "  bad:\n    kind: preprocess\n    params:\n      source: {format: parquet, train: [t.parquet]}\n",
        setup: Setup::Bare(nothing),
        code: 2,
        expect: &["a parquet source needs `class_names`"],
    },
    StageCase {
        name: "a source path that leaves the pipeline folder",
        stages: "  bad:\n    kind: preprocess\n    params:\n      source: {format: idx, train: {images: ../../etc/passwd, labels: labels.gz}}\n",
        setup: Setup::Bare(idx_pair),
        code: 2,
        expect: &[
            "stage `bad`",
            "../../etc/passwd",
            "leaves the pipeline folder",
        ],
    },
    StageCase {
        name: "zero human-eval pairs",
        stages: "  bad:\n    kind: human_eval_export\n    inputs: {ham: ham_samples, baseline: baseline_samples, catch: prep}\n    params: {pairs: 0}\n",
        setup: Setup::Smoke,
        code: 2,
        expect: &["stage `bad`", "pairs: must be at least 1"],
    },
    StageCase {
        name: "bf16 on a stage that runs on the CPU",
        stages: "  bad:\n    kind: train_ar\n    inputs: {table: prep}\n    params: {steps: 5, precision: bf16}\n",
        setup: Setup::Smoke,
        code: 2,
        expect: &[
            "stage `bad`",
            "`precision: bf16` computes on a GPU",
            "give the stage `resources: {gpus: 1}` or remove `precision`",
        ],
    },
    StageCase {
        name: "a precision that is not one",
        stages: "  bad:\n    kind: train_vq\n    inputs: {table: prep}\n    params: {steps: 5, precision: fp16}\n",
        setup: Setup::Smoke,
        code: 2,
        expect: &[
            "stage `bad`",
            "unknown variant `fp16`, expected `f32` or `bf16`",
        ],
    },
    StageCase {
        name: "a PixelCNN whose hidden channels do not split over RGB",
        stages: "  prep:\n    kind: preprocess\n    params: {source: {format: idx, train: {images: i.gz, labels: l.gz}}, transforms: {color: rgb}}\n  bad:\n    kind: train_ar\n    inputs: {table: prep}\n    params: {steps: 5, model: {hidden: 16}}\n",
        setup: Setup::Bare(nothing),
        code: 2,
        expect: &[
            "stage `bad`",
            "model.hidden is 16, not a multiple of the 3 pixel channels of input `table` (stage `prep`)",
            "use 15 or 18",
        ],
    },
    StageCase {
        name: "an encoder downsampling more than the images allow",
        stages: "  prep:\n    kind: preprocess\n    params: {source: {format: image_folder, train: imgs}, transforms: {resize: 40, crop: 40}}\n  bad:\n    kind: train_vq\n    inputs: {table: prep}\n    params: {steps: 5, encoder: {downsample: 4}}\n",
        setup: Setup::Bare(nothing),
        code: 2,
        expect: &[
            "stage `bad`",
            "encoder.downsample is 4",
            "input `table` (stage `prep`) holds 40x40 images, which 2^4 does not divide",
            "use downsample 3 or less",
        ],
    },
    StageCase {
        name: "a second level downsampling codes the first level made too small",
        stages: "  prep:\n    kind: preprocess\n    params: {source: {format: cifar10, train: [c.bin]}}\n  vq1:\n    kind: train_vq\n    inputs: {table: prep}\n    params: {steps: 5, encoder: {downsample: 3}}\n  codes1:\n    kind: encode\n    inputs: {level: vq1, table: prep}\n  bad:\n    kind: train_vq\n    inputs: {table: codes1}\n    params: {steps: 5, encoder: {downsample: 3}}\n",
        setup: Setup::Bare(nothing),
        code: 2,
        expect: &[
            "stage `bad`",
            "input `table` (stage `codes1`) holds 4x4 code maps",
            "use downsample 2 or less",
        ],
    },
    StageCase {
        name: "an AR decoder conditioned on codes its target is not 2^s times larger than",
        stages: "  prep:\n    kind: preprocess\n    params: {source: {format: image_folder, train: a}, transforms: {crop: 48}}\n  other:\n    kind: preprocess\n    params: {source: {format: image_folder, train: b}, transforms: {crop: 40}}\n  vq:\n    kind: train_vq\n    inputs: {table: other}\n    params: {steps: 5, encoder: {downsample: 1}}\n  codes:\n    kind: encode\n    inputs: {level: vq, table: other}\n  bad:\n    kind: train_ar\n    inputs: {table: prep, condition: codes}\n    params: {steps: 5}\n",
        setup: Setup::Bare(nothing),
        code: 2,
        expect: &[
            "stage `bad`",
            "input `condition` (stage `codes`) has 20x20 code maps and the target `table` (stage `prep`) is 48x48",
            "2^s times larger",
        ],
    },
    StageCase {
        name: "an AR decoder conditioned on an image table",
        stages: "  prep:\n    kind: preprocess\n    params: {source: {format: idx, train: {images: i.gz, labels: l.gz}}}\n  bad:\n    kind: train_ar\n    inputs: {table: prep, condition: prep}\n    params: {steps: 5}\n",
        setup: Setup::Bare(nothing),
        code: 2,
        expect: &[
            "stage `bad`",
            "input `condition` (stage `prep`) is an image table",
        ],
    },
    StageCase {
        name: "an unknown evaluate param",
        stages: "  bad:\n    kind: evaluate\n    inputs: {ham: ham_samples, real: prep}\n    params: {clasifier: {steps: 3}}\n",
        setup: Setup::Smoke,
        code: 2,
        expect: &["stage `bad`", "unknown field `clasifier`"],
    },
    // Data files: found when the stage reads them.
    StageCase {
        name: "a source file that does not exist",
        stages: "  bad:\n    kind: preprocess\n    params:\n      source: {format: idx, train: {images: missing.gz, labels: labels.gz}}\n",
        setup: Setup::Bare(idx_pair),
        code: 1,
        expect: &["dep `missing.gz` does not exist", "create it"],
    },
    StageCase {
        name: "a file that is not IDX",
        stages: "  bad:\n    kind: preprocess\n    params:\n      source: {format: idx, train: {images: garbage.gz, labels: labels.gz}}\n",
        setup: Setup::Bare(idx_pair),
        code: 1,
        expect: &[
            "garbage.gz: wrong magic number",
            "want 0x00000803 for an IDX images file",
        ],
    },
    StageCase {
        name: "labels given as images",
        stages: "  bad:\n    kind: preprocess\n    params:\n      source: {format: idx, train: {images: labels.gz, labels: labels.gz}}\n",
        setup: Setup::Bare(idx_pair),
        code: 1,
        expect: &["labels.gz: wrong magic number 0x00000801 (want 0x00000803"],
    },
    StageCase {
        name: "a truncated gzip IDX file",
        stages: "  bad:\n    kind: preprocess\n    params:\n      source: {format: idx, train: {images: truncated.gz, labels: labels.gz}}\n",
        setup: Setup::Bare(idx_pair),
        code: 1,
        expect: &["truncated.gz, record ", "incomplete deflate stream"],
    },
    StageCase {
        name: "images and labels of different sizes",
        stages: "  bad:\n    kind: preprocess\n    params:\n      source: {format: idx, train: {images: images.gz, labels: test-labels.gz}}\n",
        setup: Setup::Bare(idx_pair),
        code: 1,
        expect: &[
            "images.gz: 10000 images but 2000 labels",
            "do not belong together",
        ],
    },
    StageCase {
        name: "a CIFAR file of partial records",
        stages: "  bad:\n    kind: preprocess\n    params:\n      source: {format: cifar10, train: [cifar/data_batch_1.bin]}\n",
        setup: Setup::Bare(bad_cifar),
        code: 1,
        expect: &[
            "data_batch_1.bin",
            "3000 bytes is not a whole number of 3073-byte CIFAR-10 records",
        ],
    },
    StageCase {
        name: "an image folder holding a file that is no image",
        stages: "  bad:\n    kind: preprocess\n    params:\n      source: {format: image_folder, train: folder}\n",
        setup: Setup::Bare(bad_folder),
        code: 1,
        expect: &["folder/coat/a.png, record 0: cannot decode image"],
    },
    StageCase {
        name: "an image folder without class folders",
        stages: "  bad:\n    kind: preprocess\n    params:\n      source: {format: image_folder, train: empty}\n",
        setup: Setup::Bare(bad_folder),
        code: 1,
        expect: &["empty: no class folders", "one sub-folder per class"],
    },
    // Code tables.
    StageCase {
        name: "a model given where a table belongs",
        stages: "  bad:\n    kind: train_ar\n    inputs: {table: vq1}\n    params: {steps: 2}\n",
        setup: Setup::Smoke,
        code: 1,
        expect: &[
            "has no table.json, so it is not an image or code table",
            "check the stage this input names",
        ],
    },
    StageCase {
        name: "a table index that is not JSON",
        stages: "  fake:\n    kind: command\n    cmd: echo nope > table.json\n    outs: [table.json]\n  bad:\n    kind: train_ar\n    inputs: {table: fake}\n    params: {steps: 2}\n",
        setup: Setup::Smoke,
        code: 1,
        expect: &["table.json: not a table index"],
    },
    StageCase {
        name: "a code table of an unknown format version",
        stages: "  fake:\n    kind: command\n    inputs: {src: codes1}\n    cmd: sed 's/code table v1/code table v9/' $HAIC_INPUT_SRC/table.json > table.json && cp $HAIC_INPUT_SRC/*.parquet .\n    outs: [table.json, train-00000.parquet, val-00000.parquet]\n  bad:\n    kind: train_ar\n    inputs: {table: fake}\n    params: {steps: 2}\n",
        setup: Setup::Smoke,
        code: 1,
        expect: &[
            "format `haic code table v9` is neither `haic image table v1` nor `haic code table v1`",
        ],
    },
    StageCase {
        name: "a code table shard that is not Parquet",
        stages: "  fake:\n    kind: command\n    inputs: {src: codes1}\n    cmd: cp $HAIC_INPUT_SRC/table.json $HAIC_INPUT_SRC/val-00000.parquet . && echo nope > train-00000.parquet\n    outs: [table.json, train-00000.parquet, val-00000.parquet]\n  bad:\n    kind: train_ar\n    inputs: {table: fake}\n    params: {steps: 2}\n",
        setup: Setup::Smoke,
        code: 1,
        expect: &["train-00000.parquet", "Parquet file too small"],
    },
    // Checkpoints: the trained models other stages read.
    StageCase {
        name: "a table given where a trained level belongs",
        stages: "  bad:\n    kind: encode\n    inputs: {level: prep, table: prep}\n",
        setup: Setup::Smoke,
        code: 1,
        expect: &[
            "has no level.json, so it is not a trained VQ level (the output of a train_vq stage)",
        ],
    },
    StageCase {
        name: "a level checkpoint that is not safetensors",
        stages: "  fake:\n    kind: command\n    inputs: {src: vq1}\n    cmd: cp $HAIC_INPUT_SRC/level.json $HAIC_INPUT_SRC/aux_decoder.safetensors . && echo nope > model.safetensors\n    outs: [level.json, model.safetensors, aux_decoder.safetensors]\n  bad:\n    kind: encode\n    inputs: {level: fake, table: prep}\n",
        setup: Setup::Smoke,
        code: 1,
        expect: &["model.safetensors: header too small"],
    },
    StageCase {
        name: "a level description that is not JSON",
        stages: "  fake:\n    kind: command\n    inputs: {src: vq1}\n    cmd: cp $HAIC_INPUT_SRC/*.safetensors . && echo '{' > level.json\n    outs: [level.json, model.safetensors, aux_decoder.safetensors]\n  bad:\n    kind: encode\n    inputs: {level: fake, table: prep}\n",
        setup: Setup::Smoke,
        code: 1,
        expect: &["level.json: not a trained VQ level"],
    },
    StageCase {
        name: "a level given where an AR model belongs",
        stages: "  bad:\n    kind: sample\n    inputs: {prior: vq1}\n",
        setup: Setup::Smoke,
        code: 1,
        expect: &[
            "has no ar.json, so it is not a trained AR model (the output of a train_ar stage)",
        ],
    },
    StageCase {
        name: "a truncated AR checkpoint",
        stages: "  fake:\n    kind: command\n    inputs: {src: prior}\n    cmd: cp $HAIC_INPUT_SRC/ar.json . && head -c 2000 $HAIC_INPUT_SRC/model.safetensors > model.safetensors\n    outs: [ar.json, model.safetensors]\n  bad:\n    kind: sample\n    inputs: {prior: fake}\n",
        setup: Setup::Smoke,
        code: 1,
        expect: &["model.safetensors: incomplete metadata, file not fully covered"],
    },
    StageCase {
        name: "the weights of another model",
        stages: "  fake:\n    kind: command\n    inputs: {src: prior, other: decoder2}\n    cmd: cp $HAIC_INPUT_SRC/ar.json . && cp $HAIC_INPUT_OTHER/model.safetensors .\n    outs: [ar.json, model.safetensors]\n  bad:\n    kind: sample\n    inputs: {prior: fake}\n",
        setup: Setup::Smoke,
        code: 1,
        expect: &[
            "model.safetensors: `embedding.weight` is F32 [16, 4], the model needs F32 [8, 4]",
        ],
    },
];

/// The artifacts the registry knows, but for the cases' `fake` stages.
fn published(p: &Project) -> Vec<serde_json::Value> {
    p.try_query("SELECT stage, key FROM artifacts WHERE stage != 'fake' ORDER BY key")
        .unwrap_or_default()
}

/// Artifact folders the registry does not know, or staging folders left.
fn strays(p: &Project) -> bool {
    let known = p
        .try_query("SELECT count(*) AS n FROM artifacts")
        .ok()
        .and_then(|r| r[0]["n"].as_u64())
        .unwrap_or(0) as usize;
    let staging = std::fs::read_dir(p.path(".haic/artifacts/.staging"))
        .map(|d| d.count())
        .unwrap_or(0);
    p.artifact_count() != known || staging != 0
}

/// The common checks; a list of what is wrong.
fn check(out: &std::process::Output, code: i32, expect: &[&str]) -> Vec<String> {
    let err = stderr(out);
    let mut problems = Vec::new();
    if out.status.code() != Some(code) {
        problems.push(format!("exit status {:?}, want {code}", out.status.code()));
    }
    if err.contains("panicked") {
        problems.push("panicked".into());
    }
    for want in expect {
        if !err.contains(want) {
            problems.push(format!("missing `{want}`"));
        }
    }
    problems
}

fn report(failures: Vec<String>) {
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// The smoke pipeline rooted in its own folder, with the shipped data
/// linked in: the `fake` stages' outs are restored there, not into the
/// repository (`smoke()` roots the pipeline at the repository).
fn smoke_in_own_folder() -> Project {
    let text = std::fs::read_to_string(repo().join("pipelines/smoke.yaml")).expect("smoke.yaml");
    let p = Project::new(&text.replacen("root: ..\n", "", 1));
    std::os::unix::fs::symlink(repo().join("data"), p.path("data")).expect("linking data/");
    p
}

#[test]
fn every_bad_stage_input_gets_its_error_and_publishes_nothing() {
    let smoke_project = smoke_in_own_folder();
    // The models and tables the cases start from.
    let out = smoke_project.run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let base = smoke_project.read("pipeline.yaml");

    let mut failures = Vec::new();
    for case in STAGE_CASES {
        let bare;
        let p = match case.setup {
            Setup::Smoke => {
                smoke_project.write("pipeline.yaml", &format!("{base}\n{}", case.stages));
                &smoke_project
            }
            Setup::Bare(files) => {
                bare = Project::new(&format!("stages:\n{}", case.stages));
                files(&bare);
                &bare
            }
        };
        let before = published(p);
        let out = p.run(&["bad"]);
        let mut problems = check(&out, case.code, case.expect);
        if published(p) != before || strays(p) {
            problems.push("something was published or left in the store".into());
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{}: {}\n--- stderr:\n{}",
                case.name,
                problems.join("; "),
                stderr(&out)
            ));
        }
    }
    report(failures);
}

const REGISTRY_CASES: &[(&str, &str)] = &[
    ("DELETE FROM runs", "only SELECT, WITH, EXPLAIN and VALUES"),
    ("UPDATE runs SET status = 'x'", "would change the registry"),
    (
        "INSERT INTO runs (pipeline) VALUES ('x')",
        "would change the registry",
    ),
    ("select 1; drop table runs", "one statement at a time"),
    (
        "ATTACH DATABASE 'other.db' AS x",
        "would change the registry",
    ),
    (
        "SELECT load_extension('x')",
        "`load_extension` is not allowed",
    ),
    ("SELECT writefile('x', 'y')", "`writefile` is not allowed"),
    (
        "WITH x AS (SELECT 1) INSERT INTO runs (pipeline) SELECT 1 FROM x",
        "refused",
    ),
    ("PRAGMA journal_mode = DELETE", "would change the registry"),
    ("VACUUM INTO 'copy.db'", "would change the registry"),
    ("SELECT nope FROM runs", "no such column: nope"),
    ("SELECT * FROM nope", "no such table: nope"),
    ("SELEC 1", "is not a query"),
    ("", "is not a query"),
];

#[test]
fn every_refused_registry_query_changes_nothing() {
    let p = Project::new("stages:\n  a: {kind: command, cmd: echo a > a.txt, outs: [a.txt]}\n");
    assert!(p.run(&[]).status.success());
    let mut failures = Vec::new();
    for (sql, why) in REGISTRY_CASES {
        let out = p.haic(&["registry", "-p", "pipeline.yaml", "query", sql]);
        let mut problems = check(&out, 2, &["registry query refused", why]);
        for made in ["other.db", "copy.db", "x", ".haic/other.db"] {
            if p.path(made).exists() {
                problems.push(format!("{made} was written"));
            }
        }
        if !problems.is_empty() {
            failures.push(format!("{sql}: {}\n{}", problems.join("; "), stderr(&out)));
        }
    }
    report(failures);
    assert_eq!(p.query("SELECT count(*) AS n FROM runs")[0]["n"], 1);
}

/// `(name, results.csv, error)`; `TASK` stands for a real task id.
const RATING_CASES: &[(&str, &str, &str)] = &[
    (
        "a choice other than left or right",
        "task_id,choice,rater\nTASK,middle,ann\n",
        "results.csv:2: choice `middle`: answer `left` or `right`; nothing was imported",
    ),
    (
        "an unknown task",
        "task_id,choice,rater\nt9999,left,ann\n",
        "results.csv:2: no task `t9999` in this package; nothing was imported",
    ),
    (
        "no choice column",
        "task_id,rater\nTASK,ann\n",
        "results.csv: no column Answer.choice or choice",
    ),
    (
        "a rater name with spaces and punctuation",
        "task_id,choice,rater\nTASK,left,a b;c\n",
        "results.csv:2: rater `a b;c`: use 1-64 letters, digits",
    ),
    (
        "an empty file",
        "",
        "results.csv: no column Input.task_id or task_id",
    ),
    (
        "a bad row after a good one",
        "task_id,choice,rater\nTASK,left,ann\nTASK,up,bob\n",
        "results.csv:3: choice `up`",
    ),
    (
        "a row with a missing field",
        "task_id,choice,rater\nTASK,left\n",
        "results.csv:2:",
    ),
];

#[test]
fn every_bad_rating_answer_is_refused_and_nothing_is_stored() {
    let (p, pkg) = human_eval_package();
    let task = first_task(&pkg);
    let mut failures = Vec::new();
    for (name, csv, error) in RATING_CASES {
        p.write("results.csv", &csv.replace("TASK", &task));
        let out = p.haic(&[
            "eval",
            "import",
            "results.csv",
            "--package",
            pkg.to_str().expect("utf-8 path"),
        ]);
        let mut problems = check(&out, 2, &[error]);
        let stored = p.query("SELECT count(*) AS n FROM ratings")[0]["n"].clone();
        if stored != 0 {
            problems.push(format!("{stored} ratings stored"));
        }
        if !problems.is_empty() {
            failures.push(format!("{name}: {}\n{}", problems.join("; "), stderr(&out)));
        }
    }
    report(failures);
}

fn first_task(pkg: &Path) -> String {
    let tasks = std::fs::read_to_string(pkg.join("tasks.csv")).expect("tasks.csv");
    let line = tasks.lines().nth(1).expect("a task");
    line.split(',').next().expect("a task id").to_string()
}
