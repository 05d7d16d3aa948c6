//! Parquet image tables: what `preprocess` writes and every later stage
//! reads. The schema is documented in `schemas/image_table.md`.
//!
//! One folder per table: `<split>-<shard:05>.parquet` files (zstd, row
//! groups of [`ROW_GROUP_ROWS`] rows so readers can stream) and
//! `table.json`, which lists the splits, their files, row and class counts.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{Array, FixedSizeBinaryArray, Int32Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

use super::Sample;
use crate::error::{Error, Result};

pub const ROW_GROUP_ROWS: usize = 2048;
pub const TABLE_FORMAT: &str = "haic image table v1";

/// Shape, channel order and class names: the schema metadata of every file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableMeta {
    pub height: u32,
    pub width: u32,
    pub channels: u32,
    /// `L` (grayscale) or `RGB`.
    pub channel_order: String,
    pub class_names: Vec<String>,
}

impl TableMeta {
    pub fn pixel_bytes(&self) -> usize {
        (self.height * self.width * self.channels) as usize
    }

    pub fn schema(&self) -> Schema {
        let mut md = HashMap::new();
        md.insert("haic.format".to_string(), TABLE_FORMAT.to_string());
        md.insert("haic.layout".to_string(), "HWC".to_string());
        md.insert("haic.height".to_string(), self.height.to_string());
        md.insert("haic.width".to_string(), self.width.to_string());
        md.insert("haic.channels".to_string(), self.channels.to_string());
        md.insert("haic.channel_order".to_string(), self.channel_order.clone());
        md.insert(
            "haic.class_names".to_string(),
            serde_json::to_string(&self.class_names).unwrap_or_default(),
        );
        Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("label", DataType::Int32, false),
            Field::new("split", DataType::Utf8, false),
            Field::new("source_id", DataType::Utf8, false),
            Field::new(
                "pixels",
                DataType::FixedSizeBinary(self.pixel_bytes() as i32),
                false,
            ),
        ])
        .with_metadata(md)
    }

    pub fn from_schema(schema: &Schema, path: &Path) -> Result<TableMeta> {
        let md = schema.metadata();
        let get = |k: &str| {
            md.get(k).cloned().ok_or_else(|| {
                Error::data(
                    path,
                    None,
                    format!("not a haic image table: schema metadata lacks `{k}`"),
                )
            })
        };
        let num = |k: &str| -> Result<u32> {
            get(k)?.parse().map_err(|_| {
                Error::data(path, None, format!("schema metadata `{k}` is not a number"))
            })
        };
        Ok(TableMeta {
            height: num("haic.height")?,
            width: num("haic.width")?,
            channels: num("haic.channels")?,
            channel_order: get("haic.channel_order")?,
            class_names: serde_json::from_str(&get("haic.class_names")?).map_err(|e| {
                Error::data(
                    path,
                    None,
                    format!("schema metadata `haic.class_names`: {e}"),
                )
            })?,
        })
    }
}

/// `table.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableIndex {
    pub format: String,
    #[serde(flatten)]
    pub meta: TableMeta,
    pub splits: BTreeMap<String, SplitIndex>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SplitIndex {
    pub rows: u64,
    pub files: Vec<String>,
    pub class_counts: Vec<u64>,
}

impl SplitIndex {
    /// Counts one row of class `label`; a label outside the class list
    /// counts as a row only.
    pub fn add_row(&mut self, label: i64) {
        if let Some(c) = usize::try_from(label)
            .ok()
            .and_then(|l| self.class_counts.get_mut(l))
        {
            *c += 1;
        }
        self.rows += 1;
    }

    /// The file name of the split's next shard: `<split>-<shard:05>.parquet`.
    pub fn next_shard_name(&self, split: &str) -> String {
        format!("{split}-{:05}.parquet", self.files.len())
    }
}

/// What a folder with a `table.json` is, for errors about one without.
pub const TABLE_KINDS: &str = "an image or code table (the output of a preprocess or encode stage)";

impl TableIndex {
    pub fn read(dir: &Path) -> Result<TableIndex> {
        let (path, bytes) = crate::error::read_index(dir, "table.json", TABLE_KINDS)?;
        serde_json::from_slice(&bytes)
            .map_err(|e| Error::data(&path, None, format!("not a table index: {e}")))
    }
}

/// Writes one split of a table as shards of `rows_per_shard` rows.
pub struct ShardWriter {
    dir: PathBuf,
    split: String,
    meta: TableMeta,
    schema: Arc<Schema>,
    rows_per_shard: usize,
    ids: Vec<i64>,
    labels: Vec<i32>,
    sources: Vec<String>,
    pixels: Vec<u8>,
    pub index: SplitIndex,
}

impl ShardWriter {
    pub fn new(dir: &Path, split: &str, meta: &TableMeta, rows_per_shard: usize) -> Self {
        ShardWriter {
            dir: dir.to_path_buf(),
            split: split.to_string(),
            schema: Arc::new(meta.schema()),
            meta: meta.clone(),
            rows_per_shard: rows_per_shard.max(1),
            ids: Vec::new(),
            labels: Vec::new(),
            sources: Vec::new(),
            pixels: Vec::new(),
            index: SplitIndex {
                class_counts: vec![0; meta.class_names.len()],
                ..Default::default()
            },
        }
    }

    /// Adds a row; the sample must have the table's shape.
    pub fn push(&mut self, id: i64, s: &Sample) -> Result<()> {
        if s.pixels.len() != self.meta.pixel_bytes() {
            return Err(Error::Params(format!(
                "{}: image is {}x{}x{} after the transforms, the table is {}x{}x{}; set `resize`/`crop`/`pad` so all images end the same size",
                s.source_id,
                s.height,
                s.width,
                s.channels,
                self.meta.height,
                self.meta.width,
                self.meta.channels
            )));
        }
        self.ids.push(id);
        self.labels.push(s.label as i32);
        self.sources.push(s.source_id.clone());
        self.pixels.extend_from_slice(&s.pixels);
        self.index.add_row(s.label);
        if self.ids.len() >= self.rows_per_shard {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.ids.is_empty() {
            return Ok(());
        }
        let name = self.index.next_shard_name(&self.split);
        let path = self.dir.join(&name);
        let n = self.ids.len();
        let pixels = FixedSizeBinaryArray::try_new(
            self.meta.pixel_bytes() as i32,
            std::mem::take(&mut self.pixels).into(),
            None,
        )
        .map_err(|e| Error::Arrow {
            context: format!("building {name}"),
            source: e,
        })?;
        let batch = RecordBatch::try_new(
            self.schema.clone(),
            vec![
                Arc::new(Int64Array::from(std::mem::take(&mut self.ids))),
                Arc::new(Int32Array::from(std::mem::take(&mut self.labels))),
                Arc::new(StringArray::from(vec![self.split.as_str(); n])),
                Arc::new(StringArray::from(std::mem::take(&mut self.sources))),
                Arc::new(pixels),
            ],
        )
        .map_err(|e| Error::Arrow {
            context: format!("building {name}"),
            source: e,
        })?;
        write_parquet(&path, self.schema.clone(), &batch)?;
        self.index.files.push(name);
        Ok(())
    }

    pub fn finish(mut self) -> Result<SplitIndex> {
        self.flush()?;
        Ok(self.index)
    }
}

/// One zstd Parquet file with row groups of [`ROW_GROUP_ROWS`].
pub fn write_parquet(path: &Path, schema: Arc<Schema>, batch: &RecordBatch) -> Result<()> {
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).unwrap_or_default()))
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .set_created_by(format!("haic-pipe {}", env!("CARGO_PKG_VERSION")))
        .build();
    let file = std::fs::File::create(path)
        .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
    let pq = |e| Error::Parquet {
        context: format!("writing {}", path.display()),
        source: e,
    };
    let mut w = ArrowWriter::try_new(file, schema, Some(props)).map_err(pq)?;
    w.write(batch).map_err(pq)?;
    w.close().map_err(pq)?;
    Ok(())
}

/// One row read back from a table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub id: i64,
    pub label: i32,
    pub split: String,
    pub source_id: String,
    pub pixels: Vec<u8>,
}

/// Reads a whole table file (for tests and small tables).
pub fn read_file(path: &Path) -> Result<(TableMeta, Vec<Row>)> {
    let mut rows = Vec::new();
    let meta = for_each_batch(path, 8192, |batch| {
        rows.extend(batch);
        Ok(())
    })?;
    Ok((meta, rows))
}

/// Calls `f` with the rows of a table file, at most `batch_rows` at a time:
/// memory holds one batch, not the file.
pub fn for_each_batch(
    path: &Path,
    batch_rows: usize,
    mut f: impl FnMut(Vec<Row>) -> Result<()>,
) -> Result<TableMeta> {
    let batches = crate::data::parquet_read::ParquetBatches::open(path, batch_rows)?;
    let meta = TableMeta::from_schema(&batches.schema, path)?;
    for batch in batches {
        let mut rows = Vec::with_capacity(batch_rows);
        let batch = batch?;
        let col = |name: &str| {
            batch
                .column_by_name(name)
                .cloned()
                .ok_or_else(|| Error::data(path, None, format!("missing column `{name}`")))
        };
        let (ids, labels, splits, sources, pixels) = (
            col("id")?,
            col("label")?,
            col("split")?,
            col("source_id")?,
            col("pixels")?,
        );
        let bad =
            |name: &str| Error::data(path, None, format!("column `{name}` has the wrong type"));
        let ids = ids
            .as_any()
            .downcast_ref::<Int64Array>()
            .ok_or_else(|| bad("id"))?;
        let labels = labels
            .as_any()
            .downcast_ref::<Int32Array>()
            .ok_or_else(|| bad("label"))?;
        let splits = splits
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(|| bad("split"))?;
        let sources = sources
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(|| bad("source_id"))?;
        let pixels = pixels
            .as_any()
            .downcast_ref::<FixedSizeBinaryArray>()
            .ok_or_else(|| bad("pixels"))?;
        for i in 0..batch.num_rows() {
            rows.push(Row {
                id: ids.value(i),
                label: labels.value(i),
                split: splits.value(i).to_string(),
                source_id: sources.value(i).to_string(),
                pixels: pixels.value(i).to_vec(),
            });
        }
        f(rows)?;
    }
    Ok(meta)
}
