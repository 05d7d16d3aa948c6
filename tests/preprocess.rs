//! The `preprocess` stage end to end: each reader on real or fixture files,
//! the Parquet output read back, and bad input rejected with nothing published.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{Project, assert_error, repo, run_python, stderr};
use stages::data::cifar::{Variant, encode_batch};
use stages::data::idx::write_idx;
use stages::data::table::{Row, TableIndex, TableMeta, read_file};

/// The data folder of the only `preprocess` artifact in the project.
fn table_dir(p: &Project) -> PathBuf {
    p.artifact_data("kind", "preprocess")
}

fn read_split(dir: &Path, split: &str) -> (TableMeta, Vec<Row>) {
    let index = TableIndex::read(dir).unwrap();
    let mut all = Vec::new();
    let mut meta = None;
    for f in &index.splits[split].files {
        let (m, rows) = read_file(&dir.join(f)).unwrap();
        meta = Some(m);
        all.extend(rows);
    }
    (meta.unwrap(), all)
}

fn fashion_pipeline(extra: &str) -> String {
    format!(
        r#"
root: {root}
stages:
  prep:
    kind: preprocess
    params:
      source:
        format: idx
        train: {{images: data/fashion-mnist/train-images-idx3-ubyte.gz, labels: data/fashion-mnist/train-labels-idx1-ubyte.gz}}
        test: {{images: data/fashion-mnist/t10k-images-idx3-ubyte.gz, labels: data/fashion-mnist/t10k-labels-idx1-ubyte.gz}}
      transforms: {{pad: 2}}
{extra}
"#,
        root = repo().display()
    )
}

#[test]
fn the_shipped_fashion_mnist_subset_becomes_an_image_table() {
    let p = Project::new(&fashion_pipeline(
        "      validation: {fraction: 0.1, seed: 0}\n      class_names: [T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal, Shirt, Sneaker, Bag, Ankle boot]",
    ));
    let out = p.run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let dir = table_dir(&p);
    let (meta, train) = read_split(&dir, "train");
    let (_, val) = read_split(&dir, "val");
    let (_, test) = read_split(&dir, "test");
    assert_eq!((meta.height, meta.width, meta.channels), (32, 32, 1));
    assert_eq!(meta.channel_order, "L");
    assert_eq!(meta.class_names[9], "Ankle boot");
    assert_eq!((train.len(), val.len(), test.len()), (9000, 1000, 2000));
    // Pixel sums computed independently (Python over the gzipped IDX files);
    // the 2-pixel zero padding does not change them.
    let sum = |rows: &[Row]| {
        rows.iter()
            .flat_map(|r| r.pixels.iter())
            .map(|&v| v as u64)
            .sum::<u64>()
    };
    assert_eq!(sum(&train) + sum(&val), 573_133_949);
    assert_eq!(sum(&test), 114_072_606);
    // Rows are in a seeded random order: find the source's first test image.
    let first = test
        .iter()
        .find(|r| r.source_id == "t10k-images-idx3-ubyte.gz#0")
        .unwrap();
    assert_eq!(first.label, 9);
    assert_eq!(
        first.pixels[..2 * 32 + 2]
            .iter()
            .map(|&v| v as u32)
            .sum::<u32>(),
        0,
        "padding is zero"
    );
    assert_eq!(first.pixels.iter().map(|&v| v as u64).sum::<u64>(), 33_456);
    assert!(
        train
            .iter()
            .enumerate()
            .all(|(i, r)| r.id == i as i64 && r.split == "train")
    );
    let m = p.query("SELECT name, value FROM metrics WHERE name LIKE 'rows.%' ORDER BY name");
    assert_eq!(m.len(), 3);
    assert_eq!(
        (m[1]["name"].as_str(), m[1]["value"].as_f64()),
        (Some("rows.train"), Some(9000.0))
    );
    // The source files are deps: they are in the key.
    let k = p.query("SELECT key_material FROM stage_runs")[0]["key_material"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        k.contains("data/fashion-mnist/train-images-idx3-ubyte.gz"),
        "{k}"
    );

    // Deterministic: another workspace gives the same bytes.
    let q = Project::new(&fashion_pipeline(
        "      validation: {fraction: 0.1, seed: 0}\n      class_names: [T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal, Shirt, Sneaker, Bag, Ankle boot]",
    ));
    assert!(q.run(&[]).status.success());
    let digest = |p: &Project| p.query("SELECT digest FROM artifacts")[0]["digest"].clone();
    assert_eq!(digest(&p), digest(&q));
}

#[test]
fn caps_and_subsets_limit_rows_per_class_and_split() {
    let p = Project::new(&fashion_pipeline(
        "      per_class_cap: 20\n      subset: 150",
    ));
    let out = p.run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let index = TableIndex::read(&table_dir(&p)).unwrap();
    let train = &index.splits["train"];
    assert_eq!(train.rows, 150);
    assert!(
        train.class_counts.iter().all(|&c| c <= 20),
        "{:?}",
        train.class_counts
    );
    assert_eq!(index.splits["test"].rows, 150);
}

fn cifar_pixels(seed: u8) -> Vec<u8> {
    (0..3072u32)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

#[test]
fn cifar_batches_are_read_channel_planar_and_written_hwc() {
    let p = Project::new(
        "stages:\n  prep:\n    kind: preprocess\n    params:\n      source: {format: cifar10, train: [data_batch_1.bin, data_batch_2.bin], test: [test_batch.bin]}\n      shuffle: false\n",
    );
    let samples: Vec<(Vec<u8>, u8)> = (0..5).map(|i| (cifar_pixels(i), i * 2)).collect();
    std::fs::write(
        p.path("data_batch_1.bin"),
        encode_batch(Variant::Cifar10, &samples[..3]),
    )
    .unwrap();
    std::fs::write(
        p.path("data_batch_2.bin"),
        encode_batch(Variant::Cifar10, &samples[3..]),
    )
    .unwrap();
    std::fs::write(
        p.path("test_batch.bin"),
        encode_batch(Variant::Cifar10, &samples[..1]),
    )
    .unwrap();
    let out = p.run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (meta, rows) = read_split(&table_dir(&p), "train");
    assert_eq!(
        (
            meta.height,
            meta.width,
            meta.channels,
            meta.channel_order.as_str()
        ),
        (32, 32, 3, "RGB")
    );
    assert_eq!(meta.class_names[1], "automobile");
    assert_eq!(rows.len(), 5);
    for (r, (px, label)) in rows.iter().zip(&samples) {
        assert_eq!(&r.pixels, px);
        assert_eq!(r.label, *label as i32);
    }
    assert_eq!(rows[3].source_id, "data_batch_2.bin#0");
}

fn png(w: u32, h: u32, seed: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([x as u8 * 9 + seed, y as u8 * 5, seed])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

#[test]
fn an_image_folder_gets_its_classes_from_folder_names() {
    let p = Project::new(
        "stages:\n  prep:\n    kind: preprocess\n    params:\n      source: {format: image_folder, train: imgs}\n      transforms: {color: rgb, resize: 4, crop: 4}\n      shuffle: false\n",
    );
    for (class, n) in [("zebra", 2), ("aardvark", 3)] {
        for i in 0..n {
            p.write(&format!("imgs/{class}/{i}.png"), "");
            std::fs::write(
                p.path(&format!("imgs/{class}/{i}.png")),
                png(8, 6 + i, i as u8 * 40),
            )
            .unwrap();
        }
    }
    let out = p.run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (meta, rows) = read_split(&table_dir(&p), "train");
    assert_eq!(meta.class_names, vec!["aardvark", "zebra"]);
    assert_eq!((meta.height, meta.width, meta.channels), (4, 4, 3));
    let labels: Vec<i32> = rows.iter().map(|r| r.label).collect();
    assert_eq!(labels, vec![0, 0, 0, 1, 1]);
    assert_eq!(rows[0].source_id, "aardvark/0.png");
    // A new image in a folder dep changes the key: the stage runs again.
    std::fs::write(p.path("imgs/zebra/9.png"), png(8, 8, 3)).unwrap();
    assert!(p.run(&[]).status.success());
    assert_eq!(p.statuses(2), common::pairs(&[("prep", "succeeded")]));
}

/// A class-sorted folder (as ImageFolder reads: class by class) gives
/// shards, training batches and validation rows of every class; with
/// `shuffle: false` the first shard holds one class.
#[test]
fn a_class_sorted_folder_gives_batches_of_every_class() {
    use stages::data::level_table::{BatchStream, Cursor, LevelTable};
    let pipeline = |shuffle: &str| {
        format!(
            "stages:\n  prep:\n    kind: preprocess\n    params:\n      source: {{format: image_folder, train: imgs}}\n      transforms: {{color: gray, resize: 4, crop: 4}}\n      validation: {{fraction: 0.25, seed: 0}}\n      shard_rows: 40\n{shuffle}"
        )
    };
    let make = |shuffle: &str| {
        let p = Project::new(&pipeline(shuffle));
        for class in 0..8 {
            for i in 0..40 {
                let rel = format!("imgs/c{class}/{i:02}.png");
                p.write(&rel, "");
                std::fs::write(p.path(&rel), png(4, 4, (class * 8 + i) as u8)).unwrap();
            }
        }
        let out = p.run(&[]);
        assert!(out.status.success(), "{}", stderr(&out));
        p
    };
    let classes = |labels: &[i32]| {
        labels
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    };

    let shuffled = make("");
    let table = LevelTable::open(&table_dir(&shuffled)).unwrap();
    assert_eq!(table.splits["train"].rows, 240);
    assert_eq!(table.splits["train"].files.len(), 6);
    let first_shard = table.read_shard(&table.splits["train"].files[0]).unwrap();
    assert!(
        classes(&first_shard.labels) >= 6,
        "{:?}",
        first_shard.labels
    );
    let mut stream = BatchStream::new(&table, "train", 0, Cursor::default()).unwrap();
    for _ in 0..5 {
        let batch = stream.next_batch(16).unwrap();
        assert!(
            classes(&batch.labels) >= 5,
            "a batch of 16: {:?}",
            batch.labels
        );
    }
    // Validation rows: 16 of `val`, two of each class.
    let (val, positions) = table.read_stratified("val", 16).unwrap();
    let mut per_class = [0; 8];
    for l in &val.labels {
        per_class[*l as usize] += 1;
    }
    assert_eq!(per_class, [2; 8]);
    assert_eq!(
        table.read_positions("val", &positions).unwrap().ids,
        val.ids
    );

    let sorted = make("      shuffle: false\n");
    let table = LevelTable::open(&table_dir(&sorted)).unwrap();
    let first_shard = table.read_shard(&table.splits["train"].files[0]).unwrap();
    assert!(
        classes(&first_shard.labels) <= 2,
        "{:?}",
        first_shard.labels
    );
    let (val, _) = table.read_stratified("val", 16).unwrap();
    assert_eq!(classes(&val.labels), 8, "stratified even when sorted");
}

#[test]
fn a_hub_parquet_file_with_an_image_struct_column_is_decoded() {
    use arrow_array::{BinaryArray, Int64Array, RecordBatch, StringArray, StructArray};
    use arrow_schema::{DataType, Field, Schema};
    let p = Project::new(
        "stages:\n  prep:\n    kind: preprocess\n    params:\n      source: {format: parquet, train: [hub.parquet]}\n      class_names: [a, b, c]\n      shuffle: false\n",
    );
    let pngs: Vec<Vec<u8>> = (0..4).map(|i| png(5, 5, i * 30)).collect();
    let fields = vec![
        Field::new("bytes", DataType::Binary, true),
        Field::new("path", DataType::Utf8, true),
    ];
    let image = StructArray::new(
        fields.clone().into(),
        vec![
            Arc::new(BinaryArray::from_iter_values(pngs.iter())),
            Arc::new(StringArray::from(vec!["0.png", "1.png", "2.png", "3.png"])),
        ],
        None,
    );
    let schema = Arc::new(Schema::new(vec![
        Field::new("image", DataType::Struct(fields.into()), true),
        Field::new("label", DataType::Int64, false),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(image),
            Arc::new(Int64Array::from(vec![2, 0, 1, 2])),
        ],
    )
    .unwrap();
    let f = std::fs::File::create(p.path("hub.parquet")).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(f, schema, None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let out = p.run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (meta, rows) = read_split(&table_dir(&p), "train");
    assert_eq!(
        (meta.height, meta.width, meta.channels),
        (5, 5, 1),
        "grayscale unless color: rgb"
    );
    assert_eq!(
        rows.iter().map(|r| r.label).collect::<Vec<_>>(),
        vec![2, 0, 1, 2]
    );
    let want = image::load_from_memory(&pngs[1])
        .unwrap()
        .to_luma8()
        .into_raw();
    assert_eq!(rows[1].pixels, want);
}

/// Runs a one-stage preprocess that must fail; returns the stage's error.
fn failing(p: &Project) -> String {
    let out = p.run(&[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(!stderr(&out).contains("panicked"));
    assert_eq!(p.artifact_count(), 0, "nothing is published");
    let staging = std::fs::read_dir(p.path(".haic/artifacts/.staging"))
        .unwrap()
        .count();
    assert_eq!(staging, 0, "the staging folder is cleaned up");
    p.query("SELECT error FROM stage_runs")[0]["error"]
        .as_str()
        .unwrap()
        .to_string()
}

fn idx_project() -> Project {
    let p = Project::new(
        "stages:\n  prep:\n    kind: preprocess\n    params:\n      source: {format: idx, train: {images: img.idx, labels: lab.idx}}\n",
    );
    let samples: Vec<(Vec<u8>, u8)> = (0..4).map(|i| (vec![i * 10; 16], i)).collect();
    write_idx(&p.path("img.idx"), &p.path("lab.idx"), 4, 4, &samples).unwrap();
    p
}

#[test]
fn a_truncated_idx_file_names_the_record() {
    let p = idx_project();
    let bytes = std::fs::read(p.path("img.idx")).unwrap();
    std::fs::write(p.path("img.idx"), &bytes[..bytes.len() - 20]).unwrap();
    let e = failing(&p);
    assert!(e.contains("img.idx, record 2: truncated"), "{e}");
}

#[test]
fn a_wrong_magic_number_is_reported() {
    let p = idx_project();
    std::fs::copy(p.path("lab.idx"), p.path("img.idx")).unwrap();
    let e = failing(&p);
    assert!(
        e.contains("img.idx: wrong magic number 0x00000801 (want 0x00000803"),
        "{e}"
    );
}

#[test]
fn a_label_out_of_range_names_file_and_record() {
    let p = idx_project();
    let samples: Vec<(Vec<u8>, u8)> = vec![(vec![0; 16], 1), (vec![0; 16], 12)];
    write_idx(&p.path("img.idx"), &p.path("lab.idx"), 4, 4, &samples).unwrap();
    let e = failing(&p);
    assert!(
        e.contains("img.idx, record 1: label 12 is out of range for 10 classes"),
        "{e}"
    );
}

#[test]
fn a_corrupt_jpeg_names_the_file() {
    let p = Project::new(
        "stages:\n  prep:\n    kind: preprocess\n    params:\n      source: {format: image_folder, train: imgs}\n",
    );
    std::fs::create_dir_all(p.path("imgs/cat")).unwrap();
    std::fs::write(p.path("imgs/cat/a.png"), png(4, 4, 1)).unwrap();
    std::fs::write(
        p.path("imgs/cat/b.jpg"),
        b"\xff\xd8\xff\xe0 this is not a jpeg",
    )
    .unwrap();
    let e = failing(&p);
    assert!(e.contains("b.jpg, record 1: cannot decode image"), "{e}");
}

#[test]
fn an_empty_class_folder_is_refused() {
    let p = Project::new(
        "stages:\n  prep:\n    kind: preprocess\n    params:\n      source: {format: image_folder, train: imgs}\n",
    );
    std::fs::create_dir_all(p.path("imgs/cat")).unwrap();
    std::fs::write(p.path("imgs/cat/a.png"), png(4, 4, 1)).unwrap();
    std::fs::create_dir_all(p.path("imgs/dog")).unwrap();
    let e = failing(&p);
    assert!(
        e.contains("imgs/dog: class folder holds no .png/.jpg/.jpeg images"),
        "{e}"
    );
}

#[test]
fn a_truncated_cifar_batch_is_refused() {
    let p = Project::new(
        "stages:\n  prep:\n    kind: preprocess\n    params:\n      source: {format: cifar10, train: [b.bin]}\n",
    );
    let mut bytes = encode_batch(
        Variant::Cifar10,
        &[(cifar_pixels(1), 1), (cifar_pixels(2), 2)],
    );
    bytes.truncate(bytes.len() - 100);
    std::fs::write(p.path("b.bin"), bytes).unwrap();
    let e = failing(&p);
    assert!(e.contains("b.bin, record 1: truncated"), "{e}");
}

#[test]
fn bad_preprocess_params_are_spec_errors() {
    let p = Project::new(
        "stages:\n  prep:\n    kind: preprocess\n    params:\n      source: {format: tiff, train: x}\n",
    );
    let out = p.run(&[]);
    assert_error(
        &out,
        2,
        "pipeline.yaml:5:15: stage `prep`: params: source.format: unknown variant `tiff`",
    );
    let p = Project::new(
        "stages:\n  prep:\n    kind: preprocess\n    params:\n      source: {format: idx, train: {images: ../../x, labels: lab.idx}}\n",
    );
    let out = p.run(&[]);
    assert_error(&out, 2, "leaves the pipeline folder");
}

/// An independent reader: pyarrow (from the venv `.ci/run` makes; the test
/// is a no-op where `HAIC_PYARROW_PYTHON` is not set).
#[test]
fn pyarrow_reads_the_table_back() {
    let Ok(python) = std::env::var("HAIC_PYARROW_PYTHON") else {
        eprintln!("HAIC_PYARROW_PYTHON is not set; skipping the pyarrow cross-check");
        return;
    };
    let p = Project::new(&fashion_pipeline(
        "      validation: {fraction: 0.1, seed: 0}",
    ));
    assert!(p.run(&[]).status.success());
    let dir = table_dir(&p);
    let script = r#"
import json, sys, pyarrow.parquet as pq, numpy as np
d = sys.argv[1]
index = json.load(open(d + "/table.json"))
total, rows, shapes = 0, {}, set()
for split, info in index["splits"].items():
    for f in info["files"]:
        t = pq.read_table(d + "/" + f)
        md = {k.decode(): v.decode() for k, v in t.schema.metadata.items()}
        h, w, c = (int(md["haic." + k]) for k in ("height", "width", "channels"))
        px = np.frombuffer(b"".join(t.column("pixels").to_pylist()), np.uint8).reshape(-1, h, w, c)
        shapes.add(px.shape[1:])
        total += int(px.astype(np.int64).sum())
        rows[split] = rows.get(split, 0) + px.shape[0]
        assert (t.column("label").to_numpy() < 10).all()
print(json.dumps({"total": total, "rows": rows, "shapes": sorted(list(s) for s in shapes)}))
"#;
    let stdout = run_python(&python, script, &[&dir]);
    let v: serde_json::Value = serde_json::from_slice(&stdout).unwrap();
    assert_eq!(v["total"], 573_133_949u64 + 114_072_606u64);
    assert_eq!(
        v["rows"],
        serde_json::json!({"train": 9000, "val": 1000, "test": 2000})
    );
    assert_eq!(v["shapes"], serde_json::json!([[32, 32, 1]]));
}
