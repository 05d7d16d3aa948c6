//! A gated PixelCNN (van den Oord et al. 2016): vertical and horizontal
//! stacks, so there is no blind spot; masks of type A (first layer: a
//! position never sees itself) and B; for RGB pixels the channel order
//! R -> G -> B inside a pixel. Optional conditioning, added to every gated
//! layer: a class label (an embedding) and a code map of the level above
//! (embedding -> residual convs -> upsampling to the target resolution).
//!
//! Output: logits (B, C x 256, H, W) for pixels, (B, K, H, W) for codes;
//! the logits of channel c at (y, x) depend only on inputs before (y, x) in
//! raster order and on channels < c at (y, x) itself (tested through
//! autograd). `train_ar` trains it as an AR decoder, the prior or a baseline.
//!
//! Causality: all convolutions are square `k x k` with a mask. The vertical
//! stack at row y sees rows < y of the input (its first layer masks the
//! centre row, later layers see its own features up to row y). The
//! horizontal stack sees, on row y, columns < x (first layer) or <= x
//! (later layers) of its own features, plus the vertical stack at (y, x).
//! Within a pixel, hidden channels are split into C groups; a tap at the
//! centre connects input group i to output group j only if j > i (type A)
//! or j >= i (type B).

use candle_core::{Module, Tensor};
use candle_nn::{Embedding, VarBuilder, embedding};
use serde::{Deserialize, Serialize};

use super::categorical::categorical_nll_of_conv;
use super::conv::{Conv, ConvTranspose};
use super::encoder::{InputEmbedding, ResBlock};
use super::precision::Precision;
use crate::data::level_table::InputKind;

mod gate;
pub mod incremental;
mod masks;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PixelCnnConfig {
    /// Channels of each stack (a multiple of the pixel channels C).
    pub hidden: usize,
    pub layers: usize,
    /// Odd kernel size of the masked convolutions.
    pub kernel: usize,
    /// Embedding width of a code-map target.
    pub code_embedding: usize,
    /// Channels and residual blocks of the conditioning stack.
    pub cond_hidden: usize,
    pub cond_res_blocks: usize,
}

impl Default for PixelCnnConfig {
    fn default() -> Self {
        PixelCnnConfig {
            hidden: 64,
            layers: 8,
            kernel: 5,
            code_embedding: 32,
            cond_hidden: 64,
            cond_res_blocks: 2,
        }
    }
}

/// One measured training step the GPU memory estimate scales from: an
/// H200, imagenet128.yaml's decoder1 (hidden 126, 16 layers, kernel 5, on
/// 128x128 pixels) at batch 16 with candle's own convolutions, peak
/// nvidia-smi MiB in f32 and in bf16 (docs/benchmarks.md, second run).
const MEASURED_STEP: (usize, usize, usize, usize, usize) = (126, 16, 5, 128 * 128, 16);
const MEASURED_MIB_F32: f64 = 106_769.0;
const MEASURED_MIB_BF16: f64 = 83_919.0;

impl PixelCnnConfig {
    /// The GPU memory of a training step, in bytes an image, on `pixels`
    /// positions: candle's own convolutions keep an im2col buffer of each
    /// layer's k x k taps for every position and hidden channel, so it
    /// grows as pixels x hidden x layers x k^2. Scaled from one measured
    /// step ([`MEASURED_STEP`]; its whole peak counted per image, which
    /// errs high by the weights' share); other shapes are an
    /// extrapolation, and other convolution paths (`HAIC_GPU_CONV`) are
    /// not covered.
    pub fn gpu_bytes_per_image(&self, pixels: usize, precision: Precision) -> f64 {
        let (hidden, layers, k, measured_pixels, batch) = MEASURED_STEP;
        let mib = match precision {
            Precision::F32 => MEASURED_MIB_F32,
            Precision::Bf16 => MEASURED_MIB_BF16,
        };
        let per_unit = mib * (1u64 << 20) as f64
            / batch as f64
            / (measured_pixels * hidden * layers * k * k) as f64;
        per_unit * (pixels * self.hidden * self.layers * self.kernel * self.kernel) as f64
    }
}

/// What the model is conditioned on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conditioning {
    /// Number of class labels (None: unconditional on the class).
    pub labels: Option<usize>,
    /// A code map of K codes, 2^upsample times smaller than the target.
    pub code_map: Option<(usize, usize)>,
}

pub use gate::{gate, gate_of_sum};
use masks::{MaskSpec, MaskType, Stack};

struct GatedLayer {
    vertical: Conv,
    horizontal: Conv,
    v_to_h: Conv,
    h_out: Conv,
    label: Option<Embedding>,
    cond: Option<Conv>,
    residual: bool,
}

impl GatedLayer {
    /// What the layer adds to both stacks' pre-activations: the label's
    /// embedding (B, 2h, 1, 1) plus the code map's features (B, 2h, H, W).
    fn extra(
        &self,
        labels: Option<&Tensor>,
        cond: Option<&Tensor>,
    ) -> candle_core::Result<Option<Tensor>> {
        extra_term(self.label.as_ref(), self.cond.as_ref(), labels, cond)
    }
}

/// A gated layer's extra term from its label embedding and its `cond`
/// layer (the layer's own or, for sampling, a frozen copy): the label's
/// (B, 2h, 1, 1) plus the code map's (B, 2h, H, W), whichever are given.
fn extra_term(
    label: Option<&Embedding>,
    cond_layer: Option<&Conv>,
    labels: Option<&Tensor>,
    cond: Option<&Tensor>,
) -> candle_core::Result<Option<Tensor>> {
    let mut extra: Option<Tensor> = None;
    if let (Some(e), Some(l)) = (label, labels) {
        extra = Some(e.forward(l)?.unsqueeze(2)?.unsqueeze(3)?);
    }
    if let (Some(c), Some(f)) = (cond_layer, cond) {
        let m = c.forward(f)?;
        extra = Some(match extra {
            Some(e) => m.broadcast_add(&e)?,
            None => m,
        });
    }
    Ok(extra)
}

/// The conditioning stack: a code map -> features at the target resolution.
struct CondStack {
    input: InputEmbedding,
    conv_in: Conv,
    res: Vec<ResBlock>,
    up: Vec<ConvTranspose>,
}

pub struct PixelCnn {
    target: InputKind,
    input: InputEmbedding,
    layers: Vec<GatedLayer>,
    out1: Conv,
    out2: Conv,
    cond: Option<CondStack>,
    /// Classes per output channel (256 for pixels, K for codes).
    pub classes: usize,
    kernel: usize,
}

impl PixelCnn {
    pub fn new(
        cfg: &PixelCnnConfig,
        target: InputKind,
        conditioning: Conditioning,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let (groups, classes) = match target {
            InputKind::Pixels { channels } => (channels, 256),
            InputKind::Codes { classes } => (1, classes),
        };
        let (h, k) = (cfg.hidden, cfg.kernel);
        if h % groups != 0 || k % 2 == 0 || cfg.layers == 0 {
            candle_core::bail!(
                "PixelCNN: hidden ({h}) must be a multiple of the channels ({groups}), kernel ({k}) odd, layers at least 1"
            );
        }
        let spec = |stack, kind, k, gate_out| MaskSpec {
            stack,
            kind,
            k,
            groups,
            gate_out,
        };
        let input = InputEmbedding::new(target, cfg.code_embedding, vb.pp("embedding"))?;
        let cond = match conditioning.code_map {
            None => None,
            Some((codes, upsample)) => {
                let vb = vb.pp("cond");
                let input = InputEmbedding::new(
                    InputKind::Codes { classes: codes },
                    cfg.code_embedding,
                    vb.pp("embedding"),
                )?;
                Some(CondStack {
                    conv_in: Conv::new(input.channels, cfg.cond_hidden, 3, 1, 1, vb.pp("conv_in"))?,
                    input,
                    res: (0..cfg.cond_res_blocks)
                        .map(|i| {
                            ResBlock::new(
                                cfg.cond_hidden,
                                cfg.cond_hidden / 2,
                                vb.pp(format!("res.{i}")),
                            )
                        })
                        .collect::<candle_core::Result<_>>()?,
                    up: (0..upsample)
                        .map(|i| {
                            ConvTranspose::new(
                                cfg.cond_hidden,
                                cfg.cond_hidden,
                                4,
                                2,
                                1,
                                vb.pp(format!("up.{i}")),
                            )
                        })
                        .collect::<candle_core::Result<_>>()?,
                })
            }
        };
        let mut layers = Vec::new();
        for l in 0..cfg.layers {
            let vb = vb.pp(format!("layers.{l}"));
            let (kind, c_in) = if l == 0 {
                (MaskType::A, input.channels)
            } else {
                (MaskType::B, h)
            };
            layers.push(GatedLayer {
                vertical: spec(Stack::Vertical, kind, k, true).conv(
                    c_in,
                    2 * h,
                    vb.pp("vertical"),
                )?,
                horizontal: spec(Stack::Horizontal, kind, k, true).conv(
                    c_in,
                    2 * h,
                    vb.pp("horizontal"),
                )?,
                // The vertical stack at (y, x) has seen rows < y only: no mask
                // needed, but groups must line up, so mask B at the centre.
                v_to_h: spec(Stack::Horizontal, MaskType::B, 1, true).conv(
                    2 * h,
                    2 * h,
                    vb.pp("v_to_h"),
                )?,
                h_out: spec(Stack::Horizontal, MaskType::B, 1, false).conv(h, h, vb.pp("h_out"))?,
                label: match conditioning.labels {
                    Some(n) => Some(embedding(n, 2 * h, vb.pp("label"))?),
                    None => None,
                },
                cond: match &cond {
                    Some(_) => Some(Conv::new(cfg.cond_hidden, 2 * h, 1, 1, 0, vb.pp("cond"))?),
                    None => None,
                },
                residual: l > 0,
            });
        }
        Ok(PixelCnn {
            out1: spec(Stack::Horizontal, MaskType::B, 1, false).conv(h, h, vb.pp("out1"))?,
            out2: spec(Stack::Horizontal, MaskType::B, 1, false).conv(
                h,
                groups * classes,
                vb.pp("out2"),
            )?,
            target,
            input,
            layers,
            cond,
            classes,
            kernel: k,
        })
    }

    /// Logits for every position of `x` (pixels f32 (B, C, H, W) in
    /// [-0.5, 0.5], or codes u32 (B, H, W)); `labels` u32 (B,); `code_map`
    /// u32 (B, H / 2^s, W / 2^s).
    pub fn forward(
        &self,
        x: &Tensor,
        labels: Option<&Tensor>,
        code_map: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let cond = match code_map {
            Some(map) => Some(self.condition(map)?),
            None => None,
        };
        self.forward_with(x, labels, cond.as_ref())
    }

    /// The conditioning stack's features (B, cond_hidden, H, W) of a code map.
    pub fn condition(&self, code_map: &Tensor) -> candle_core::Result<Tensor> {
        let Some(c) = &self.cond else {
            candle_core::bail!("PixelCNN: this model was built without a code map");
        };
        let mut f = c.conv_in.forward(&c.input.forward(code_map)?)?;
        for r in &c.res {
            f = r.forward(&f)?;
        }
        for u in &c.up {
            f = u.forward_relu(&f)?;
        }
        Ok(f)
    }

    /// [`PixelCnn::forward`] with the conditioning features computed
    /// already; `x` and `cond` may be the same band of rows cut from whole
    /// images (see [`PixelCnn::rows_above`]).
    pub fn forward_with(
        &self,
        x: &Tensor,
        labels: Option<&Tensor>,
        cond: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let h = self.hidden(x, labels, cond)?;
        self.out2.forward_relu(&self.out1.forward_relu(&h)?)
    }

    /// -ln p of every value of `targets` (u32 (B, C, H, W) for pixels, (B, 1,
    /// H, W) for codes) given the values before it: the NLL of
    /// [`PixelCnn::forward`]'s logits, (B, C, H, W), without storing them.
    pub fn nll(
        &self,
        x: &Tensor,
        labels: Option<&Tensor>,
        code_map: Option<&Tensor>,
        targets: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let cond = match code_map {
            Some(map) => Some(self.condition(map)?),
            None => None,
        };
        let h = self.hidden(x, labels, cond.as_ref())?;
        let o1 = self.out1.forward_relu(&h)?;
        categorical_nll_of_conv(&o1, &self.out2, true, targets, self.classes)
    }

    /// The horizontal stack's output, before the output layers.
    fn hidden(
        &self,
        x: &Tensor,
        labels: Option<&Tensor>,
        cond: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        if self.cond.is_some() != cond.is_some() {
            candle_core::bail!(
                "PixelCNN: the code map must be given exactly when the model was built for one"
            );
        }
        let input = self.input.forward(x)?;
        let (mut v, mut h) = (input.clone(), input);
        for layer in &self.layers {
            let v_pre = layer.vertical.forward(&v)?;
            let (h_conv, v_to_h) = (layer.horizontal.forward(&h)?, layer.v_to_h.forward(&v_pre)?);
            let extra = layer.extra(labels, cond)?;
            v = gate_of_sum(&v_pre, None, extra.as_ref())?;
            let h_new =
                layer
                    .h_out
                    .forward(&gate_of_sum(&h_conv, Some(&v_to_h), extra.as_ref())?)?;
            h = if layer.residual { (h + h_new)? } else { h_new };
        }
        Ok(h)
    }

    pub fn target(&self) -> InputKind {
        self.target
    }

    /// How many rows above a position its logits can see: the logits of
    /// row y are the same whether the network runs on whole images or on
    /// rows `y - rows_above ..= y` only (what sampling uses).
    pub fn rows_above(&self) -> usize {
        self.layers.len() * (self.kernel / 2)
    }
}

/// Mean negative log-likelihood in bits per value (pixel channel or code).
pub fn bits_per_dim(nll_nats: f64) -> f64 {
    nll_nats / std::f64::consts::LN_2
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::aux_decoder::cross_entropy_loss;
    use crate::models::reference::{self, Kernels};
    use crate::models::vars::SeededVars;
    use crate::rng::SplitMix64;

    /// The estimate gives back the measured step it scales from, grows
    /// as pixels x hidden x layers x k^2, and says that batch 32 of
    /// decoder1 does not fit an H200's 143,771 MiB, as it did not there.
    #[test]
    fn the_gpu_memory_estimate_scales_from_its_measured_step() {
        let decoder1 = PixelCnnConfig {
            hidden: 126,
            layers: 16,
            kernel: 5,
            ..PixelCnnConfig::default()
        };
        let mib = |bytes: f64| bytes / (1u64 << 20) as f64;
        let pixels = 128 * 128;
        let f32_step = mib(16.0 * decoder1.gpu_bytes_per_image(pixels, Precision::F32));
        let bf16_step = mib(16.0 * decoder1.gpu_bytes_per_image(pixels, Precision::Bf16));
        assert!((f32_step - 106_769.0).abs() < 1e-6, "{f32_step}");
        assert!((bf16_step - 83_919.0).abs() < 1e-6, "{bf16_step}");
        assert!(mib(32.0 * decoder1.gpu_bytes_per_image(pixels, Precision::F32)) > 143_771.0);

        let base = decoder1.gpu_bytes_per_image(32 * 32, Precision::F32);
        let scaled = |cfg: PixelCnnConfig, pixels: usize| {
            cfg.gpu_bytes_per_image(pixels, Precision::F32) / base
        };
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(close(scaled(decoder1.clone(), 64 * 32), 2.0));
        let wider = PixelCnnConfig {
            hidden: 252,
            ..decoder1.clone()
        };
        assert!(close(scaled(wider, 32 * 32), 2.0));
        let shallower = PixelCnnConfig {
            layers: 8,
            ..decoder1.clone()
        };
        assert!(close(scaled(shallower, 32 * 32), 0.5));
        let smaller_kernel = PixelCnnConfig {
            kernel: 3,
            ..decoder1.clone()
        };
        assert!(close(scaled(smaller_kernel, 32 * 32), 9.0 / 25.0));
    }
    use candle_core::Device;
    use candle_core::Var;

    /// `f` with the gates as candle's composition (`composed`) or the kernel.
    fn with_gate<R>(composed: bool, f: impl FnOnce() -> R) -> R {
        let kernels = Kernels {
            composed_gate: composed,
            ..Kernels::default()
        };
        reference::with(kernels, f)
    }

    fn small(layers: usize) -> PixelCnnConfig {
        PixelCnnConfig {
            hidden: 6,
            layers,
            kernel: 3,
            code_embedding: 4,
            cond_hidden: 4,
            cond_res_blocks: 1,
        }
    }

    /// The gradient of the logits of channel `c` at (y, x) with respect to
    /// the input is zero at (y, x) for channels >= c and at every later
    /// position, and not zero everywhere before.
    #[test]
    fn pixel_logits_depend_only_on_earlier_values() {
        let dev = Device::Cpu;
        let (ch, n) = (3, 5);
        let vars = SeededVars::new(3);
        let model = PixelCnn::new(
            &small(3),
            InputKind::Pixels { channels: ch },
            Conditioning {
                labels: None,
                code_map: None,
            },
            vars.var_builder(&dev),
        )
        .unwrap();
        let mut r = SplitMix64(1);
        let x: Vec<f32> = (0..ch * n * n).map(|_| r.uniform() as f32 - 0.5).collect();
        let x = Var::from_tensor(&Tensor::from_vec(x, (1, ch, n, n), &dev).unwrap()).unwrap();
        let out = model.forward(x.as_tensor(), None, None).unwrap(); // 1, ch*256, n, n
        for y in 0..n {
            for xx in 0..n {
                for c in 0..ch {
                    let logits = out
                        .narrow(1, c * 256, 256)
                        .unwrap()
                        .narrow(2, y, 1)
                        .unwrap()
                        .narrow(3, xx, 1)
                        .unwrap();
                    let g = logits.sum_all().unwrap().backward().unwrap();
                    let g = g
                        .get(&x)
                        .unwrap()
                        .abs()
                        .unwrap()
                        .squeeze(0)
                        .unwrap()
                        .to_vec3::<f32>()
                        .unwrap();
                    let mut seen_before = false;
                    for (ci, plane) in g.iter().enumerate() {
                        for (yi, row) in plane.iter().enumerate() {
                            for (xi, &v) in row.iter().enumerate() {
                                let later = (yi, xi) > (y, xx) || ((yi, xi) == (y, xx) && ci >= c);
                                if later {
                                    assert_eq!(
                                        v, 0.0,
                                        "logits of channel {c} at ({y},{xx}) see channel {ci} at ({yi},{xi})"
                                    );
                                } else if v != 0.0 {
                                    seen_before = true;
                                }
                            }
                        }
                    }
                    let first = (y, xx, c) == (0, 0, 0);
                    assert!(first || seen_before, "({y},{xx}) channel {c} sees nothing");
                }
            }
        }
    }

    #[test]
    fn code_logits_ignore_the_current_and_later_codes_and_conditioning_matters() {
        let dev = Device::Cpu;
        let (k, n) = (7, 4);
        let vars = SeededVars::new(4);
        let model = PixelCnn::new(
            &small(2),
            InputKind::Codes { classes: k },
            Conditioning {
                labels: Some(3),
                code_map: Some((5, 1)),
            },
            vars.var_builder(&dev),
        )
        .unwrap();
        let codes: Vec<u32> = (0..n * n).map(|i| (i * 3 % k) as u32).collect();
        let x = Tensor::from_vec(codes.clone(), (1, n, n), &dev).unwrap();
        let label = Tensor::new(&[1u32], &dev).unwrap();
        let map = Tensor::new(&[[[0u32, 1], [2, 3]]], &dev).unwrap();
        let base = model.forward(&x, Some(&label), Some(&map)).unwrap();
        let flat = |t: &Tensor| t.squeeze(0).unwrap().to_vec3::<f32>().unwrap();
        let base_v = flat(&base);
        for p in 0..n * n {
            let mut changed = codes.clone();
            changed[p] = (changed[p] + 1) % k as u32;
            let out = flat(
                &model
                    .forward(
                        &Tensor::from_vec(changed, (1, n, n), &dev).unwrap(),
                        Some(&label),
                        Some(&map),
                    )
                    .unwrap(),
            );
            for q in 0..n * n {
                let same = (0..k).all(|c| out[c][q / n][q % n] == base_v[c][q / n][q % n]);
                if q <= p {
                    assert!(same, "the logits at {q} changed with the code at {p}");
                }
            }
            // The next position on the same row is always in the receptive field.
            if p % n + 1 < n {
                let next_same = (0..k).all(|c| {
                    out[c][(p + 1) / n][(p + 1) % n] == base_v[c][(p + 1) / n][(p + 1) % n]
                });
                assert!(
                    !next_same,
                    "the code at {p} does not reach its right neighbour"
                );
            }
        }
        let other_label = model
            .forward(&x, Some(&Tensor::new(&[2u32], &dev).unwrap()), Some(&map))
            .unwrap();
        assert_ne!(flat(&other_label), base_v, "the label changes the output");
        let other_map = model
            .forward(
                &x,
                Some(&label),
                Some(&Tensor::new(&[[[4u32, 1], [2, 3]]], &dev).unwrap()),
            )
            .unwrap();
        assert_ne!(flat(&other_map), base_v, "the code map changes the output");
        assert!(model.forward(&x, Some(&label), None).is_err());
    }

    /// Sampling runs the network on the rows a position can see: the logits
    /// of row y from that band equal the whole image's.
    #[test]
    fn a_band_of_rows_above_gives_the_logits_of_its_last_row() {
        let dev = Device::Cpu;
        let (c, h, w) = (3, 9, 4);
        let vars = SeededVars::new(6);
        let model = PixelCnn::new(
            &small(3),
            InputKind::Pixels { channels: c },
            Conditioning {
                labels: Some(2),
                code_map: Some((5, 1)),
            },
            vars.var_builder(&dev),
        )
        .unwrap();
        assert_eq!(model.rows_above(), 3);
        let mut r = SplitMix64(2);
        let x: Vec<f32> = (0..c * h * w).map(|_| r.uniform() as f32 - 0.5).collect();
        let x = Tensor::from_vec(x, (1, c, h, w), &dev).unwrap();
        let label = Tensor::new(&[1u32], &dev).unwrap();
        let map: Vec<u32> = (0..(h / 2 + 1) * (w / 2)).map(|i| i as u32 % 5).collect();
        let map = Tensor::from_vec(map, (1, h / 2 + 1, w / 2), &dev).unwrap();
        let cond = model.condition(&map).unwrap().narrow(2, 0, h).unwrap();
        let whole = model.forward_with(&x, Some(&label), Some(&cond)).unwrap();
        for y in 0..h {
            let y0 = y.saturating_sub(model.rows_above());
            let n = y + 1 - y0;
            let band = model
                .forward_with(
                    &x.narrow(2, y0, n).unwrap(),
                    Some(&label),
                    Some(&cond.narrow(2, y0, n).unwrap()),
                )
                .unwrap();
            let got = band.narrow(2, n - 1, 1).unwrap().flatten_all().unwrap();
            let want = whole.narrow(2, y, 1).unwrap().flatten_all().unwrap();
            let d = crate::models::max_abs_diff(&got, &want);
            assert!(d < 1e-5, "row {y}: the band's logits differ by {d}");
        }
    }

    /// The incremental computation's logits at every position equal the
    /// whole network's, for kernels of 3 and 5, on images taller than the
    /// rows a position sees above it.
    #[test]
    fn incremental_logits_equal_the_whole_networks() {
        for cfg in [
            small(3),
            PixelCnnConfig {
                kernel: 5,
                ..small(2)
            },
        ] {
            incremental_logits_equal_the_whole_networks_for(&cfg);
        }
    }

    fn incremental_logits_equal_the_whole_networks_for(cfg: &PixelCnnConfig) {
        let dev = Device::Cpu;
        let (c, h, w, n) = (3, 7, 6, 4);
        let vars = SeededVars::new(8);
        let model = PixelCnn::new(
            cfg,
            InputKind::Pixels { channels: c },
            Conditioning {
                labels: Some(2),
                code_map: Some((5, 0)),
            },
            vars.var_builder(&dev),
        )
        .unwrap();
        let mut r = SplitMix64(4);
        let x: Vec<f32> = (0..n * c * h * w)
            .map(|_| r.uniform() as f32 - 0.5)
            .collect();
        let x = Tensor::from_vec(x, (n, c, h, w), &dev).unwrap();
        let label = Tensor::new(&[1u32, 0, 1, 1], &dev).unwrap();
        let map: Vec<u32> = (0..n * h * w).map(|i| i as u32 % 5).collect();
        let map = Tensor::from_vec(map, (n, h, w), &dev).unwrap();
        let cond = model.condition(&map).unwrap();
        let whole = model.forward_with(&x, Some(&label), Some(&cond)).unwrap();
        let mut inc = incremental::Incremental::new(&model, Some(&label), Some(&cond)).unwrap();
        let mut worst = 0f32;
        for y in 0..h {
            inc.start_row(y, &x.narrow(2, y.saturating_sub(1), 1).unwrap())
                .unwrap();
            for xx in 0..w {
                let row = x.narrow(2, y, 1).unwrap();
                let got = inc.logits(xx, &row).unwrap().flatten_all().unwrap();
                let want = whole
                    .narrow(2, y, 1)
                    .unwrap()
                    .narrow(3, xx, 1)
                    .unwrap()
                    .flatten_all()
                    .unwrap();
                worst = worst.max(crate::models::max_abs_diff(&got, &want));
            }
        }
        assert!(
            worst == 0.0,
            "kernel {}: the incremental logits differ by {worst}",
            cfg.kernel
        );
        assert!(model.rows_above() < h);
        let again = inc.start_row(2, &x.narrow(2, 1, 1).unwrap());
        assert!(
            again.is_err_and(|e| e.to_string().contains("rows go in order")),
            "a row out of order is refused"
        );
    }

    #[test]
    fn the_gate_kernel_matches_candles_composition_in_value_and_gradient() {
        let dev = Device::Cpu;
        let mut r = SplitMix64(3);
        let v: Vec<f32> = (0..2 * 6 * 3 * 4)
            .map(|_| 2.0 * r.normal() as f32)
            .collect();
        let x = Var::from_vec(v, (2, 6, 3, 4), &dev).unwrap();
        let w: Vec<f32> = (0..2 * 3 * 3 * 4).map(|_| r.normal() as f32).collect();
        let w = Tensor::from_vec(w, (2, 3, 3, 4), &dev).unwrap();
        let run = |composed: bool| {
            let y = with_gate(composed, || gate(x.as_tensor())).unwrap();
            let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            (y, g.get(&x).unwrap().clone())
        };
        let ((y1, g1), (y2, g2)) = (run(false), run(true));
        assert!(crate::models::max_abs_diff(&y1, &y2) < 1e-6);
        assert!(crate::models::max_abs_diff(&g1, &g2) < 1e-5);
    }

    #[test]
    fn the_fused_gated_sum_matches_candles_adds_in_value_and_gradients() {
        let dev = Device::Cpu;
        let mut r = SplitMix64(4);
        let mut var = |dims: (usize, usize, usize, usize)| {
            let n = dims.0 * dims.1 * dims.2 * dims.3;
            let v: Vec<f32> = (0..n).map(|_| 1.5 * r.normal() as f32).collect();
            Var::from_vec(v, dims, &dev).unwrap()
        };
        let (x, y) = (var((3, 6, 4, 5)), var((3, 6, 4, 5)));
        let (per_channel, per_position) = (var((3, 6, 1, 1)), var((3, 6, 4, 5)));
        let w = var((3, 3, 4, 5));
        for with_y in [false, true] {
            for e in [&per_channel, &per_position] {
                let run = |composed: bool| {
                    let y_arg = with_y.then(|| y.as_tensor());
                    let out = with_gate(composed, || {
                        gate_of_sum(x.as_tensor(), y_arg, Some(e.as_tensor()))
                    })
                    .unwrap();
                    let g = (&out * w.as_tensor()).unwrap().sum_all().unwrap();
                    let g = g.backward().unwrap();
                    let grads: Vec<Tensor> = [&x, &y, e]
                        .iter()
                        .filter_map(|v| g.get(v.as_tensor()).cloned())
                        .collect();
                    (out, grads)
                };
                let ((o1, g1), (o2, g2)) = (run(false), run(true));
                let what = format!("with y: {with_y}, extra {:?}", e.dims());
                assert!(crate::models::max_abs_diff(&o1, &o2) < 1e-6, "{what}");
                assert_eq!(g1.len(), if with_y { 3 } else { 2 }, "{what}");
                assert_eq!(g1.len(), g2.len(), "{what}");
                for (a, b) in g1.iter().zip(&g2) {
                    let scale = b
                        .abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap();
                    let diff = crate::models::max_abs_diff(a, b);
                    assert!(
                        diff <= 1e-5 * scale.max(1.0),
                        "{what}: gradient off by {diff}"
                    );
                }
            }
        }
    }

    #[test]
    fn bits_per_dim_is_the_mean_cross_entropy_in_bits() {
        let dev = Device::Cpu;
        let vars = SeededVars::new(5);
        let model = PixelCnn::new(
            &small(1),
            InputKind::Codes { classes: 4 },
            Conditioning {
                labels: None,
                code_map: None,
            },
            vars.var_builder(&dev),
        )
        .unwrap();
        let codes = Tensor::new(&[[[0u32, 1, 2], [3, 0, 1]]], &dev).unwrap();
        let logits = model.forward(&codes, None, None).unwrap();
        let nll = cross_entropy_loss(&logits, &codes.unsqueeze(1).unwrap(), 4, None)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        // By hand: -log2 softmax(logits)[target], averaged over the 6 codes.
        let l = logits.squeeze(0).unwrap().to_vec3::<f32>().unwrap();
        let t = codes.squeeze(0).unwrap().to_vec2::<u32>().unwrap();
        let mut bits = 0.0;
        for y in 0..2 {
            for x in 0..3 {
                let z: f64 = (0..4).map(|c| (l[c][y][x] as f64).exp()).sum();
                bits -= ((l[t[y][x] as usize][y][x] as f64).exp() / z).log2();
            }
        }
        assert!(
            (bits_per_dim(nll) - bits / 6.0).abs() < 1e-5,
            "{} vs {}",
            bits_per_dim(nll),
            bits / 6.0
        );
    }
}
