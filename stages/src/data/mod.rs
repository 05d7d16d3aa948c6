//! Image data: readers for the source formats, transforms, and the Parquet
//! image tables every later stage reads.
//!
//! A reader yields [`Sample`]s one at a time in a fixed order, so that a
//! preprocess of a large source holds one shard, not the data set, in memory.

pub mod cifar;
pub mod code_table;
pub mod fetch;
pub mod folder;
pub mod grid;
pub mod hub_parquet;
pub mod idx;
pub mod layout;
pub mod level_table;
pub mod parquet_read;
pub mod prefetch;
pub mod row_source;
pub mod shuffle;
pub mod table;
pub mod transform;

use crate::error::Result;

/// One image, HWC uint8, with its label and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub pixels: Vec<u8>,
    pub height: u32,
    pub width: u32,
    /// 1 (grayscale) or 3 (RGB).
    pub channels: u32,
    pub label: i64,
    /// e.g. `train-images-idx3-ubyte.gz#17`
    pub source_id: String,
}

/// A source of samples with a known count (used for exact, seeded splits).
pub trait SampleSource: Iterator<Item = Result<Sample>> + Send {
    fn len_hint(&self) -> u64;
}

/// Reads all of a file, transparently gunzipping it when it starts with the gzip magic.
pub(crate) fn open_maybe_gz(path: &std::path::Path) -> Result<Box<dyn std::io::Read + Send>> {
    use std::io::{BufReader, Read, Seek};
    let mut f = std::fs::File::open(path)
        .map_err(|e| crate::error::Error::io(format!("opening {}", path.display()), e))?;
    let mut magic = [0u8; 2];
    let n = f
        .read(&mut magic)
        .map_err(|e| crate::error::Error::io(format!("reading {}", path.display()), e))?;
    f.rewind()
        .map_err(|e| crate::error::Error::io(format!("reading {}", path.display()), e))?;
    if n == 2 && magic == [0x1f, 0x8b] {
        Ok(Box::new(BufReader::with_capacity(
            1 << 16,
            flate2::read::GzDecoder::new(BufReader::new(f)),
        )))
    } else {
        Ok(Box::new(BufReader::with_capacity(1 << 16, f)))
    }
}

/// Fills `buf` completely, or reports how many bytes there were.
pub(crate) fn read_full(r: &mut dyn std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}
