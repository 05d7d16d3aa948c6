//! Masks for masked self-prediction: which positions of a level's input the
//! auxiliary decoder must predict. Drawn on the host from the run's seeded
//! stream, so a resumed run masks exactly like an uninterrupted one.

use serde::{Deserialize, Serialize};

use crate::rng::SplitMix64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaskShape {
    /// Random axis-aligned rectangles (each side 1 to half the image's),
    /// added until the ratio is reached: contiguous holes.
    Rectangles,
    /// Exactly `round(ratio * H * W)` positions, chosen uniformly.
    Positions,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MaskConfig {
    pub shape: MaskShape,
    /// Fraction of positions masked (at least one position always is).
    pub ratio: f64,
}

impl Default for MaskConfig {
    fn default() -> Self {
        MaskConfig {
            shape: MaskShape::Rectangles,
            ratio: 0.5,
        }
    }
}

impl MaskConfig {
    pub fn check(&self) -> Result<(), String> {
        if !(self.ratio > 0.0 && self.ratio <= 1.0) {
            return Err(format!(
                "mask ratio is {}; it must be in (0, 1]",
                self.ratio
            ));
        }
        Ok(())
    }

    /// One H x W mask, row-major, 1.0 where masked.
    pub fn draw(&self, h: usize, w: usize, rng: &mut SplitMix64) -> Vec<f32> {
        let n = h * w;
        let target = ((self.ratio * n as f64).round() as usize).clamp(1, n);
        let mut mask = vec![0f32; n];
        match self.shape {
            MaskShape::Positions => {
                for &i in &rng.permutation(n)[..target] {
                    mask[i] = 1.0;
                }
            }
            MaskShape::Rectangles => {
                let mut masked = 0;
                while masked < target {
                    let rh = 1 + rng.below((h / 2).max(1) as u64) as usize;
                    let rw = 1 + rng.below((w / 2).max(1) as u64) as usize;
                    let top = rng.below((h - rh + 1) as u64) as usize;
                    let left = rng.below((w - rw + 1) as u64) as usize;
                    for y in top..top + rh {
                        for x in left..left + rw {
                            if mask[y * w + x] == 0.0 {
                                mask[y * w + x] = 1.0;
                                masked += 1;
                            }
                        }
                    }
                }
            }
        }
        mask
    }

    /// `batch` masks, (B, 1, H, W) row-major.
    pub fn draw_batch(&self, batch: usize, h: usize, w: usize, rng: &mut SplitMix64) -> Vec<f32> {
        (0..batch).flat_map(|_| self.draw(h, w, rng)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_mask_exactly_the_ratio() {
        let cfg = MaskConfig {
            shape: MaskShape::Positions,
            ratio: 0.25,
        };
        let m = cfg.draw(8, 8, &mut SplitMix64(1));
        assert_eq!(m.iter().filter(|&&x| x == 1.0).count(), 16);
        assert_ne!(m, cfg.draw(8, 8, &mut SplitMix64(2)));
        assert_eq!(m, cfg.draw(8, 8, &mut SplitMix64(1)));
    }

    #[test]
    fn rectangles_reach_the_ratio_with_contiguous_holes() {
        let cfg = MaskConfig::default();
        let mut rng = SplitMix64(4);
        for _ in 0..50 {
            let m = cfg.draw(16, 16, &mut rng);
            let n = m.iter().filter(|&&x| x == 1.0).count();
            // Overshoot is at most one rectangle (8 x 8).
            assert!((128..128 + 64).contains(&n), "{n}");
        }
        let tiny = MaskConfig {
            shape: MaskShape::Rectangles,
            ratio: 0.01,
        };
        assert_eq!(tiny.draw(1, 1, &mut rng), [1.0], "at least one position");
        assert!(MaskConfig { ratio: 0.0, ..cfg }.check().is_err());
    }
}
