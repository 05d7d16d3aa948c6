//! haic-pipe's stage kinds, one per module. Each implements
//! [`pipeline::stage::StageKind`]; [`all`] lists them for the binary.
//!
//! Today: `command` (any shell step, cached like the built-in kinds) and
//! `preprocess` (image sources -> Parquet image tables, readers in [`data`]).
//! The model kinds (train_vq, encode, train_ar, sample, evaluate,
//! human_eval_export) arrive with their issues.

pub mod command;
pub mod data;
pub mod error;
pub mod preprocess;

use pipeline::stage::{Kinds, StageKind};

/// Every stage kind this build knows.
pub fn all() -> Kinds {
    let kinds: Vec<Box<dyn StageKind>> =
        vec![Box::new(command::Command), Box::new(preprocess::Preprocess)];
    Kinds::new(kinds)
}
