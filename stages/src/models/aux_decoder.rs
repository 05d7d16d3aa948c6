//! Auxiliary decoders of a VQ level, and their losses. They give the encoder
//! its learning signal and are discarded after training.
//!
//! - `ff` (feed-forward): reconstructs the level's input from the codes.
//! - `msp` (masked self-prediction): sees the codes plus the input with part
//!   of it masked (and a mask channel), predicts the masked part; the loss
//!   counts masked positions only. What the visible neighbourhood predicts,
//!   the codes need not carry.
//!
//! Outputs: pixels with `mse` -> C channels (the prediction, in the input's
//! [-0.5, 0.5] scale); pixels with `cross_entropy` -> C x 256 logits; a code
//! map -> K logits (K = the lower level's codebook size).

use candle_core::{D, DType, Module, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::conv::{Conv, ConvTranspose};
use super::encoder::{InputEmbedding, ResBlock, same_conv};
use super::masks::MaskConfig;
use crate::data::level_table::InputKind;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuxKind {
    Ff,
    Msp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PixelLoss {
    Mse,
    /// 256-way cross-entropy per channel value.
    CrossEntropy,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuxDecoderConfig {
    pub kind: AuxKind,
    pub hidden: usize,
    pub res_blocks: usize,
    pub res_hidden: usize,
    /// For pixel inputs; a code-map input always uses cross-entropy.
    pub pixel_loss: PixelLoss,
    /// `msp` only.
    pub mask: MaskConfig,
    /// Embedding width of a code-map input (`msp` context).
    pub code_embedding: usize,
}

impl Default for AuxDecoderConfig {
    fn default() -> Self {
        AuxDecoderConfig {
            kind: AuxKind::Ff,
            hidden: 64,
            res_blocks: 2,
            res_hidden: 32,
            pixel_loss: PixelLoss::Mse,
            mask: MaskConfig::default(),
            code_embedding: 32,
        }
    }
}

/// How the decoder's output is read: channels, and classes per channel
/// (`None`: a regression).
pub fn output_layout(input: InputKind, loss: PixelLoss) -> (usize, Option<usize>) {
    match (input, loss) {
        (InputKind::Pixels { channels }, PixelLoss::Mse) => (channels, None),
        (InputKind::Pixels { channels }, PixelLoss::CrossEntropy) => (channels * 256, Some(256)),
        (InputKind::Codes { classes }, _) => (classes, Some(classes)),
    }
}

/// The context path of `msp`: masked input + mask channel -> hidden.
struct Context {
    input: InputEmbedding,
    conv: Conv,
    res: Vec<ResBlock>,
}

pub struct AuxDecoder {
    pub kind: AuxKind,
    conv_in: Conv,
    res: Vec<ResBlock>,
    up: Vec<ConvTranspose>,
    context: Option<Context>,
    out: Conv,
}

fn res_stack(
    n: usize,
    cfg: &AuxDecoderConfig,
    vb: &VarBuilder,
    name: &str,
) -> candle_core::Result<Vec<ResBlock>> {
    (0..n)
        .map(|i| ResBlock::new(cfg.hidden, cfg.res_hidden, vb.pp(format!("{name}.{i}"))))
        .collect()
}

impl AuxDecoder {
    /// `dim`: the code vectors' length; `upsample`: the encoder's s.
    pub fn new(
        cfg: &AuxDecoderConfig,
        input: InputKind,
        dim: usize,
        upsample: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let context = match cfg.kind {
            AuxKind::Ff => None,
            AuxKind::Msp => {
                let input =
                    InputEmbedding::new(input, cfg.code_embedding, vb.pp("context.embedding"))?;
                Some(Context {
                    conv: same_conv(input.channels + 1, cfg.hidden, 3, vb.pp("context.conv"))?,
                    input,
                    res: res_stack(cfg.res_blocks, cfg, &vb, "context.res")?,
                })
            }
        };
        Ok(AuxDecoder {
            kind: cfg.kind,
            conv_in: same_conv(dim, cfg.hidden, 3, vb.pp("conv_in"))?,
            res: res_stack(cfg.res_blocks, cfg, &vb, "res")?,
            up: (0..upsample)
                .map(|i| {
                    ConvTranspose::new(cfg.hidden, cfg.hidden, 4, 2, 1, vb.pp(format!("up.{i}")))
                })
                .collect::<candle_core::Result<_>>()?,
            context,
            out: same_conv(
                cfg.hidden,
                output_layout(input, cfg.pixel_loss).0,
                3,
                vb.pp("out"),
            )?,
        })
    }

    /// `codes`: quantised vectors (B, D, h, w). `masked`: for `msp`, the
    /// level's input and its mask (B, 1, H, W; 1 = hidden from the decoder).
    pub fn forward(
        &self,
        codes: &Tensor,
        masked: Option<(&Tensor, &Tensor)>,
    ) -> candle_core::Result<Tensor> {
        let mut h = self.conv_in.forward(codes)?;
        for r in &self.res {
            h = r.forward(&h)?;
        }
        for u in &self.up {
            h = u.forward_relu(&h)?;
        }
        if let Some(ctx) = &self.context {
            let Some((input, mask)) = masked else {
                candle_core::bail!("an `msp` decoder needs the masked input");
            };
            let x = ctx.input.forward(input)?;
            let visible = x.broadcast_mul(&(1.0 - mask)?)?;
            let mut c = ctx.conv.forward(&Tensor::cat(&[&visible, mask], 1)?)?;
            for r in &ctx.res {
                c = r.forward(&c)?;
            }
            h = (h + c)?;
        }
        self.out.forward_relu(&h)
    }
}

/// Mean squared error; with a mask (B, 1, H, W), over masked positions only.
pub fn mse_loss(
    pred: &Tensor,
    target: &Tensor,
    mask: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let sq = (pred - target)?.sqr()?;
    match mask {
        None => sq.mean_all(),
        Some(m) => {
            let channels = pred.dim(1)? as f64;
            let m = m.to_dtype(pred.dtype())?;
            sq.broadcast_mul(&m)?.sum_all()? / (m.sum_all()?.to_scalar_f64()? * channels).max(1.0)
        }
    }
}

/// Logits (B, G*K, H, W) -> rows (B*G*H*W, K), in the order of targets (B, G, H, W).
pub fn class_rows(logits: &Tensor, classes: usize) -> candle_core::Result<Tensor> {
    let (b, gk, h, w) = logits.dims4()?;
    let g = gk / classes;
    logits
        .reshape((b, g, classes, h, w))?
        .permute((0, 1, 3, 4, 2))?
        .reshape((b * g * h * w, classes))
}

/// Cross-entropy of logits (B, G*K, H, W) against u32 targets (B, G, H, W);
/// with a mask (B, 1, H, W), over masked positions only.
pub fn cross_entropy_loss(
    logits: &Tensor,
    targets: &Tensor,
    classes: usize,
    mask: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let rows = class_rows(logits, classes)?;
    let nll = candle_nn::ops::log_softmax(&rows, D::Minus1)?
        .gather(&targets.flatten_all()?.unsqueeze(1)?, 1)?
        .squeeze(1)?
        .neg()?;
    match mask {
        None => nll.mean_all(),
        Some(m) => {
            let w = m
                .to_dtype(logits.dtype())?
                .broadcast_as(targets.shape())?
                .flatten_all()?;
            (nll * &w)?.sum_all()? / w.sum_all()?.to_scalar_f64()?.max(1.0)
        }
    }
}

/// The most likely class per row (B*G*H*W).
pub fn class_argmax(logits: &Tensor, classes: usize) -> candle_core::Result<Tensor> {
    class_rows(logits, classes)?.argmax(D::Minus1)
}

trait ScalarF64 {
    fn to_scalar_f64(&self) -> candle_core::Result<f64>;
}

impl ScalarF64 for Tensor {
    fn to_scalar_f64(&self) -> candle_core::Result<f64> {
        self.to_dtype(DType::F64)?.to_scalar::<f64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    use crate::rng::SplitMix64;

    /// Checks the autograd gradient of `loss` at `x` against central finite
    /// differences, in f64.
    fn check_gradient(x: Vec<f64>, shape: &[usize], loss: impl Fn(&Tensor) -> Tensor) {
        let dev = Device::Cpu;
        let var = Var::from_tensor(&Tensor::from_vec(x.clone(), shape, &dev).unwrap()).unwrap();
        let grads = loss(var.as_tensor()).backward().unwrap();
        let g = grads
            .get(&var)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let h = 1e-6;
        for i in 0..x.len() {
            let at = |d: f64| {
                let mut y = x.clone();
                y[i] += d;
                loss(&Tensor::from_vec(y, shape, &dev).unwrap())
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            assert!(
                (fd - g[i]).abs() < 1e-6 * (1.0 + fd.abs()),
                "element {i}: autograd {} vs finite difference {fd}",
                g[i]
            );
        }
    }

    fn random(n: usize, seed: u64) -> Vec<f64> {
        let mut r = SplitMix64(seed);
        (0..n).map(|_| r.normal()).collect()
    }

    fn mask_tensor() -> Tensor {
        // (B=2, 1, H=2, W=2): three masked positions.
        Tensor::from_vec(
            vec![1f32, 0., 0., 1., 0., 0., 1., 0.],
            (2, 1, 2, 2),
            &Device::Cpu,
        )
        .unwrap()
    }

    #[test]
    fn mse_gradients_match_finite_differences() {
        let dev = Device::Cpu;
        let target = Tensor::from_vec(random(24, 1), (2, 3, 2, 2), &dev).unwrap();
        check_gradient(random(24, 2), &[2, 3, 2, 2], |p| {
            mse_loss(p, &target, None).unwrap()
        });
        let m = mask_tensor();
        check_gradient(random(24, 3), &[2, 3, 2, 2], |p| {
            mse_loss(p, &target, Some(&m)).unwrap()
        });
    }

    #[test]
    fn cross_entropy_gradients_match_finite_differences() {
        let dev = Device::Cpu;
        // Two channels of 3 classes: logits (2, 6, 2, 2), targets (2, 2, 2, 2).
        let mut r = SplitMix64(5);
        let t: Vec<u32> = (0..16).map(|_| r.below(3) as u32).collect();
        let targets = Tensor::from_vec(t, (2, 2, 2, 2), &dev).unwrap();
        check_gradient(random(48, 6), &[2, 6, 2, 2], |l| {
            cross_entropy_loss(l, &targets, 3, None).unwrap()
        });
        let m = mask_tensor();
        check_gradient(random(48, 7), &[2, 6, 2, 2], |l| {
            cross_entropy_loss(l, &targets, 3, Some(&m)).unwrap()
        });
    }

    #[test]
    fn cross_entropy_matches_a_hand_computation() {
        let dev = Device::Cpu;
        // One position, 3 classes, logits [0, ln 2, 0], target 1: -ln(2 / 4).
        let logits = Tensor::from_vec(vec![0f64, 2f64.ln(), 0.], (1, 3, 1, 1), &dev).unwrap();
        let t = Tensor::from_vec(vec![1u32], (1, 1, 1, 1), &dev).unwrap();
        let l = cross_entropy_loss(&logits, &t, 3, None)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!((l - 2f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn commitment_gradient_matches_finite_differences() {
        let dev = Device::Cpu;
        let e = Tensor::from_vec(random(12, 8), (4, 3), &dev).unwrap();
        check_gradient(random(12, 9), &[4, 3], |z| {
            (z - &e).unwrap().sqr().unwrap().mean_all().unwrap()
        });
    }

    #[test]
    fn masked_losses_touch_masked_positions_only() {
        let dev = Device::Cpu;
        let m = mask_tensor();
        let target = Tensor::zeros((2, 3, 2, 2), DType::F32, &dev).unwrap();
        let pred =
            Var::from_tensor(&Tensor::ones((2, 3, 2, 2), DType::F32, &dev).unwrap()).unwrap();
        let loss = mse_loss(pred.as_tensor(), &target, Some(&m)).unwrap();
        assert_eq!(
            loss.to_scalar::<f32>().unwrap(),
            1.0,
            "averaged over masked values"
        );
        let g = mse_loss(pred.as_tensor(), &target, Some(&m))
            .unwrap()
            .backward()
            .unwrap()
            .get(&pred)
            .unwrap()
            .clone();
        let mask = m
            .broadcast_as((2, 3, 2, 2))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (gi, mi) in g
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .zip(&mask)
        {
            if *mi == 0.0 {
                assert_eq!(*gi, 0.0, "no gradient at a visible position");
            } else {
                assert!(*gi > 0.0);
            }
        }
        // Changing the prediction where nothing is masked leaves the loss alone.
        let visible = (1.0 - m.broadcast_as((2, 3, 2, 2)).unwrap()).unwrap();
        let changed = (pred.as_tensor() + (visible * 7.0).unwrap()).unwrap();
        assert_eq!(
            mse_loss(&changed, &target, Some(&m))
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            1.0
        );

        // The same for cross-entropy over 4 classes.
        let logits =
            Var::from_tensor(&Tensor::zeros((2, 4, 2, 2), DType::F32, &dev).unwrap()).unwrap();
        let t = Tensor::zeros((2, 1, 2, 2), DType::U32, &dev).unwrap();
        let loss = cross_entropy_loss(logits.as_tensor(), &t, 4, Some(&m)).unwrap();
        assert!((loss.to_scalar::<f32>().unwrap() - 4f32.ln()).abs() < 1e-6);
        let g = loss.backward().unwrap().get(&logits).unwrap().clone();
        let per_pos = g
            .abs()
            .unwrap()
            .sum(1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mflat = m.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (p, mi) in per_pos.iter().zip(&mflat) {
            assert_eq!(*p == 0.0, *mi == 0.0, "{per_pos:?} {mflat:?}");
        }
    }
}
