//! CIFAR-10 / CIFAR-100 binary batches: fixed-size records of label byte(s)
//! then 3072 bytes of pixels, channel-planar (R plane, G plane, B plane),
//! 32x32. CIFAR-100 records carry a coarse and a fine label; we use the fine.

use std::io::Read;
use std::path::PathBuf;

use super::{Sample, SampleSource, read_full};
use crate::error::{Error, Result};

/// Every CIFAR image is SIDE x SIDE.
pub const SIDE: usize = 32;
const PLANE: usize = SIDE * SIDE;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Variant {
    Cifar10,
    Cifar100,
}

impl Variant {
    fn label_bytes(self) -> usize {
        match self {
            Variant::Cifar10 => 1,
            Variant::Cifar100 => 2,
        }
    }

    pub fn record_bytes(self) -> usize {
        self.label_bytes() + 3 * PLANE
    }
}

pub struct CifarReader {
    variant: Variant,
    files: Vec<(PathBuf, u64)>,
    file_index: usize,
    current: Option<Box<dyn Read + Send>>,
    record_in_file: u64,
    total: u64,
    failed: bool,
}

impl CifarReader {
    pub fn open(variant: Variant, files: &[PathBuf]) -> Result<CifarReader> {
        let rec = variant.record_bytes() as u64;
        let mut list = Vec::new();
        let mut total = 0;
        for f in files {
            let len = std::fs::metadata(f)
                .map_err(|e| Error::io(format!("reading {}", f.display()), e))?
                .len();
            if len == 0 {
                return Err(Error::data(f, None, "file is empty"));
            }
            if len % rec != 0 {
                return Err(Error::data(
                    f,
                    Some(len / rec),
                    format!(
                        "truncated: {len} bytes is not a whole number of {rec}-byte {} records",
                        if variant == Variant::Cifar10 {
                            "CIFAR-10"
                        } else {
                            "CIFAR-100"
                        }
                    ),
                ));
            }
            total += len / rec;
            list.push((f.clone(), len / rec));
        }
        Ok(CifarReader {
            variant,
            files: list,
            file_index: 0,
            current: None,
            record_in_file: 0,
            total,
            failed: false,
        })
    }
}

impl Iterator for CifarReader {
    type Item = Result<Sample>;

    fn next(&mut self) -> Option<Result<Sample>> {
        if self.failed {
            return None;
        }
        loop {
            let (path, count) = self.files.get(self.file_index)?.clone();
            if self.record_in_file >= count {
                self.file_index += 1;
                self.record_in_file = 0;
                self.current = None;
                continue;
            }
            if self.current.is_none() {
                match std::fs::File::open(&path) {
                    Ok(f) => {
                        self.current = Some(Box::new(std::io::BufReader::with_capacity(1 << 16, f)))
                    }
                    Err(e) => {
                        self.failed = true;
                        return Some(Err(Error::io(format!("opening {}", path.display()), e)));
                    }
                }
            }
            let mut rec = vec![0u8; self.variant.record_bytes()];
            let r = self
                .current
                .as_mut()
                .map(|c| read_full(c.as_mut(), &mut rec));
            let i = self.record_in_file;
            self.record_in_file += 1;
            match r {
                Some(Ok(n)) if n == rec.len() => {}
                other => {
                    self.failed = true;
                    let why = match other {
                        Some(Err(e)) => format!("cannot read: {e}"),
                        _ => "truncated record".into(),
                    };
                    return Some(Err(Error::data(&path, Some(i), why)));
                }
            }
            let lb = self.variant.label_bytes();
            let label = rec[lb - 1] as i64;
            let planes = &rec[lb..];
            let mut pixels = vec![0u8; 3 * PLANE];
            for p in 0..PLANE {
                for c in 0..3 {
                    pixels[p * 3 + c] = planes[c * PLANE + p];
                }
            }
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            return Some(Ok(Sample {
                pixels,
                height: SIDE as u32,
                width: SIDE as u32,
                channels: 3,
                label,
                source_id: format!("{name}#{i}"),
            }));
        }
    }
}

impl SampleSource for CifarReader {
    fn len_hint(&self) -> u64 {
        self.total
    }
}

pub const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// Encodes samples as a CIFAR binary batch; for tests and fixtures.
pub fn encode_batch(variant: Variant, samples: &[(Vec<u8>, u8)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (hwc, label) in samples {
        if variant == Variant::Cifar100 {
            out.push(label / 5); // coarse label: any value, unused
        }
        out.push(*label);
        for c in 0..3 {
            for p in 0..PLANE {
                out.push(hwc[p * 3 + c]);
            }
        }
    }
    out
}
