//! Rows read a shard at a time: a split of a table, of which memory holds
//! one shard whatever the split's size, or rows already in memory (one
//! shard). What `evaluate`'s classifiers train and are tested on, so that
//! an evaluation at ImageNet size never holds a split.

use std::borrow::Cow;

use super::level_table::{LevelTable, Rows};
use crate::error::{Error, Result};

pub enum RowSource<'a> {
    Held(&'a Rows),
    Split {
        table: &'a LevelTable,
        split: &'a str,
        /// Rows of each shard, from the Parquet footers.
        shard_rows: Vec<u64>,
    },
}

impl<'a> RowSource<'a> {
    /// A split of `table`; reads the shards' footers only.
    pub fn split(table: &'a LevelTable, split: &'a str) -> Result<Self> {
        Ok(RowSource::Split {
            table,
            split,
            shard_rows: table.shard_rows(split)?,
        })
    }

    pub fn len(&self) -> usize {
        match self {
            RowSource::Held(rows) => rows.len(),
            RowSource::Split { shard_rows, .. } => shard_rows.iter().sum::<u64>() as usize,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn shards(&self) -> usize {
        match self {
            RowSource::Held(_) => 1,
            RowSource::Split { shard_rows, .. } => shard_rows.len(),
        }
    }

    /// Shard `i`'s rows in table order, checked to be as many as its
    /// footer says.
    pub fn shard(&self, i: usize) -> Result<Cow<'_, Rows>> {
        match self {
            RowSource::Held(rows) => Ok(Cow::Borrowed(*rows)),
            RowSource::Split {
                table,
                split,
                shard_rows,
            } => {
                let file = &table.split(split)?.files[i];
                let rows = table.read_shard(file)?;
                if rows.len() as u64 != shard_rows[i] {
                    return Err(Error::data(
                        table.dir.join(file),
                        None,
                        format!(
                            "holds {} rows, its footer says {}",
                            rows.len(),
                            shard_rows[i]
                        ),
                    ));
                }
                Ok(Cow::Owned(rows))
            }
        }
    }

    /// Every row's label, in table order (one pass, a shard at a time).
    pub fn labels(&self) -> Result<Vec<i32>> {
        let mut labels = Vec::with_capacity(self.len());
        for i in 0..self.shards() {
            labels.extend_from_slice(&self.shard(i)?.labels);
        }
        Ok(labels)
    }

    /// The rows at `positions` (in table order, any order and repeats
    /// allowed), in the order given. Reads only the shards they lie in.
    pub fn rows_at(&self, positions: &[usize]) -> Result<Rows> {
        let mut ascending: Vec<u64> = positions.iter().map(|&p| p as u64).collect();
        ascending.sort_unstable();
        ascending.dedup();
        let (found, per) = match self {
            RowSource::Held(rows) => {
                let per = rows.values.len() / rows.len().max(1);
                let mut found = Rows::default();
                for &p in &ascending {
                    if p as usize >= rows.len() {
                        return Err(Error::Params(format!(
                            "row {p} asked of {} rows",
                            rows.len()
                        )));
                    }
                    found.push_row(rows, p as usize, per);
                }
                (found, per)
            }
            RowSource::Split { table, split, .. } => (
                table.read_positions(split, &ascending)?,
                table.values_per_row,
            ),
        };
        let mut out = Rows::default();
        for &p in positions {
            // Present: `ascending` holds every position and `found` its rows.
            let Ok(i) = ascending.binary_search(&(p as u64)) else {
                unreachable!("every position was read")
            };
            out.push_row(&found, i, per);
        }
        Ok(out)
    }
}

/// Writes an image table of grayscale `height` x `width` images (`rows`:
/// label and pixels, ids their positions) as split `train` in shards of
/// `shard` rows, with classes `c0`, `c1`, ...; opens it.
#[cfg(test)]
pub(crate) fn write_test_table(
    dir: &std::path::Path,
    (height, width): (u32, u32),
    classes: usize,
    rows: &[(i64, Vec<u8>)],
    shard: usize,
) -> LevelTable {
    use crate::data::Sample;
    use crate::data::table::{ShardWriter, TABLE_FORMAT, TableIndex, TableMeta};
    let meta = TableMeta {
        height,
        width,
        channels: 1,
        channel_order: "L".into(),
        class_names: (0..classes).map(|c| format!("c{c}")).collect(),
    };
    let mut w = ShardWriter::new(dir, "train", &meta, shard);
    for (i, (label, pixels)) in rows.iter().enumerate() {
        let s = Sample {
            pixels: pixels.clone(),
            height,
            width,
            channels: 1,
            label: *label,
            source_id: format!("#{i}"),
        };
        w.push(i as i64, &s).unwrap();
    }
    let index = TableIndex {
        format: TABLE_FORMAT.into(),
        meta,
        splits: [("train".to_string(), w.finish().unwrap())].into(),
    };
    std::fs::write(dir.join("table.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    LevelTable::open(dir).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_split_reads_a_shard_at_a_time_and_rows_come_back_in_the_order_asked() {
        let dir = tempfile::tempdir().unwrap();
        let rows: Vec<_> = (0..25).map(|i| (i % 3, vec![i as u8])).collect();
        let t = write_test_table(dir.path(), (1, 1), 3, &rows, 10);
        let s = RowSource::split(&t, "train").unwrap();
        assert_eq!((s.len(), s.shards()), (25, 3));
        assert_eq!(s.shard(2).unwrap().values, vec![20, 21, 22, 23, 24]);
        assert_eq!(s.labels().unwrap()[..4], [0, 1, 2, 0]);
        let picked = s.rows_at(&[17, 3, 24, 3]).unwrap();
        assert_eq!(picked.values, vec![17, 3, 24, 3]);
        assert_eq!(picked.ids, vec![17, 3, 24, 3]);
        let held = s.rows_at(&(0..25).collect::<Vec<_>>()).unwrap();
        let h = RowSource::Held(&held);
        assert_eq!(h.rows_at(&[17, 3]).unwrap(), picked.range(0, 2, 1));
        assert!(s.rows_at(&[25]).is_err());
        assert!(h.rows_at(&[25]).is_err());
    }
}
