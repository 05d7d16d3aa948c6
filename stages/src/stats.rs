//! The statistics an evaluation reports: bootstrap intervals (of a
//! proportion, of a PSNR) and the Fréchet distance between two sets of
//! feature vectors.
//!
//! Intervals are percentile bootstraps (Efron & Tibshirani 1993, ch. 13):
//! the statistic recomputed on `resamples` draws with replacement from the
//! observed items, the 2.5th and 97.5th percentiles of those values; for
//! the Fréchet distance, which resampling biases upward, shifted by the
//! bootstrap's estimate of that bias.

use nalgebra::{DMatrix, DVector, SymmetricEigen};

use crate::rng::SplitMix64;

/// A value with its 95 % interval.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Estimate {
    pub value: f64,
    pub lo: f64,
    pub hi: f64,
}

/// The 2.5th and 97.5th percentiles of `values` (sorted in place).
fn percentile_interval(values: &mut [f64]) -> (f64, f64) {
    values.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let i = (q * (values.len() - 1) as f64).round() as usize;
        values[i.min(values.len() - 1)]
    };
    (at(0.025), at(0.975))
}

/// `statistic` recomputed on `resamples` draws of `n` item indices with
/// replacement, from the random stream `name` of `seed` (none when there
/// is nothing to draw).
fn bootstrap_draws(
    n: usize,
    resamples: usize,
    (seed, name): (u64, &str),
    mut statistic: impl FnMut(&[usize]) -> f64,
) -> Vec<f64> {
    if n == 0 {
        return Vec::new();
    }
    let mut rng = SplitMix64::stream(seed, name);
    let mut picks = vec![0usize; n];
    (0..resamples)
        .map(|_| {
            for p in picks.iter_mut() {
                *p = rng.below(n as u64) as usize;
            }
            statistic(&picks)
        })
        .collect()
}

/// `value` with the percentile interval of its bootstrap `draws`.
fn percentile_estimate(value: f64, mut draws: Vec<f64>) -> Estimate {
    if draws.is_empty() {
        return Estimate {
            value,
            lo: value,
            hi: value,
        };
    }
    let (lo, hi) = percentile_interval(&mut draws);
    Estimate { value, lo, hi }
}

/// The fraction of `hits` that are true, with a bootstrap interval over
/// the items.
pub fn proportion(hits: &[bool], resamples: usize, seed: u64) -> Estimate {
    let n = hits.len();
    let fraction = |count: usize| count as f64 / n.max(1) as f64;
    let value = fraction(hits.iter().filter(|h| **h).count());
    let draws = bootstrap_draws(n, resamples, (seed, "bootstrap proportion"), |picks| {
        fraction(picks.iter().filter(|&&i| hits[i]).count())
    });
    percentile_estimate(value, draws)
}

/// PSNR (peak 1) of the mean of per-item squared errors `mse`, with a
/// bootstrap interval over the items: 10 log10(1 / mean), as a level's
/// `val.psnr` is computed, so the two compare.
pub fn psnr(mse: &[f64], resamples: usize, seed: u64) -> Estimate {
    let n = mse.len();
    let of_mean = |sum: f64| 10.0 * (n.max(1) as f64 / sum.max(1e-12)).log10();
    let value = of_mean(mse.iter().sum());
    let draws = bootstrap_draws(n, resamples, (seed, "bootstrap psnr"), |picks| {
        of_mean(picks.iter().map(|&i| mse[i]).sum())
    });
    percentile_estimate(value, draws)
}

/// Mean and covariance (divided by n - 1) of `n` row vectors of `dim`.
fn moments(
    rows: &[f32],
    dim: usize,
    pick: impl Fn(usize) -> usize,
    n: usize,
) -> (DVector<f64>, DMatrix<f64>) {
    let mut mean = DVector::<f64>::zeros(dim);
    for i in 0..n {
        let r = pick(i);
        for (j, v) in rows[r * dim..(r + 1) * dim].iter().enumerate() {
            mean[j] += *v as f64;
        }
    }
    mean /= n.max(1) as f64;
    let mut centred = DMatrix::<f64>::zeros(n, dim);
    for i in 0..n {
        let r = pick(i);
        for (j, v) in rows[r * dim..(r + 1) * dim].iter().enumerate() {
            centred[(i, j)] = *v as f64 - mean[j];
        }
    }
    let cov = centred.transpose() * &centred / (n.max(2) - 1) as f64;
    (mean, cov)
}

/// The symmetric square root of a symmetric positive semi-definite matrix
/// (negative eigenvalues from rounding clamped to 0).
fn sqrt_psd(m: DMatrix<f64>) -> DMatrix<f64> {
    let eig = SymmetricEigen::new(m);
    let roots = eig.eigenvalues.map(|l| l.max(0.0).sqrt());
    &eig.eigenvectors * DMatrix::from_diagonal(&roots) * eig.eigenvectors.transpose()
}

/// The Fréchet distance between Gaussians fitted to two sets of feature
/// vectors: |m1 - m2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), the
/// quantity FID computes on Inception features (Heusel et al. 2017).
fn frechet_of(a: &(DVector<f64>, DMatrix<f64>), b: &(DVector<f64>, DMatrix<f64>)) -> f64 {
    let (m1, s1) = a;
    let (m2, s2) = b;
    let r1 = sqrt_psd(s1.clone());
    let middle = &r1 * s2 * &r1;
    // Symmetrise away rounding before the eigendecomposition.
    let middle = (&middle + middle.transpose()) * 0.5;
    let cross: f64 = SymmetricEigen::new(middle)
        .eigenvalues
        .iter()
        .map(|l| l.max(0.0).sqrt())
        .sum();
    (m1 - m2).norm_squared() + s1.trace() + s2.trace() - 2.0 * cross
}

/// The Fréchet distance between feature sets `a` and `b` (rows of `dim`),
/// with a bootstrap interval over the rows of `a` (`b`, the reference set,
/// is held fixed).
pub fn frechet_distance(a: &[f32], b: &[f32], dim: usize, resamples: usize, seed: u64) -> Estimate {
    let (na, nb) = (a.len() / dim.max(1), b.len() / dim.max(1));
    let reference = moments(b, dim, |i| i, nb);
    let value = frechet_of(&moments(a, dim, |i| i, na), &reference);
    let draws = bootstrap_draws(na, resamples, (seed, "bootstrap frechet"), |picks| {
        frechet_of(&moments(a, dim, |i| picks[i], na), &reference)
    });
    if draws.is_empty() {
        return percentile_estimate(value, draws);
    }
    // A resample repeats rows, which narrows the fitted covariance and
    // inflates the distance: the draws sit above the value (for real
    // images against real images, entirely). The percentile interval is
    // shifted down by the bootstrap's estimate of that bias (the draws'
    // mean minus the value; Efron & Tibshirani 1993, ch. 10) and kept
    // non-negative.
    let bias = draws.iter().sum::<f64>() / draws.len() as f64 - value;
    let e = percentile_estimate(value, draws);
    Estimate {
        value,
        lo: (e.lo - bias).max(0.0),
        hi: (e.hi - bias).max(0.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gaussian(n: usize, dim: usize, mean: f64, scale: f64, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix64(seed);
        (0..n * dim)
            .map(|_| (mean + scale * rng.normal()) as f32)
            .collect()
    }

    #[test]
    fn the_frechet_distance_of_known_gaussians() {
        // N(0, I) against N(1, 4I) in 4 dims: 4 * 1^2 + 4 * (1 + 4 - 2 * 2) = 8.
        let a = gaussian(20_000, 4, 0.0, 1.0, 1);
        let b = gaussian(20_000, 4, 1.0, 2.0, 2);
        let d = frechet_distance(&a, &b, 4, 0, 0).value;
        assert!((d - 8.0).abs() < 0.3, "distance {d}, expected 8");
        let same = frechet_distance(&a, &gaussian(20_000, 4, 0.0, 1.0, 3), 4, 0, 0).value;
        assert!(
            same.abs() < 0.05,
            "distance of one distribution to itself {same}"
        );
    }

    #[test]
    fn bootstrap_intervals_cover_the_value_and_shrink_with_n() {
        let few: Vec<bool> = (0..100).map(|i| i % 4 != 0).collect();
        let many: Vec<bool> = (0..10_000).map(|i| i % 4 != 0).collect();
        let (e1, e2) = (proportion(&few, 1000, 0), proportion(&many, 1000, 0));
        assert_eq!(e1.value, 0.75);
        assert!(e1.lo < 0.75 && 0.75 < e1.hi, "{e1:?}");
        // A binomial's 95 % half-width is 1.96 sqrt(p(1-p)/n): 0.085 and 0.0085.
        assert!(((e1.hi - e1.lo) / 2.0 - 0.085).abs() < 0.02, "{e1:?}");
        assert!(((e2.hi - e2.lo) / 2.0 - 0.0085).abs() < 0.002, "{e2:?}");
        let a = gaussian(300, 3, 0.0, 1.0, 4);
        let b = gaussian(3000, 3, 0.5, 1.0, 5);
        let f = frechet_distance(&a, &b, 3, 200, 0);
        assert!(f.lo <= f.value && f.value <= f.hi && f.lo < f.hi, "{f:?}");
        // Two samples of one distribution: the interval reaches down to 0.
        let same = frechet_distance(&a, &gaussian(3000, 3, 0.0, 1.0, 6), 3, 200, 0);
        assert!(same.lo < 0.02 && same.value <= same.hi, "{same:?}");
    }

    #[test]
    fn psnr_is_of_the_mean_error_and_its_interval_narrows_with_n() {
        // Errors 0.01 and 0.03: mean 0.02, 10 log10(50) = 16.99 dB, not
        // the mean of the two images' PSNRs (18.29 dB).
        let two = psnr(&[0.01, 0.03], 0, 0);
        assert!((two.value - 16.9897).abs() < 1e-4, "{two:?}");
        let errors = |n: usize| -> Vec<f64> {
            let mut rng = SplitMix64(7);
            (0..n).map(|_| 0.01 + 0.02 * rng.uniform()).collect()
        };
        let (few, many) = (psnr(&errors(10), 1000, 0), psnr(&errors(1000), 1000, 0));
        for e in [few, many] {
            assert!(e.lo < e.value && e.value < e.hi, "{e:?}");
        }
        assert!(
            many.hi - many.lo < (few.hi - few.lo) / 3.0,
            "{few:?} {many:?}"
        );
    }
}
