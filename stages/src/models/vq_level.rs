//! One VQ level as a whole: encoder, quantiser and auxiliary decoder, the
//! tensors a batch of table rows becomes, the training loss, encoding, and
//! the files of a trained level (`model.safetensors`, `aux_decoder.safetensors`,
//! `level.json`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::data::level_table::InputKind;
use crate::data::level_table::{LevelTable, Rows};
use crate::error::{Error, Result};
use crate::models::aux_decoder::{
    AuxDecoder, AuxDecoderConfig, AuxKind, PixelLoss, class_argmax, cross_entropy_loss, mse_loss,
    output_layout,
};
use crate::models::encoder::{Encoder, EncoderConfig};
use crate::models::precision::Precision;
use crate::models::quantiser::{Quantiser, QuantiserConfig};
use crate::models::vars::SeededVars;
use crate::rng::SplitMix64;

pub const LEVEL_FORMAT: &str = "haic vq level v1";

/// The architecture of a level (the part of `train_vq`'s params that a
/// trained level must remember to be rebuilt).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LevelConfig {
    #[serde(default)]
    pub encoder: EncoderConfig,
    #[serde(default)]
    pub quantiser: QuantiserConfig,
    #[serde(default)]
    pub decoder: AuxDecoderConfig,
}

/// One measured training step the VQ memory estimate scales from: an
/// H200, imagenet128.yaml's vq1 (encoder and `ff` decoder of hidden 128,
/// on 128x128 pixels) at batch 64 with candle's own convolutions, peak
/// nvidia-smi MiB in f32 and in bf16 (docs/benchmarks.md, second run).
const MEASURED_STEP: (usize, usize, usize) = (128 + 128, 128 * 128, 64);
const MEASURED_MIB_F32: f64 = 40_881.0;
const MEASURED_MIB_BF16: f64 = 11_377.0;

impl LevelConfig {
    /// The GPU memory of a training step, in bytes an image, on the
    /// input's `positions`: the encoder's and decoder's layers nearest the
    /// input, which run at the input's resolution and hold the largest
    /// activations and im2col buffers, grow as positions times the sum of
    /// `encoder.hidden` and `decoder.hidden`. Scaled from one measured step ([`MEASURED_STEP`],
    /// its whole peak counted per image, which errs high); residual blocks,
    /// which run at the code map's resolution, are not counted, and other
    /// shapes are an extrapolation.
    pub fn gpu_bytes_per_image(&self, positions: usize, precision: Precision) -> f64 {
        let (width, measured_positions, batch) = MEASURED_STEP;
        let mib = match precision {
            Precision::F32 => MEASURED_MIB_F32,
            Precision::Bf16 => MEASURED_MIB_BF16,
        };
        let per_unit =
            mib * (1u64 << 20) as f64 / batch as f64 / (measured_positions * width) as f64;
        per_unit * (positions * (self.encoder.hidden + self.decoder.hidden)) as f64
    }
}

/// `level.json`: what a trained level reads and writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LevelInfo {
    pub format: String,
    pub input: InputKind,
    pub input_height: usize,
    pub input_width: usize,
    pub code_height: usize,
    pub code_width: usize,
    pub class_names: Vec<String>,
    pub seed: u64,
    pub level: LevelConfig,
}

/// A batch as tensors.
pub struct Batch {
    /// Pixels f32 (B, C, H, W) in [-0.5, 0.5], or codes u32 (B, H, W).
    pub input: Tensor,
    /// u32 class targets (B, G, H, W) when the loss is a cross-entropy.
    pub classes: Option<Tensor>,
    pub size: usize,
}

/// The loss of one batch and what the EMA update needs.
pub struct StepLoss {
    pub total: Tensor,
    pub reconstruction: f64,
    pub commitment: f64,
    /// Encoder outputs (N x D, detached) and their codes (N, u32), where
    /// the level computes.
    pub z: Tensor,
    pub codes: Tensor,
}

pub struct VqLevel {
    pub info: LevelInfo,
    pub vars: SeededVars,
    pub encoder: Encoder,
    pub quantiser: Quantiser,
    pub decoder: AuxDecoder,
    pub device: Device,
}

impl VqLevel {
    /// A freshly initialised level for `table`'s rows.
    pub fn new(cfg: &LevelConfig, table: &LevelTable, seed: u64, device: &Device) -> Result<Self> {
        let factor = 1usize << cfg.encoder.downsample;
        if !table.height.is_multiple_of(factor) || !table.width.is_multiple_of(factor) {
            return Err(Error::Params(format!(
                "params.encoder.downsample: the input is {}x{}, which 2^{} = {factor} does not divide; pad or crop the input, or change `downsample`",
                table.height, table.width, cfg.encoder.downsample
            )));
        }
        let info = LevelInfo {
            format: LEVEL_FORMAT.into(),
            input: table.input,
            input_height: table.height,
            input_width: table.width,
            code_height: table.height / factor,
            code_width: table.width / factor,
            class_names: table.class_names.clone(),
            seed,
            level: cfg.clone(),
        };
        Self::build(info, device)
    }

    fn build(info: LevelInfo, device: &Device) -> Result<Self> {
        let cfg = &info.level;
        let vars = SeededVars::new(info.seed);
        let vb = vars.var_builder(device);
        let err = Error::candle("building the model");
        let encoder = Encoder::new(&cfg.encoder, info.input, vb.pp("encoder")).map_err(&err)?;
        let decoder = AuxDecoder::new(
            &cfg.decoder,
            info.input,
            cfg.encoder.dim,
            cfg.encoder.downsample,
            vb.pp("aux_decoder"),
        )
        .map_err(&err)?;
        let mut rng = SplitMix64::stream(info.seed, "init/codebook");
        let quantiser = Quantiser::new(cfg.quantiser.clone(), cfg.encoder.dim, &mut rng, device)
            .map_err(&err)?;
        Ok(VqLevel {
            info,
            vars,
            encoder,
            quantiser,
            decoder,
            device: device.clone(),
        })
    }

    /// The optimiser's variables, in name order.
    pub fn trainable(&self) -> Vec<(String, Var)> {
        self.vars.all()
    }

    fn classes_per_channel(&self) -> Option<usize> {
        output_layout(self.info.input, self.info.level.decoder.pixel_loss).1
    }

    /// Table rows -> tensors.
    pub fn batch(&self, rows: &Rows) -> Result<Batch> {
        let (b, h, w) = (rows.len(), self.info.input_height, self.info.input_width);
        let err = Error::candle("building a batch");
        let (input, classes) = match self.info.input {
            InputKind::Pixels { channels: c } => {
                let chw = rows.planes(c, h * w);
                let scaled: Vec<f32> = chw.iter().map(|&v| v as f32 / 255.0 - 0.5).collect();
                let input = Tensor::from_vec(scaled, (b, c, h, w), &self.device).map_err(&err)?;
                let classes = match self.info.level.decoder.pixel_loss {
                    PixelLoss::Mse => None,
                    PixelLoss::CrossEntropy => {
                        Some(Tensor::from_vec(chw, (b, c, h, w), &self.device).map_err(&err)?)
                    }
                };
                (input, classes)
            }
            InputKind::Codes { .. } => {
                let codes: Vec<u32> = rows.values.iter().map(|&v| v as u32).collect();
                let input = Tensor::from_vec(codes, (b, h, w), &self.device).map_err(&err)?;
                let classes = input.reshape((b, 1, h, w)).map_err(&err)?;
                (input, Some(classes))
            }
        };
        Ok(Batch {
            input,
            classes,
            size: b,
        })
    }

    /// Encoder output as rows (B*h*w, D).
    fn encode_rows(&self, input: &Tensor) -> candle_core::Result<Tensor> {
        let z = self.encoder.forward(input)?;
        let (b, d, h, w) = z.dims4()?;
        z.permute((0, 2, 3, 1))?.reshape((b * h * w, d))
    }

    /// Decoder output for a batch and (for `msp`) a mask (B, 1, H, W).
    fn decode(
        &self,
        batch: &Batch,
        zq_rows: &Tensor,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (h, w, d) = (
            self.info.code_height,
            self.info.code_width,
            self.info.level.encoder.dim,
        );
        let zq = zq_rows
            .reshape((batch.size, h, w, d))?
            .permute((0, 3, 1, 2))?
            .contiguous()?;
        self.decoder.forward(&zq, mask.map(|m| (&batch.input, m)))
    }

    fn reconstruction_loss(
        &self,
        batch: &Batch,
        out: &Tensor,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        match (self.classes_per_channel(), &batch.classes) {
            (Some(k), Some(t)) => cross_entropy_loss(out, t, k, mask),
            _ => mse_loss(out, &batch.input, mask),
        }
    }

    /// Masks for a batch when the decoder is `msp`.
    pub fn draw_mask(
        &self,
        batch: usize,
        rng: &mut SplitMix64,
    ) -> candle_core::Result<Option<Tensor>> {
        if self.decoder.kind != AuxKind::Msp {
            return Ok(None);
        }
        self.draw_scoring_mask(batch, rng).map(Some)
    }

    /// Masks of the level's mask config for a batch, whatever the decoder
    /// kind: the region a validation scores as "masked" for `ff` and `msp`
    /// alike, so that the two kinds' figures compare.
    pub fn draw_scoring_mask(
        &self,
        batch: usize,
        rng: &mut SplitMix64,
    ) -> candle_core::Result<Tensor> {
        let (h, w) = (self.info.input_height, self.info.input_width);
        let m = self.info.level.decoder.mask.draw_batch(batch, h, w, rng);
        Tensor::from_vec(m, (batch, 1, h, w), &self.device)
    }

    /// The training loss of a batch: reconstruction (or masked prediction)
    /// plus beta times the commitment loss.
    pub fn loss(&self, batch: &Batch, mask_rng: &mut SplitMix64) -> candle_core::Result<StepLoss> {
        let z = self.encode_rows(&batch.input)?;
        let q = self.quantiser.forward(&z)?;
        let mask = self.draw_mask(batch.size, mask_rng)?;
        let out = self.decode(batch, &q.straight_through, mask.as_ref())?;
        let recon = self.reconstruction_loss(batch, &out, mask.as_ref())?;
        let total = (&recon + (&q.commitment * self.info.level.quantiser.beta)?)?;
        Ok(StepLoss {
            reconstruction: recon.to_scalar::<f32>()? as f64,
            commitment: q.commitment.to_scalar::<f32>()? as f64,
            total,
            z: z.detach(),
            codes: q.codes,
        })
    }

    /// Codes of a batch, (B, h*w) row-major.
    pub fn codes(&self, batch: &Batch) -> candle_core::Result<Vec<u32>> {
        let z = self.encode_rows(&batch.input)?;
        self.quantiser.codes(&z)?.to_vec1::<u32>()
    }

    /// Evaluation of a batch, scored the same way for `ff` and `msp`: the
    /// loss (the kind's own objective: `msp` sees the visible pixels of
    /// `mask`), the codes, and two scores, each the squared error (pixels,
    /// [0, 1] scale) or the count of correct classes (codes), summed, with
    /// how many values were scored:
    /// - `full`: the whole input reconstructed from the codes alone (`msp`
    ///   given a mask that hides everything);
    /// - `masked`: the region `mask` hides, reconstructed by the decoder as
    ///   it trains (`msp` seeing the rest; `ff` from the codes).
    pub fn evaluate(&self, batch: &Batch, mask: &Tensor) -> candle_core::Result<Evaluation> {
        let z = self.encode_rows(&batch.input)?;
        let codes = self.quantiser.codes(&z)?;
        let e = self.quantiser.codebook().index_select(&codes, 0)?;
        let msp = self.decoder.kind == AuxKind::Msp;
        let own_mask = msp.then_some(mask);
        let out = self.decode(batch, &e, own_mask)?;
        let loss = self
            .reconstruction_loss(batch, &out, own_mask)?
            .to_scalar::<f32>()? as f64;
        let all = Tensor::ones(mask.shape(), DType::F32, &self.device)?;
        let full_out = match msp {
            true => self.decode(batch, &e, Some(&all))?,
            false => out.clone(),
        };
        Ok(Evaluation {
            loss,
            codes: codes.to_vec1::<u32>()?,
            full: self.score(batch, &full_out, &all)?,
            masked: self.score(batch, &out, mask)?,
        })
    }

    /// A pixel level's whole inputs decoded from their codes alone (`msp`
    /// with everything masked), 0..=255 in table layout (HWC); `None` for a
    /// code level.
    pub fn reconstruct_pixels(&self, batch: &Batch) -> candle_core::Result<Option<Vec<u16>>> {
        let InputKind::Pixels { channels } = self.info.input else {
            return Ok(None);
        };
        let (b, h, w) = (batch.size, self.info.input_height, self.info.input_width);
        let z = self.encode_rows(&batch.input)?;
        let codes = self.quantiser.codes(&z)?;
        let e = self.quantiser.codebook().index_select(&codes, 0)?;
        let all = Tensor::ones((b, 1, h, w), DType::F32, &self.device)?;
        let msp = self.decoder.kind == AuxKind::Msp;
        let out = self.decode(batch, &e, msp.then_some(&all))?;
        let values = match self.classes_per_channel() {
            None => ((out.clamp(-0.5f32, 0.5f32)? + 0.5)? * 255.0)?
                .round()?
                .to_dtype(DType::U32)?,
            Some(k) => class_argmax(&out, k)?.reshape((b, channels, h, w))?,
        };
        let chw = values.flatten_all()?.to_vec1::<u32>()?;
        let mut hwc = vec![0u16; chw.len()];
        for i in 0..b {
            for c in 0..channels {
                for p in 0..h * w {
                    hwc[(i * h * w + p) * channels + c] =
                        chw[(i * channels + c) * h * w + p] as u16;
                }
            }
        }
        Ok(Some(hwc))
    }

    /// The squared error or correct count of a decoder output over the
    /// region `weights` marks with 1.
    fn score(&self, batch: &Batch, out: &Tensor, weights: &Tensor) -> candle_core::Result<Score> {
        let (b, h, w) = (batch.size, self.info.input_height, self.info.input_width);
        let (channels, value) = match (self.info.input, self.classes_per_channel()) {
            (InputKind::Pixels { channels }, k) => {
                let pred = match k {
                    None => out.clamp(-0.5f32, 0.5f32)?,
                    Some(k) => ((class_argmax(out, k)?.to_dtype(DType::F32)? / 255.0)? - 0.5)?
                        .reshape((b, channels, h, w))?,
                };
                let sq = (pred - &batch.input)?.sqr()?.broadcast_mul(weights)?;
                (channels, sq.sum_all()?.to_scalar::<f32>()? as f64)
            }
            (InputKind::Codes { classes }, _) => {
                let pred = class_argmax(out, classes)?.reshape((b, 1, h, w))?;
                let target = batch.input.reshape((b, 1, h, w))?;
                let hit = pred.eq(&target)?.to_dtype(DType::F32)?.mul(weights)?;
                (1, hit.sum_all()?.to_scalar::<f32>()? as f64)
            }
        };
        Ok(Score {
            value,
            scored: weights.sum_all()?.to_scalar::<f32>()? as f64 * channels as f64,
        })
    }

    /// Weights and codebook (`model.safetensors`) and the auxiliary decoder
    /// (`aux_decoder.safetensors`), plus `level.json`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let mut model: HashMap<String, Tensor> = HashMap::new();
        let mut aux: HashMap<String, Tensor> = HashMap::new();
        for (name, var) in self.vars.all() {
            let t = var.as_tensor().clone();
            if name.starts_with("aux_decoder.") {
                aux.insert(name, t);
            } else {
                model.insert(name, t);
            }
        }
        model.insert(
            "quantiser.codebook".into(),
            self.quantiser.codebook().clone(),
        );
        let err = Error::candle("writing the model");
        candle_core::safetensors::save(&model, dir.join("model.safetensors")).map_err(&err)?;
        candle_core::safetensors::save(&aux, dir.join("aux_decoder.safetensors")).map_err(&err)?;
        let path = dir.join("level.json");
        let text = serde_json::to_vec_pretty(&self.info).unwrap_or_default();
        std::fs::write(&path, text).map_err(|e| Error::io(format!("writing {}", path.display()), e))
    }

    /// A trained level, from the folder `save` wrote.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let (path, bytes) = crate::error::read_index(
            dir,
            "level.json",
            "a trained VQ level (the output of a train_vq stage)",
        )?;
        let info: LevelInfo = serde_json::from_slice(&bytes)
            .map_err(|e| Error::data(&path, None, format!("not a trained VQ level: {e}")))?;
        if info.format != LEVEL_FORMAT {
            return Err(Error::data(
                &path,
                None,
                format!("format `{}` is not `{LEVEL_FORMAT}`", info.format),
            ));
        }
        let mut level = Self::build(info, device)?;
        let mut tensors = BTreeMap::new();
        for file in ["model.safetensors", "aux_decoder.safetensors"] {
            let p = dir.join(file);
            let loaded = candle_core::safetensors::load(&p, device)
                .map_err(|e| Error::data(&p, None, e.to_string()))?;
            tensors.extend(loaded);
        }
        let p = dir.join("model.safetensors");
        level
            .vars
            .load(&tensors, "")
            .map_err(|e| Error::data(&p, None, e))?;
        let codebook = tensors
            .get("quantiser.codebook")
            .ok_or_else(|| Error::data(&p, None, "no tensor `quantiser.codebook`"))?;
        level
            .quantiser
            .set_codebook(codebook)
            .map_err(|e| Error::data(&p, None, e.to_string()))?;
        Ok(level)
    }
}

/// See [`VqLevel::evaluate`].
pub struct Evaluation {
    pub loss: f64,
    pub codes: Vec<u32>,
    pub full: Score,
    pub masked: Score,
}

/// A squared error (pixels) or a count of correct classes (codes), summed
/// over `scored` values.
#[derive(Debug, Clone, Copy, Default)]
pub struct Score {
    pub value: f64,
    pub scored: f64,
}

impl Score {
    pub fn add(&mut self, other: Score) {
        self.value += other.value;
        self.scored += other.scored;
    }

    /// The mean per scored value (0 when nothing was scored).
    pub fn mean(&self) -> f64 {
        self.value / self.scored.max(1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The estimate gives back the measured step it scales from and grows
    /// with the positions and the two stacks' width.
    #[test]
    fn the_gpu_memory_estimate_scales_from_its_measured_step() {
        let mut vq1 = LevelConfig::default();
        vq1.encoder.hidden = 128;
        vq1.decoder.hidden = 128;
        let mib = |bytes: f64| bytes / (1u64 << 20) as f64;
        let pixels = 128 * 128;
        let f32_step = mib(64.0 * vq1.gpu_bytes_per_image(pixels, Precision::F32));
        let bf16_step = mib(64.0 * vq1.gpu_bytes_per_image(pixels, Precision::Bf16));
        assert!((f32_step - 40_881.0).abs() < 1e-6, "{f32_step}");
        assert!((bf16_step - 11_377.0).abs() < 1e-6, "{bf16_step}");
        let base = vq1.gpu_bytes_per_image(pixels, Precision::F32);
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9 * b;
        assert!(close(
            vq1.gpu_bytes_per_image(2 * pixels, Precision::F32),
            2.0 * base
        ));
        let mut narrower = vq1.clone();
        narrower.decoder.hidden = 64;
        assert!(close(
            narrower.gpu_bytes_per_image(pixels, Precision::F32),
            0.75 * base
        ));
    }
}
