//! The models, in candle's house style: a `Config` (serde, `Default`), a
//! `new(cfg, vb)`, a `forward`. Weight names are stable (`encoder.down.0.weight`,
//! ...) so the safetensors files read the same in PyTorch.
//!
//! Everything random here draws from [`crate::rng::SplitMix64`] streams the
//! training loop owns and checkpoints; nothing uses candle's thread RNG.

pub mod aux_decoder;
pub mod categorical;
pub mod conv;
pub mod encoder;
pub mod masks;
pub mod nearest;
pub mod optim;
pub mod pixelcnn;
pub mod quantiser;
pub mod vars;
