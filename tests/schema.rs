//! `schemas/pipeline.schema.json` accepts every shipped pipeline and rejects
//! what the loader rejects structurally, so editors flag the same mistakes.

use std::path::Path;

use serde_json::Value;

fn schema() -> jsonschema::Validator {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/pipeline.schema.json"),
    )
    .expect("reading the schema");
    let schema: Value = serde_json::from_str(&text).expect("the schema is JSON");
    jsonschema::validator_for(&schema).expect("the schema is a valid JSON Schema")
}

fn yaml(text: &str) -> Value {
    serde_saphyr::from_str(text).expect("valid YAML")
}

#[test]
fn every_shipped_pipeline_validates() {
    let v = schema();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("pipelines/") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let doc = yaml(&std::fs::read_to_string(&path).expect("read"));
        let errors: Vec<String> = v
            .iter_errors(&doc)
            .map(|e| format!("{e} at {}", e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{}: {}",
            path.display(),
            errors.join("; ")
        );
        seen += 1;
    }
    assert!(seen >= 1, "no pipelines found under {}", dir.display());
}

#[test]
fn the_schema_rejects_structural_mistakes() {
    let v = schema();
    for bad in [
        "stagez: {a: {kind: command, cmd: x}}",
        "stages: {a: {kind: command}}",
        "stages: {a: {kind: command, cmd: x, bogus: 1}}",
        "stages: {a: {kind: train_vq, cmd: x}}",
        "stages: {a: {kind: command, cmd: x, resources: {gpus: -1}}}",
        "stages: {9a: {kind: command, cmd: x}}",
        "stages: {a: {kind: command, cmd: x, outs: [/abs]}}",
        "stages: {}",
        "stages: {a: {kind: train_vq, params: {batch_size: 2}}}",
        "stages: {a: {kind: train_vq, params: {steps: 2, encoder: {downsampel: 2}}}}",
        "stages: {a: {kind: train_vq, params: {steps: 2, decoder: {kind: mlp}}}}",
        "stages: {a: {kind: train_vq, params: {steps: 2, quantiser: {codebook_size: 70000}}}}",
        "stages: {a: {kind: encode, params: {batch: 2}}}",
    ] {
        assert!(!v.is_valid(&yaml(bad)), "the schema accepted: {bad}");
    }
    assert!(v.is_valid(&yaml("stages: {a: {kind: train_vq, inputs: {images: p}, params: {steps: 2}, resources: {gpus: 1}}}")));
    assert!(v.is_valid(&yaml(
        "stages: {a: {kind: train_vq, params: {steps: 2, decoder: {kind: \"${x}\"}}}}"
    )));
}

/// Adding a kind means adding its name to the schema's `kind` enum (and its
/// params' `$def`): the schema and `stages::all()` name the same kinds.
#[test]
fn the_schema_names_every_kind_the_binary_knows() {
    use pipeline::spec::KindRules;
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/pipeline.schema.json"),
    )
    .expect("reading the schema");
    let schema: Value = serde_json::from_str(&text).expect("the schema is JSON");
    let mut in_schema: Vec<String> = schema["$defs"]["stage"]["properties"]["kind"]["enum"]
        .as_array()
        .expect("$defs.stage.properties.kind.enum")
        .iter()
        .filter_map(|k| k.as_str().map(str::to_string))
        .collect();
    let mut known: Vec<String> = stages::all()
        .kind_names()
        .into_iter()
        .map(str::to_string)
        .collect();
    in_schema.sort();
    known.sort();
    assert_eq!(in_schema, known);
}
