//! PNG grids of images (table layout: HWC bytes per image), for a person to
//! look at: reconstructions now, samples later.

use std::path::Path;

use crate::error::{Error, Result};

/// Writes `images` (each `h*w*c` values 0..=255, HWC) as a grid of
/// `columns` per row with a 2-pixel gap, grey (1 channel) or RGB (3).
pub fn write_grid(
    path: &Path,
    images: &[&[u16]],
    (h, w, c): (usize, usize, usize),
    columns: usize,
) -> Result<()> {
    let gap = 2;
    let columns = columns.clamp(1, images.len().max(1));
    let rows = images.len().div_ceil(columns);
    let (gw, gh) = (columns * (w + gap) + gap, rows * (h + gap) + gap);
    let out_c = if c == 1 { 1 } else { 3 };
    let mut canvas = vec![255u8; gw * gh * out_c];
    for (n, img) in images.iter().enumerate() {
        let (oy, ox) = (
            (n / columns) * (h + gap) + gap,
            (n % columns) * (w + gap) + gap,
        );
        for y in 0..h {
            for x in 0..w {
                for ch in 0..out_c {
                    let v = img[(y * w + x) * c + ch.min(c - 1)].min(255) as u8;
                    canvas[((oy + y) * gw + ox + x) * out_c + ch] = v;
                }
            }
        }
    }
    save_png(path, &canvas, (gh, gw, out_c))
}

/// Writes one image (`h*w*c` values 0..=255, HWC; c 1 or 3) as a PNG.
pub fn write_image(path: &Path, image: &[u16], (h, w, c): (usize, usize, usize)) -> Result<()> {
    let bytes: Vec<u8> = image.iter().map(|&v| v.min(255) as u8).collect();
    save_png(path, &bytes, (h, w, c))
}

fn save_png(path: &Path, bytes: &[u8], (h, w, c): (usize, usize, usize)) -> Result<()> {
    let color = if c == 1 {
        image::ExtendedColorType::L8
    } else {
        image::ExtendedColorType::Rgb8
    };
    image::save_buffer(path, bytes, w as u32, h as u32, color).map_err(|e| Error::Image {
        context: format!("writing {}", path.display()),
        source: e,
    })
}
