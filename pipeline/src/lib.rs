//! haic-pipe's engine: pipeline spec, stage graph, stage cache, registry,
//! executors and the driver. It knows nothing about images or models; stage
//! kinds plug in through [`stage::StageKind`].
//!
//! Data flows one way: YAML ([`spec`]) -> graph ([`graph`]) -> driver
//! ([`run`]) -> worker processes ([`executor`], [`stage`]) -> content-addressed
//! artifacts ([`cache`]) -> registry rows ([`registry`]).

pub mod cache;
pub mod compare;
pub mod error;
pub mod executor;
pub mod gc;
pub mod graph;
pub mod hashing;
pub mod outs;
pub mod recover;
pub mod registry;
pub mod run;
pub mod spec;
pub mod stage;
pub mod status;
pub mod workspace;

pub use error::{Error, ParamError, Result, SpecError};
