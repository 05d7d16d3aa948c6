//! MNIST-style IDX files (MNIST, Fashion-MNIST, KMNIST), gzipped or not:
//! an images file (magic 0x00000803: count, rows, cols, then uint8 pixels)
//! and a labels file (magic 0x00000801: count, then uint8 labels).

use std::io::Read;
use std::path::{Path, PathBuf};

use super::{Sample, SampleSource, open_maybe_gz, read_full};
use crate::error::{Error, Result};

const IMAGES_MAGIC: u32 = 0x0000_0803;
const LABELS_MAGIC: u32 = 0x0000_0801;

pub struct IdxReader {
    images: Box<dyn Read + Send>,
    images_path: PathBuf,
    labels: Vec<u8>,
    name: String,
    height: u32,
    width: u32,
    next: u64,
    count: u64,
}

fn read_header(r: &mut dyn Read, path: &Path, want: u32, dims: usize) -> Result<Vec<u32>> {
    let mut buf = vec![0u8; 4 * (1 + dims)];
    let got =
        read_full(r, &mut buf).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    if got < 4 {
        return Err(Error::data(
            path,
            None,
            "file is empty or truncated before its header",
        ));
    }
    let magic = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if magic != want {
        let what = if want == IMAGES_MAGIC {
            "an IDX images file"
        } else {
            "an IDX labels file"
        };
        return Err(Error::data(
            path,
            None,
            format!(
                "wrong magic number 0x{magic:08x} (want 0x{want:08x} for {what}); is this the right file?"
            ),
        ));
    }
    if got < buf.len() {
        return Err(Error::data(
            path,
            None,
            "file is truncated inside its header",
        ));
    }
    Ok((0..dims)
        .map(|i| {
            let o = 4 + 4 * i;
            u32::from_be_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]])
        })
        .collect())
}

impl IdxReader {
    pub fn open(images: &Path, labels: &Path) -> Result<IdxReader> {
        let mut lr = open_maybe_gz(labels)?;
        let ldims = read_header(&mut lr, labels, LABELS_MAGIC, 1)?;
        let mut label_bytes = Vec::with_capacity(ldims[0] as usize);
        lr.read_to_end(&mut label_bytes)
            .map_err(|e| Error::io(format!("reading {}", labels.display()), e))?;
        if (label_bytes.len() as u64) < ldims[0] as u64 {
            return Err(Error::data(
                labels,
                Some(label_bytes.len() as u64),
                format!(
                    "truncated: the header says {} labels, the file holds {}",
                    ldims[0],
                    label_bytes.len()
                ),
            ));
        }
        label_bytes.truncate(ldims[0] as usize);
        let mut ir = open_maybe_gz(images)?;
        let idims = read_header(&mut ir, images, IMAGES_MAGIC, 3)?;
        if idims[0] != ldims[0] {
            return Err(Error::data(
                images,
                None,
                format!(
                    "{} images but {} labels in {}; the two files do not belong together",
                    idims[0],
                    ldims[0],
                    labels.display()
                ),
            ));
        }
        if idims[1] == 0 || idims[2] == 0 || idims[1] > 4096 || idims[2] > 4096 {
            return Err(Error::data(
                images,
                None,
                format!("implausible image size {}x{}", idims[1], idims[2]),
            ));
        }
        Ok(IdxReader {
            images: ir,
            name: images
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default(),
            images_path: images.to_path_buf(),
            labels: label_bytes,
            height: idims[1],
            width: idims[2],
            next: 0,
            count: idims[0] as u64,
        })
    }
}

impl Iterator for IdxReader {
    type Item = Result<Sample>;

    fn next(&mut self) -> Option<Result<Sample>> {
        if self.next >= self.count {
            return None;
        }
        let i = self.next;
        self.next += 1;
        let mut pixels = vec![0u8; (self.height * self.width) as usize];
        match read_full(&mut self.images, &mut pixels) {
            Ok(n) if n == pixels.len() => {}
            Ok(n) => {
                self.next = self.count;
                return Some(Err(Error::data(
                    &self.images_path,
                    Some(i),
                    format!(
                        "truncated: {n} of {} pixel bytes; the header promises {} images",
                        pixels.len(),
                        self.count
                    ),
                )));
            }
            Err(e) => {
                self.next = self.count;
                return Some(Err(Error::data(
                    &self.images_path,
                    Some(i),
                    format!("cannot read: {e}"),
                )));
            }
        }
        Some(Ok(Sample {
            pixels,
            height: self.height,
            width: self.width,
            channels: 1,
            label: self.labels[i as usize] as i64,
            source_id: format!("{}#{i}", self.name),
        }))
    }
}

impl SampleSource for IdxReader {
    fn len_hint(&self) -> u64 {
        self.count
    }
}

/// Writes an IDX pair (uncompressed); for tests and fixtures.
pub fn write_idx(
    images: &Path,
    labels: &Path,
    h: u32,
    w: u32,
    samples: &[(Vec<u8>, u8)],
) -> std::io::Result<()> {
    let mut img = Vec::new();
    img.extend(IMAGES_MAGIC.to_be_bytes());
    img.extend((samples.len() as u32).to_be_bytes());
    img.extend(h.to_be_bytes());
    img.extend(w.to_be_bytes());
    let mut lab = Vec::new();
    lab.extend(LABELS_MAGIC.to_be_bytes());
    lab.extend((samples.len() as u32).to_be_bytes());
    for (p, l) in samples {
        img.extend(p);
        lab.push(*l);
    }
    std::fs::write(images, img)?;
    std::fs::write(labels, lab)
}
