//! Trainable variables with a deterministic start: a `VarBuilder` backend
//! that initialises each variable from a generator seeded by the run's seed
//! and the variable's name, so the same config and seed give the same bits
//! whatever order the layers are built in. candle's own `VarMap` draws from
//! an unseedable thread RNG.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::init::NormalOrUniform;
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use crate::rng::SplitMix64;

/// Name -> variable, in name order (the order of the optimiser's state and of
/// every file written).
#[derive(Clone)]
pub struct SeededVars {
    seed: u64,
    vars: Arc<Mutex<BTreeMap<String, Var>>>,
}

impl SeededVars {
    pub fn new(seed: u64) -> Self {
        SeededVars {
            seed,
            vars: Arc::new(Mutex::new(BTreeMap::new())),
        }
    }

    pub fn var_builder(&self, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), DType::F32, device.clone())
    }

    /// All variables, sorted by name.
    pub fn all(&self) -> Vec<(String, Var)> {
        self.lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub fn parameter_count(&self) -> usize {
        self.lock().values().map(|v| v.elem_count()).sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Var>> {
        // A poisoned lock only means another thread panicked mid-insert of a
        // whole Var; the map itself is intact.
        self.vars.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Overwrites every variable with the tensor of the same name in `tensors`
    /// (a loaded checkpoint); a missing or misshapen one is an error that
    /// says which (the caller names the file).
    pub fn load(&self, tensors: &BTreeMap<String, Tensor>, prefix: &str) -> Result<(), String> {
        for (name, var) in self.lock().iter() {
            let key = format!("{prefix}{name}");
            let t = tensors
                .get(&key)
                .ok_or_else(|| format!("has no tensor `{key}`"))?;
            if t.shape() != var.shape() || t.dtype() != var.dtype() {
                return Err(format!(
                    "`{key}` is {:?} {:?}, the model needs {:?} {:?}",
                    t.dtype(),
                    t.dims(),
                    var.dtype(),
                    var.dims()
                ));
            }
            // Shape, dtype and device match, which is all `set` checks.
            var.set(t).map_err(|e| format!("`{key}`: {e}"))?;
        }
        Ok(())
    }
}

/// Values for one variable, drawn like candle's `Init` does but from `rng`.
fn init_values(shape: &Shape, init: Init, rng: &mut SplitMix64) -> Vec<f32> {
    let n = shape.elem_count();
    let uniform = |rng: &mut SplitMix64, lo: f64, up: f64| (lo + (up - lo) * rng.uniform()) as f32;
    match init {
        Init::Const(c) => vec![c as f32; n],
        Init::Uniform { lo, up } => (0..n).map(|_| uniform(rng, lo, up)).collect(),
        Init::Randn { mean, stdev } => (0..n)
            .map(|_| (mean + stdev * rng.normal()) as f32)
            .collect(),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
            match dist {
                NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    (0..n).map(|_| uniform(rng, -bound, bound)).collect()
                }
                NormalOrUniform::Normal => (0..n).map(|_| (std * rng.normal()) as f32).collect(),
            }
        }
    }
}

impl SimpleBackend for SeededVars {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut vars = self.lock();
        if let Some(v) = vars.get(name) {
            if v.shape() != &s {
                candle_core::bail!(
                    "variable `{name}` requested as {s:?}, exists as {:?}",
                    v.shape()
                );
            }
            return Ok(v.as_tensor().clone());
        }
        let mut rng = SplitMix64::stream(self.seed, &format!("init/{name}"));
        let values = init_values(&s, h, &mut rng);
        let var = Var::from_tensor(&Tensor::from_vec(values, s, dev)?.to_dtype(dtype)?)?;
        let t = var.as_tensor().clone();
        vars.insert(name.to_string(), var);
        Ok(t)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.lock()
            .get(name)
            .map(|v| v.as_tensor().clone())
            .ok_or_else(|| candle_core::Error::Msg(format!("no variable `{name}`")))
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.lock().contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_and_name_give_the_same_values_in_any_order() {
        let dev = Device::Cpu;
        let (a, b) = (SeededVars::new(5), SeededVars::new(5));
        let (va, vb) = (a.var_builder(&dev), b.var_builder(&dev));
        let init = candle_nn::init::DEFAULT_KAIMING_NORMAL;
        let x1 = va.get_with_hints((4, 3), "x", init).unwrap();
        let _y1 = va.get_with_hints(7, "y", init).unwrap();
        let _y2 = vb.get_with_hints(7, "y", init).unwrap();
        let x2 = vb.get_with_hints((4, 3), "x", init).unwrap();
        assert_eq!(
            x1.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            x2.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let other = SeededVars::new(6)
            .var_builder(&dev)
            .get_with_hints((4, 3), "x", init)
            .unwrap();
        assert_ne!(
            x1.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            other.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        assert_eq!(
            a.all().iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            ["x", "y"]
        );
    }
}
