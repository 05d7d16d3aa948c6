//! A training stage's checkpoint: one safetensors file holding the tensors
//! (weights, optimiser moments, EMA state...) and, as JSON in the header's
//! metadata, everything else a bit-exact resume needs (step, data cursor,
//! generator states). The engine's `save_checkpoint` gives it a digest and
//! an atomic rename; `latest_checkpoint` falls back past a damaged one.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor};
use pipeline::stage::{StageContext, StageError};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::models::optim::AdamW;
use crate::models::vars::SeededVars;

/// A checkpoint's one file.
const CHECKPOINT_FILE: &str = "state.safetensors";
/// The metadata key of the train state in it.
const STATE_KEY: &str = "haic.train_state";

/// Writes checkpoint `step`: `tensors` and `state`.
pub fn save<S: Serialize>(
    ctx: &StageContext,
    step: u64,
    tensors: &HashMap<String, Tensor>,
    state: &S,
) -> Result<(), StageError> {
    let metadata = HashMap::from([(STATE_KEY.to_string(), serde_json::to_string(state)?)]);
    ctx.save_checkpoint(step, |dir| {
        safetensors::serialize_to_file(tensors, Some(metadata), &dir.join(CHECKPOINT_FILE))?;
        Ok(())
    })?;
    Ok(())
}

/// Reads the checkpoint in `dir`: its tensors (on `device`) and train state.
pub fn load<S: DeserializeOwned>(
    dir: &Path,
    device: &Device,
) -> Result<(BTreeMap<String, Tensor>, S), StageError> {
    let file = dir.join(CHECKPOINT_FILE);
    let bytes = std::fs::read(&file)?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)?;
    let state_json = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(STATE_KEY))
        .ok_or_else(|| format!("{} has no `{STATE_KEY}` metadata", file.display()))?;
    let state: S = serde_json::from_str(state_json)?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)?
        .into_iter()
        .collect();
    Ok((tensors, state))
}

/// The file name inside a checkpoint folder, for messages and tests.
pub fn file(dir: &Path) -> std::path::PathBuf {
    dir.join(CHECKPOINT_FILE)
}

/// A model's weights (`model.*`) and the optimiser's moments (`optim.*`), as
/// checkpoint tensors.
pub fn weights_and_moments(vars: &SeededVars, opt: &AdamW) -> HashMap<String, Tensor> {
    let mut tensors: HashMap<String, Tensor> = vars
        .all()
        .into_iter()
        .map(|(name, var)| (format!("model.{name}"), var.as_tensor().clone()))
        .collect();
    tensors.extend(opt.state("optim."));
    tensors
}

/// Sets what [`weights_and_moments`] saved into the checkpoint in `dir`;
/// `optimizer_steps` from its train state.
pub fn restore_weights_and_moments(
    tensors: &BTreeMap<String, Tensor>,
    dir: &Path,
    vars: &SeededVars,
    opt: &mut AdamW,
    optimizer_steps: u64,
) -> Result<(), StageError> {
    vars.load(tensors, "model.")
        .map_err(|e| format!("{}: {e}", file(dir).display()))?;
    opt.load_state(tensors, "optim.", optimizer_steps)?;
    Ok(())
}
