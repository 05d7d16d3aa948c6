//! Code tables: what `encode` writes from a trained VQ level and the next
//! level (and the AR models) read. Laid out like image tables (one folder,
//! `<split>-<shard:05>.parquet` files, `table.json`), documented in
//! `schemas/code_table.md`.
//!
//! Columns: `id` int64, `label` int32, `split` utf8, `codes`
//! `fixed_size_list<uint16>[H*W]` (row-major code map). Schema metadata:
//! `haic.format`, `haic.height`, `haic.width`, `haic.codebook_size`,
//! `haic.class_names`, `haic.producer_key`, `haic.source_key`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{
    Array, FixedSizeListArray, Int32Array, Int64Array, RecordBatch, StringArray, UInt16Array,
};
use arrow_schema::{DataType, Field, Schema};
use serde::{Deserialize, Serialize};

use super::table::{SplitIndex, write_parquet};
use crate::error::{Error, Result};

pub const CODE_TABLE_FORMAT: &str = "haic code table v1";

/// Shape of the code maps, codebook size and class names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CodeMeta {
    pub height: u32,
    pub width: u32,
    pub codebook_size: u32,
    pub class_names: Vec<String>,
    /// The stage key of the `encode` run that wrote the table.
    #[serde(default)]
    pub producer_key: String,
    /// The stage key of the table it encoded (the same images, row for row).
    #[serde(default)]
    pub source_key: String,
}

impl CodeMeta {
    pub fn codes_per_row(&self) -> usize {
        (self.height * self.width) as usize
    }

    fn item_field() -> Arc<Field> {
        Arc::new(Field::new("item", DataType::UInt16, false))
    }

    pub fn schema(&self) -> Schema {
        let md: HashMap<String, String> = [
            ("haic.format", CODE_TABLE_FORMAT.to_string()),
            ("haic.height", self.height.to_string()),
            ("haic.width", self.width.to_string()),
            ("haic.codebook_size", self.codebook_size.to_string()),
            ("haic.producer_key", self.producer_key.clone()),
            ("haic.source_key", self.source_key.clone()),
            (
                "haic.class_names",
                serde_json::to_string(&self.class_names).unwrap_or_default(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("label", DataType::Int32, false),
            Field::new("split", DataType::Utf8, false),
            Field::new(
                "codes",
                DataType::FixedSizeList(Self::item_field(), self.codes_per_row() as i32),
                false,
            ),
        ])
        .with_metadata(md)
    }
}

/// `table.json` of a code table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CodeTableIndex {
    pub format: String,
    #[serde(flatten)]
    pub meta: CodeMeta,
    pub splits: BTreeMap<String, SplitIndex>,
}

/// Writes one split of a code table as shards.
pub struct CodeShardWriter {
    dir: PathBuf,
    split: String,
    meta: CodeMeta,
    schema: Arc<Schema>,
    rows_per_shard: usize,
    ids: Vec<i64>,
    labels: Vec<i32>,
    codes: Vec<u16>,
    pub index: SplitIndex,
}

impl CodeShardWriter {
    pub fn new(dir: &Path, split: &str, meta: &CodeMeta, rows_per_shard: usize) -> Self {
        CodeShardWriter {
            dir: dir.to_path_buf(),
            split: split.to_string(),
            schema: Arc::new(meta.schema()),
            meta: meta.clone(),
            rows_per_shard: rows_per_shard.max(1),
            ids: Vec::new(),
            labels: Vec::new(),
            codes: Vec::new(),
            index: SplitIndex {
                class_counts: vec![0; meta.class_names.len()],
                ..Default::default()
            },
        }
    }

    pub fn push(&mut self, id: i64, label: i32, codes: &[u16]) -> Result<()> {
        if codes.len() != self.meta.codes_per_row() {
            return Err(Error::Params(format!(
                "row {id}: {} codes, the table holds {}x{} maps",
                codes.len(),
                self.meta.height,
                self.meta.width
            )));
        }
        self.ids.push(id);
        self.labels.push(label);
        self.codes.extend_from_slice(codes);
        self.index.add_row(label as i64);
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
        let arrow = |e| Error::Arrow {
            context: format!("building {name}"),
            source: e,
        };
        let codes = FixedSizeListArray::try_new(
            CodeMeta::item_field(),
            self.meta.codes_per_row() as i32,
            Arc::new(UInt16Array::from(std::mem::take(&mut self.codes))),
            None,
        )
        .map_err(arrow)?;
        let batch = RecordBatch::try_new(
            self.schema.clone(),
            vec![
                Arc::new(Int64Array::from(std::mem::take(&mut self.ids))),
                Arc::new(Int32Array::from(std::mem::take(&mut self.labels))),
                Arc::new(StringArray::from(vec![self.split.as_str(); n])),
                Arc::new(codes),
            ],
        )
        .map_err(arrow)?;
        write_parquet(&path, self.schema.clone(), &batch)?;
        self.index.files.push(name);
        Ok(())
    }

    pub fn finish(mut self) -> Result<SplitIndex> {
        self.flush()?;
        Ok(self.index)
    }
}

/// A code table file's rows: ids, labels and the codes, row after row.
pub struct CodeRows {
    pub ids: Vec<i64>,
    pub labels: Vec<i32>,
    pub codes: Vec<u16>,
}

/// Reads a whole code table file.
pub fn read_code_file(path: &Path, codes_per_row: usize) -> Result<CodeRows> {
    let mut out = CodeRows {
        ids: Vec::new(),
        labels: Vec::new(),
        codes: Vec::new(),
    };
    for_each_code_batch(path, codes_per_row, 8192, |b| {
        out.ids.extend(b.ids);
        out.labels.extend(b.labels);
        out.codes.extend(b.codes);
        Ok(())
    })?;
    Ok(out)
}

/// Calls `f` with the rows of a code table file, at most `batch_rows` at a time.
pub fn for_each_code_batch(
    path: &Path,
    codes_per_row: usize,
    batch_rows: usize,
    mut f: impl FnMut(CodeRows) -> Result<()>,
) -> Result<()> {
    for batch in crate::data::parquet_read::ParquetBatches::open(path, batch_rows)? {
        let mut out = CodeRows {
            ids: Vec::new(),
            labels: Vec::new(),
            codes: Vec::new(),
        };
        let batch = batch?;
        let bad = |name: &str| {
            Error::data(
                path,
                None,
                format!("column `{name}` is missing or has the wrong type"),
            )
        };
        let ids = batch
            .column_by_name("id")
            .and_then(|c| c.as_any().downcast_ref::<Int64Array>())
            .ok_or_else(|| bad("id"))?;
        let labels = batch
            .column_by_name("label")
            .and_then(|c| c.as_any().downcast_ref::<Int32Array>())
            .ok_or_else(|| bad("label"))?;
        let codes = batch
            .column_by_name("codes")
            .and_then(|c| c.as_any().downcast_ref::<FixedSizeListArray>())
            .ok_or_else(|| bad("codes"))?;
        if codes.value_length() as usize != codes_per_row {
            return Err(Error::data(
                path,
                None,
                format!(
                    "rows hold {} codes, table.json says {codes_per_row}",
                    codes.value_length()
                ),
            ));
        }
        let values = codes
            .values()
            .as_any()
            .downcast_ref::<UInt16Array>()
            .ok_or_else(|| bad("codes"))?;
        let start = codes.offset() * codes_per_row;
        out.codes
            .extend_from_slice(&values.values()[start..start + codes.len() * codes_per_row]);
        out.ids.extend_from_slice(ids.values());
        out.labels.extend_from_slice(labels.values());
        f(out)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_through_shards() {
        let dir = tempfile::tempdir().unwrap();
        let meta = CodeMeta {
            height: 2,
            width: 3,
            codebook_size: 1000,
            class_names: vec!["a".into(), "b".into()],
            producer_key: "k".into(),
            source_key: "s".into(),
        };
        let mut w = CodeShardWriter::new(dir.path(), "train", &meta, 2);
        for i in 0..5i64 {
            let codes: Vec<u16> = (0..6).map(|j| (i * 100 + j) as u16).collect();
            w.push(i, (i % 2) as i32, &codes).unwrap();
        }
        let idx = w.finish().unwrap();
        assert_eq!(idx.files.len(), 3);
        assert_eq!(idx.class_counts, [3, 2]);
        let back = read_code_file(&dir.path().join("train-00001.parquet"), 6).unwrap();
        assert_eq!(back.ids, [2, 3]);
        assert_eq!(back.labels, [0, 1]);
        assert_eq!(back.codes[6..], [300, 301, 302, 303, 304, 305]);
        assert!(read_code_file(&dir.path().join("train-00000.parquet"), 5).is_err());
    }
}
