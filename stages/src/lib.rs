//! haic-pipe's stage kinds, one per module. Each implements
//! [`pipeline::stage::StageKind`]; [`all`] lists them for the binary.
//!
//! Today: `command` (any shell step, cached like the built-in kinds),
//! `preprocess` (image sources -> Parquet image tables, readers in [`data`]),
//! `train_vq` (one level of the hierarchy; models in [`models`]), `encode`
//! (a trained level -> a code table), `train_ar` (a gated PixelCNN: an AR
//! decoder, the prior or the flat baseline), `bound` (the hierarchical
//! bound on bits/dim), `sample` (ancestral sampling through the hierarchy),
//! `evaluate` (classifier accuracy on samples and CAS) and
//! `human_eval_export` (pairwise realism tasks; their statistics in
//! [`human_eval`]).

pub mod bound;
pub mod checkpoint;
pub mod command;
pub mod data;
pub mod encode;
pub mod error;
pub mod evaluate;
pub mod hierarchy;
pub mod human_eval;
pub mod human_eval_export;
pub mod models;
pub mod params;
pub mod preprocess;
pub mod rng;
pub mod sample;
pub mod train_ar;
pub mod train_vq;
pub mod training;
pub mod tuning;

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
        Box::new(sample::SampleStage),
        Box::new(evaluate::Evaluate),
        Box::new(human_eval_export::HumanEvalExport),
    ];
    Kinds::new(kinds)
}
