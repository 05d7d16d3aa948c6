//! An ImageFolder tree (the ImageNet layout): one sub-folder per class, the
//! class index is the position of its folder name in sorted order. PNG and
//! JPEG files, decoded with the `image` crate.

use std::path::{Path, PathBuf};

use super::{Sample, SampleSource};
use crate::error::{Error, Result};

pub struct FolderReader {
    files: Vec<(PathBuf, i64)>,
    next: usize,
    rgb: bool,
    pub classes: Vec<String>,
    root: PathBuf,
}

fn is_image(p: &Path) -> bool {
    matches!(
        p.extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
            .as_deref(),
        Some("png" | "jpg" | "jpeg")
    )
}

impl FolderReader {
    /// `rgb`: decode to RGB (else grayscale).
    pub fn open(root: &Path, rgb: bool) -> Result<FolderReader> {
        let rd = std::fs::read_dir(root)
            .map_err(|e| Error::io(format!("listing {}", root.display()), e))?;
        let mut classes: Vec<String> = Vec::new();
        for e in rd {
            let e = e.map_err(|e| Error::io(format!("listing {}", root.display()), e))?;
            if e.path().is_dir() {
                classes.push(e.file_name().to_string_lossy().to_string());
            }
        }
        classes.sort();
        if classes.is_empty() {
            return Err(Error::data(
                root,
                None,
                "no class folders: an ImageFolder source needs one sub-folder per class",
            ));
        }
        let mut files = Vec::new();
        for (label, class) in classes.iter().enumerate() {
            let dir = root.join(class);
            let mut imgs: Vec<PathBuf> = std::fs::read_dir(&dir)
                .map_err(|e| Error::io(format!("listing {}", dir.display()), e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && is_image(p))
                .collect();
            if imgs.is_empty() {
                return Err(Error::data(
                    &dir,
                    None,
                    "class folder holds no .png/.jpg/.jpeg images; remove it or add images",
                ));
            }
            imgs.sort();
            files.extend(imgs.into_iter().map(|p| (p, label as i64)));
        }
        Ok(FolderReader {
            files,
            next: 0,
            rgb,
            classes,
            root: root.to_path_buf(),
        })
    }
}

/// Decodes encoded image bytes to HWC uint8 (gray or RGB).
pub fn decode(bytes: &[u8], rgb: bool) -> std::result::Result<(Vec<u8>, u32, u32, u32), String> {
    let img = image::load_from_memory(bytes).map_err(|e| format!("cannot decode image: {e}"))?;
    Ok(if rgb {
        let i = img.to_rgb8();
        let (w, h) = i.dimensions();
        (i.into_raw(), h, w, 3)
    } else {
        let i = img.to_luma8();
        let (w, h) = i.dimensions();
        (i.into_raw(), h, w, 1)
    })
}

impl Iterator for FolderReader {
    type Item = Result<Sample>;

    fn next(&mut self) -> Option<Result<Sample>> {
        let (path, label) = self.files.get(self.next)?.clone();
        let i = self.next as u64;
        self.next += 1;
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) => return Some(Err(Error::io(format!("reading {}", path.display()), e))),
        };
        let (pixels, height, width, channels) = match decode(&bytes, self.rgb) {
            Ok(d) => d,
            Err(m) => {
                self.next = self.files.len();
                return Some(Err(Error::data(&path, Some(i), m)));
            }
        };
        let rel = path
            .strip_prefix(&self.root)
            .unwrap_or(&path)
            .display()
            .to_string();
        Some(Ok(Sample {
            pixels,
            height,
            width,
            channels,
            label,
            source_id: rel,
        }))
    }
}

impl SampleSource for FolderReader {
    fn len_hint(&self) -> u64 {
        self.files.len() as u64
    }
}
