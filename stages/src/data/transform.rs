//! Image transforms applied by `preprocess`, in this order: colour
//! conversion, resize (shorter side), centre crop, pad.

use serde::{Deserialize, Serialize};

use super::Sample;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Color {
    Gray,
    Rgb,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Transforms {
    /// Convert to this colour mode (default: keep the source's).
    pub color: Option<Color>,
    /// Resize so that the shorter side has this many pixels (bilinear).
    pub resize: Option<u32>,
    /// Centre crop to a square of this side.
    pub crop: Option<u32>,
    /// Zero pixels added on every side (e.g. 2 turns 28x28 into 32x32).
    pub pad: Option<u32>,
}

impl Transforms {
    pub fn apply(&self, mut s: Sample) -> Result<Sample, String> {
        if let Some(c) = self.color {
            s = convert(s, c);
        }
        if let Some(side) = self.resize {
            s = resize_shorter(s, side)?;
        }
        if let Some(side) = self.crop {
            s = crop_center(s, side)?;
        }
        if let Some(p) = self.pad {
            s = pad(s, p);
        }
        Ok(s)
    }
}

fn convert(s: Sample, to: Color) -> Sample {
    match (s.channels, to) {
        (1, Color::Rgb) => Sample {
            pixels: s.pixels.iter().flat_map(|&v| [v, v, v]).collect(),
            channels: 3,
            ..s
        },
        (3, Color::Gray) => Sample {
            // ITU-R BT.601 luma, the same weights as image's to_luma8.
            pixels: s
                .pixels
                .chunks_exact(3)
                .map(|p| {
                    let y = 0.299 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32;
                    y.round().clamp(0.0, 255.0) as u8
                })
                .collect(),
            channels: 1,
            ..s
        },
        _ => s,
    }
}

fn resize_shorter(s: Sample, side: u32) -> Result<Sample, String> {
    if side == 0 {
        return Err("resize must be at least 1".into());
    }
    let short = s.height.min(s.width);
    if short == side {
        return Ok(s);
    }
    let (nh, nw) = if s.height <= s.width {
        (
            side,
            ((s.width as u64 * side as u64 + short as u64 / 2) / short as u64).max(1) as u32,
        )
    } else {
        (
            ((s.height as u64 * side as u64 + short as u64 / 2) / short as u64).max(1) as u32,
            side,
        )
    };
    let filter = image::imageops::FilterType::Triangle;
    let pixels = if s.channels == 1 {
        let img =
            image::GrayImage::from_raw(s.width, s.height, s.pixels).ok_or("bad image buffer")?;
        image::imageops::resize(&img, nw, nh, filter).into_raw()
    } else {
        let img =
            image::RgbImage::from_raw(s.width, s.height, s.pixels).ok_or("bad image buffer")?;
        image::imageops::resize(&img, nw, nh, filter).into_raw()
    };
    Ok(Sample {
        pixels,
        height: nh,
        width: nw,
        ..s
    })
}

fn crop_center(s: Sample, side: u32) -> Result<Sample, String> {
    if side > s.height || side > s.width {
        return Err(format!(
            "cannot crop {side}x{side} from a {}x{} image; resize first or crop less",
            s.height, s.width
        ));
    }
    let top = (s.height - side) / 2;
    let left = (s.width - side) / 2;
    let c = s.channels as usize;
    let mut pixels = Vec::with_capacity((side * side) as usize * c);
    for y in top..top + side {
        let start = ((y * s.width + left) as usize) * c;
        pixels.extend_from_slice(&s.pixels[start..start + side as usize * c]);
    }
    Ok(Sample {
        pixels,
        height: side,
        width: side,
        ..s
    })
}

fn pad(s: Sample, p: u32) -> Sample {
    let c = s.channels as usize;
    let (nh, nw) = (s.height + 2 * p, s.width + 2 * p);
    let mut pixels = vec![0u8; (nh * nw) as usize * c];
    for y in 0..s.height {
        let src = (y * s.width) as usize * c;
        let dst = (((y + p) * nw + p) as usize) * c;
        pixels[dst..dst + s.width as usize * c]
            .copy_from_slice(&s.pixels[src..src + s.width as usize * c]);
    }
    Sample {
        pixels,
        height: nh,
        width: nw,
        ..s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(h: u32, w: u32, c: u32) -> Sample {
        Sample {
            pixels: (0..h * w * c).map(|v| (v % 251) as u8).collect(),
            height: h,
            width: w,
            channels: c,
            label: 0,
            source_id: "t".into(),
        }
    }

    #[test]
    fn pad_then_crop_gives_back_the_image() {
        let s = sample(28, 28, 1);
        let t = Transforms {
            pad: Some(2),
            ..Default::default()
        }
        .apply(s.clone())
        .unwrap();
        assert_eq!((t.height, t.width), (32, 32));
        assert_eq!(t.pixels[0], 0);
        assert_eq!(t.pixels[(2 * 32 + 2) as usize], s.pixels[0]);
        let back = Transforms {
            crop: Some(28),
            ..Default::default()
        }
        .apply(t)
        .unwrap();
        assert_eq!(back.pixels, s.pixels);
    }

    #[test]
    fn resize_keeps_aspect_and_crop_centres() {
        let s = sample(40, 80, 3);
        let t = Transforms {
            resize: Some(20),
            crop: Some(20),
            ..Default::default()
        }
        .apply(s)
        .unwrap();
        assert_eq!((t.height, t.width, t.channels), (20, 20, 3));
        assert_eq!(t.pixels.len(), 20 * 20 * 3);
        let e = Transforms {
            crop: Some(50),
            ..Default::default()
        }
        .apply(sample(40, 40, 1))
        .unwrap_err();
        assert!(e.contains("cannot crop 50x50"));
    }

    #[test]
    fn gray_and_rgb_convert() {
        let g = sample(2, 2, 1);
        let rgb = convert(g.clone(), Color::Rgb);
        assert_eq!(rgb.pixels.len(), 12);
        assert_eq!(convert(rgb, Color::Gray).pixels, g.pixels);
    }
}
