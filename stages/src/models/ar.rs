//! One AR model as a whole: the gated PixelCNN, what it models (pixels or
//! the codes of a level) and what it is conditioned on (a class label, the
//! code map of the level above), the tensors a batch of table rows becomes,
//! its likelihood, sampling, and the files of a trained model
//! (`model.safetensors`, `ar.json`).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::data::level_table::InputKind;
use crate::data::level_table::{LevelTable, Rows};
use crate::error::{Error, Result};
use crate::models::pixelcnn::incremental::Incremental;
use crate::models::pixelcnn::{Conditioning, PixelCnn, PixelCnnConfig};
use crate::models::vars::SeededVars;
use crate::rng::SplitMix64;

pub const AR_FORMAT: &str = "haic ar model v1";

/// The conditioning code map: its codebook and shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodeMapInfo {
    pub codebook_size: usize,
    pub height: usize,
    pub width: usize,
    /// The target is 2^upsample times larger.
    pub upsample: usize,
}

impl CodeMapInfo {
    /// Codes per map.
    pub fn values(&self) -> usize {
        self.height * self.width
    }
}

/// `ar.json`: what a trained AR model reads, what it was made from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArInfo {
    pub format: String,
    pub target: InputKind,
    pub height: usize,
    pub width: usize,
    pub class_names: Vec<String>,
    pub class_conditional: bool,
    pub condition: Option<CodeMapInfo>,
    /// Stage keys of the modelled table and of the conditioning code table.
    pub target_key: String,
    pub condition_key: Option<String>,
    pub seed: u64,
    pub model: PixelCnnConfig,
}

impl ArInfo {
    /// Values per row: H*W*C pixel values or H*W codes.
    pub fn values_per_row(&self) -> usize {
        self.height * self.width * self.channels()
    }

    /// Output channels (pixel channels; 1 for codes).
    pub fn channels(&self) -> usize {
        match self.target {
            InputKind::Pixels { channels } => channels,
            InputKind::Codes { .. } => 1,
        }
    }

    /// Classes per value: 256 intensities or K codes.
    pub fn classes(&self) -> usize {
        match self.target {
            InputKind::Pixels { .. } => 256,
            InputKind::Codes { classes } => classes,
        }
    }

    /// The code map shape `table` gives, checked against the target's.
    pub fn code_map(target: &LevelTable, condition: &LevelTable) -> Result<CodeMapInfo> {
        let InputKind::Codes { classes } = condition.input else {
            return Err(Error::Params(
                "inputs.condition: an image table; give the code table an `encode` stage wrote"
                    .into(),
            ));
        };
        let (h, w) = (condition.height, condition.width);
        let Some(upsample) = upsample_factor((h, w), (target.height, target.width)) else {
            return Err(Error::Params(format!(
                "inputs.condition: its code maps are {h}x{w}, the target is {}x{}: the target must be 2^s times larger on both sides",
                target.height, target.width
            )));
        };
        Ok(CodeMapInfo {
            codebook_size: classes,
            height: h,
            width: w,
            upsample,
        })
    }
}

/// The s (at most 8) for which a `target` is 2^s times a code map of
/// size `condition` on both sides, if there is one.
pub fn upsample_factor(condition: (usize, usize), target: (usize, usize)) -> Option<usize> {
    (0..=8).find(|&s| condition.0 << s == target.0 && condition.1 << s == target.1)
}

/// A batch as tensors.
pub struct ArBatch {
    /// Pixels f32 (B, C, H, W) in [-0.5, 0.5], or codes u32 (B, H, W).
    pub input: Tensor,
    /// u32 (B, G, H, W): the value each output channel must predict.
    pub targets: Tensor,
    pub labels: Option<Tensor>,
    /// u32 (B, h, w).
    pub code_map: Option<Tensor>,
    pub size: usize,
}

/// How [`ArModel::sample`] computes each position's logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sampling {
    /// The whole network on whole images, once per value: the reference.
    Naive,
    /// Only what each new position adds ([`Incremental`]); each value is
    /// drawn on the host from the position's logits.
    Cached,
    /// [`Sampling::Cached`]'s network, with the values drawn where the
    /// logits are (Gumbel-max: argmax of logits / T + Gumbel noise, the
    /// noise drawn from `rng` once per row) and kept there: one transfer
    /// to the host per row instead of one per value, which on a GPU is a
    /// synchronisation (49,152 per 128x128x3 image batch). The same
    /// distribution as the others, other values for the same seed.
    OnDevice,
}

impl Sampling {
    /// What the sample stage uses on `device`: the host-drawn values on
    /// the CPU (the values every earlier artifact holds), on-device
    /// drawing on a GPU.
    pub fn for_device(device: &Device) -> Sampling {
        match device {
            Device::Cpu => Sampling::Cached,
            _ => Sampling::OnDevice,
        }
    }
}

pub struct ArModel {
    pub info: ArInfo,
    pub vars: SeededVars,
    pub net: PixelCnn,
    pub device: Device,
}

impl ArModel {
    /// A freshly initialised model (its weights drawn from `info.seed`).
    pub fn new(info: ArInfo, device: &Device) -> Result<Self> {
        let vars = SeededVars::new(info.seed);
        let conditioning = Conditioning {
            labels: info.class_conditional.then_some(info.class_names.len()),
            code_map: info.condition.map(|c| (c.codebook_size, c.upsample)),
        };
        let net = PixelCnn::new(
            &info.model,
            info.target,
            conditioning,
            vars.var_builder(device),
        )
        .map_err(|e| Error::Params(format!("params.model: {e}")))?;
        Ok(ArModel {
            info,
            vars,
            net,
            device: device.clone(),
        })
    }

    /// The optimiser's variables, in name order.
    pub fn trainable(&self) -> Vec<(String, Var)> {
        self.vars.all()
    }

    /// Values (u32, CHW per row, h x w of them) -> the network's input tensor.
    fn input_tensor(
        &self,
        chw: &[u32],
        b: usize,
        h: usize,
        w: usize,
    ) -> candle_core::Result<Tensor> {
        let c = self.info.channels();
        match self.info.target {
            InputKind::Pixels { .. } => {
                let scaled: Vec<f32> = chw.iter().map(|&v| pixel_input(v)).collect();
                Tensor::from_vec(scaled, (b, c, h, w), &self.device)
            }
            InputKind::Codes { .. } => Tensor::from_slice(chw, (b, h, w), &self.device),
        }
    }

    /// Table rows (and, for a model conditioned on codes, the code table's
    /// rows of the same images) -> tensors.
    pub fn batch(&self, rows: &Rows, condition: Option<&Rows>) -> Result<ArBatch> {
        let info = &self.info;
        let (b, c, h, w) = (rows.len(), info.channels(), info.height, info.width);
        let err = Error::candle("building a batch");
        let chw = rows.planes(c, h * w);
        let input = self.input_tensor(&chw, b, h, w).map_err(&err)?;
        let targets = Tensor::from_vec(chw, (b, c, h, w), &self.device).map_err(&err)?;
        let labels = if info.class_conditional {
            let n = info.class_names.len();
            let mut out = Vec::with_capacity(b);
            for (id, &l) in rows.ids.iter().zip(&rows.labels) {
                match usize::try_from(l) {
                    Ok(l) if l < n => out.push(l as u32),
                    _ => {
                        return Err(Error::Params(format!(
                            "row id {id} has label {l}, outside the {n} classes; a class-conditional model needs every row labelled (set `class_conditional: false` for unlabelled data)"
                        )));
                    }
                }
            }
            Some(Tensor::from_vec(out, b, &self.device).map_err(&err)?)
        } else {
            None
        };
        let code_map = match (info.condition, condition) {
            (None, _) => None,
            (Some(m), Some(rows)) => {
                let codes: Vec<u32> = rows.values.iter().map(|&v| v as u32).collect();
                Some(Tensor::from_vec(codes, (b, m.height, m.width), &self.device).map_err(&err)?)
            }
            (Some(_), None) => {
                return Err(Error::Params(
                    "the model is conditioned on a code map; give its rows".into(),
                ));
            }
        };
        Ok(ArBatch {
            input,
            targets,
            labels,
            code_map,
            size: b,
        })
    }

    /// Negative log-likelihood in nats of every value (B*G*H*W, in the
    /// order of the targets).
    fn nll(&self, batch: &ArBatch) -> candle_core::Result<Tensor> {
        self.net
            .nll(
                &batch.input,
                batch.labels.as_ref(),
                batch.code_map.as_ref(),
                &batch.targets,
            )?
            .flatten_all()
    }

    /// The training loss: mean NLL in nats per value.
    pub fn loss(&self, batch: &ArBatch) -> candle_core::Result<Tensor> {
        self.nll(batch)?.mean_all()
    }

    /// -ln p(row) of each row in nats: the NLL summed over its values.
    pub fn nll_per_row(&self, batch: &ArBatch) -> candle_core::Result<Vec<f64>> {
        let per = self.info.values_per_row();
        let nll = self.nll(batch)?.to_vec1::<f32>()?;
        Ok(nll
            .chunks_exact(per)
            .map(|r| r.iter().map(|&v| v as f64).sum())
            .collect())
    }

    /// Draws one row per label (and per code map) value by value in raster
    /// and channel order, at `temperature` (logits divided by it); returns
    /// the rows in table layout (HWC pixels or row-major codes). `how`
    /// picks the computation: `Naive` and `Cached` draw the same values from
    /// the same `rng`, `OnDevice` other values from the same distribution.
    pub fn sample(
        &self,
        labels: Option<&Tensor>,
        code_map: Option<&Tensor>,
        n: usize,
        temperature: f64,
        rng: &mut SplitMix64,
        how: Sampling,
    ) -> candle_core::Result<Vec<u16>> {
        let (c, h, w, k) = (
            self.info.channels(),
            self.info.height,
            self.info.width,
            self.info.classes(),
        );
        let cond = match code_map {
            Some(m) => Some(self.net.condition(m)?),
            None => None,
        };
        if how == Sampling::OnDevice {
            let chw = self.sample_on_device(labels, cond.as_ref(), n, temperature, rng)?;
            return Ok(self.table_layout(&chw, n));
        }
        let mut cached = match how {
            Sampling::Cached => Some(Incremental::new(&self.net, labels, cond.as_ref())?),
            Sampling::Naive | Sampling::OnDevice => None,
        };
        let mut chw = vec![0u32; n * c * h * w];
        let mut probs = vec![0f64; k];
        for y in 0..h {
            if let Some(inc) = &mut cached {
                inc.start_row(y, &self.input_row(&chw, n, y.saturating_sub(1))?)?;
            }
            for x in 0..w {
                for ch in 0..c {
                    let logits = match &mut cached {
                        Some(inc) => {
                            inc.logits(x, &self.input_row(&chw, n, y)?)?
                                .narrow(1, ch * k, k)?
                        }
                        None => self
                            .net
                            .forward_with(
                                &self.input_tensor(&chw, n, h, w)?,
                                labels,
                                cond.as_ref(),
                            )?
                            .narrow(1, ch * k, k)?
                            .narrow(2, y, 1)?
                            .narrow(3, x, 1)?,
                    };
                    let logits = logits.flatten_all()?.to_vec1::<f32>()?; // (n, k) image-major
                    for i in 0..n {
                        let l = &logits[i * k..(i + 1) * k];
                        let max = l.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
                        for (p, &v) in probs.iter_mut().zip(l) {
                            *p = ((v as f64 - max) / temperature).exp();
                        }
                        chw[((i * c + ch) * h + y) * w + x] = draw(&probs, rng) as u32;
                    }
                }
            }
        }
        Ok(self.table_layout(&chw, n))
    }

    /// Row `y` of `n` CHW images, as the network's input.
    fn input_row(&self, chw: &[u32], n: usize, y: usize) -> candle_core::Result<Tensor> {
        let (c, h, w) = (self.info.channels(), self.info.height, self.info.width);
        let mut values = vec![0u32; n * c * w];
        for (dst, src) in values.chunks_exact_mut(w).zip(chw.chunks_exact(h * w)) {
            dst.copy_from_slice(&src[y * w..(y + 1) * w]);
        }
        self.input_tensor(&values, n, 1, w)
    }

    /// CHW values of `n` rows -> table layout (HWC pixels, row-major codes).
    fn table_layout(&self, chw: &[u32], n: usize) -> Vec<u16> {
        let (c, h, w) = (self.info.channels(), self.info.height, self.info.width);
        let mut out = vec![0u16; n * c * h * w];
        for i in 0..n {
            for ch in 0..c {
                for p in 0..h * w {
                    out[(i * h * w + p) * c + ch] = chw[(i * c + ch) * h * w + p] as u16;
                }
            }
        }
        out
    }

    /// [`Sampling::OnDevice`]: returns the values in CHW layout.
    fn sample_on_device(
        &self,
        labels: Option<&Tensor>,
        cond: Option<&Tensor>,
        n: usize,
        temperature: f64,
        rng: &mut SplitMix64,
    ) -> candle_core::Result<Vec<u32>> {
        let (c, h, w, k) = (
            self.info.channels(),
            self.info.height,
            self.info.width,
            self.info.classes(),
        );
        // Pixel values enter the network as `input_tensor` makes them: looked
        // up in a table of `pixel_input`, so both paths feed the same floats.
        let pixel_inputs = match self.info.target {
            InputKind::Pixels { .. } => Some(Tensor::from_vec(
                (0..k as u32).map(pixel_input).collect::<Vec<f32>>(),
                k,
                &self.device,
            )?),
            InputKind::Codes { .. } => None,
        };
        let mut inc = Incremental::new(&self.net, labels, cond)?;
        let mut chw = vec![0u32; n * c * h * w];
        let mut noise = vec![0f32; w * c * n * k];
        let zeros = self.input_tensor(&vec![0u32; n * c * w], n, 1, w)?;
        // The row above, as drawn on the device (row 0: not read).
        let mut row = zeros.clone();
        for y in 0..h {
            inc.start_row(y, &row)?;
            // The row's noise, one upload: (position, image, class).
            for g in noise.iter_mut() {
                *g = gumbel(rng);
            }
            let noise_t = Tensor::from_slice(&noise, (w * c, n, k), &self.device)?;
            row = zeros.clone();
            let mut drawn = Vec::with_capacity(w * c);
            for x in 0..w {
                for ch in 0..c {
                    let logits = inc.logits(x, &row)?.narrow(1, ch * k, k)?.reshape((n, k))?;
                    let value = logits
                        .affine(1.0 / temperature, 0.0)?
                        .add(&noise_t.get(x * c + ch)?)?
                        .argmax(candle_core::D::Minus1)?;
                    row = match &pixel_inputs {
                        Some(table) => {
                            let scaled = table.index_select(&value, 0)?.reshape((n, 1, 1, 1))?;
                            row.slice_assign(&[0..n, ch..ch + 1, 0..1, x..x + 1], &scaled)?
                        }
                        None => {
                            row.slice_assign(&[0..n, 0..1, x..x + 1], &value.reshape((n, 1, 1))?)?
                        }
                    };
                    drawn.push(value);
                }
            }
            // The row's values, one download: (image, position).
            let got = Tensor::stack(&drawn, 1)?.to_vec2::<u32>()?;
            for (i, values) in got.iter().enumerate() {
                for (p, &v) in values.iter().enumerate() {
                    let (x, ch) = (p / c, p % c);
                    chw[((i * c + ch) * h + y) * w + x] = v;
                }
            }
        }
        Ok(chw)
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        let tensors: HashMap<String, Tensor> = self
            .vars
            .all()
            .into_iter()
            .map(|(name, v)| (name, v.as_tensor().clone()))
            .collect();
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))
            .map_err(Error::candle("writing the model"))?;
        let path = dir.join("ar.json");
        let text = serde_json::to_vec_pretty(&self.info).unwrap_or_default();
        std::fs::write(&path, text).map_err(|e| Error::io(format!("writing {}", path.display()), e))
    }

    /// A trained model, from the folder `save` wrote.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let info = read_info(dir)?;
        let model = Self::new(info, device)?;
        let p = dir.join("model.safetensors");
        let tensors = candle_core::safetensors::load(&p, device)
            .map_err(|e| Error::data(&p, None, e.to_string()))?
            .into_iter()
            .collect();
        model
            .vars
            .load(&tensors, "")
            .map_err(|e| Error::data(&p, None, e))?;
        Ok(model)
    }
}

/// The `ar.json` of a trained AR model's folder.
pub fn read_info(dir: &Path) -> Result<ArInfo> {
    let (path, bytes) = crate::error::read_index(
        dir,
        "ar.json",
        "a trained AR model (the output of a train_ar stage)",
    )?;
    let info: ArInfo = serde_json::from_slice(&bytes).map_err(|e| {
        Error::data(
            &path,
            None,
            format!("not a trained AR model (a train_ar stage's output): {e}"),
        )
    })?;
    if info.format != AR_FORMAT {
        return Err(Error::data(
            &path,
            None,
            format!("format `{}` is not `{AR_FORMAT}`", info.format),
        ));
    }
    Ok(info)
}

/// An index drawn from unnormalised probabilities.
/// What the network reads for pixel value `v` (0..=255).
fn pixel_input(v: u32) -> f32 {
    v as f32 / 255.0 - 0.5
}

/// A standard Gumbel variate: -ln(-ln u), u uniform in (0, 1).
fn gumbel(rng: &mut SplitMix64) -> f32 {
    let u = rng.uniform().max(f64::MIN_POSITIVE);
    (-(-u.ln()).ln()) as f32
}

fn draw(weights: &[f64], rng: &mut SplitMix64) -> usize {
    let total: f64 = weights.iter().sum();
    let mut u = rng.uniform() * total;
    for (i, &p) in weights.iter().enumerate() {
        if u < p {
            return i;
        }
        u -= p;
    }
    weights.len() - 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(target: InputKind, labels: bool, condition: Option<CodeMapInfo>) -> ArModel {
        let info = ArInfo {
            format: AR_FORMAT.into(),
            target,
            height: 6,
            width: 6,
            class_names: vec!["a".into(), "b".into(), "c".into()],
            class_conditional: labels,
            condition,
            target_key: "t".into(),
            condition_key: condition.map(|_| "c".into()),
            seed: 11,
            model: PixelCnnConfig {
                hidden: 6,
                layers: 3,
                kernel: 3,
                code_embedding: 4,
                cond_hidden: 4,
                cond_res_blocks: 1,
            },
        };
        ArModel::new(info, &Device::Cpu).unwrap()
    }

    fn draw_samples(m: &ArModel, seed: u64, how: Sampling) -> Vec<u16> {
        draw_samples_at(m, seed, how, 1.0)
    }

    fn draw_samples_at(m: &ArModel, seed: u64, how: Sampling, temperature: f64) -> Vec<u16> {
        let n = 4;
        let dev = &Device::Cpu;
        let labels = m
            .info
            .class_conditional
            .then(|| Tensor::new(&[0u32, 1, 2, 1], dev).unwrap());
        let map = m.info.condition.map(|c| {
            let codes: Vec<u32> = (0..n * c.values())
                .map(|i| (i * 7 % c.codebook_size) as u32)
                .collect();
            Tensor::from_vec(codes, (n, c.height, c.width), dev).unwrap()
        });
        let mut rng = SplitMix64(seed);
        m.sample(labels.as_ref(), map.as_ref(), n, temperature, &mut rng, how)
            .unwrap()
    }

    /// The cached sampler computes each position's logits from cached rows
    /// and columns; it must draw the very values the whole network gives.
    /// RGB pixels conditioned on a class and a code map; codes on a class.
    fn pixel_and_code_models() -> [ArModel; 2] {
        let rgb = model(
            InputKind::Pixels { channels: 3 },
            true,
            Some(CodeMapInfo {
                codebook_size: 5,
                height: 3,
                width: 3,
                upsample: 1,
            }),
        );
        [rgb, model(InputKind::Codes { classes: 7 }, true, None)]
    }

    #[test]
    fn cached_sampling_draws_exactly_the_naive_samples() {
        for m in &pixel_and_code_models() {
            let naive = draw_samples(m, 5, Sampling::Naive);
            let cached = draw_samples(m, 5, Sampling::Cached);
            assert_eq!(naive.len(), 4 * m.info.values_per_row());
            assert_eq!(cached, naive, "{:?}", m.info.target);
        }
    }

    /// At a temperature near 0 every sampler draws each position's most
    /// likely value: on-device drawing must give the cached sampler's
    /// values exactly, through the same network, for pixels and codes.
    #[test]
    fn on_device_drawing_at_a_cold_temperature_gives_the_greedy_values() {
        for m in &pixel_and_code_models() {
            let cached = draw_samples_at(m, 3, Sampling::Cached, 1e-4);
            let on_device = draw_samples_at(m, 4, Sampling::OnDevice, 1e-4);
            assert_eq!(on_device, cached, "{:?}", m.info.target);
            let warm = draw_samples(m, 4, Sampling::OnDevice);
            assert_ne!(warm, on_device, "at T = 1 the draws vary");
            assert_eq!(
                warm,
                draw_samples(m, 4, Sampling::OnDevice),
                "deterministic"
            );
        }
    }

    /// Gumbel-max draws class i with probability softmax(l / T)_i.
    #[test]
    fn gumbel_max_draws_the_softmax_distribution() {
        let logits = [0.0f64, 1.0, 2.0, -1.0];
        let t = 0.7;
        let z: f64 = logits.iter().map(|l| (l / t).exp()).sum();
        let mut rng = SplitMix64(11);
        let n = 40_000;
        let mut counts = [0usize; 4];
        for _ in 0..n {
            let best = (0..4)
                .map(|i| (logits[i] / t + gumbel(&mut rng) as f64, i))
                .fold((f64::NEG_INFINITY, 0), |a, b| if b.0 > a.0 { b } else { a });
            counts[best.1] += 1;
        }
        for i in 0..4 {
            let p = (logits[i] / t).exp() / z;
            let sd = (p * (1.0 - p) / n as f64).sqrt();
            let got = counts[i] as f64 / n as f64;
            assert!(
                (got - p).abs() < 4.0 * sd,
                "class {i}: {got} vs {p} (sd {sd})"
            );
        }
    }

    #[test]
    fn sampling_is_deterministic_given_the_seed() {
        let m = model(InputKind::Pixels { channels: 1 }, true, None);
        let a = draw_samples(&m, 1, Sampling::Cached);
        assert_eq!(a, draw_samples(&m, 1, Sampling::Cached));
        assert_ne!(a, draw_samples(&m, 2, Sampling::Cached));
    }
}
