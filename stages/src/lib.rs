//! haic-pipe's stage kinds, one per module. Each implements
//! [`pipeline::stage::StageKind`]; [`all`] lists them for the binary.
//!
//! Today: `command` (any shell step, cached like the built-in kinds),
//! `preprocess` (image sources -> Parquet image tables, readers in [`data`]),
//! `train_vq` (one level of the hierarchy; models in [`models`]), `encode`
//! (a trained level -> a code table), `train_ar` (a gated PixelCNN: an AR
//! decoder, the prior or the flat baseline) and `bound` (the hierarchical
//! bound on bits/dim). Sampling and evaluation arrive with their issues.

pub mod bound;
pub mod checkpoint;
pub mod command;
pub mod data;
pub mod encode;
pub mod error;
pub mod models;
pub mod params;
pub mod preprocess;
pub mod rng;
pub mod train_ar;
pub mod train_vq;
pub mod training;

use pipeline::stage::{Kinds, StageKind};

/// Every stage kind this build knows.
pub fn all() -> Kinds {
    let kinds: Vec<Box<dyn StageKind>> = vec![
        Box::new(command::Command),
        Box::new(preprocess::Preprocess),
        Box::new(train_vq::TrainVq),
        Box::new(encode::Encode),
        Box::new(train_ar::TrainAr),
        Box::new(bound::Bound),
    ];
    Kinds::new(kinds)
}
