//! haic-pipe's stage kinds and the models, tables and training loop they
//! share. Each kind implements [`pipeline::stage::StageKind`]; [`all`] lists
//! them for the binary.
//!
//! The floors, bottom up (a module imports only from floors below it):
//!
//! | floor | modules | owns |
//! | --- | --- | --- |
//! | 1 | [`error`], [`rng`], [`params`], [`stats`], [`tuning`] | the crate's error type, seeded generators, params parsing, bootstrap intervals and the Fréchet distance, process tuning |
//! | 2 | [`data`] | readers of image sources, image and code tables, their layout in artifacts |
//! | 3 | [`models`], [`device`], [`checkpoint`] | candle modules and kernels (the VQ level, the AR model, the classifier), the compute device, checkpoint files |
//! | 4 | [`training`], [`hierarchy`], [`human_eval`] | the training cadence, the chain of AR models, rating packages |
//! | 5 | [`kinds`] | the nine stage kinds, peers: none imports another |
//!
//! The kinds: `command` (any shell step, cached like the built-in kinds),
//! `preprocess` (image sources -> Parquet image tables), `train_vq` (one
//! level of the hierarchy), `encode` (a trained level -> a code table),
//! `train_ar` (a gated PixelCNN: an AR decoder, the prior or the flat
//! baseline), `bound` (the hierarchical bound on bits/dim), `sample`
//! (ancestral sampling through the hierarchy), `evaluate` (classifier
//! accuracy on samples and CAS) and `human_eval_export` (pairwise realism
//! tasks).
//!
//! **Adding a kind** is one module under `kinds/` (a struct implementing
//! `StageKind`: its name, version, `check` of params and inputs, `run`),
//! one line in [`all`], and its params' `$def` in
//! `schemas/pipeline.schema.json` (the schema test checks every kind has
//! one). What it shares with another kind goes below `kinds/`, never into
//! the other kind's module.

pub mod checkpoint;
pub mod data;
pub mod device;
pub mod error;
pub mod hierarchy;
pub mod human_eval;
pub mod kinds;
pub mod models;
pub mod params;
pub mod rng;
pub mod stats;
pub mod training;
pub mod tuning;

use kinds::{
    bound, command, encode, evaluate, human_eval_export, preprocess, sample, train_ar, train_vq,
};
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
