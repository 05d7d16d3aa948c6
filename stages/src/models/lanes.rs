//! Eight-lane `axpy` and dot products, written out with AVX2 and FMA
//! where the CPU has them, for the loops LLVM does not vectorise well on
//! its own (several dot products sharing one operand came out as a mix of
//! 2- and 4-wide scalar shuffles).
//!
//! Both implementations compute the same thing the same way: eight
//! partial sums, lane l taking elements `8i + l`, each step a fused
//! multiply-add, the lanes added pairwise at the end in a fixed order. So
//! a result does not depend on which one ran.

/// The operations; a kernel written over `L: Lanes` is instantiated once
/// per implementation (see [`lanes_kernel`]).
pub(crate) trait Lanes: Copy {
    /// `dst[i] += a * src[i]` (fused) over `dst`; `src` is at least as long.
    fn axpy(self, dst: &mut [f32], a: f32, src: &[f32]);

    /// `[a . bs[0], ..., a . bs[G - 1]]`; each of `bs` is at least as long
    /// as `a`. `a` is read once for all G.
    fn dots<const G: usize>(self, a: &[f32], bs: [&[f32]; G]) -> [f32; G];
}

const LANES: usize = 8;

/// The eight partial sums added pairwise: (0+4, 1+5, ...), then again.
#[inline(always)]
fn reduce(mut acc: [f32; LANES]) -> f32 {
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            acc[l] += acc[l + width];
        }
    }
    acc[0]
}

/// The last `a.len() % 8` elements, zero-padded to a full chunk.
#[inline(always)]
fn tail(a: &[f32]) -> [f32; LANES] {
    let mut t = [0f32; LANES];
    let rest = a.len() % LANES;
    t[..rest].copy_from_slice(&a[a.len() - rest..]);
    t
}

/// Plain Rust, for CPUs without AVX2 and FMA (and the reference for the
/// tests).
#[derive(Clone, Copy)]
pub(crate) struct Portable;

impl Lanes for Portable {
    #[inline(always)]
    fn axpy(self, dst: &mut [f32], a: f32, src: &[f32]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = a.mul_add(s, *d);
        }
    }

    #[inline(always)]
    fn dots<const G: usize>(self, a: &[f32], bs: [&[f32]; G]) -> [f32; G] {
        let n = a.len();
        let bs = bs.map(|b| &b[..n]);
        let mut acc = [[0f32; LANES]; G];
        let (chunks, _) = a.as_chunks::<LANES>();
        for (i, x) in chunks.iter().enumerate() {
            for (acc, b) in acc.iter_mut().zip(&bs) {
                for l in 0..LANES {
                    acc[l] = x[l].mul_add(b[i * LANES + l], acc[l]);
                }
            }
        }
        let x = tail(a);
        for (acc, b) in acc.iter_mut().zip(&bs) {
            let y = tail(b);
            for l in 0..LANES {
                acc[l] = x[l].mul_add(y[l], acc[l]);
            }
        }
        acc.map(reduce)
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::Avx2;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{LANES, Lanes, reduce, tail};
    use std::arch::x86_64::{
        __m256, _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_set1_ps, _mm256_setzero_ps,
        _mm256_storeu_ps,
    };

    /// Proof that the CPU has AVX2 and FMA: only [`Avx2::detect`] makes one.
    #[derive(Clone, Copy)]
    pub(crate) struct Avx2(());

    impl Avx2 {
        pub(crate) fn detect() -> Option<Self> {
            let ok = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            ok.then_some(Avx2(()))
        }
    }

    #[inline(always)]
    fn load(chunk: &[f32; LANES]) -> __m256 {
        // SAFETY: reads the 8 floats of `chunk`; an `Avx2` exists, so the
        // CPU has AVX (see `Avx2::detect`); unaligned loads are allowed.
        unsafe { _mm256_loadu_ps(chunk.as_ptr()) }
    }

    #[inline(always)]
    fn store(chunk: &mut [f32; LANES], v: __m256) {
        // SAFETY: as in `load`, writing the 8 floats of `chunk`.
        unsafe { _mm256_storeu_ps(chunk.as_mut_ptr(), v) }
    }

    #[inline(always)]
    fn fmadd(a: __m256, b: __m256, c: __m256) -> __m256 {
        // SAFETY: an `Avx2` exists, so the CPU has FMA.
        unsafe { _mm256_fmadd_ps(a, b, c) }
    }

    impl Lanes for Avx2 {
        #[inline(always)]
        fn axpy(self, dst: &mut [f32], a: f32, src: &[f32]) {
            let src = &src[..dst.len()];
            // SAFETY: an `Avx2` exists, so the CPU has AVX.
            let av = unsafe { _mm256_set1_ps(a) };
            let (d_chunks, d_rest) = dst.as_chunks_mut::<LANES>();
            let (s_chunks, s_rest) = src.as_chunks::<LANES>();
            for (d, s) in d_chunks.iter_mut().zip(s_chunks) {
                store(d, fmadd(av, load(s), load(d)));
            }
            for (d, &s) in d_rest.iter_mut().zip(s_rest) {
                *d = a.mul_add(s, *d);
            }
        }

        #[inline(always)]
        fn dots<const G: usize>(self, a: &[f32], bs: [&[f32]; G]) -> [f32; G] {
            let n = a.len();
            let (chunks, _) = a.as_chunks::<LANES>();
            let b_chunks = bs.map(|b| &b[..n].as_chunks::<LANES>().0[..chunks.len()]);
            // SAFETY: an `Avx2` exists, so the CPU has AVX.
            let mut acc = [unsafe { _mm256_setzero_ps() }; G];
            for (i, x) in chunks.iter().enumerate() {
                let x = load(x);
                for (acc, b) in acc.iter_mut().zip(&b_chunks) {
                    *acc = fmadd(x, load(&b[i]), *acc);
                }
            }
            let x = load(&tail(a));
            let mut out = [0f32; G];
            for ((acc, b), out) in acc.iter_mut().zip(bs).zip(&mut out) {
                let mut lanes = [0f32; LANES];
                store(&mut lanes, fmadd(x, load(&tail(&b[..n])), *acc));
                *out = reduce(lanes);
            }
            out
        }
    }
}

/// `fn name[lanes](args) { body }`: the body, generic over `lanes: impl
/// Lanes`, compiled once with AVX2 and FMA enabled (run when the CPU has
/// them, the operations inlined into it) and once for the baseline.
macro_rules! lanes_kernel {
    ($(#[$m:meta])* $vis:vis fn $name:ident[$lanes:ident]($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body<L: $crate::models::lanes::Lanes>($lanes: L, $($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            if let Some(avx2) = $crate::models::lanes::Avx2::detect() {
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn fast(avx2: $crate::models::lanes::Avx2, $($arg: $ty),*) {
                    body(avx2, $($arg),*)
                }
                // SAFETY: `detect` found both features.
                return unsafe { fast(avx2, $($arg),*) };
            }
            body($crate::models::lanes::Portable, $($arg),*)
        }
    };
}
pub(crate) use lanes_kernel;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut r = SplitMix64(seed);
        (0..n).map(|_| r.normal() as f32).collect()
    }

    /// Both implementations give the same bits, and within rounding of f64.
    #[test]
    fn implementations_agree_bit_for_bit_and_with_f64() {
        for n in [0, 1, 7, 8, 9, 63, 1086] {
            let (a, b0, b1, b2) = (random(n, 1), random(n + 3, 2), random(n, 3), random(n, 4));
            let portable = Portable.dots(&a, [&b0, &b1, &b2]);
            for (j, b) in [&b0, &b1, &b2].into_iter().enumerate() {
                let exact: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
                let scale: f64 = a.iter().zip(b).map(|(&x, &y)| (x * y).abs() as f64).sum();
                let err = (portable[j] as f64 - exact).abs();
                assert!(err <= 1e-6 * scale.max(1.0), "n {n}: dot {j} off by {err}");
            }
            let mut d_portable = random(n, 5);
            let mut d_fast = d_portable.clone();
            Portable.axpy(&mut d_portable, 0.37, &b0);
            #[cfg(target_arch = "x86_64")]
            if let Some(avx2) = Avx2::detect() {
                assert_eq!(avx2.dots(&a, [&b0, &b1, &b2]), portable, "n {n}");
                avx2.axpy(&mut d_fast, 0.37, &b0);
                assert_eq!(d_fast, d_portable, "n {n}: axpy");
            }
        }
    }
}
