//! What the CPU kernels of the models share: a bounds-checked gemm on
//! strided views, per-thread scratch buffers, fused-ReLU helpers,
//! deterministic chunked sums of per-image gradients, and outputs written
//! once (unzeroed, finished with a bias or a ReLU's backward as stored).

use std::cell::RefCell;
use std::mem::MaybeUninit;

use rayon::prelude::*;

/// Images per partial sum of a weight gradient.
pub(crate) const CHUNK: usize = 8;

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on a buffer of `len` floats (contents unspecified) that this
/// thread keeps for the next call: a step reuses its buffers instead of
/// mapping fresh pages for every op.
pub(crate) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
            f(&mut buf[..len])
        }
        // Re-entered (a rayon worker that stole work while in `f`).
        Err(_) => f(&mut vec![0.0; len]),
    })
}

/// A strided read-only matrix: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> View<'a> {
    pub fn new(data: &'a [f32], rs: usize, cs: usize) -> Self {
        View { data, rs, cs }
    }

    fn check(&self, rows: usize, cols: usize) {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * self.rs + (cols - 1) * self.cs;
            assert!(
                last < self.data.len(),
                "a gemm operand reads past its slice"
            );
        }
    }
}

/// `dst (m x n, row-major) = [dst +] a (m x k) . b (k x n)`.
pub(crate) fn gemm(
    dst: &mut [f32],
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    a: View,
    b: View,
    parallel: bool,
) {
    gemm_any(dst, (n, 1), (m, n, k), accumulate, a, b, parallel)
}

/// `dst = dst + a . b` single-threaded, into a strided `dst`: element
/// (i, j) at `i * rs + j * cs` (`(rs, cs)`), which must not overlap.
pub(crate) fn gemm_strided(
    dst: &mut [f32],
    (rs, cs): (usize, usize),
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    a: View,
    b: View,
) {
    gemm_any(dst, (rs, cs), (m, n, k), accumulate, a, b, false)
}

fn gemm_any(
    dst: &mut [f32],
    (dst_rs, dst_cs): (usize, usize),
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    a: View,
    b: View,
    parallel: bool,
) {
    let distinct = (dst_cs >= 1 && dst_rs >= n * dst_cs) || (dst_rs >= 1 && dst_cs >= m * dst_rs);
    assert!(
        m == 0 || n == 0 || (distinct && dst.len() > (m - 1) * dst_rs + (n - 1) * dst_cs),
        "a gemm result does not fit its slice"
    );
    a.check(m, k);
    b.check(k, n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    dst[i * dst_rs + j * dst_cs] = 0.0;
                }
            }
        }
        return;
    }
    let parallelism = match parallel {
        true => gemm::Parallelism::Rayon(0),
        false => gemm::Parallelism::None,
    };
    // SAFETY: every pointer covers the elements the strides reach (checked
    // above), `dst` is exclusively borrowed and does not alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// A NaN with a payload no kernel makes: what debug builds fill a
/// [`written_in_full`] buffer with, to find elements left unwritten.
const UNWRITTEN: u32 = 0x7fa1_b2c3;

/// An op's output of `len` floats, which `write` must store every element
/// of. It gets the buffer uninitialised: no pass zeroing memory that is
/// overwritten next (a full pass over a batch's activations, 8 MB at
/// 32 x 32 x 32 x 64, took about a millisecond here). Debug builds (the
/// tests) fill it with a marker first and panic if any is left.
pub(crate) fn written_in_full(len: usize, write: impl FnOnce(&mut [MaybeUninit<f32>])) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(len);
    let buf = &mut v.spare_capacity_mut()[..len];
    if cfg!(debug_assertions) {
        for x in buf.iter_mut() {
            x.write(f32::from_bits(UNWRITTEN));
        }
    }
    write(buf);
    // SAFETY: the capacity is `len`, and `write` initialised all `len`
    // elements: each caller's writer stores every element of every
    // image's chunk (in debug builds checked just below).
    unsafe { v.set_len(len) };
    if cfg!(debug_assertions) {
        let left = v.iter().filter(|x| x.to_bits() == UNWRITTEN).count();
        assert!(
            left == 0,
            "a kernel left {left} of {len} output values unwritten"
        );
    }
    v
}

/// A layer's input gradient, image by image in parallel and written once:
/// `image((dx, finish), dy, scratch)` fills one image's `dx` (x's images
/// are `len` floats) from its `dy` (`dy_len` floats), storing through
/// `finish`, the backward of the layer's fused input ReLU when it had one;
/// `scratch` is a per-thread buffer of `scratch_len` floats.
pub(crate) fn input_grad_by_image(
    (x, len): (&[f32], usize),
    (dy, dy_len): (&[f32], usize),
    relu_input: bool,
    scratch_len: usize,
    image: impl Fn((&mut [MaybeUninit<f32>], Finish), &[f32], &mut [f32]) + Sync,
) -> Vec<f32> {
    written_in_full(x.len(), |dx| {
        dx.par_chunks_mut(len)
            .zip(x.par_chunks(len).zip(dy.par_chunks(dy_len)))
            .for_each(|(dxb, (xb, dyb))| {
                let finish = Finish::input_grad(relu_input, xb);
                with_scratch(scratch_len, |buf| image((dxb, finish), dyb, buf))
            })
    })
}

/// What a kernel's last pass does to each value as it stores it in the
/// output, so bias and the backward of a fused ReLU cost no pass of their
/// own.
#[derive(Clone, Copy)]
pub(crate) enum Finish<'a> {
    Store,
    /// Adds plane i's `bias[i]`.
    Bias(&'a [f32]),
    /// Stores 0 where the same element of `input` is negative: the input
    /// gradient of a layer that ReLU'd its input (candle's ReLU passes
    /// the gradient at 0).
    ReluGrad(&'a [f32]),
}

impl<'a> Finish<'a> {
    /// The finish of the input gradient of a layer with input `x`:
    /// [`Finish::ReluGrad`] when the layer ReLU'd its input.
    pub(crate) fn input_grad(relu_input: bool, x: &'a [f32]) -> Self {
        match relu_input {
            true => Finish::ReluGrad(x),
            false => Finish::Store,
        }
    }

    /// The finish of `len` values from element `at` of an image, in plane
    /// `plane`.
    #[inline(always)]
    pub(crate) fn run(self, plane: usize, at: usize, len: usize) -> RunFinish<'a> {
        match self {
            Finish::Store => RunFinish::Store,
            Finish::Bias(b) => RunFinish::Add(b[plane]),
            Finish::ReluGrad(x) => RunFinish::Mask(&x[at..at + len]),
        }
    }
}

/// [`Finish`] for one run of consecutive values.
#[derive(Clone, Copy)]
pub(crate) enum RunFinish<'a> {
    Store,
    Add(f32),
    Mask(&'a [f32]),
}

impl RunFinish<'_> {
    /// Value j of the run.
    #[inline(always)]
    pub(crate) fn apply(self, j: usize, v: f32) -> f32 {
        match self {
            RunFinish::Store => v,
            RunFinish::Add(b) => v + b,
            RunFinish::Mask(x) => {
                if x[j] < 0.0 {
                    0.0
                } else {
                    v
                }
            }
        }
    }
}

/// `dst[j] = f(src[j])` for the run.
#[inline(always)]
pub(crate) fn store_run(dst: &mut [MaybeUninit<f32>], src: &[f32], f: RunFinish) {
    let src = &src[..dst.len()];
    match f {
        RunFinish::Store => {
            dst.write_copy_of_slice(src);
        }
        RunFinish::Add(b) => {
            for (d, &s) in dst.iter_mut().zip(src) {
                d.write(s + b);
            }
        }
        RunFinish::Mask(x) => {
            for ((d, &s), &x) in dst.iter_mut().zip(src).zip(x) {
                // A select, not a conditional store, so the loop vectorises.
                d.write(if x < 0.0 { 0.0 } else { s });
            }
        }
    }
}

/// `v`, ReLU'd when `on`.
#[inline(always)]
pub(crate) fn relu(v: f32, on: bool) -> f32 {
    if on { v.max(0.0) } else { v }
}

/// `dst = relu(src)` when `on`, else a copy.
pub(crate) fn relu_copy(dst: &mut [f32], src: &[f32], on: bool) {
    for (d, &v) in dst.iter_mut().zip(src) {
        *d = relu(v, on);
    }
}

/// The gradients of a layer op over (x, weight, bias): dx from `data`
/// when x needs one, and dW (of `shape`) and db (`bias` values) split
/// from the flat [dW | db] that `weight` returns.
pub(crate) fn layer_grads(
    x: &candle_core::Tensor,
    (shape, bias): ((usize, usize), usize),
    data: impl FnOnce() -> candle_core::Result<candle_core::Tensor>,
    weight: impl FnOnce() -> candle_core::Result<candle_core::Tensor>,
) -> candle_core::Result<(
    Option<candle_core::Tensor>,
    Option<candle_core::Tensor>,
    Option<candle_core::Tensor>,
)> {
    let dx = match x.track_op() {
        true => Some(data()?),
        false => None,
    };
    let both = weight()?;
    let n = shape.0 * shape.1;
    let dw = both.narrow(0, 0, n)?.reshape(shape)?;
    Ok((dx, Some(dw), Some(both.narrow(0, n, bias)?)))
}

/// Zeroes the gradient where the input of a fused ReLU was negative
/// (candle's ReLU passes the gradient at 0).
pub(crate) fn relu_backward(grad: &mut [f32], input: &[f32]) {
    for (g, &x) in grad.iter_mut().zip(input) {
        // A select, not a conditional store, so the loop vectorises.
        *g = if x < 0.0 { 0.0 } else { *g };
    }
}

/// Sums per-chunk partial gradients (each `len` long) in chunk order.
pub(crate) fn sum_chunks(
    images: usize,
    len: usize,
    partial: impl Fn(std::ops::Range<usize>, &mut [f32]) + Sync,
) -> Vec<f32> {
    let chunks: Vec<Vec<f32>> = (0..images.div_ceil(CHUNK))
        .into_par_iter()
        .map(|i| {
            let mut acc = vec![0f32; len];
            partial(i * CHUNK..((i + 1) * CHUNK).min(images), &mut acc);
            acc
        })
        .collect();
    let mut total = vec![0f32; len];
    for c in &chunks {
        for (t, &v) in total.iter_mut().zip(c) {
            *t += v;
        }
    }
    total
}

/// `sums[i] += sum(planes[i])` for consecutive planes of `plane` values:
/// a bias gradient.
pub(crate) fn add_plane_sums(sums: &mut [f32], planes: &[f32], plane: usize) {
    for (d, p) in sums.iter_mut().zip(planes.chunks_exact(plane)) {
        *d += p.iter().sum::<f32>();
    }
}

/// Adds `bias[i]` to every value of plane i of `planes`.
pub(crate) fn add_bias(planes: &mut [f32], bias: &[f32], plane: usize) {
    for (p, &b) in planes.chunks_exact_mut(plane).zip(bias) {
        for v in p {
            *v += b;
        }
    }
}
