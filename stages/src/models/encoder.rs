//! The encoder of a VQ level: a residual conv net that downsamples its input
//! by `2^downsample` and outputs `dim`-dimensional vectors, one per position
//! of the code map. A code-map input (level 2 and up) is embedded first.

use candle_core::{Module, Tensor};
use candle_nn::{Embedding, VarBuilder, embedding};

use super::conv::Conv;
use crate::data::level_table::InputKind;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EncoderConfig {
    /// Channels of the conv stack.
    pub hidden: usize,
    pub res_blocks: usize,
    /// Channels inside a residual block.
    pub res_hidden: usize,
    /// s: the code map is 2^s times smaller than the input on each side.
    pub downsample: usize,
    /// D: the length of the vectors (and of the codes).
    pub dim: usize,
    /// Embedding width of a code-map input.
    pub code_embedding: usize,
}

impl Default for EncoderConfig {
    fn default() -> Self {
        EncoderConfig {
            hidden: 64,
            res_blocks: 2,
            res_hidden: 32,
            downsample: 2,
            dim: 64,
            code_embedding: 32,
        }
    }
}

/// A stride-1 convolution that keeps the size (odd `k`).
pub fn same_conv(c_in: usize, c_out: usize, k: usize, vb: VarBuilder) -> candle_core::Result<Conv> {
    Conv::new(c_in, c_out, k, 1, k / 2, vb)
}

/// `x + conv1x1(relu(conv3x3(relu(x))))`.
pub struct ResBlock {
    conv1: Conv,
    conv2: Conv,
}

impl ResBlock {
    pub fn new(channels: usize, hidden: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(ResBlock {
            conv1: same_conv(channels, hidden, 3, vb.pp("conv1"))?,
            conv2: same_conv(hidden, channels, 1, vb.pp("conv2"))?,
        })
    }
}

impl Module for ResBlock {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.conv1.forward_relu(x)?;
        x + self.conv2.forward_relu(&h)?
    }
}

/// Embeds a code map (B, H, W) as (B, E, H, W); passes pixels through.
pub struct InputEmbedding {
    embedding: Option<Embedding>,
    pub channels: usize,
}

impl InputEmbedding {
    pub fn new(input: InputKind, width: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(match input {
            InputKind::Pixels { channels } => InputEmbedding {
                embedding: None,
                channels,
            },
            InputKind::Codes { classes } => InputEmbedding {
                embedding: Some(embedding(classes, width, vb)?),
                channels: width,
            },
        })
    }
}

impl Module for InputEmbedding {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.embedding {
            None => Ok(x.clone()),
            Some(e) => e.forward(x)?.permute((0, 3, 1, 2))?.contiguous(),
        }
    }
}

pub struct Encoder {
    input: InputEmbedding,
    stem: Conv,
    down: Vec<Conv>,
    res: Vec<ResBlock>,
    out: Conv,
}

impl Encoder {
    pub fn new(cfg: &EncoderConfig, input: InputKind, vb: VarBuilder) -> candle_core::Result<Self> {
        let embed = InputEmbedding::new(input, cfg.code_embedding, vb.pp("embedding"))?;
        Ok(Encoder {
            stem: same_conv(embed.channels, cfg.hidden, 3, vb.pp("stem"))?,
            input: embed,
            down: (0..cfg.downsample)
                .map(|i| Conv::new(cfg.hidden, cfg.hidden, 4, 2, 1, vb.pp(format!("down.{i}"))))
                .collect::<candle_core::Result<_>>()?,
            res: (0..cfg.res_blocks)
                .map(|i| ResBlock::new(cfg.hidden, cfg.res_hidden, vb.pp(format!("res.{i}"))))
                .collect::<candle_core::Result<_>>()?,
            out: same_conv(cfg.hidden, cfg.dim, 1, vb.pp("out"))?,
        })
    }
}

impl Module for Encoder {
    /// Input (see [`InputKind`]) -> (B, D, H / 2^s, W / 2^s).
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.stem.forward(&self.input.forward(x)?)?;
        for d in &self.down {
            h = d.forward_relu(&h)?;
        }
        for r in &self.res {
            h = r.forward(&h)?;
        }
        self.out.forward_relu(&h)
    }
}
