//! `train_vq` and `encode` end to end on the shipped Fashion-MNIST subset:
//! learning, bit-exact resume after SIGKILL, a damaged checkpoint, two
//! levels through a code table, and bad params.

mod common;

use std::path::PathBuf;

use common::{Project, assert_error, repo, run_python, stderr};
use serde_json::Value;
use stages::data::level_table::LevelTable;
use stages::models::vq_level::VqLevel;

const PREP: &str = r#"
  prep:
    kind: preprocess
    params:
      source:
        format: idx
        train:
          images: data/fashion-mnist/train-images-idx3-ubyte.gz
          labels: data/fashion-mnist/train-labels-idx1-ubyte.gz
      transforms: {pad: 2}
      subset: 2000
      validation: {fraction: 0.1, seed: 0}
"#;

/// A small level 1 on the shipped data; `params` extends its params.
fn pipeline(params: &str) -> String {
    format!(
        r#"root: {root}
stages:{PREP}
  vq1:
    kind: train_vq
    inputs: {{table: prep}}
    params:
      batch_size: 16
      validation_rows: 100
{params}
"#,
        root = repo().display(),
        params = with_defaults(params),
    )
}

/// `params` plus a small encoder, quantiser, decoder and optimizer where it names none.
fn with_defaults(params: &str) -> String {
    let mut out = params.to_string();
    for (key, value) in [
        (
            "encoder",
            "{hidden: 16, res_blocks: 1, res_hidden: 8, downsample: 2, dim: 8}",
        ),
        ("quantiser", "{codebook_size: 32, reseed_every: 10}"),
        (
            "decoder",
            "{kind: ff, hidden: 16, res_blocks: 1, res_hidden: 8}",
        ),
        ("optimizer", "{lr: 0.003}"),
    ] {
        if !params.contains(&format!("{key}:")) {
            out.push_str(&format!("\n      {key}: {value}"));
        }
    }
    out
}

fn metric(p: &Project, name: &str) -> Vec<(i64, f64)> {
    p.query(&format!(
        "SELECT step, value FROM metrics WHERE name = '{name}' ORDER BY step"
    ))
    .iter()
    .map(|r| (r["step"].as_i64().unwrap(), r["value"].as_f64().unwrap()))
    .collect()
}

#[test]
fn training_lowers_the_reconstruction_error_well_below_the_pixel_variance() {
    let p = Project::new(&pipeline("      steps: 150\n      validate_every: 50"));
    let out = p.run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let variance = metric(&p, "val.pixel_variance")[0].1;
    let mse = metric(&p, "val.mse");
    assert_eq!(mse.iter().map(|m| m.0).collect::<Vec<_>>(), [50, 100, 150]);
    let last = mse.last().unwrap().1;
    assert!(
        last < 0.4 * variance,
        "validation MSE {last} is not well below the pixel variance {variance}"
    );
    assert!(last < mse[0].1, "{mse:?}");
    let psnr = metric(&p, "val.psnr").last().unwrap().1;
    assert!((psnr - 10.0 * (1.0 / last).log10()).abs() < 1e-9);
    assert!(metric(&p, "val.perplexity").last().unwrap().1 > 2.0);
    assert!(!metric(&p, "train.images_per_s").is_empty());
    let dir = p.artifact_data("kind", "train_vq");
    for f in [
        "model.safetensors",
        "aux_decoder.safetensors",
        "level.json",
        "metrics.json",
    ] {
        assert!(dir.join(f).exists(), "{f}");
    }
    let level: Value =
        serde_json::from_slice(&std::fs::read(dir.join("level.json")).unwrap()).unwrap();
    assert_eq!(level["code_height"], 8);
    assert_eq!(level["input"]["kind"], "pixels");
}

fn weights(p: &Project) -> Vec<Vec<u8>> {
    let dir = p.artifact_data("kind", "train_vq");
    ["model.safetensors", "aux_decoder.safetensors"]
        .iter()
        .map(|f| std::fs::read(dir.join(f)).unwrap())
        .collect()
}

/// The reconstructions drawn at each validation step, by file name.
fn step_images(p: &Project) -> Vec<(String, Vec<u8>)> {
    let dir = p.artifact_data("kind", "train_vq").join("steps");
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

const RESUMABLE: &str = "      steps: 40\n      checkpoint_every: 5\n      validate_every: 20\n      decoder: {kind: msp, hidden: 16, res_blocks: 1, res_hidden: 8}";

#[test]
fn an_interrupted_stage_says_where_it_stopped_and_resumes_there() {
    let p = Project::new(&pipeline(RESUMABLE));
    p.interrupt_after_checkpoint("vq1", 10);
    let out = p.haic(&["status", "pipeline.yaml"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("vq1"))
        .unwrap_or_default();
    assert!(line.contains("interrupted"), "{text}");
    assert!(line.contains("interrupted in run 1 at step"), "{text}");
    let from = line
        .split("resumes from the checkpoint at step ")
        .nth(1)
        .and_then(|s| s.trim_end_matches(')').parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no resume point in {line}"));
    assert!(from >= 10 && from % 5 == 0, "{line}");
    // The resumed run says the same on the console.
    let out = p.run(&["--resume"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "stage `vq1` resumes from its checkpoint at step {from}"
        )),
        "{err}"
    );
}

#[test]
fn a_worker_killed_mid_training_resumes_to_the_same_bytes() {
    let whole = Project::new(&pipeline(RESUMABLE));
    let out = whole.run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let expected = weights(&whole);

    let killed = Project::new(&pipeline(RESUMABLE));
    killed.kill_worker_after_checkpoint("vq1", 10);
    let out = killed.run(&["--resume"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let log = killed.attempt_log("vq1", 2);
    assert!(
        log.contains("resuming from the checkpoint at step"),
        "{log}"
    );
    assert!(
        weights(&killed) == expected,
        "resumed weights differ from the uninterrupted run's"
    );

    // Killed after its step-20 validation drew its reconstructions: the
    // resumed attempt keeps them and draws step 40's, the same bytes.
    let images = step_images(&whole);
    let names: Vec<&str> = images.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "reconstructions-000000000020.png",
            "reconstructions-000000000040.png"
        ]
    );
    let late = Project::new(&pipeline(RESUMABLE));
    late.kill_worker_after_checkpoint("vq1", 30);
    let out = late.run(&["--resume"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        late.attempt_log("vq1", 2)
            .contains("resuming from the checkpoint at step 30"),
        "{}",
        late.attempt_log("vq1", 2)
    );
    assert!(
        step_images(&late) == images,
        "the resumed run's step images differ from the uninterrupted run's"
    );

    // A damaged newest checkpoint: the previous one is used, with a warning,
    // and the result is still the same.
    let damaged = Project::new(&pipeline(RESUMABLE));
    damaged.kill_worker_after_checkpoint("vq1", 20);
    let newest = std::fs::read_dir(damaged.path(".haic/scratch"))
        .unwrap()
        .flatten()
        .map(|e| e.path().join("checkpoints"))
        .find(|c| c.exists())
        .unwrap();
    let mut steps: Vec<PathBuf> = std::fs::read_dir(&newest)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("step-")
        })
        .collect();
    steps.sort();
    let last = steps.last().unwrap().join("state.safetensors");
    let mut bytes = std::fs::read(&last).unwrap();
    let i = bytes.len() - 7;
    bytes[i] ^= 0x10;
    std::fs::write(&last, bytes).unwrap();
    let out = damaged.run(&["--resume"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let log = damaged.attempt_log("vq1", 2);
    assert!(
        log.contains("is damaged") && log.contains("trying the previous one"),
        "{log}"
    );
    let previous: u64 = steps[steps.len() - 2]
        .file_name()
        .unwrap()
        .to_string_lossy()[5..]
        .parse()
        .unwrap();
    assert!(
        log.contains(&format!(
            "resuming from the checkpoint at step {previous}\n"
        )),
        "{log}"
    );
    assert!(
        weights(&damaged) == expected,
        "weights after the fallback differ"
    );
}

#[test]
fn two_levels_through_a_code_table() {
    let level1 = pipeline("      steps: 20\n      validate_every: 20");
    let p = Project::new(&format!(
        "{level1}{}",
        r#"  codes1:
    kind: encode
    inputs: {level: vq1, table: prep}
  vq2:
    kind: train_vq
    inputs: {table: codes1}
    params:
      steps: 20
      batch_size: 16
      encoder: {hidden: 16, res_blocks: 1, res_hidden: 8, downsample: 1, dim: 8}
      quantiser: {codebook_size: 16}
      decoder: {kind: msp, hidden: 16, res_blocks: 1, res_hidden: 8, mask: {shape: positions, ratio: 0.25}}
      validate_every: 20
      validation_rows: 100
  codes2:
    kind: encode
    inputs: {level: vq2, table: codes1}
"#
    ));
    let out = p.run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (codes1, codes2) = (
        p.artifact_data("stage", "codes1"),
        p.artifact_data("stage", "codes2"),
    );
    let index: Value =
        serde_json::from_slice(&std::fs::read(codes2.join("table.json")).unwrap()).unwrap();
    assert_eq!(index["format"], "haic code table v1");
    assert_eq!(
        (index["height"].as_u64(), index["width"].as_u64()),
        (Some(4), Some(4))
    );
    assert_eq!(index["codebook_size"], 16);
    // `subset: 2000` caps each split; `val` holds 1,000 of the 10,000.
    assert_eq!(index["splits"]["train"]["rows"], 2000);
    assert_eq!(index["splits"]["val"]["rows"], 1000);
    // Level 1's codes, read back with arrow: 8x8 maps below K = 32, in table order.
    let file = std::fs::File::open(codes1.join("train-00000.parquet")).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let mut ids = Vec::new();
    for batch in reader {
        let batch = batch.unwrap();
        let codes = batch
            .column_by_name("codes")
            .unwrap()
            .as_any()
            .downcast_ref::<arrow_array::FixedSizeListArray>()
            .unwrap()
            .clone();
        assert_eq!(codes.value_length(), 64);
        let values = codes
            .values()
            .as_any()
            .downcast_ref::<arrow_array::UInt16Array>()
            .unwrap();
        assert!(values.values().iter().all(|&c| c < 32));
        let id = batch
            .column_by_name("id")
            .unwrap()
            .as_any()
            .downcast_ref::<arrow_array::Int64Array>()
            .unwrap();
        ids.extend_from_slice(id.values());
    }
    assert_eq!(ids.len(), 2000);
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "rows keep the table's order"
    );
    // The code table holds what the trained level gives on the same images,
    // and names the encode run that wrote it.
    let level_dir = p.artifact_data("stage", "vq1");
    let level = VqLevel::load(&level_dir, &candle_core::Device::Cpu).unwrap();
    let images = LevelTable::open(&p.artifact_data("stage", "prep")).unwrap();
    let val = images.read_split("val", None).unwrap();
    let codes = LevelTable::open(&codes1).unwrap();
    let stored = codes.read_split("val", None).unwrap();
    assert_eq!((&stored.ids, &stored.labels), (&val.ids, &val.labels));
    let mut expected = Vec::new();
    for start in (0..val.len()).step_by(100) {
        let rows = val.range(start, (start + 100).min(val.len()), 1024);
        let batch = level.batch(&rows).unwrap();
        expected.extend(level.codes(&batch).unwrap().iter().map(|&c| c as u16));
    }
    assert_eq!(
        stored.values, expected,
        "stored codes differ from the encoder's"
    );
    let file = std::fs::File::open(codes1.join("val-00000.parquet")).unwrap();
    let reader =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
    let key = |stage: &str| {
        p.query(&format!(
            "SELECT key FROM artifacts WHERE stage = '{stage}'"
        ))[0]["key"]
            .clone()
    };
    let metadata = reader.schema().metadata();
    assert_eq!(
        metadata.get("haic.producer_key").map(String::as_str),
        key("codes1").as_str()
    );
    assert_eq!(
        metadata.get("haic.source_key").map(String::as_str),
        key("prep").as_str()
    );
    // Level 2 learnt to predict masked codes at all.
    let acc = metric(&p, "val.accuracy");
    assert!(acc.last().unwrap().1 > 0.0, "{acc:?}");
}

#[test]
fn bad_params_are_refused_before_anything_runs() {
    let p = Project::new(&pipeline("      steps: 10\n      encoder: {downsampel: 2}"));
    let out = p.run(&[]);
    assert_error(&out, 2, "downsampel");
    assert!(stderr(&out).contains("pipeline.yaml:"), "{}", stderr(&out));
    let p = Project::new(&pipeline(
        "      steps: 10\n      quantiser: {codebook_size: 70000}",
    ));
    assert_error(&p.run(&[]), 2, "65536");
    let p = Project::new(&pipeline(
        "      steps: 10\n      decoder: {kind: msp, mask: {ratio: 1.5}}",
    ));
    assert_error(&p.run(&[]), 2, "mask ratio is 1.5");
    // Known only when the input is read: 32 is not divisible by 2^6.
    let p = Project::new(&pipeline("      steps: 10\n      encoder: {downsample: 6}"));
    let out = p.run(&[]);
    assert_eq!(out.status.code(), Some(1));
    let e = p.query("SELECT error FROM stage_runs WHERE stage = 'vq1'");
    assert!(
        e[0]["error"].as_str().unwrap().contains("does not divide"),
        "{e:?}"
    );
    assert_eq!(
        p.query("SELECT count(*) AS n FROM artifacts WHERE kind = 'train_vq'")[0]["n"],
        0
    );
}

/// A GPU level whose training step cannot fit one GPU's memory (stated by
/// HAIC_GPU_MEMORY_GIB) is refused when the pipeline is read, naming the
/// stage, its batch and the batches that fit, as an AR model's is
/// (tests/train_ar.rs); one that fits is not.
#[test]
fn a_level_too_large_for_the_gpu_is_refused_at_load() {
    let pipeline = |batch: usize| {
        format!(
            "stages:\n  prep:\n    kind: preprocess\n    params: {{source: {{format: cifar10, train: [c.bin]}}}}\n  vq1:\n    kind: train_vq\n    inputs: {{table: prep}}\n    resources: {{gpus: 1}}\n    params: {{steps: 5, batch_size: {batch}, encoder: {{hidden: 128}}, decoder: {{hidden: 128}}}}\n"
        )
    };
    let status = |p: &Project| {
        p.cmd(&["status", "pipeline.yaml"])
            .env("HAIC_GPU_MEMORY_GIB", "8")
            .env_remove("HAIC_GPU_CONV")
            .output()
            .expect("running haic-pipe")
    };
    // 32x32 CIFAR images, hidden 128 + 128: 39.9 MiB an image by the
    // estimate (11.1 in bf16), 20 GiB at 512.
    let out = status(&Project::new(&pipeline(512)));
    assert_error(&out, 2, "pipeline.yaml:");
    let err = stderr(&out);
    for want in [
        "stage `vq1`",
        "batch_size 512 needs about 20 GiB of GPU memory a training step",
        "encoder hidden 128 and decoder hidden 128 on 1024 positions",
        "more than one GPU's 8 GiB (HAIC_GPU_MEMORY_GIB=8)",
        "lower it to 184 or less, or set `precision: bf16` (663 fit)",
    ] {
        assert!(err.contains(want), "missing `{want}` in:\n{err}");
    }
    // 184 images fit: status reports the stages (stale, no data), exit 1.
    let out = status(&Project::new(&pipeline(184)));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(!stderr(&out).contains("GPU memory"), "{}", stderr(&out));
}

/// The weights read back with the Python `safetensors` package and the code
/// table with pyarrow (where `HAIC_PYARROW_PYTHON` names a Python with both).
#[test]
fn python_reads_the_model_and_the_code_table() {
    let Ok(python) = std::env::var("HAIC_PYARROW_PYTHON") else {
        eprintln!("HAIC_PYARROW_PYTHON is not set; skipping the safetensors cross-check");
        return;
    };
    let level1 = pipeline("      steps: 5\n      validate_every: 5");
    let p = Project::new(&format!(
        "{level1}  codes1:\n    kind: encode\n    inputs: {{level: vq1, table: prep}}\n"
    ));
    let out = p.run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let dir = p.artifact_data("kind", "train_vq");
    let codes = p.artifact_data("kind", "encode");
    let script = r#"
import sys, json
import pyarrow.parquet as pq
from safetensors.numpy import load_file
m = load_file(sys.argv[1] + "/model.safetensors")
level = json.load(open(sys.argv[1] + "/level.json"))
k = level["level"]["quantiser"]["codebook_size"]
d = level["level"]["encoder"]["dim"]
assert m["quantiser.codebook"].shape == (k, d), m["quantiser.codebook"].shape
assert m["encoder.stem.weight"].shape == (16, 1, 3, 3)
assert str(m["encoder.stem.weight"].dtype) == "float32"
t = pq.read_table(sys.argv[2] + "/train-00000.parquet")
assert str(t.schema.field("codes").type) == "fixed_size_list<item: uint16 not null>[64]", t.schema
assert t.num_rows == 2000 and t.schema.metadata[b"haic.codebook_size"] == b"32"
codes = t.column("codes").combine_chunks().flatten().to_numpy()
assert codes.max() < 32 and len(codes) == 2000 * 64
"#;
    run_python(&python, script, &[&dir, &codes]);
}

/// Without a terminal, `run` prints a stage's progress at most once per
/// `--progress-interval` (and its last step), every step with 0, and none
/// with `--quiet`; stage events always.
#[test]
fn plain_progress_lines_are_throttled() {
    let count = |extra: &[&str]| {
        let p = common::smoke("");
        let mut args = vec!["vq1"];
        args.extend_from_slice(extra);
        let out = p.run(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        let text = stderr(&out);
        assert!(text.contains("vq1: succeeded"), "{text}");
        text.lines()
            .filter(|l| l.contains("] vq1: ") && l.contains("/20"))
            .count()
    };
    let every = count(&["--progress-interval", "0"]);
    assert_eq!(every, 20, "one line a step");
    let default = count(&[]);
    assert!(
        (1..=3).contains(&default),
        "{default} lines in a few seconds"
    );
    assert_eq!(count(&["--quiet"]), 0);
}
