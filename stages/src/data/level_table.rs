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
use crate::rng::SplitMix64;

/// What a level reads: pixels (level 1) or the code map of the level below.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum InputKind {
    /// f32 (B, C, H, W), scaled to [-0.5, 0.5].
    Pixels { channels: usize },
    /// u32 (B, H, W), values below `classes`.
    Codes { classes: usize },
}

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
    /// For a code table: the stage key of the table it encoded.
    pub source_key: Option<String>,
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

    /// The values as u32 planes, row by row: rows of `pixels` positions x
    /// `channels` interleaved (HWC) become `channels` planes of `pixels` (CHW).
    pub fn planes(&self, channels: usize, pixels: usize) -> Vec<u32> {
        let mut chw = vec![0u32; self.values.len()];
        for (i, row) in self.values.chunks_exact(pixels * channels).enumerate() {
            for (p, px) in row.chunks_exact(channels).enumerate() {
                for (c, &v) in px.iter().enumerate() {
                    chw[(i * channels + c) * pixels + p] = v as u32;
                }
            }
        }
        chw
    }

    /// Appends row `r` of `src` (`per_row` values each).
    pub fn push_row(&mut self, src: &Rows, r: usize, per_row: usize) {
        self.ids.push(src.ids[r]);
        self.labels.push(src.labels[r]);
        self.values
            .extend_from_slice(&src.values[r * per_row..(r + 1) * per_row]);
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
        let (path, bytes) =
            crate::error::read_index(dir, "table.json", crate::data::table::TABLE_KINDS)?;
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
                    source_key: None,
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
                    source_key: Some(m.source_key.clone()).filter(|k| !k.is_empty()),
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

    /// The number of rows of each of a split's shard files (from the
    /// Parquet footers, without reading the data).
    pub fn shard_rows(&self, split: &str) -> Result<Vec<u64>> {
        use parquet::file::reader::{FileReader, SerializedFileReader};
        self.split(split)?
            .files
            .iter()
            .map(|f| {
                let path = self.dir.join(f);
                let file = std::fs::File::open(&path)
                    .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
                crate::data::parquet_read::guarded(&path, || {
                    let reader = SerializedFileReader::new(file).map_err(|e| Error::Parquet {
                        context: format!("reading {}", path.display()),
                        source: e,
                    })?;
                    Ok(reader.metadata().file_metadata().num_rows().max(0) as u64)
                })
            })
            .collect()
    }

    /// Rows `start..end` of a split in table order; `shard_rows` as
    /// [`LevelTable::shard_rows`] gives it. Reads only the shards they lie in.
    pub fn read_rows(&self, split: &str, shard_rows: &[u64], start: u64, end: u64) -> Result<Rows> {
        let per = self.values_per_row;
        let mut out = Rows::default();
        let mut first = 0u64;
        for (file, &n) in self.split(split)?.files.iter().zip(shard_rows) {
            let last = first + n;
            if first < end && start < last {
                let rows = self.read_shard(file)?;
                if rows.len() as u64 != n {
                    return Err(Error::data(
                        self.dir.join(file),
                        None,
                        format!("holds {} rows, its footer says {n}", rows.len()),
                    ));
                }
                let from = start.saturating_sub(first) as usize;
                let to = (end.min(last) - first) as usize;
                out.extend(rows.range(from, to, per));
            }
            first = last;
        }
        if (out.len() as u64) < end - start {
            return Err(Error::Params(format!(
                "table {} has {first} rows in split `{split}`, fewer than {end}",
                self.dir.display()
            )));
        }
        Ok(out)
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

impl LevelTable {
    /// Up to `limit` rows of a split, as evenly spread over the classes as
    /// they allow (`limit / classes` each, the remainder to the first
    /// classes; a class short of its share leaves its place to the next
    /// rows of any class), in table order, with their positions in the
    /// split. The first `limit` rows of a class-sorted table would hold
    /// its first classes only. Reads one shard at a time; a table without
    /// class names gives its first `limit` rows.
    pub fn read_stratified(&self, split: &str, limit: usize) -> Result<(Rows, Vec<u64>)> {
        let k = self.class_names.len();
        let mut quota: Vec<usize> = (0..k)
            .map(|c| limit / k + usize::from(c < limit % k))
            .collect();
        let files = &self.split(split)?.files;
        let mut picked: Vec<bool> = Vec::new();
        let mut taken = 0usize;
        for f in files {
            if taken >= limit {
                break;
            }
            self.for_each_batch(f, 8192, |b| {
                for &l in &b.labels {
                    let slot = usize::try_from(l).ok().and_then(|c| quota.get_mut(c));
                    let take = match slot {
                        Some(q) if *q > 0 && taken < limit => {
                            *q -= 1;
                            true
                        }
                        _ => k == 0 && taken < limit,
                    };
                    taken += usize::from(take);
                    picked.push(take);
                }
                Ok(())
            })?;
        }
        // Classes short of their share: the next unpicked rows in order.
        for p in picked.iter_mut().filter(|p| !**p) {
            if taken >= limit {
                break;
            }
            *p = true;
            taken += 1;
        }
        let positions: Vec<u64> = (0..picked.len() as u64)
            .filter(|&i| picked[i as usize])
            .collect();
        Ok((self.read_positions(split, &positions)?, positions))
    }

    /// The rows at `positions` (ascending) of a split, in that order.
    /// Reads only the shards they lie in.
    pub fn read_positions(&self, split: &str, positions: &[u64]) -> Result<Rows> {
        let per = self.values_per_row;
        let mut out = Rows::default();
        let mut wanted = positions.iter().copied().peekable();
        let mut first = 0u64;
        for (file, n) in self.split(split)?.files.iter().zip(self.shard_rows(split)?) {
            let last = first + n;
            if wanted.peek().is_some_and(|&p| p < last) {
                let rows = self.read_shard(file)?;
                while let Some(p) = wanted.next_if(|&p| p < last) {
                    let r = (p - first) as usize;
                    if r >= rows.len() {
                        return Err(Error::data(
                            self.dir.join(file),
                            None,
                            format!("holds {} rows, its footer says {n}", rows.len()),
                        ));
                    }
                    out.push_row(&rows, r, per);
                }
            }
            first = last;
        }
        if let Some(p) = wanted.next() {
            return Err(Error::Params(format!(
                "table {} has {first} rows in split `{split}`, not row {p}",
                self.dir.display()
            )));
        }
        Ok(out)
    }
}

/// Checks that `condition` holds, row for row, the same images as `target`
/// (the same ids in the same order), as a code table that `encode` wrote
/// from the target table (or from a table encoded from it) does.
pub fn check_aligned(
    target: (&LevelTable, &Rows),
    condition: (&LevelTable, &Rows),
    split: &str,
    first_row: u64,
) -> Result<()> {
    let ((t, tr), (c, cr)) = (target, condition);
    if let Some(i) = (0..tr.len().max(cr.len())).find(|&i| tr.ids.get(i) != cr.ids.get(i)) {
        let id = |r: &Rows| {
            r.ids
                .get(i)
                .map_or("no row".to_string(), |v| format!("id {v}"))
        };
        return Err(Error::Params(format!(
            "the conditioning table does not line up with the target table: row {} of split `{split}` is {} in {} and {} in {}; give as `condition` the code table encoded from the target table (or from the codes encoded from it)",
            first_row + i as u64,
            id(tr),
            t.dir.display(),
            id(cr),
            c.dir.display()
        )));
    }
    Ok(())
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

/// A table read alongside the stream's, row for row (the conditioning code
/// map of an AR decoder): where each of the stream's shards starts in it.
struct Companion {
    table: LevelTable,
    split: String,
    shard_rows: Vec<u64>,
    /// The first row (in split order) of each of the stream's shards.
    shard_starts: Vec<u64>,
}

/// A loaded shard: its (epoch, shard position), rows, the companion's rows
/// for them, and the visiting order.
struct Loaded {
    at: (u64, usize),
    rows: Rows,
    companion: Option<Rows>,
    order: Vec<usize>,
}

/// Endless, seeded batches from one split.
pub struct BatchStream {
    table: LevelTable,
    files: Vec<String>,
    seed: u64,
    pub cursor: Cursor,
    companion: Option<Companion>,
    loaded: Option<Loaded>,
}

impl BatchStream {
    pub fn new(table: &LevelTable, split: &str, seed: u64, cursor: Cursor) -> Result<Self> {
        Ok(BatchStream {
            files: table.split(split)?.files.clone(),
            table: table.clone(),
            seed,
            cursor,
            companion: None,
            loaded: None,
        })
    }

    /// The same stream, also yielding `companion`'s rows for the same
    /// images (checked by id); the order depends on `table` only.
    pub fn paired(
        table: &LevelTable,
        companion: &LevelTable,
        split: &str,
        seed: u64,
        cursor: Cursor,
    ) -> Result<Self> {
        let mut s = Self::new(table, split, seed, cursor)?;
        let mut start = 0;
        let shard_starts = table
            .shard_rows(split)?
            .into_iter()
            .map(|n| {
                start += n;
                start - n
            })
            .collect();
        s.companion = Some(Companion {
            shard_rows: companion.shard_rows(split)?,
            table: companion.clone(),
            split: split.to_string(),
            shard_starts,
        });
        Ok(s)
    }

    /// The next `n` rows.
    pub fn next_batch(&mut self, n: usize) -> Result<Rows> {
        Ok(self.next_pair(n)?.0)
    }

    fn shard_order(&self, epoch: u64) -> Vec<usize> {
        SplitMix64::stream(self.seed, &format!("data/epoch-{epoch}")).permutation(self.files.len())
    }

    /// The next `n` rows, and the companion's rows for them.
    pub fn next_pair(&mut self, n: usize) -> Result<(Rows, Option<Rows>)> {
        let per = self.table.values_per_row;
        let mut out = Rows::default();
        let mut out_companion = self.companion.as_ref().map(|_| Rows::default());
        while out.len() < n {
            let at = (self.cursor.epoch, self.cursor.shard);
            if self.loaded.as_ref().is_none_or(|l| l.at != at) {
                self.loaded = Some(self.load(at)?);
            }
            let Some(l) = &self.loaded else {
                unreachable!("loaded just above")
            };
            if self.cursor.row >= l.order.len() {
                self.cursor.row = 0;
                self.cursor.shard += 1;
                if self.cursor.shard >= self.files.len() {
                    self.cursor.shard = 0;
                    self.cursor.epoch += 1;
                }
                continue;
            }
            let r = l.order[self.cursor.row];
            out.push_row(&l.rows, r, per);
            if let (Some(dst), Some(src), Some(c)) =
                (&mut out_companion, &l.companion, &self.companion)
            {
                dst.push_row(src, r, c.table.values_per_row);
            }
            self.cursor.row += 1;
        }
        Ok((out, out_companion))
    }

    fn load(&self, at: (u64, usize)) -> Result<Loaded> {
        let file_index = self.shard_order(at.0)[at.1];
        let rows = self.table.read_shard(&self.files[file_index])?;
        let companion = match &self.companion {
            None => None,
            Some(c) => {
                let start = c.shard_starts[file_index];
                let end = start + rows.len() as u64;
                let other = c.table.read_rows(&c.split, &c.shard_rows, start, end)?;
                check_aligned((&self.table, &rows), (&c.table, &other), &c.split, start)?;
                Some(other)
            }
        };
        let order = SplitMix64::stream(
            self.seed,
            &format!("data/epoch-{}/shard-{file_index}", at.0),
        )
        .permutation(rows.len());
        Ok(Loaded {
            at,
            rows,
            companion,
            order,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::data::code_table::{CodeMeta, CodeShardWriter};

    pub(crate) fn code_table(dir: &Path, rows: i64, shard: usize) -> LevelTable {
        code_table_of(dir, (0..rows).map(|i| (i, [i as u16, 99])), shard)
    }

    pub(crate) fn code_table_of(
        dir: &Path,
        rows: impl Iterator<Item = (i64, [u16; 2])>,
        shard: usize,
    ) -> LevelTable {
        let meta = CodeMeta {
            height: 1,
            width: 2,
            codebook_size: 100,
            class_names: vec!["x".into()],
            producer_key: String::new(),
            source_key: String::new(),
        };
        let mut w = CodeShardWriter::new(dir, "train", &meta, shard);
        for (id, codes) in rows {
            w.push(id, 0, &codes).unwrap();
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

    #[test]
    fn a_paired_stream_yields_the_companion_rows_of_the_same_images() {
        let (a, b, c) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        let target = code_table(a.path(), 10, 4);
        // The same ids, other values, other shard sizes.
        let companion = code_table_of(b.path(), (0..10).map(|i| (i, [2 * i as u16, 7])), 3);
        let mut s =
            BatchStream::paired(&target, &companion, "train", 3, Cursor::default()).unwrap();
        let mut plain = BatchStream::new(&target, "train", 3, Cursor::default()).unwrap();
        let (rows, other) = s.next_pair(15).unwrap();
        let other = other.unwrap();
        assert_eq!(
            rows,
            plain.next_batch(15).unwrap(),
            "the order is the target's"
        );
        assert_eq!(other.ids, rows.ids);
        for (i, id) in rows.ids.iter().enumerate() {
            assert_eq!(other.values[2 * i], 2 * *id as u16);
        }
        // Rows out of line: named, with both ids.
        let shifted = code_table_of(c.path(), (0..10).map(|i| (i + 1, [0, 0])), 3);
        let mut bad =
            BatchStream::paired(&target, &shifted, "train", 3, Cursor::default()).unwrap();
        let e = bad.next_pair(1).unwrap_err().to_string();
        assert!(e.contains("does not line up") && e.contains("id"), "{e}");
    }
}
