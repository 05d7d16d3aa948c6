//! What a VQ level reads, whichever table it is: an image table (level 1)
//! or a code table (level 2 and up), as rows of `u16` values; and the seeded,
//! resumable order in which training visits the rows.
//!
//! Order: each epoch visits the split's shards in a seeded permutation and
//! the rows of a shard in a seeded permutation, holding one shard in memory.
//! A [`Cursor`] (epoch, shard, row) says where the stream stands; a stream
//! rebuilt from the same seed and cursor yields exactly the same rows.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::code_table::{CODE_TABLE_FORMAT, CodeTableIndex, for_each_code_batch};
use super::table::{SplitIndex, TABLE_FORMAT, TableIndex, for_each_batch as read_image_batches};
use crate::error::{Error, Result};
use crate::models::encoder::InputKind;
use crate::rng::SplitMix64;

/// An opened image or code table.
#[derive(Debug, Clone)]
pub struct LevelTable {
    pub dir: PathBuf,
    pub input: InputKind,
    pub height: usize,
    pub width: usize,
    /// H*W*C for pixels (HWC order), H*W for codes.
    pub values_per_row: usize,
    pub class_names: Vec<String>,
    pub splits: BTreeMap<String, SplitIndex>,
}

/// Rows of a table, `values_per_row` values each.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rows {
    pub ids: Vec<i64>,
    pub labels: Vec<i32>,
    pub values: Vec<u16>,
}

impl Rows {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Appends `other`'s rows.
    pub fn extend(&mut self, other: Rows) {
        self.ids.extend(other.ids);
        self.labels.extend(other.labels);
        self.values.extend(other.values);
    }

    /// A copy of rows `start..end`, `per_row` values each.
    pub fn range(&self, start: usize, end: usize, per_row: usize) -> Rows {
        Rows {
            ids: self.ids[start..end].to_vec(),
            labels: self.labels[start..end].to_vec(),
            values: self.values[start * per_row..end * per_row].to_vec(),
        }
    }
}

#[derive(Deserialize)]
struct FormatOnly {
    format: String,
}

impl LevelTable {
    pub fn open(dir: &Path) -> Result<LevelTable> {
        let path = dir.join("table.json");
        let bytes = std::fs::read(&path)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        let not_index =
            |e: serde_json::Error| Error::data(&path, None, format!("not a table index: {e}"));
        let format: FormatOnly = serde_json::from_slice(&bytes).map_err(not_index)?;
        match format.format.as_str() {
            TABLE_FORMAT => {
                let t: TableIndex = serde_json::from_slice(&bytes).map_err(not_index)?;
                let m = &t.meta;
                Ok(LevelTable {
                    dir: dir.to_path_buf(),
                    input: InputKind::Pixels {
                        channels: m.channels as usize,
                    },
                    height: m.height as usize,
                    width: m.width as usize,
                    values_per_row: m.pixel_bytes(),
                    class_names: m.class_names.clone(),
                    splits: t.splits,
                })
            }
            CODE_TABLE_FORMAT => {
                let t: CodeTableIndex = serde_json::from_slice(&bytes).map_err(not_index)?;
                let m = &t.meta;
                Ok(LevelTable {
                    dir: dir.to_path_buf(),
                    input: InputKind::Codes {
                        classes: m.codebook_size as usize,
                    },
                    height: m.height as usize,
                    width: m.width as usize,
                    values_per_row: m.codes_per_row(),
                    class_names: m.class_names.clone(),
                    splits: t.splits,
                })
            }
            other => Err(Error::data(
                &path,
                None,
                format!(
                    "format `{other}` is neither `{TABLE_FORMAT}` nor `{CODE_TABLE_FORMAT}`; the input must be a preprocess or encode stage"
                ),
            )),
        }
    }

    /// The split's shard files; an error names the splits there are.
    pub fn split(&self, name: &str) -> Result<&SplitIndex> {
        match self.splits.get(name) {
            Some(s) if s.rows > 0 => Ok(s),
            _ => Err(Error::Params(format!(
                "table {} has no rows in split `{name}` (it has: {})",
                self.dir.display(),
                self.splits
                    .iter()
                    .filter(|(_, s)| s.rows > 0)
                    .map(|(n, s)| format!("{n} ({} rows)", s.rows))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// A whole shard file.
    pub fn read_shard(&self, file: &str) -> Result<Rows> {
        let mut out = Rows::default();
        self.for_each_batch(file, 8192, |b| {
            out.extend(b);
            Ok(())
        })?;
        Ok(out)
    }

    /// Calls `f` with a shard's rows, at most `batch_rows` at a time, each
    /// row checked against the table's shape (and codes against K).
    pub fn for_each_batch(
        &self,
        file: &str,
        batch_rows: usize,
        mut f: impl FnMut(Rows) -> Result<()>,
    ) -> Result<()> {
        let path = self.dir.join(file);
        let mut seen = 0u64;
        match self.input {
            InputKind::Pixels { .. } => {
                read_image_batches(&path, batch_rows, |rows| {
                    let mut out = Rows::default();
                    for r in rows {
                        if r.pixels.len() != self.values_per_row {
                            return Err(Error::data(
                                &path,
                                Some(seen),
                                "row size differs from table.json",
                            ));
                        }
                        seen += 1;
                        out.ids.push(r.id);
                        out.labels.push(r.label);
                        out.values.extend(r.pixels.iter().map(|&p| p as u16));
                    }
                    f(out)
                })?;
            }
            InputKind::Codes { classes } => {
                for_each_code_batch(&path, self.values_per_row, batch_rows, |c| {
                    if let Some(bad) = c.codes.iter().position(|&v| v as usize >= classes) {
                        return Err(Error::data(
                            &path,
                            Some(seen + (bad / self.values_per_row) as u64),
                            format!("code {} is outside the codebook of {classes}", c.codes[bad]),
                        ));
                    }
                    seen += c.ids.len() as u64;
                    f(Rows {
                        ids: c.ids,
                        labels: c.labels,
                        values: c.codes,
                    })
                })?;
            }
        }
        Ok(())
    }

    /// The first `limit` rows of a split (all if `None`), in table order.
    pub fn read_split(&self, name: &str, limit: Option<usize>) -> Result<Rows> {
        let mut out = Rows::default();
        for f in &self.split(name)?.files {
            if limit.is_some_and(|l| out.len() >= l) {
                break;
            }
            out.extend(self.read_shard(f)?);
        }
        if let Some(l) = limit
            && out.len() > l
        {
            out.ids.truncate(l);
            out.labels.truncate(l);
            out.values.truncate(l * self.values_per_row);
        }
        Ok(out)
    }
}

/// Where a training stream stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub epoch: u64,
    /// Position in the epoch's shard order.
    pub shard: usize,
    /// Position in the shard's row order.
    pub row: usize,
}

/// Endless, seeded batches from one split.
pub struct BatchStream {
    table: LevelTable,
    files: Vec<String>,
    seed: u64,
    pub cursor: Cursor,
    /// (epoch, shard position) of the loaded shard, its rows, their order.
    loaded: Option<((u64, usize), Rows, Vec<usize>)>,
}

impl BatchStream {
    pub fn new(table: &LevelTable, split: &str, seed: u64, cursor: Cursor) -> Result<Self> {
        Ok(BatchStream {
            files: table.split(split)?.files.clone(),
            table: table.clone(),
            seed,
            cursor,
            loaded: None,
        })
    }

    fn shard_order(&self, epoch: u64) -> Vec<usize> {
        SplitMix64::stream(self.seed, &format!("data/epoch-{epoch}")).permutation(self.files.len())
    }

    /// The next `n` rows.
    pub fn next_batch(&mut self, n: usize) -> Result<Rows> {
        let per = self.table.values_per_row;
        let mut out = Rows::default();
        while out.len() < n {
            let at = (self.cursor.epoch, self.cursor.shard);
            if self.loaded.as_ref().is_none_or(|(k, _, _)| *k != at) {
                let file_index = self.shard_order(at.0)[at.1];
                let rows = self.table.read_shard(&self.files[file_index])?;
                let order = SplitMix64::stream(
                    self.seed,
                    &format!("data/epoch-{}/shard-{file_index}", at.0),
                )
                .permutation(rows.len());
                self.loaded = Some((at, rows, order));
            }
            let Some((_, rows, order)) = &self.loaded else {
                unreachable!("loaded just above")
            };
            if self.cursor.row >= order.len() {
                self.cursor.row = 0;
                self.cursor.shard += 1;
                if self.cursor.shard >= self.files.len() {
                    self.cursor.shard = 0;
                    self.cursor.epoch += 1;
                }
                continue;
            }
            let r = order[self.cursor.row];
            out.ids.push(rows.ids[r]);
            out.labels.push(rows.labels[r]);
            out.values
                .extend_from_slice(&rows.values[r * per..(r + 1) * per]);
            self.cursor.row += 1;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::code_table::{CodeMeta, CodeShardWriter};

    fn code_table(dir: &Path, rows: i64, shard: usize) -> LevelTable {
        let meta = CodeMeta {
            height: 1,
            width: 2,
            codebook_size: 100,
            class_names: vec!["x".into()],
            producer_key: String::new(),
        };
        let mut w = CodeShardWriter::new(dir, "train", &meta, shard);
        for i in 0..rows {
            w.push(i, 0, &[i as u16, 99]).unwrap();
        }
        let index = CodeTableIndex {
            format: CODE_TABLE_FORMAT.into(),
            meta,
            splits: [("train".to_string(), w.finish().unwrap())].into(),
        };
        std::fs::write(dir.join("table.json"), serde_json::to_vec(&index).unwrap()).unwrap();
        LevelTable::open(dir).unwrap()
    }

    #[test]
    fn every_row_once_per_epoch_and_a_cursor_resumes_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let t = code_table(dir.path(), 10, 4);
        assert_eq!(t.input, InputKind::Codes { classes: 100 });
        let mut s = BatchStream::new(&t, "train", 3, Cursor::default()).unwrap();
        let epoch = s.next_batch(10).unwrap();
        let mut ids = epoch.ids.clone();
        ids.sort();
        assert_eq!(ids, (0..10).collect::<Vec<_>>());
        assert_ne!(epoch.ids, (0..10).collect::<Vec<_>>(), "shuffled");
        assert_eq!(epoch.values[..2], [epoch.ids[0] as u16, 99]);

        let mut a = BatchStream::new(&t, "train", 3, Cursor::default()).unwrap();
        a.next_batch(7).unwrap();
        let saved = a.cursor;
        let rest_a = a.next_batch(9).unwrap();
        let mut b = BatchStream::new(&t, "train", 3, saved).unwrap();
        assert_eq!(b.next_batch(9).unwrap(), rest_a);
        assert_eq!(a.cursor, b.cursor);
        // Another epoch, another order.
        let mut c = BatchStream::new(
            &t,
            "train",
            3,
            Cursor {
                epoch: 1,
                ..Default::default()
            },
        )
        .unwrap();
        assert_ne!(c.next_batch(10).unwrap().ids, epoch.ids);
        assert!(BatchStream::new(&t, "val", 3, Cursor::default()).is_err());
    }
}
