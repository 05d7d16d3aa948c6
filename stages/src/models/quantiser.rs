//! The vector quantiser: a K x D codebook, nearest code by L2, a
//! straight-through gradient to the encoder, a commitment loss, and codebook
//! updates by exponential moving averages (van den Oord et al. 2017,
//! appendix), with dead codes re-seeded from encoder outputs.
//!
//! The codebook is not a trainable variable: the optimiser never sees it.
//! On the CPU its EMA state lives on the host as f32, updated in a fixed
//! order, so a resumed run updates it bit for bit like an uninterrupted
//! one. On a GPU it lives on the device: a step's update is two
//! scatter-adds and a few element-wise kernels, and the batch's encoder
//! outputs never cross to the host (their sums' order is the device's,
//! so resume there is exact to rounding, not to the bit).

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::nearest::nearest_code;
use crate::rng::SplitMix64;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuantiserConfig {
    /// K, the number of codes.
    pub codebook_size: usize,
    /// EMA decay of the cluster sizes and sums.
    pub decay: f64,
    /// Laplace smoothing of the cluster sizes (keeps unused codes finite).
    pub epsilon: f64,
    /// Weight of the commitment loss `||z - sg(e)||^2`.
    pub beta: f64,
    /// A code whose EMA cluster size falls below this is dead.
    pub dead_below: f64,
    /// Every this many steps, dead codes move to random encoder outputs of
    /// the current batch (0: never).
    pub reseed_every: u64,
}

impl Default for QuantiserConfig {
    fn default() -> Self {
        QuantiserConfig {
            codebook_size: 512,
            decay: 0.99,
            epsilon: 1e-5,
            beta: 0.25,
            dead_below: 1.0,
            reseed_every: 100,
        }
    }
}

/// What one quantisation of a batch gives.
pub struct Quantised {
    /// Nearest code per row, u32, shape (N,).
    pub codes: Tensor,
    /// `z + sg(e - z)`: the code vectors forward, the identity backward.
    pub straight_through: Tensor,
    /// `mean ||z - sg(e)||^2` (not yet weighted by beta).
    pub commitment: Tensor,
}

pub struct Quantiser {
    pub cfg: QuantiserConfig,
    pub dim: usize,
    /// K x D, row-major. With `on_device`, these three are stale between
    /// [`Quantiser::sync_to_host`] calls.
    codebook: Vec<f32>,
    cluster_size: Vec<f32>,
    embed_sum: Vec<f32>,
    codebook_t: Tensor,
    on_device: Option<DeviceEma>,
}

/// The EMA state kept on the device: cluster sizes (K) and sums (K x D).
struct DeviceEma {
    cluster_size: Tensor,
    embed_sum: Tensor,
}

impl Quantiser {
    /// A codebook drawn from N(0, 1) by `rng` (the run's seeded stream).
    pub fn new(
        cfg: QuantiserConfig,
        dim: usize,
        rng: &mut SplitMix64,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let k = cfg.codebook_size;
        let codebook: Vec<f32> = (0..k * dim).map(|_| rng.normal() as f32).collect();
        let codebook_t = Tensor::from_vec(codebook.clone(), (k, dim), device)?;
        let mut q = Quantiser {
            embed_sum: codebook.clone(),
            cluster_size: vec![0.0; k],
            codebook,
            codebook_t,
            dim,
            cfg,
            on_device: None,
        };
        q.keep_ema_on_device(device.is_cuda())?;
        Ok(q)
    }

    /// Where the EMA state lives: the device (a GPU's default) or the host
    /// (the CPU's, bit-exact). Tests move it to compare the two.
    pub fn keep_ema_on_device(&mut self, on: bool) -> candle_core::Result<()> {
        self.sync_to_host()?;
        self.on_device = None;
        if on {
            let (k, d, dev) = (self.cfg.codebook_size, self.dim, self.codebook_t.device());
            self.on_device = Some(DeviceEma {
                cluster_size: Tensor::from_vec(self.cluster_size.clone(), k, dev)?,
                embed_sum: Tensor::from_vec(self.embed_sum.clone(), (k, d), dev)?,
            });
        }
        Ok(())
    }

    /// Brings the device's EMA state and codebook to the host copies.
    fn sync_to_host(&mut self) -> candle_core::Result<()> {
        if let Some(e) = &self.on_device {
            self.cluster_size = e.cluster_size.to_vec1::<f32>()?;
            self.embed_sum = e.embed_sum.flatten_all()?.to_vec1::<f32>()?;
            self.codebook = self.codebook_t.flatten_all()?.to_vec1::<f32>()?;
        }
        Ok(())
    }

    pub fn codebook(&self) -> &Tensor {
        &self.codebook_t
    }

    pub fn cluster_sizes(&self) -> candle_core::Result<Vec<f32>> {
        match &self.on_device {
            Some(e) => e.cluster_size.to_vec1::<f32>(),
            None => Ok(self.cluster_size.clone()),
        }
    }

    /// Quantises `z` (N x D).
    pub fn forward(&self, z: &Tensor) -> candle_core::Result<Quantised> {
        let codes = nearest_code(z, &self.codebook_t)?;
        let e = self.codebook_t.index_select(&codes, 0)?;
        let straight_through = (z + (e.clone() - z)?.detach())?;
        let commitment = (z - e.detach())?.sqr()?.mean_all()?;
        Ok(Quantised {
            codes,
            straight_through,
            commitment,
        })
    }

    /// Only the codes (encoding, no gradient).
    pub fn codes(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        nearest_code(z, &self.codebook_t)
    }

    /// One EMA step from a batch: `z` (N x D) and its codes (N, u32),
    /// where the state lives (see [`Quantiser::keep_ema_on_device`]).
    pub fn ema_update_batch(&mut self, z: &Tensor, codes: &Tensor) -> candle_core::Result<()> {
        let Some(e) = &mut self.on_device else {
            let z = z.flatten_all()?.to_vec1::<f32>()?;
            return self.ema_update(&z, &codes.to_vec1::<u32>()?);
        };
        let (k, d, dev) = (self.cfg.codebook_size, self.dim, z.device());
        let z = z.reshape(((), d))?;
        let n = z.dim(0)?;
        let sums = Tensor::zeros((k, d), DType::F32, dev)?.index_add(codes, &z, 0)?;
        let counts = Tensor::zeros(k, DType::F32, dev)?.index_add(
            codes,
            &Tensor::ones(n, DType::F32, dev)?,
            0,
        )?;
        let decay = self.cfg.decay;
        e.cluster_size = ((&e.cluster_size * decay)? + (counts * (1.0 - decay))?)?;
        e.embed_sum = ((&e.embed_sum * decay)? + (sums * (1.0 - decay))?)?;
        // The same smoothing as the host's, as kernels: N_k' = (N_k + eps) / (n + K eps) * n.
        let total = e.cluster_size.sum_all()?;
        let eps = self.cfg.epsilon;
        let smoothed = (&e.cluster_size + eps)?
            .broadcast_div(&(&total + k as f64 * eps)?)?
            .broadcast_mul(&total)?;
        self.codebook_t = e.embed_sum.broadcast_div(&smoothed.unsqueeze(1)?)?;
        Ok(())
    }

    /// One EMA step from a batch on the host: `z` rows (N x D, f32) and
    /// their codes.
    pub fn ema_update(&mut self, z: &[f32], codes: &[u32]) -> candle_core::Result<()> {
        let (k, d) = (self.cfg.codebook_size, self.dim);
        let mut counts = vec![0f64; k];
        let mut sums = vec![0f64; k * d];
        for (row, &c) in z.chunks_exact(d).zip(codes) {
            let c = c as usize;
            counts[c] += 1.0;
            for (s, &x) in sums[c * d..(c + 1) * d].iter_mut().zip(row) {
                *s += x as f64;
            }
        }
        let decay = self.cfg.decay;
        for (size, &count) in self.cluster_size.iter_mut().zip(&counts) {
            *size = (decay * *size as f64 + (1.0 - decay) * count) as f32;
        }
        for (m, &sum) in self.embed_sum.iter_mut().zip(&sums) {
            *m = (decay * *m as f64 + (1.0 - decay) * sum) as f32;
        }
        let n: f64 = self.cluster_size.iter().map(|&x| x as f64).sum();
        let eps = self.cfg.epsilon;
        for c in 0..k {
            let smoothed = (self.cluster_size[c] as f64 + eps) / (n + k as f64 * eps) * n;
            for j in 0..d {
                let i = c * d + j;
                self.codebook[i] = (self.embed_sum[i] as f64 / smoothed) as f32;
            }
        }
        self.refresh()
    }

    /// Replaces the codebook (a trained level being loaded).
    pub fn set_codebook(&mut self, t: &Tensor) -> candle_core::Result<()> {
        let (k, d) = (self.cfg.codebook_size, self.dim);
        if t.dims() != [k, d] {
            candle_core::bail!("the codebook is {:?}, the level needs [{k}, {d}]", t.dims());
        }
        self.sync_to_host()?;
        self.codebook = t.flatten_all()?.to_vec1::<f32>()?;
        self.refresh()
    }

    /// Codes whose EMA cluster size is below `dead_below`.
    pub fn dead_codes(&self) -> candle_core::Result<Vec<usize>> {
        let sizes = self.cluster_sizes()?;
        Ok((0..self.cfg.codebook_size)
            .filter(|&c| (sizes[c] as f64) < self.cfg.dead_below)
            .collect())
    }

    /// [`Quantiser::reseed_dead`] from a batch's `z` (N x D) wherever the
    /// state lives: re-seeding is rare (every `reseed_every` steps), so
    /// device state makes the round trip through the host for it.
    pub fn reseed_dead_batch(
        &mut self,
        z: &Tensor,
        rng: &mut SplitMix64,
    ) -> candle_core::Result<usize> {
        let z = z.flatten_all()?.to_vec1::<f32>()?;
        let on_device = self.on_device.is_some();
        self.keep_ema_on_device(false)?;
        let moved = self.reseed_dead(&z, rng)?;
        self.keep_ema_on_device(on_device)?;
        Ok(moved)
    }

    /// Moves every dead code onto a random row of `z` (N x D, host f32) and
    /// gives it a cluster size of 1. Returns how many were moved.
    pub fn reseed_dead(&mut self, z: &[f32], rng: &mut SplitMix64) -> candle_core::Result<usize> {
        let d = self.dim;
        let rows = z.len() / d;
        let dead = self.dead_codes()?;
        if rows == 0 || dead.is_empty() {
            return Ok(0);
        }
        for &c in &dead {
            let r = rng.below(rows as u64) as usize;
            let row = &z[r * d..(r + 1) * d];
            self.codebook[c * d..(c + 1) * d].copy_from_slice(row);
            self.embed_sum[c * d..(c + 1) * d].copy_from_slice(row);
            self.cluster_size[c] = 1.0;
        }
        self.refresh()?;
        Ok(dead.len())
    }

    fn refresh(&mut self) -> candle_core::Result<()> {
        self.codebook_t = Tensor::from_vec(
            self.codebook.clone(),
            (self.cfg.codebook_size, self.dim),
            self.codebook_t.device(),
        )?;
        Ok(())
    }

    /// The state a checkpoint keeps, under `prefix`.
    pub fn state(&self, prefix: &str) -> candle_core::Result<Vec<(String, Tensor)>> {
        let dev = self.codebook_t.device();
        let (k, d) = (self.cfg.codebook_size, self.dim);
        if let Some(e) = &self.on_device {
            return Ok(vec![
                (format!("{prefix}codebook"), self.codebook_t.clone()),
                (format!("{prefix}ema_cluster_size"), e.cluster_size.clone()),
                (format!("{prefix}ema_embed_sum"), e.embed_sum.clone()),
            ]);
        }
        Ok(vec![
            (format!("{prefix}codebook"), self.codebook_t.clone()),
            (
                format!("{prefix}ema_cluster_size"),
                Tensor::from_vec(self.cluster_size.clone(), k, dev)?,
            ),
            (
                format!("{prefix}ema_embed_sum"),
                Tensor::from_vec(self.embed_sum.clone(), (k, d), dev)?,
            ),
        ])
    }

    pub fn load_state(
        &mut self,
        tensors: &BTreeMap<String, Tensor>,
        prefix: &str,
    ) -> candle_core::Result<()> {
        let get = |name: &str, n: usize| -> candle_core::Result<Vec<f32>> {
            let t = tensors
                .get(&format!("{prefix}{name}"))
                .ok_or_else(|| candle_core::Error::Msg(format!("no tensor `{prefix}{name}`")))?;
            let v = t.flatten_all()?.to_vec1::<f32>()?;
            if v.len() != n {
                candle_core::bail!(
                    "`{prefix}{name}` has {} values, the quantiser needs {n}",
                    v.len()
                );
            }
            Ok(v)
        };
        let (k, d) = (self.cfg.codebook_size, self.dim);
        self.codebook = get("codebook", k * d)?;
        self.cluster_size = get("ema_cluster_size", k)?;
        self.embed_sum = get("ema_embed_sum", k * d)?;
        self.refresh()?;
        let on_device = self.on_device.take().is_some();
        self.keep_ema_on_device(on_device)
    }
}

/// Perplexity `exp(H)` of a code histogram and the number of unused codes.
pub fn usage(histogram: &[u64]) -> (f64, usize) {
    let total: u64 = histogram.iter().sum();
    if total == 0 {
        return (0.0, histogram.len());
    }
    let h: f64 = histogram
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / total as f64;
            -p * p.ln()
        })
        .sum();
    (h.exp(), histogram.iter().filter(|&&c| c == 0).count())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quantiser(codebook: &[f32], k: usize, d: usize) -> Quantiser {
        let cfg = QuantiserConfig {
            codebook_size: k,
            decay: 0.9,
            epsilon: 1e-5,
            ..Default::default()
        };
        let mut q = Quantiser::new(cfg, d, &mut SplitMix64(1), &Device::Cpu).unwrap();
        q.codebook = codebook.to_vec();
        q.embed_sum = codebook.to_vec();
        q.refresh().unwrap();
        q
    }

    #[test]
    fn straight_through_gradient_is_the_identity_on_the_encoder_output() {
        let q = quantiser(&[0., 0., 1., 1.], 2, 2);
        let z =
            candle_core::Var::new(&[[0.1f32, 0.2], [0.9, 0.7], [0.4, 0.3]], &Device::Cpu).unwrap();
        let out = q.forward(z.as_tensor()).unwrap();
        assert_eq!(out.codes.to_vec1::<u32>().unwrap(), [0, 1, 0]);
        // Forward: the code vectors.
        assert_eq!(
            out.straight_through.to_vec2::<f32>().unwrap(),
            [[0., 0.], [1., 1.], [0., 0.]]
        );
        // Backward: d(sum w * st)/dz = w exactly.
        let w = Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &Device::Cpu).unwrap();
        let grads = (out.straight_through * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert_eq!(
            grads.get(&z).unwrap().to_vec2::<f32>().unwrap(),
            w.to_vec2::<f32>().unwrap()
        );
        // Commitment: mean over all elements of (z - e)^2.
        let c = out.commitment.to_scalar::<f32>().unwrap();
        let want = (0.01 + 0.04 + 0.01 + 0.09 + 0.16 + 0.09) / 6.0;
        assert!((c - want).abs() < 1e-6, "{c} vs {want}");
    }

    #[test]
    fn ema_update_matches_a_hand_computation() {
        // K = 3, D = 1, decay 0.9, eps 1e-5; codebook [0, 10, 20].
        let mut q = quantiser(&[0., 10., 20.], 3, 1);
        // Rows 1, 3 -> code 0; 9 -> code 1; code 2 unused.
        q.ema_update(&[1., 3., 9.], &[0, 0, 1]).unwrap();
        // N = 0.9 * 0 + 0.1 * [2, 1, 0] = [0.2, 0.1, 0]
        // m = 0.9 * [0, 10, 20] + 0.1 * [4, 9, 0] = [0.4, 9.9, 18]
        // n = 0.3; smoothed N_k = (N_k + 1e-5) / (0.3 + 3e-5) * 0.3
        let n = 0.3f64;
        let sm = |nk: f64| (nk + 1e-5) / (n + 3e-5) * n;
        let want = [0.4 / sm(0.2), 9.9 / sm(0.1), 18.0 / sm(0.0)];
        let got = q.codebook.clone();
        for (g, w) in got.iter().zip(want) {
            assert!(
                ((*g as f64) - w).abs() < 1e-3 * w.abs().max(1.0),
                "{got:?} vs {want:?}"
            );
        }
        let cs = q.cluster_sizes().unwrap();
        assert!((cs[0] - 0.2).abs() < 1e-7 && (cs[1] - 0.1).abs() < 1e-7 && cs[2] == 0.0);
        // The smoothing keeps the unused code finite, and far away: it is dead.
        assert!(got[2].is_finite());
        assert_eq!(
            q.dead_codes().unwrap(),
            [0, 1, 2],
            "all below the default threshold of 1"
        );
    }

    #[test]
    fn dead_codes_are_reseeded_from_encoder_outputs() {
        let mut q = quantiser(&[0., 0., 100., 100.], 2, 2);
        q.cluster_size = vec![5.0, 0.0];
        let z = [3f32, 4., 5., 6.];
        let moved = q.reseed_dead(&z, &mut SplitMix64(2)).unwrap();
        assert_eq!(moved, 1);
        let row = &q.codebook[2..4];
        assert!(row == [3., 4.] || row == [5., 6.], "{row:?}");
        assert_eq!(q.cluster_sizes().unwrap(), [5.0, 1.0]);
        assert_eq!(q.codebook[..2], [0., 0.], "live codes stay");
    }

    #[test]
    fn the_device_update_agrees_with_the_host_update() {
        // 64 codes of 8, 40 steps of 256 rows, a re-seed every 10: the two
        // paths must end within rounding (f32 sums on the device against
        // f64 on the host).
        let (k, d) = (64, 8);
        let mut rng = SplitMix64(7);
        let start: Vec<f32> = (0..k * d).map(|_| rng.normal() as f32).collect();
        let mut host = quantiser(&start, k, d);
        let mut device = quantiser(&start, k, d);
        device.keep_ema_on_device(true).unwrap();
        let (mut r1, mut r2) = (SplitMix64(3), SplitMix64(3));
        for step in 1..=40 {
            let z: Vec<f32> = (0..256 * d).map(|_| rng.normal() as f32 * 0.5).collect();
            let zt = Tensor::from_vec(z.clone(), (256, d), &Device::Cpu).unwrap();
            let codes = host.codes(&zt).unwrap();
            host.ema_update(&z, &codes.to_vec1::<u32>().unwrap())
                .unwrap();
            device.ema_update_batch(&zt, &codes).unwrap();
            if step % 10 == 0 {
                assert_eq!(
                    host.reseed_dead(&z, &mut r1).unwrap(),
                    device.reseed_dead_batch(&zt, &mut r2).unwrap()
                );
            }
        }
        let a = host
            .codebook()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = device
            .codebook()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs() / x.abs().max(1.0))
            .fold(0f32, f32::max);
        assert!(worst < 1e-4, "codebooks differ by {worst}");
        let (sa, sb) = (
            host.cluster_sizes().unwrap(),
            device.cluster_sizes().unwrap(),
        );
        assert!(
            sa.iter().zip(&sb).all(|(x, y)| (x - y).abs() < 1e-4),
            "{sa:?} vs {sb:?}"
        );
        // A checkpoint of the device state reads back into a host quantiser.
        let state: BTreeMap<String, Tensor> = device.state("q.").unwrap().into_iter().collect();
        let mut back = quantiser(&start, k, d);
        back.load_state(&state, "q.").unwrap();
        assert_eq!(back.cluster_sizes().unwrap(), sb);
    }

    #[test]
    fn usage_gives_perplexity_and_unused_count() {
        let (p, unused) = usage(&[5, 5, 5, 5, 0]);
        assert!((p - 4.0).abs() < 1e-9);
        assert_eq!(unused, 1);
        assert_eq!(usage(&[7, 0]).0, 1.0);
    }
}
