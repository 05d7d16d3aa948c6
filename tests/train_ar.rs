//! `train_ar` and `bound` end to end: the smoke pipeline (the tiny
//! pipeline's stages at toy sizes) through the hierarchy and the bound,
//! bit-exact resume of an AR model after SIGKILL, and bad inputs.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use common::{Project, assert_error, smoke, stderr};
use serde_json::Value;
use stages::data::level_table::LevelTable;
use stages::models::ar::ArModel;

/// Each metric's last value, per stage.
fn last_values(p: &Project) -> BTreeMap<(String, String), f64> {
    p.query(
        "SELECT r.stage, s.name, s.last_value FROM metric_summaries s JOIN stage_runs r ON r.id = s.stage_run_id",
    )
    .into_iter()
    .map(|r| {
        (
            (
                r["stage"].as_str().unwrap().to_string(),
                r["name"].as_str().unwrap().to_string(),
            ),
            r["last_value"].as_f64().unwrap(),
        )
    })
    .collect()
}

fn json(path: PathBuf) -> Value {
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

#[test]
fn the_smoke_pipeline_trains_the_hierarchy_and_the_bound_adds_its_terms() {
    let p = smoke("");
    let out = p.run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let m = last_values(&p);
    let get = |stage: &str, name: &str| {
        *m.get(&(stage.to_string(), name.to_string()))
            .unwrap_or_else(|| panic!("no {name} for {stage}"))
    };
    // bits/dim is bits per image over the values per image.
    for (stage, values) in [
        ("decoder1", 1024.0),
        ("baseline", 1024.0),
        ("decoder2", 64.0),
        ("prior", 16.0),
    ] {
        let (bpd, bpi) = (
            get(stage, "val.bits_per_dim"),
            get(stage, "val.bits_per_image"),
        );
        assert!(bpd > 0.0 && bpd.is_finite(), "{stage}: {bpd}");
        assert!((bpi / values - bpd).abs() < 1e-9, "{stage}");
    }
    // The bound: the three terms over the image's 1,024 values, and their sum.
    let terms = ["decoder1", "decoder2", "prior"].map(|s| get(s, "val.bits_per_image") / 1024.0);
    for (s, t) in ["decoder1", "decoder2", "prior"].iter().zip(terms) {
        assert!((get("bound", &format!("bound.{s}")) - t).abs() < 1e-9);
    }
    let bound = get("bound", "bound.bits_per_dim");
    assert!((bound - terms.iter().sum::<f64>()).abs() < 1e-9);
    assert!(bound > get("decoder1", "val.bits_per_dim"));
    assert_eq!(
        get("bound", "baseline.bits_per_dim"),
        get("baseline", "val.bits_per_dim")
    );
    let report = json(p.artifact_data("stage", "bound").join("bound.json"));
    assert_eq!(report["bits_per_dim"].as_f64(), Some(bound));
    assert_eq!(report["validation"]["rows"], 20);

    // Reconstructions by sampling given the codes.
    let psnr = get("decoder1", "val.reconstruction_psnr");
    assert!(psnr > 0.0 && psnr.is_finite());
    let (lo, hi) = (
        get("decoder1", "val.reconstruction_psnr_lo"),
        get("decoder1", "val.reconstruction_psnr_hi"),
    );
    assert!(lo <= psnr && psnr <= hi && lo < hi, "{lo} {psnr} {hi}");
    let accuracy = get("decoder2", "val.reconstruction_accuracy");
    assert!((0.0..=1.0).contains(&accuracy));
    let d1 = p.artifact_data("stage", "decoder1");
    let png = image::open(d1.join("reconstructions.png")).unwrap();
    assert_eq!((png.width(), png.height()), (2 * 34 + 2, 2 * 34 + 2));

    // The model names the tables it was made from, by stage key.
    let key = |stage: &str| {
        p.query(&format!(
            "SELECT key FROM artifacts WHERE stage = '{stage}'"
        ))[0]["key"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let info = json(d1.join("ar.json"));
    assert_eq!(info["target_key"], key("prep"));
    assert_eq!(info["condition_key"], key("codes1"));
    assert_eq!(
        json(p.artifact_data("stage", "prior").join("ar.json"))["class_conditional"],
        true
    );

    // The saved model gives the measured likelihood on the same rows.
    let model = ArModel::load(&d1, &candle_core::Device::Cpu).unwrap();
    let (rows, positions) = LevelTable::open(&p.artifact_data("stage", "prep"))
        .unwrap()
        .read_stratified("val", 20)
        .unwrap();
    let codes = LevelTable::open(&p.artifact_data("stage", "codes1"))
        .unwrap()
        .read_positions("val", &positions)
        .unwrap();
    let nats: f64 = model
        .nll_per_row(&model.batch(&rows, Some(&codes)).unwrap())
        .unwrap()
        .iter()
        .sum();
    let bits = nats / 20.0 / std::f64::consts::LN_2;
    assert!(
        (bits - get("decoder1", "val.bits_per_image")).abs() < 1e-3 * bits,
        "{bits} vs {}",
        get("decoder1", "val.bits_per_image")
    );
}

const FLAT: &str = r#"
  flat:
    kind: train_ar
    inputs: {table: prep}
    params:
      steps: 30
      batch_size: 8
      class_conditional: true
      model: {hidden: 4, layers: 2, kernel: 3}
      optimizer: {lr: 0.003, schedule: cosine, warmup_steps: 5}
      validation_rows: 20
      validate_every: 15
      checkpoint_every: 5
"#;

#[test]
fn a_killed_train_ar_worker_resumes_to_the_same_bytes() {
    let weights = |p: &Project| {
        std::fs::read(p.artifact_data("stage", "flat").join("model.safetensors")).unwrap()
    };
    let whole = smoke(FLAT);
    let out = whole.run(&["flat"]);
    assert!(out.status.success(), "{}", stderr(&out));

    let killed = smoke(FLAT);
    killed.kill_worker_after_checkpoint("flat", 10);
    let out = killed.run(&["--resume"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        killed
            .attempt_log("flat", 2)
            .contains("resuming from the checkpoint at step 10"),
        "{}",
        killed.attempt_log("flat", 2)
    );
    assert!(
        weights(&killed) == weights(&whole),
        "resumed weights differ from the uninterrupted run's"
    );
}

#[test]
fn bad_params_are_refused_before_anything_runs() {
    for (params, text) in [
        ("model: {kernel: 4}", "model.kernel is 4"),
        ("reconstruct: {temperature: 0}", "reconstruct.temperature"),
        ("batch_size: 0", "batch_size must be at least 1"),
        ("hidden: 3", "unknown field `hidden`"),
    ] {
        let p = smoke(&format!(
            "\n  bad:\n    kind: train_ar\n    inputs: {{table: prep}}\n    params: {{steps: 5, {params}}}\n"
        ));
        let out = p.run(&[]);
        assert_error(&out, 2, text);
        assert_eq!(p.artifact_count(), 0, "nothing ran for {params}");
    }
    let p = smoke(
        "\n  bad:\n    kind: train_ar\n    inputs: {table: prep, cond: codes1}\n    params: {steps: 5}\n",
    );
    assert_error(&p.run(&[]), 2, "train_ar has no input `cond`");
    let p = smoke("\n  bad:\n    kind: bound\n    inputs: {decoder2: decoder2, prior: prior}\n");
    assert_error(&p.run(&[]), 2, "decoder1..decoderN without gaps");
}

/// Inputs whose mismatch shows only in the artifacts (an image table as
/// `condition` is refused at load time: tests/bad_input.rs).
#[test]
fn inputs_that_do_not_fit_fail_their_stage_with_what_to_do() {
    let p = smoke(
        r#"
  prep_other:                     # other images: its codes do not line up with prep
    kind: preprocess
    params:
      source:
        format: idx
        train:
          images: data/fashion-mnist/train-images-idx3-ubyte.gz
          labels: data/fashion-mnist/train-labels-idx1-ubyte.gz
      transforms: {pad: 2}
      subset: 600
      validation: {fraction: 0.1, seed: 1}
  codes_other:
    kind: encode
    inputs: {level: vq1, table: prep_other}
  misaligned:
    kind: train_ar
    inputs: {table: prep, condition: codes_other}
    params: {steps: 2, model: {hidden: 4, layers: 1}}
  broken_chain:                   # decoder1 is conditioned on codes1, the baseline models pixels
    kind: bound
    inputs: {decoder1: decoder1, prior: baseline}
  fewer_rows:
    kind: train_ar
    inputs: {table: codes2}
    params: {steps: 2, validation_rows: 10, model: {hidden: 4, layers: 1}}
  other_rows:
    kind: bound
    inputs: {decoder1: decoder1, decoder2: decoder2, prior: fewer_rows}
"#,
    );
    let out = p.run(&[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let errors: BTreeMap<String, String> = p
        .query("SELECT stage, error FROM stage_runs WHERE status = 'failed'")
        .into_iter()
        .map(|r| {
            (
                r["stage"].as_str().unwrap().to_string(),
                r["error"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let expect = [
        ("misaligned", "encoded from another table"),
        (
            "broken_chain",
            "is not conditioned on the codes that `prior` models",
        ),
        ("other_rows", "measured on other validation rows"),
    ];
    for (stage, text) in expect {
        let e = errors
            .get(stage)
            .unwrap_or_else(|| panic!("{stage} did not fail: {errors:?}"));
        assert!(e.contains(text), "{stage}: {e}");
    }
    assert_eq!(errors.len(), expect.len(), "{errors:?}");
    for stage in ["misaligned", "broken_chain", "other_rows"] {
        assert!(
            p.query(&format!(
                "SELECT key FROM artifacts WHERE stage = '{stage}'"
            ))
            .is_empty(),
            "{stage} published nothing"
        );
    }
}

/// Params are resolved before they are keyed: writing a kind's default out
/// (`precision: f32`, an option added later, too), or changing how often a
/// stage checkpoints or logs, leaves every stage
/// cached; and the registry holds the values actually used.
#[test]
fn written_defaults_and_checkpoint_cadence_keep_stages_cached() {
    let p = smoke("");
    let out = p.run(&["decoder1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let decay = p.query(
        "SELECT p.value FROM params p JOIN stage_runs r ON r.id = p.stage_run_id WHERE r.stage = 'vq1' AND p.name = 'quantiser.decay'",
    );
    assert_eq!(decay.len(), 1, "{decay:?}");
    assert_eq!(decay[0]["value"].as_str(), Some("0.99"), "{decay:?}");

    let text = std::fs::read_to_string(p.pipeline()).unwrap();
    let spelled = text
        .replacen(
            "quantiser: {codebook_size: 16}",
            "quantiser: {codebook_size: 16, decay: 0.99, epsilon: 1.0e-5, beta: 0.25}",
            1,
        )
        .replacen(
            "      validation_rows: 20\n",
            "      validation_rows: 20\n      checkpoint_every: 3\n      log_every: 2\n      precision: f32\n",
            1,
        );
    assert_ne!(spelled, text);
    std::fs::write(p.pipeline(), &spelled).unwrap();
    let out = p.run(&["decoder1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let statuses = p.statuses(2);
    assert!(!statuses.is_empty());
    assert!(statuses.iter().all(|(_, s)| s == "cached"), "{statuses:?}");

    // A param that does change the output still makes the stage stale.
    std::fs::write(
        p.pipeline(),
        spelled.replacen("decay: 0.99", "decay: 0.9", 1),
    )
    .unwrap();
    let status = p.haic(&["status", p.pipeline().to_str().unwrap()]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("quantiser.decay"), "{text}");
}

/// A GPU stage whose training step cannot fit one GPU's memory (stated by
/// HAIC_GPU_MEMORY_GIB here; on a GPU machine, read from the driver) is
/// refused when the pipeline is read, naming the stage, its batch and the
/// batch that fits; one that fits, or runs on the CPU, is not checked
/// against it; an unreadable figure is an error that says what to write.
#[test]
fn a_training_step_too_large_for_the_gpu_is_refused_at_load() {
    let pipeline = |gpus: u32| {
        format!(
            "stages:\n  prep:\n    kind: preprocess\n    params: {{source: {{format: cifar10, train: [c.bin]}}}}\n  big:\n    kind: train_ar\n    inputs: {{table: prep}}\n    resources: {{gpus: {gpus}}}\n    params: {{steps: 5, batch_size: 64, model: {{hidden: 126, layers: 16, kernel: 5}}}}\n"
        )
    };
    let status = |p: &Project, gib: &str| {
        p.cmd(&["status", "pipeline.yaml"])
            .env("HAIC_GPU_MEMORY_GIB", gib)
            .env_remove("HAIC_GPU_CONV")
            .output()
            .expect("running haic-pipe")
    };
    let p = Project::new(&pipeline(1));
    // 32x32 CIFAR images: 0.41 GiB an image by the estimate, 26 GiB at 64.
    let out = status(&p, "8");
    assert_error(&out, 2, "pipeline.yaml:");
    let err = stderr(&out);
    for want in [
        "stage `big`",
        "batch_size 64 needs about 26 GiB of GPU memory a training step",
        "more than one GPU's 8 GiB (HAIC_GPU_MEMORY_GIB=8)",
        "lower it to 17 or less, or set `precision: bf16` (22 fit)",
    ] {
        assert!(err.contains(want), "missing `{want}` in:\n{err}");
    }
    // Status then reports the stages (stale: no data here), exit 1.
    let fits = |out: &std::process::Output| {
        out.status.code() == Some(1) && !stderr(out).contains("GPU memory")
    };
    assert!(fits(&status(&p, "40")), "26 GiB fit in 40");
    let out = status(&p, "8G");
    assert_error(
        &out,
        2,
        "HAIC_GPU_MEMORY_GIB is `8G`: give the memory of one GPU in GiB",
    );

    let on_cpu = Project::new(&pipeline(0));
    assert!(fits(&status(&on_cpu, "8")), "a CPU stage is not checked");
}
