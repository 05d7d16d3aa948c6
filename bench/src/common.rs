//! What the benchmark binaries share (each includes this file as a module).
#![allow(dead_code)]

use stages::models::aux_decoder::{AuxDecoderConfig, AuxKind};
use stages::models::encoder::EncoderConfig;
use stages::models::quantiser::QuantiserConfig;
use stages::train_vq::level::LevelConfig;

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `pipelines/tiny.yaml`'s level 1 (hidden 32, D 32, K 128) with a `kind` decoder.
pub fn tiny_level1(kind: AuxKind) -> LevelConfig {
    LevelConfig {
        encoder: EncoderConfig {
            hidden: 32,
            res_blocks: 2,
            res_hidden: 16,
            downsample: 2,
            dim: 32,
            ..Default::default()
        },
        quantiser: QuantiserConfig {
            codebook_size: 128,
            ..Default::default()
        },
        decoder: AuxDecoderConfig {
            kind,
            hidden: 32,
            res_blocks: 2,
            res_hidden: 16,
            ..Default::default()
        },
    }
}
