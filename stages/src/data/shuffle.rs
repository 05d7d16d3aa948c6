//! A global, seeded shuffle of the rows a table is written from, in
//! bounded memory: a class-sorted source (an ImageFolder is class by
//! class) must not give shards, and so batches, of a few classes.
//!
//! Each split's rows get the positions of a seeded permutation of
//! `0..rows`; pass 1 appends every row to the spill file of the shard its
//! position falls in (one file per destination shard, in a folder the
//! caller names); pass 2 reads one spill file at a time back, puts its
//! rows in position order and hands them on. Memory holds the permutation
//! (8 bytes a row) and one shard's rows; disk holds the spilled rows once.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use super::Sample;
use crate::error::{Error, Result};
use crate::rng::SplitMix64;

/// Rows of every split in flight between pass 1 and pass 2.
pub struct Spill {
    dir: PathBuf,
    shard_rows: u64,
    seed: u64,
    /// In order of first appearance.
    splits: Vec<SplitSpill>,
}

struct SplitSpill {
    name: String,
    positions: Vec<u64>,
    added: usize,
    buckets: Vec<Option<BufWriter<File>>>,
}

impl Spill {
    /// Spills under `dir` (created; removed by [`Spill::drain`]).
    pub fn new(dir: &Path, shard_rows: usize, seed: u64) -> Result<Spill> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        Ok(Spill {
            dir: dir.to_path_buf(),
            shard_rows: shard_rows.max(1) as u64,
            seed,
            splits: Vec::new(),
        })
    }

    /// Declares that `split` will get `rows` rows (before its first
    /// [`Spill::add`]).
    pub fn expect(&mut self, split: &str, rows: u64) {
        let mut positions: Vec<u64> = (0..rows).collect();
        SplitMix64::stream(self.seed, &format!("table rows/{split}")).shuffle(&mut positions);
        let buckets = rows.div_ceil(self.shard_rows) as usize;
        self.splits.push(SplitSpill {
            name: split.to_string(),
            positions,
            added: 0,
            buckets: (0..buckets).map(|_| None).collect(),
        });
    }

    /// Pass 1: one row of `split`.
    pub fn add(&mut self, split: &str, s: &Sample) -> Result<()> {
        let Some(sp) = self.splits.iter_mut().find(|sp| sp.name == split) else {
            return Err(Error::Params(format!(
                "internal: split `{split}` was not declared to the shuffle"
            )));
        };
        let Some(&pos) = sp.positions.get(sp.added) else {
            return Err(Error::Params(format!(
                "the source gave more than the {} rows it counted for split `{split}`; is a file being written while it is read?",
                sp.positions.len()
            )));
        };
        sp.added += 1;
        let bucket = (pos / self.shard_rows) as usize;
        let path = bucket_path(&self.dir, split, bucket);
        let w = match &mut sp.buckets[bucket] {
            Some(w) => w,
            slot => {
                let f = File::create(&path)
                    .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
                slot.insert(BufWriter::new(f))
            }
        };
        write_record(w, pos, s).map_err(|e| Error::io(format!("writing {}", path.display()), e))
    }

    /// Pass 2: every row, split by split in order of first appearance and
    /// within a split in shuffled order, to `f`; then removes the spill.
    pub fn drain(mut self, mut f: impl FnMut(&str, Sample) -> Result<()>) -> Result<()> {
        for sp in &mut self.splits {
            for (bucket, w) in sp.buckets.iter_mut().enumerate() {
                let Some(w) = w.take() else { continue };
                let path = bucket_path(&self.dir, &sp.name, bucket);
                w.into_inner().map_err(|e| {
                    Error::io(format!("writing {}", path.display()), e.into_error())
                })?;
                let mut rows = read_records(&path)?;
                rows.sort_by_key(|(pos, _)| *pos);
                std::fs::remove_file(&path)
                    .map_err(|e| Error::io(format!("removing {}", path.display()), e))?;
                for (_, s) in rows {
                    f(&sp.name, s)?;
                }
            }
        }
        std::fs::remove_dir_all(&self.dir)
            .map_err(|e| Error::io(format!("removing {}", self.dir.display()), e))
    }
}

fn bucket_path(dir: &Path, split: &str, bucket: usize) -> PathBuf {
    dir.join(format!("{split}-{bucket:06}.rows"))
}

fn write_record(w: &mut impl Write, pos: u64, s: &Sample) -> std::io::Result<()> {
    w.write_all(&pos.to_le_bytes())?;
    w.write_all(&s.label.to_le_bytes())?;
    for v in [s.height, s.width, s.channels] {
        w.write_all(&v.to_le_bytes())?;
    }
    for bytes in [s.source_id.as_bytes(), &s.pixels] {
        w.write_all(&(bytes.len() as u64).to_le_bytes())?;
        w.write_all(bytes)?;
    }
    Ok(())
}

fn read_records(path: &Path) -> Result<Vec<(u64, Sample)>> {
    let err = |e| Error::io(format!("reading {}", path.display()), e);
    let mut r = BufReader::new(File::open(path).map_err(err)?);
    let mut out = Vec::new();
    loop {
        let mut first = [0u8; 8];
        match r.read_exact(&mut first) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(err(e)),
        }
        let pos = u64::from_le_bytes(first);
        let label = i64::from_le_bytes(read_array(&mut r).map_err(err)?);
        let [height, width, channels] = [(); 3].map(|_| read_array(&mut r).map(u32::from_le_bytes));
        let source_id = String::from_utf8(read_bytes(&mut r).map_err(err)?)
            .map_err(|_| Error::Params(format!("{}: a source id is not UTF-8", path.display())))?;
        let pixels = read_bytes(&mut r).map_err(err)?;
        out.push((
            pos,
            Sample {
                pixels,
                height: height.map_err(err)?,
                width: width.map_err(err)?,
                channels: channels.map_err(err)?,
                label,
                source_id,
            },
        ));
    }
    Ok(out)
}

fn read_array<const N: usize>(r: &mut impl Read) -> std::io::Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
}

fn read_bytes(r: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let n = u64::from_le_bytes(read_array(r)?);
    let mut b = Vec::new();
    r.take(n).read_to_end(&mut b)?;
    if b.len() as u64 != n {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(i: u64) -> Sample {
        Sample {
            pixels: vec![i as u8; 4],
            height: 2,
            width: 2,
            channels: 1,
            label: (i / 10) as i64,
            source_id: format!("src#{i}"),
        }
    }

    /// Every row comes back once, in an order that is a seeded shuffle
    /// over the whole split, not within one shard.
    #[test]
    fn rows_come_back_once_shuffled_across_shards() {
        let dir = tempfile::tempdir().unwrap();
        let order = |seed| {
            let mut spill = Spill::new(&dir.path().join("spill"), 7, seed).unwrap();
            spill.expect("train", 50);
            for i in 0..50 {
                spill.add("train", &sample(i)).unwrap();
            }
            let mut got = Vec::new();
            spill
                .drain(|split, s| {
                    assert_eq!(split, "train");
                    got.push(
                        s.source_id
                            .trim_start_matches("src#")
                            .parse::<u64>()
                            .unwrap(),
                    );
                    Ok(())
                })
                .unwrap();
            assert!(!dir.path().join("spill").exists(), "spill removed");
            got
        };
        let a = order(0);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_eq!(a, order(0), "seeded");
        assert_ne!(a, order(1));
        // The first shard's 7 rows come from across the source, not from
        // its first 7 rows.
        assert!(a[..7].iter().any(|&i| i >= 25), "{a:?}");
    }

    #[test]
    fn more_rows_than_declared_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut spill = Spill::new(dir.path(), 4, 0).unwrap();
        spill.expect("test", 1);
        spill.add("test", &sample(0)).unwrap();
        let e = spill.add("test", &sample(1)).unwrap_err().to_string();
        assert!(e.contains("more than the 1 rows"), "{e}");
    }
}
