//! Parquet files in the layout common dataset hubs export: an image column
//! `struct<bytes: binary, path: string>` (encoded PNG/JPEG) and an integer
//! label column. Column names are params (`image` and `label` by default).

use std::path::PathBuf;

use arrow_array::{Array, BinaryArray, LargeBinaryArray, RecordBatch, StructArray};

use super::folder::decode;
use super::parquet_read::ParquetBatches;
use super::{Sample, SampleSource};
use crate::error::{Error, Result};

pub struct HubParquetReader {
    files: Vec<PathBuf>,
    file_index: usize,
    reader: Option<ParquetBatches>,
    batch: Option<RecordBatch>,
    row_in_batch: usize,
    row_in_file: u64,
    total: u64,
    image_column: String,
    label_column: String,
    rgb: bool,
    failed: bool,
}

/// Rows per record batch read.
const BATCH_ROWS: usize = 256;

impl HubParquetReader {
    pub fn open(
        files: &[PathBuf],
        image_column: &str,
        label_column: &str,
        rgb: bool,
    ) -> Result<Self> {
        let mut total = 0;
        for f in files {
            total += ParquetBatches::open(f, BATCH_ROWS)?.rows;
        }
        Ok(HubParquetReader {
            files: files.to_vec(),
            file_index: 0,
            reader: None,
            batch: None,
            row_in_batch: 0,
            row_in_file: 0,
            total,
            image_column: image_column.to_string(),
            label_column: label_column.to_string(),
            rgb,
            failed: false,
        })
    }

    fn fail(&mut self, e: Error) -> Option<Result<Sample>> {
        self.failed = true;
        Some(Err(e))
    }

    fn row(&self, batch: &RecordBatch, i: usize, path: &PathBuf) -> Result<Sample> {
        let record = Some(self.row_in_file);
        let col = batch.column_by_name(&self.image_column).ok_or_else(|| {
            Error::data(
                path,
                None,
                format!("no column `{}` (params.image_column)", self.image_column),
            )
        })?;
        let st = col.as_any().downcast_ref::<StructArray>().ok_or_else(|| {
            Error::data(
                path,
                None,
                format!(
                    "column `{}` is {}, not struct<bytes, path>",
                    self.image_column,
                    col.data_type()
                ),
            )
        })?;
        let bytes_col = st.column_by_name("bytes").ok_or_else(|| {
            Error::data(
                path,
                None,
                format!("column `{}` has no `bytes` field", self.image_column),
            )
        })?;
        let bytes: &[u8] = if let Some(b) = bytes_col.as_any().downcast_ref::<BinaryArray>() {
            if b.is_null(i) || st.is_null(i) {
                return Err(Error::data(path, record, "image bytes are null"));
            }
            b.value(i)
        } else if let Some(b) = bytes_col.as_any().downcast_ref::<LargeBinaryArray>() {
            if b.is_null(i) || st.is_null(i) {
                return Err(Error::data(path, record, "image bytes are null"));
            }
            b.value(i)
        } else {
            return Err(Error::data(
                path,
                None,
                format!("`{}.bytes` is not binary", self.image_column),
            ));
        };
        let label_col = batch.column_by_name(&self.label_column).ok_or_else(|| {
            Error::data(
                path,
                None,
                format!("no column `{}` (params.label_column)", self.label_column),
            )
        })?;
        let label = int_at(label_col.as_ref(), i).ok_or_else(|| {
            Error::data(
                path,
                record,
                format!(
                    "label column `{}` is null or not an integer",
                    self.label_column
                ),
            )
        })?;
        let (pixels, height, width, channels) =
            decode(bytes, self.rgb).map_err(|m| Error::data(path, record, m))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        Ok(Sample {
            pixels,
            height,
            width,
            channels,
            label,
            source_id: format!("{name}#{}", self.row_in_file),
        })
    }
}

fn int_at(a: &dyn Array, i: usize) -> Option<i64> {
    use arrow_array::{
        Int8Array, Int16Array, Int32Array, Int64Array, UInt8Array, UInt16Array, UInt32Array,
        UInt64Array,
    };
    if a.is_null(i) {
        return None;
    }
    let any = a.as_any();
    if let Some(x) = any.downcast_ref::<Int64Array>() {
        return Some(x.value(i));
    }
    if let Some(x) = any.downcast_ref::<Int32Array>() {
        return Some(x.value(i) as i64);
    }
    if let Some(x) = any.downcast_ref::<Int16Array>() {
        return Some(x.value(i) as i64);
    }
    if let Some(x) = any.downcast_ref::<Int8Array>() {
        return Some(x.value(i) as i64);
    }
    if let Some(x) = any.downcast_ref::<UInt8Array>() {
        return Some(x.value(i) as i64);
    }
    if let Some(x) = any.downcast_ref::<UInt16Array>() {
        return Some(x.value(i) as i64);
    }
    if let Some(x) = any.downcast_ref::<UInt32Array>() {
        return Some(x.value(i) as i64);
    }
    any.downcast_ref::<UInt64Array>()
        .and_then(|x| i64::try_from(x.value(i)).ok())
}

impl Iterator for HubParquetReader {
    type Item = Result<Sample>;

    fn next(&mut self) -> Option<Result<Sample>> {
        if self.failed {
            return None;
        }
        loop {
            if let Some(batch) = &self.batch
                && self.row_in_batch < batch.num_rows()
            {
                let batch = batch.clone();
                let path = self.files[self.file_index].clone();
                let r = self.row(&batch, self.row_in_batch, &path);
                self.row_in_batch += 1;
                self.row_in_file += 1;
                return match r {
                    Ok(s) => Some(Ok(s)),
                    Err(e) => self.fail(e),
                };
            }
            self.batch = None;
            if self.reader.is_none() {
                let path = self.files.get(self.file_index)?.clone();
                match ParquetBatches::open(&path, BATCH_ROWS) {
                    Ok(r) => {
                        self.reader = Some(r);
                        self.row_in_file = 0;
                    }
                    Err(e) => return self.fail(e),
                }
            }
            match self.reader.as_mut().and_then(Iterator::next) {
                Some(Ok(b)) => {
                    self.batch = Some(b);
                    self.row_in_batch = 0;
                }
                Some(Err(e)) => return self.fail(e),
                None => {
                    self.reader = None;
                    self.file_index += 1;
                }
            }
        }
    }
}

impl SampleSource for HubParquetReader {
    fn len_hint(&self) -> u64 {
        self.total
    }
}
