//! Reading Parquet files that may be malformed. parquet 60 panics on some
//! bad metadata instead of returning an error (an `assert!` on negative
//! column offsets, found by fuzzing the code-table reader), so every call
//! into it that reads a file's bytes runs under `catch_unwind`: a bad file
//! is a data error naming it, not a crashed worker.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};

use crate::error::{Error, Result};

/// Runs `f`, a call into the Parquet reader on `path`; a panic becomes a
/// data error.
pub fn guarded<T>(path: &Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let why = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "the Parquet reader failed".into());
        Err(Error::data(
            path,
            None,
            format!("not a readable Parquet file: {why}"),
        ))
    })
}

/// A Parquet file's record batches, `batch_rows` rows at a time.
pub struct ParquetBatches {
    path: PathBuf,
    reader: ParquetRecordBatchReader,
    /// The file's Arrow schema.
    pub schema: SchemaRef,
    /// Its row count, from the footer.
    pub rows: u64,
}

impl ParquetBatches {
    pub fn open(path: &Path, batch_rows: usize) -> Result<Self> {
        let file = std::fs::File::open(path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        let pq = |e| Error::Parquet {
            context: format!("{} is not a readable Parquet file", path.display()),
            source: e,
        };
        guarded(path, || {
            let b = ParquetRecordBatchReaderBuilder::try_new(file).map_err(pq)?;
            let schema = b.schema().clone();
            let rows = b.metadata().file_metadata().num_rows().max(0) as u64;
            let reader = b.with_batch_size(batch_rows.max(1)).build().map_err(pq)?;
            Ok(ParquetBatches {
                path: path.to_path_buf(),
                reader,
                schema,
                rows,
            })
        })
    }
}

impl Iterator for ParquetBatches {
    type Item = Result<RecordBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        let path = self.path.clone();
        let reader = &mut self.reader;
        guarded(&path, || {
            reader.next().transpose().map_err(|e| Error::Arrow {
                context: format!("reading {}", path.display()),
                source: e,
            })
        })
        .transpose()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// The fuzzer's find: a code-table shard whose metadata makes parquet
    /// assert (a negative column offset). Reading it is an error, not a
    /// panic.
    #[test]
    fn a_file_the_parquet_reader_panics_on_is_an_error() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("testdata/parquet-negative-column-offset.parquet");
        let err = crate::data::code_table::for_each_code_batch(&path, 64, 7, |_| Ok(()))
            .expect_err("a malformed file");
        let text = err.to_string();
        assert!(
            text.contains("parquet-negative-column-offset.parquet")
                && text.contains(
                    "not a readable Parquet file: column start and length should not be negative"
                ),
            "{text}"
        );
    }
}
