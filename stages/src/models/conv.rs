//! 2-d convolution layers with fast CPU kernels.
//!
//! candle's CPU `conv2d` backward and its `conv_transpose2d` are nested
//! loops, and composing a layer from candle ops (im2col, matmul, bias add,
//! transpose, ReLU) makes a pass and an allocation per op. Here each layer
//! is one custom op forward and two backward, with the bias and an optional
//! ReLU of the input ([`Conv::forward_relu`]) fused in and masked taps
//! skipped: stride-1 layers with one channel on a side directly (`direct`),
//! other stride-1 layers without columns (`implicit`), strided ones (a
//! kernel a multiple of the stride) as stride-1 layers over blocks
//! (`space_to_depth`), the rest as columns plus gemm (`ops`).
//!
//! Layers keep PyTorch's weight layout and names (`weight` O x C x k x k,
//! `bias`); on other devices than the CPU they call candle's own ops (the
//! reference the tests compare against), in bf16 where the stage asks
//! ([`super::precision`]).

mod direct;
mod implicit;
mod ops;
mod space_to_depth;
pub mod tapwise;

use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{Module, Tensor};
use candle_nn::{Conv2dConfig, ConvTranspose2dConfig, Init, VarBuilder};

use super::precision;
use ops::{ConvOp, ConvTransposeOp};
use space_to_depth::{BlockConv, BlockConvTranspose, SpaceToDepth};
use tapwise::{Taps, TapwiseConv};

/// Multiply-add FLOPs (2 per MAC) of the forward matmuls of every
/// convolution since the start, for benchmarks that report a FLOP rate.
pub static FORWARD_FLOPS: AtomicU64 = AtomicU64::new(0);

/// Candle's own ops: on other devices, and on the CPU where this thread
/// asked for the reference ([`super::reference`]).
fn use_reference(x: &Tensor) -> bool {
    !x.device().is_cpu() || super::reference::current().candle_convs
}

/// Whether a convolution that takes candle's ops runs tap-wise rather than
/// through candle's conv2d or conv_transpose2d (stride 1:
/// [`Conv::forward_tapwise`]; a kernel a multiple of its stride:
/// [`Conv::forward_strided_tapwise`], [`ConvTranspose::forward_tapwise`]): off
/// the CPU when `HAIC_GPU_CONV` is `taps` or `gemm` ([`gpu_conv`]), on the
/// CPU where this thread asked for it.
fn use_tapwise(x: &Tensor) -> bool {
    match x.device().is_cpu() {
        true => super::reference::current().tapwise_convs,
        false => tapwise_on_gpu(),
    }
}

/// Whether a tap-wise convolution takes [`TapwiseConv`]'s own backward:
/// off the CPU with `HAIC_GPU_CONV=gemm`, on the CPU where this thread
/// asked for it.
fn tapwise_adjoint(x: &Tensor) -> bool {
    match x.device().is_cpu() {
        true => super::reference::current().tapwise_adjoint,
        false => gpu_conv() == GpuConv::TapwiseAdjoint,
    }
}

/// How convolutions run off the CPU (`HAIC_GPU_CONV`): candle's conv2d
/// and conv_transpose2d (unset), tap-wise with candle's autograd
/// (`taps`), or tap-wise with their own adjoint (`gemm`). Experiments until measured on a GPU:
/// they change rounding only, so they are not in the stage key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuConv {
    Candle,
    Tapwise,
    TapwiseAdjoint,
}

/// This process's [`GpuConv`], read once (an unknown value is candle's,
/// with a warning).
pub fn gpu_conv() -> GpuConv {
    static FROM_ENV: std::sync::OnceLock<GpuConv> = std::sync::OnceLock::new();
    *FROM_ENV.get_or_init(|| match std::env::var("HAIC_GPU_CONV").as_deref() {
        Ok("taps") => GpuConv::Tapwise,
        Ok("gemm") => GpuConv::TapwiseAdjoint,
        Ok("") | Err(_) => GpuConv::Candle,
        Ok(other) => {
            eprintln!(
                "warning: HAIC_GPU_CONV={other} is neither `taps` nor `gemm`: candle's convolutions"
            );
            GpuConv::Candle
        }
    })
}

/// Whether this process runs GPU convolutions tap-wise.
pub fn tapwise_on_gpu() -> bool {
    gpu_conv() != GpuConv::Candle
}

/// Whether a layer of kernel `k` and stride `s` runs over s x s blocks
/// (as a stride-1 layer of k / s taps a side): strided, the kernel a
/// multiple of the stride. The dispatch to that path and the path itself
/// both ask this, so that they agree.
fn over_blocks(k: usize, s: usize) -> bool {
    s > 1 && k.is_multiple_of(s)
}

/// `x` itself where contiguous from the start of its storage, else a copy
/// that is (what [`TapwiseConv`]'s forward reads).
fn from_start(x: &Tensor) -> candle_core::Result<Tensor> {
    match x.layout().contiguous_offsets() {
        Some((0, _)) => Ok(x.clone()),
        _ => x.force_contiguous(),
    }
}

/// `x` (B, C, H, W) convolved with `weight` (O, C, k, k) at `taps`, stride
/// 1 and no bias, in their dtype: through [`TapwiseConv`]'s adjoint where
/// this thread or `HAIC_GPU_CONV=gemm` asks for it and something tracks a
/// gradient, else candle's autograd (or nothing to take a gradient of: a
/// frozen layer on a sampled input, where the op's copies would buy
/// nothing).
fn tapwise(x: &Tensor, weight: &Tensor, taps: Taps) -> candle_core::Result<Tensor> {
    let needs_grad = x.track_op() || weight.track_op();
    match needs_grad && tapwise_adjoint(x) && taps.adjoint_applies() {
        true => {
            let op = TapwiseConv {
                taps,
                column_bytes: tapwise::COLUMN_BYTES,
            };
            from_start(x)?.apply_op2(&from_start(weight)?, op)
        }
        false => taps.apply(x, &taps.matrix(weight)?),
    }
}

fn count_flops(rows: usize, inner: usize, cols: usize) {
    FORWARD_FLOPS.fetch_add((2 * rows * inner * cols) as u64, Ordering::Relaxed);
}

/// Where each kernel tap of each output position reads in an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// The image: channels, height, width.
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
    /// The kernel taps that take part (bit `ky * k + kx`); a masked layer
    /// whose mask zeroes whole taps (a PixelCNN's) skips them.
    pub taps: u128,
}

/// The largest kernel side: its taps must fit [`Geometry::taps`].
pub const MAX_KERNEL: usize = 11;

/// Every tap of a `k x k` kernel (k at most [`MAX_KERNEL`]).
pub fn all_taps(k: usize) -> u128 {
    (1u128 << (k * k)) - 1
}

fn check_kernel(k: usize) -> candle_core::Result<()> {
    if !(1..=MAX_KERNEL).contains(&k) {
        candle_core::bail!(
            "a convolution kernel of {k}x{k}: sides 1 to {MAX_KERNEL} are supported"
        );
    }
    Ok(())
}

impl Geometry {
    pub fn out_h(&self) -> usize {
        (self.h + 2 * self.pad - self.k) / self.stride + 1
    }

    pub fn out_w(&self) -> usize {
        (self.w + 2 * self.pad - self.k) / self.stride + 1
    }

    /// Length of one column row: C x the taps.
    fn row_len(&self) -> usize {
        self.c * self.taps.count_ones() as usize
    }
}

/// A conv2d layer (`weight` O x C x k x k, `bias` O).
pub struct Conv {
    weight: Tensor,
    bias: Tensor,
    k: usize,
    cfg: Conv2dConfig,
    /// Multiplied into the weight (O x C x k x k, 1 keeps a tap): masked
    /// taps stay zero and get zero gradient.
    mask: Option<Tensor>,
    /// The taps the mask keeps for some weight, and their indices (u32).
    taps: u128,
    tap_index: Option<Tensor>,
}

impl Conv {
    /// Initialised like `candle_nn::conv2d` (Kaiming normal, uniform bias).
    pub fn new(
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        pad: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        check_kernel(k)?;
        let weight = vb.get_with_hints(
            (c_out, c_in, k, k),
            "weight",
            candle_nn::init::DEFAULT_KAIMING_NORMAL,
        )?;
        let bound = 1.0 / (c_in as f64).sqrt();
        let bias = vb.get_with_hints(
            c_out,
            "bias",
            Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?;
        Ok(Conv {
            weight,
            bias,
            k,
            cfg: Conv2dConfig {
                padding: pad,
                stride,
                ..Default::default()
            },
            mask: None,
            taps: all_taps(k),
            tap_index: None,
        })
    }

    /// candle's own conv2d (non-CPU devices; the tests' reference).
    /// (In bf16 on a GPU where asked: [`precision`].)
    pub fn forward_reference(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dt = precision::compute_dtype(x);
        let weight = self.weight()?.to_dtype(dt)?;
        let y = x
            .to_dtype(dt)?
            .conv2d(&weight, self.cfg.padding, self.cfg.stride, 1, 1)?;
        y.broadcast_add(&self.bias.to_dtype(dt)?.reshape((1, (), 1, 1))?)?
            .to_dtype(x.dtype())
    }

    /// A stride-1 layer as gemms over the kept taps only (`taps`, bit
    /// `ky * k + kx`; [`tapwise`]), where candle's conv2d backward would run
    /// an im2col with image-sized kernels and a naive transposed
    /// convolution. The backward is candle's autograd through the copies
    /// and the matmul, or, where this thread or `HAIC_GPU_CONV=gemm` asks
    /// for it, [`TapwiseConv`]'s own. (In bf16 on a GPU where asked:
    /// [`precision`].)
    pub fn forward_tapwise(&self, input: &Tensor, taps: u128) -> candle_core::Result<Tensor> {
        if self.cfg.stride != 1 {
            candle_core::bail!("a tap-wise convolution needs stride 1");
        }
        let dt = precision::compute_dtype(input);
        let bits = taps;
        let mut taps = Taps::from_bits(self.k, self.cfg.padding, bits);
        if bits == self.taps {
            // The mask's taps, indexed on the device when it was set.
            taps.index = self.tap_index.clone();
        }
        let y = tapwise(&input.to_dtype(dt)?, &self.weight()?.to_dtype(dt)?, taps)?;
        y.broadcast_add(&self.bias.to_dtype(dt)?.reshape((1, (), 1, 1))?)?
            .to_dtype(input.dtype())
    }

    /// A strided layer whose kernel is a multiple of its stride s (a VQ
    /// encoder's downsampling) tap-wise, where candle's conv2d would run
    /// its backward: the padded input's s x s blocks as channels, then a
    /// stride-1 layer of k / s taps a side over them
    /// ([`weight_over_blocks`], as the CPU kernels' `space_to_depth`).
    pub fn forward_strided_tapwise(&self, input: &Tensor) -> candle_core::Result<Tensor> {
        let (k, s, p) = (self.k, self.cfg.stride, self.cfg.padding);
        if !over_blocks(k, s) || self.mask.is_some() {
            candle_core::bail!(
                "a strided tap-wise convolution needs an unmasked kernel a multiple of its stride ({k} by {s})"
            );
        }
        let (b, c, h, w) = input.dims4()?;
        if h + 2 * p < k || w + 2 * p < k {
            candle_core::bail!("a {h}x{w} input is smaller than the {k}x{k} kernel (padding {p})");
        }
        let kb = k / s;
        // Blocks that feed an output; a last row or column past them does not.
        let hs = (h + 2 * p - k) / s + kb;
        let ws = (w + 2 * p - k) / s + kb;
        let dt = precision::compute_dtype(input);
        let blocks = input
            .to_dtype(dt)?
            .pad_with_zeros(2, p, p)?
            .pad_with_zeros(3, p, p)?
            .narrow(2, 0, hs * s)?
            .narrow(3, 0, ws * s)?
            .reshape((b, c, hs, s, ws, s))?
            .permute((0, 1, 3, 5, 2, 4))?
            .reshape((b, c * s * s, hs, ws))?;
        let weight = weight_over_blocks(&self.weight()?, s)?.to_dtype(dt)?;
        let y = tapwise(&blocks, &weight, Taps::from_bits(kb, 0, all_taps(kb)))?;
        y.broadcast_add(&self.bias.to_dtype(dt)?.reshape((1, (), 1, 1))?)?
            .to_dtype(input.dtype())
    }

    /// The same layer with `mask` (O x C x k x k of 0 and 1) on its weight.
    pub fn masked(mut self, mask: Tensor) -> candle_core::Result<Self> {
        if mask.dims() != self.weight.dims() {
            candle_core::bail!(
                "a conv mask is {:?}, the weight {:?}",
                mask.dims(),
                self.weight.dims()
            );
        }
        let k = self.k;
        let per_tap = mask
            .permute((2, 3, 0, 1))?
            .reshape((k * k, ()))?
            .max(1)?
            .to_vec1::<f32>()?;
        let kept: Vec<u32> = (0..(k * k) as u32)
            .filter(|&t| per_tap[t as usize] != 0.0)
            .collect();
        self.taps = kept.iter().fold(0, |m, &t| m | 1u128 << t);
        self.tap_index = Some(Tensor::new(kept, mask.device())?);
        self.mask = Some(mask);
        Ok(self)
    }

    /// The same layer for inference, where each layer runs once a position
    /// (a sampler): the mask multiplied in and the weight and bias cast to
    /// `dtype` once, outside the graph, instead of at every call. The
    /// values it computes are the layer's.
    pub fn frozen(&self, dtype: candle_core::DType) -> candle_core::Result<Conv> {
        Ok(Conv {
            weight: self.weight()?.to_dtype(dtype)?.detach(),
            bias: self.bias.to_dtype(dtype)?.detach(),
            k: self.k,
            cfg: self.cfg,
            mask: None,
            taps: self.taps,
            tap_index: self.tap_index.clone(),
        })
    }

    /// Where the layer's weight is.
    pub fn weight_device(&self) -> &candle_core::Device {
        self.weight.device()
    }

    fn weight(&self) -> candle_core::Result<Tensor> {
        match &self.mask {
            Some(m) => self.weight.mul(m),
            None => Ok(self.weight.clone()),
        }
    }
}

impl Conv {
    /// `self.forward(&x.relu()?)` in one pass (the ReLU fused into the
    /// columns forward and into the input gradient backward).
    pub fn forward_relu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.apply(x, true)
    }

    fn apply(&self, x: &Tensor, relu_input: bool) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let g = Geometry {
            c,
            h,
            w,
            k: self.k,
            stride: self.cfg.stride,
            pad: self.cfg.padding,
            taps: match super::reference::current().all_masked_taps {
                true => all_taps(self.k),
                false => self.taps,
            },
        };
        let o = self.weight.dim(0)?;
        count_flops(b * g.out_h() * g.out_w(), g.row_len(), o);
        if use_reference(x) {
            let x = if relu_input { x.relu()? } else { x.clone() };
            if use_tapwise(&x) {
                if g.stride == 1 {
                    return self.forward_tapwise(&x, g.taps);
                }
                if over_blocks(self.k, g.stride) && self.mask.is_none() {
                    return self.forward_strided_tapwise(&x);
                }
            }
            return self.forward_reference(&x);
        }
        let s = g.stride;
        if over_blocks(self.k, s) && self.k > s && g.taps == all_taps(self.k) {
            return self.strided_as_blocks(x, g, relu_input);
        }
        let wm = match &self.tap_index {
            Some(index) if g.taps != all_taps(self.k) => self
                .weight()?
                .reshape((o, c, self.k * self.k))?
                .index_select(index, 2)?,
            _ => self.weight()?,
        }
        .reshape((o, g.row_len()))?;
        // (C*T, O), contiguous: the layout the forward gemm reads.
        let w_t = wm.t()?.contiguous()?;
        x.contiguous()?
            .apply_op3(&w_t, &self.bias, ConvOp { g, relu_input })
    }
}

impl Conv {
    /// For kernels that fuse a 1x1 stride-1 layer with what follows it:
    /// the weight as an O x C matrix (masked) and the bias, when the layer
    /// is one and `x` is on the CPU (counting the layer's FLOPs); `None`
    /// where the layer must run as itself.
    pub(crate) fn pointwise_on_cpu(
        &self,
        x: &Tensor,
    ) -> candle_core::Result<Option<(Tensor, Tensor)>> {
        let (b, c, h, w) = x.dims4()?;
        if self.k != 1 || self.cfg.stride != 1 || self.cfg.padding != 0 || use_reference(x) {
            return Ok(None);
        }
        let o = self.weight.dim(0)?;
        count_flops(b * h * w, c, o);
        Ok(Some((self.weight()?.reshape((o, c))?, self.bias.clone())))
    }
}

impl Module for Conv {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.apply(x, false)
    }
}

/// A k x k weight (A, B, k, k) of a stride-s layer as the (A, B*s*s, k/s,
/// k/s) weight of the same layer over s x s blocks (see `space_to_depth`).
fn weight_over_blocks(weight: &Tensor, s: usize) -> candle_core::Result<Tensor> {
    let (a, b, k, _) = weight.dims4()?;
    let kb = k / s;
    weight
        .reshape((a, b, kb, s, kb, s))?
        .permute((0, 1, 3, 5, 2, 4))?
        .reshape((a, b * s * s, kb, kb))
}

impl Conv {
    /// A stride-s layer as a stride-1 one over s x s blocks of its input.
    fn strided_as_blocks(
        &self,
        x: &Tensor,
        g: Geometry,
        relu_input: bool,
    ) -> candle_core::Result<Tensor> {
        let (s, kb) = (g.stride, self.k / g.stride);
        let blocks = SpaceToDepth {
            s,
            pad: g.pad,
            hs: g.out_h() + kb - 1,
            ws: g.out_w() + kb - 1,
            relu_input,
        };
        let over_blocks = Geometry {
            c: g.c * s * s,
            h: blocks.hs,
            w: blocks.ws,
            k: kb,
            stride: 1,
            pad: 0,
            taps: all_taps(kb),
        };
        let w = weight_over_blocks(&self.weight()?, s)?;
        let w_t = w.reshape((w.dim(0)?, ()))?.t()?.contiguous()?;
        let op = BlockConv {
            blocks,
            g: over_blocks,
        };
        x.contiguous()?.apply_op3(&w_t, &self.bias, op)
    }
}

/// A transposed conv2d layer (`weight` C_in x C_out x k x k, `bias` C_out):
/// the adjoint of a convolution, used to upsample.
pub struct ConvTranspose {
    weight: Tensor,
    bias: Tensor,
    k: usize,
    cfg: ConvTranspose2dConfig,
    /// The taps of k/s x k/s blocks in reverse (u32, on the weight's
    /// device) for [`ConvTranspose::forward_tapwise`]: uploaded once, as a
    /// copy from the host waits for the device's queue.
    block_mirror: Tensor,
}

impl ConvTranspose {
    /// Initialised like `candle_nn::conv_transpose2d`.
    pub fn new(
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        pad: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        check_kernel(k)?;
        let bound = 1.0 / (c_out as f64).sqrt() / k as f64;
        let init = Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let block_taps = (k / stride.max(1)).pow(2) as u32;
        let mirror: Vec<u32> = (0..block_taps).rev().collect();
        Ok(ConvTranspose {
            weight: vb.get_with_hints((c_in, c_out, k, k), "weight", init)?,
            bias: vb.get_with_hints(c_out, "bias", init)?,
            block_mirror: Tensor::new(mirror.as_slice(), vb.device())?,
            k,
            cfg: ConvTranspose2dConfig {
                padding: pad,
                stride,
                ..Default::default()
            },
        })
    }

    /// candle's own conv_transpose2d (in bf16 on a GPU where asked:
    /// [`precision`]).
    pub fn forward_reference(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dt = precision::compute_dtype(x);
        let y = x.to_dtype(dt)?.conv_transpose2d(
            &self.weight.to_dtype(dt)?,
            self.cfg.padding,
            0,
            self.cfg.stride,
            1,
        )?;
        y.broadcast_add(&self.bias.to_dtype(dt)?.reshape((1, (), 1, 1))?)?
            .to_dtype(x.dtype())
    }

    /// A layer whose kernel is a multiple of its stride s (a decoder's
    /// upsampling) tap-wise, where candle's conv_transpose2d is a direct
    /// kernel and its backward runs conv2d's: the adjoint of a stride-1
    /// layer over s x s blocks of the output. Over the blocks it is a
    /// stride-1 layer of k / s taps a side on the input, padded by
    /// k / s - 1, with the blocks' weight's taps mirrored; its s * s
    /// channels an output channel are then put back in place as blocks and
    /// the padding cut.
    pub fn forward_tapwise(&self, input: &Tensor) -> candle_core::Result<Tensor> {
        let (k, s, p) = (self.k, self.cfg.stride, self.cfg.padding);
        if !over_blocks(k, s) {
            candle_core::bail!(
                "a tap-wise transposed convolution needs a kernel a multiple of its stride ({k} by {s})"
            );
        }
        let (b, c_in, h, w) = input.dims4()?;
        let c_out = self.weight.dim(1)?;
        // The output before the padding is cut.
        let (full_h, full_w) = (h * s + k - s, w * s + k - s);
        if h == 0 || w == 0 || full_h <= 2 * p || full_w <= 2 * p {
            candle_core::bail!("conv_transpose: a {h}x{w} input gives an empty output");
        }
        let (kb, kk) = (k / s, (k / s) * (k / s));
        let dt = precision::compute_dtype(input);
        // (C_in, C_out*s*s, kb, kb) -> (C_out*s*s, C_in, kb, kb), mirrored.
        let weight = weight_over_blocks(&self.weight, s)?
            .transpose(0, 1)?
            .reshape((c_out * s * s, c_in, kk))?
            .index_select(&self.block_mirror, 2)?
            .reshape((c_out * s * s, c_in, kb, kb))?
            .to_dtype(dt)?;
        let taps = Taps::from_bits(kb, kb - 1, all_taps(kb));
        let (hb, wb) = (h + kb - 1, w + kb - 1);
        let y = tapwise(&input.to_dtype(dt)?, &weight, taps)?
            .reshape((b, c_out, s, s, hb, wb))?
            .permute((0, 1, 4, 2, 5, 3))?
            .reshape((b, c_out, hb * s, wb * s))?
            .narrow(2, p, full_h - 2 * p)?
            .narrow(3, p, full_w - 2 * p)?;
        y.broadcast_add(&self.bias.to_dtype(dt)?.reshape((1, (), 1, 1))?)?
            .to_dtype(input.dtype())
    }
}

impl ConvTranspose {
    /// `self.forward(&x.relu()?)` in one pass.
    pub fn forward_relu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.apply(x, true)
    }

    fn apply(&self, x: &Tensor, relu_input: bool) -> candle_core::Result<Tensor> {
        let (b, c_in, h, w) = x.dims4()?;
        let c_out = self.weight.dim(1)?;
        let (k, s, p) = (self.k, self.cfg.stride, self.cfg.padding);
        if (h - 1) * s + k < 2 * p + 1 || (w - 1) * s + k < 2 * p + 1 {
            candle_core::bail!("conv_transpose: a {h}x{w} input gives an empty output");
        }
        // The output image is the input of the convolution this is the adjoint of.
        let g = Geometry {
            c: c_out,
            h: (h - 1) * s + k - 2 * p,
            w: (w - 1) * s + k - 2 * p,
            k,
            stride: s,
            pad: p,
            taps: all_taps(k),
        };
        count_flops(b * h * w, c_in, g.row_len());
        if use_reference(x) {
            let x = if relu_input { x.relu()? } else { x.clone() };
            if over_blocks(k, s) && use_tapwise(&x) {
                return self.forward_tapwise(&x);
            }
            return self.forward_reference(&x);
        }
        if over_blocks(k, s) && k > s {
            // The adjoint of a stride-1 convolution over s x s blocks of
            // the output, the blocks then put back in place.
            let kb = k / s;
            let layout = SpaceToDepth {
                s,
                pad: p,
                hs: h + kb - 1,
                ws: w + kb - 1,
                relu_input: false,
            };
            let over_blocks = Geometry {
                c: c_out * s * s,
                h: layout.hs,
                w: layout.ws,
                k: kb,
                stride: 1,
                pad: 0,
                taps: all_taps(kb),
            };
            let wb = weight_over_blocks(&self.weight, s)?.reshape((c_in, ()))?;
            let op = BlockConvTranspose {
                blocks: layout,
                g: over_blocks,
                out: (c_out, g.h, g.w),
                relu_input,
            };
            return x.contiguous()?.apply_op3(&wb, &self.bias, op);
        }
        let w_mat = self.weight.reshape((c_in, g.row_len()))?;
        x.contiguous()?
            .apply_op3(&w_mat, &self.bias, ConvTransposeOp { g, relu_input })
    }
}

impl Module for ConvTranspose {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.apply(x, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::reference::Kernels;
    use crate::models::vars::SeededVars;
    use candle_core::{DType, Device, Var};

    fn input(shape: (usize, usize, usize, usize), seed: u64) -> Var {
        let mut r = crate::rng::SplitMix64(seed);
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let v: Vec<f32> = (0..n).map(|_| r.normal() as f32).collect();
        Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()
    }

    /// A `k x k` stride-1 layer (padding `pad`, weights from `seed`)
    /// masked to its first `kept` taps in raster order, every channel
    /// pair alike; with its variables. 12 of a 5x5 kernel's are a
    /// PixelCNN's: the rows above the centre and the centre row's left
    /// half.
    fn masked_conv(
        c_in: usize,
        c_out: usize,
        k: usize,
        pad: usize,
        kept: usize,
        seed: u64,
    ) -> (Conv, SeededVars) {
        let dev = Device::Cpu;
        let m: Vec<f32> = (0..c_out * c_in * k * k)
            .map(|i| f32::from(u8::from(i % (k * k) < kept)))
            .collect();
        let vars = SeededVars::new(seed);
        let conv = Conv::new(c_in, c_out, k, 1, pad, vars.var_builder(&dev))
            .unwrap()
            .masked(Tensor::from_vec(m, (c_out, c_in, k, k), &dev).unwrap())
            .unwrap();
        (conv, vars)
    }

    /// Within 1e-5 of the largest magnitude of `b` (relative).
    fn close(a: &Tensor, b: &Tensor, what: &str) {
        assert_eq!(a.dims(), b.dims(), "{what}");
        let d = crate::models::max_abs_diff(a, b);
        let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        let scale = scale.to_scalar::<f32>().unwrap().max(1e-3);
        assert!(
            d / scale < 1e-5,
            "{what}: max difference {d} at scale {scale}"
        );
    }

    /// A layer with candle's own op beside it.
    trait WithReference: Module {
        fn reference(&self, x: &Tensor) -> candle_core::Result<Tensor>;
    }

    impl WithReference for Conv {
        fn reference(&self, x: &Tensor) -> candle_core::Result<Tensor> {
            self.forward_reference(x)
        }
    }

    impl WithReference for ConvTranspose {
        fn reference(&self, x: &Tensor) -> candle_core::Result<Tensor> {
            self.forward_reference(x)
        }
    }

    /// Output, input gradient and weight gradient equal candle's own op.
    fn compare(layer: &dyn WithReference, vars: &SeededVars, x: &Var, what: &str) {
        let fast = layer.forward(x.as_tensor()).unwrap();
        let slow = layer.reference(x.as_tensor()).unwrap();
        close(&fast, &slow, what);
        // A weighting so the gradient is not uniform.
        let wgt = input(
            {
                let d = fast.dims4().unwrap();
                (d.0, d.1, d.2, d.3)
            },
            99,
        );
        let gf = (fast * wgt.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gs = (slow * wgt.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        close(
            gf.get(x).unwrap(),
            gs.get(x).unwrap(),
            &format!("{what}: input gradient"),
        );
        for (name, v) in vars.all() {
            close(
                gf.get(&v).unwrap(),
                gs.get(&v).unwrap(),
                &format!("{what}: gradient of {name}"),
            );
        }
    }

    /// Every kernel, stride and padding in use, and edge cases: odd and
    /// non-square sizes, batch 1, padding below and above k / 2, a stride
    /// that does not divide the size, more images than a gradient chunk.
    /// (Not every such size: for some, candle's conv2d backward returns an
    /// input gradient of the wrong shape, e.g. k3 s2 p1 on a width of 5.)
    #[test]
    fn convolutions_match_candle_forward_and_backward() {
        let dev = Device::Cpu;
        let cases = [
            // (k, stride, pad, batch, h, w)
            (3, 1, 1, 2, 7, 7),
            (3, 1, 1, 1, 5, 8),
            (3, 1, 0, 2, 6, 5),
            (5, 1, 1, 2, 7, 6),
            (5, 1, 2, 1, 4, 4),
            (2, 1, 0, 2, 5, 4),
            (4, 2, 1, 2, 8, 8),
            (4, 2, 1, 1, 7, 9),
            // The last row and column feed no output (the blocks leave them
            // out).
            (4, 2, 0, 1, 9, 9),
            (4, 2, 0, 2, 8, 8),
            (1, 1, 0, 2, 5, 5),
            (1, 1, 0, 1, 3, 7),
            (3, 2, 0, 2, 9, 9),
            (3, 2, 1, 10, 8, 6),
            (3, 1, 1, 17, 4, 4),
        ];
        // Channels in -> out: at stride 1, one channel on a side runs the
        // direct kernels, 2 -> 5 the columns and 6 -> 5 the implicit ones.
        let channels = [(1, 5), (6, 1), (2, 5), (6, 5)];
        for ((k, s, p, b, h, w), (c, o)) in cases
            .into_iter()
            .flat_map(|case| channels.map(|ch| (case, ch)))
        {
            let vars = SeededVars::new(1);
            let conv = Conv::new(c, o, k, s, p, vars.var_builder(&dev)).unwrap();
            let x = input((b, c, h, w), 2);
            let what = format!("conv k{k} s{s} p{p}, {b}x{c}x{h}x{w} -> {o}");
            compare(&conv, &vars, &x, &what);
            compare(&Relu(&conv), &vars, &x, &format!("{what}, fused ReLU"));
        }
    }

    /// `layer(relu(x))` through the fused path, candle's ReLU and op beside it.
    struct Relu<'a, L>(&'a L);

    impl Module for Relu<'_, Conv> {
        fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
            self.0.forward_relu(x)
        }
    }

    impl WithReference for Relu<'_, Conv> {
        fn reference(&self, x: &Tensor) -> candle_core::Result<Tensor> {
            self.0.forward_reference(&x.relu()?)
        }
    }

    impl Module for Relu<'_, ConvTranspose> {
        fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
            self.0.forward_relu(x)
        }
    }

    impl WithReference for Relu<'_, ConvTranspose> {
        fn reference(&self, x: &Tensor) -> candle_core::Result<Tensor> {
            self.0.forward_reference(&x.relu()?)
        }
    }

    #[test]
    fn a_mask_that_zeroes_whole_taps_skips_them_and_matches_candle() {
        let k = 5;
        // Direct kernels for 1 -> 4 and 6 -> 1, columns for 3 -> 4,
        // implicit for 6 -> 4.
        for (c_in, c_out) in [(1, 4), (6, 1), (3, 4), (6, 4)] {
            // Rows above the centre, and the centre row's left half: 12 of
            // 25 taps.
            let (conv, vars) = masked_conv(c_in, c_out, k, 2, 12, 5);
            assert_eq!(conv.taps.count_ones(), 12);
            let x = input((2, c_in, 6, 6), 6);
            compare(
                &conv,
                &vars,
                &x,
                &format!("masked conv, {c_in} channels in, {c_out} out"),
            );
        }
    }

    /// A layer through one of its tap-wise paths (`.1`), candle's op
    /// beside it.
    struct Via<'a, L>(&'a L, fn(&L, &Tensor) -> candle_core::Result<Tensor>);

    impl<L> Module for Via<'_, L> {
        fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
            (self.1)(self.0, x)
        }
    }

    impl<L: WithReference> WithReference for Via<'_, L> {
        fn reference(&self, x: &Tensor) -> candle_core::Result<Tensor> {
            self.0.reference(x)
        }
    }

    /// A stride-1 layer through [`Conv::forward_tapwise`] with its own taps.
    fn stride1_tapwise(conv: &Conv) -> Via<'_, Conv> {
        Via(conv, |c, x| c.forward_tapwise(x, c.taps))
    }

    /// A layer's forward with this thread's kernels set to `.0`.
    struct InScope<'a, L>(Kernels, &'a L);

    impl<L: WithReference> Module for InScope<'_, L> {
        fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
            crate::models::reference::with(self.0, || self.1.forward(x))
        }
    }

    impl<L: WithReference> WithReference for InScope<'_, L> {
        fn reference(&self, x: &Tensor) -> candle_core::Result<Tensor> {
            self.1.reference(x)
        }
    }

    /// The two tap-wise paths as a thread asks for them, with their names.
    const TAPWISE_PATHS: [(Kernels, &str); 2] = [
        (Kernels::gpu_convs(GpuConv::Tapwise), "autograd"),
        (Kernels::gpu_convs(GpuConv::TapwiseAdjoint), "adjoint"),
    ];

    /// The tap-wise paths (a GPU's with `HAIC_GPU_CONV=taps` and `gemm`;
    /// here on the CPU) equal candle's conv2d in value and gradients: 1x1,
    /// odd and even kernels, padding below k / 2 and above k - 1 (where
    /// the adjoint leaves the backward to autograd), a masked layer's kept
    /// taps, and through `forward` / `forward_relu` when the thread asks.
    #[test]
    fn tapwise_convolutions_match_candle_forward_and_backward() {
        let dev = Device::Cpu;
        let (tapwise, _) = TAPWISE_PATHS[0];
        for (k, p, b, h, w, c, o) in [
            (3, 1, 2, 7, 7, 2, 5),
            (3, 0, 1, 6, 5, 6, 1),
            (5, 2, 1, 4, 4, 3, 4),
            (5, 1, 2, 7, 6, 1, 5),
            (2, 0, 2, 5, 4, 2, 3),
            (2, 1, 2, 5, 4, 2, 3),
            (1, 0, 2, 5, 5, 6, 5),
            (1, 1, 2, 4, 3, 2, 3),
        ] {
            let vars = SeededVars::new(1);
            let conv = Conv::new(c, o, k, 1, p, vars.var_builder(&dev)).unwrap();
            let x = input((b, c, h, w), 2);
            for (kernels, path) in TAPWISE_PATHS {
                let what = format!("tap-wise conv ({path}) k{k} p{p}, {b}x{c}x{h}x{w} -> {o}");
                compare(&InScope(kernels, &stride1_tapwise(&conv)), &vars, &x, &what);
                compare(
                    &InScope(kernels, &conv),
                    &vars,
                    &x,
                    &format!("{what}, forward"),
                );
                compare(
                    &InScope(kernels, &Relu(&conv)),
                    &vars,
                    &x,
                    &format!("{what}, fused ReLU"),
                );
            }
        }
        let x = input((1, 1, 3, 3), 1);
        assert!(crate::models::reference::with(tapwise, || use_tapwise(
            x.as_tensor()
        )));
        assert!(
            !use_tapwise(x.as_tensor()),
            "the CPU's default takes the kernels"
        );

        // A PixelCNN-like mask: rows above the centre and the centre row's
        // left half, 12 of 25 taps, the others never multiplied.
        let (k, c_in, c_out) = (5, 3, 4);
        let (conv, vars) = masked_conv(c_in, c_out, k, 2, 12, 5);
        for (kernels, path) in TAPWISE_PATHS {
            compare(
                &InScope(kernels, &stride1_tapwise(&conv)),
                &vars,
                &input((2, c_in, 6, 6), 6),
                &format!("tap-wise masked conv ({path})"),
            );
        }
    }

    /// Strided and transposed layers whose kernel is a multiple of the
    /// stride (a VQ level's down- and upsampling), tap-wise over blocks,
    /// equal candle's conv2d and conv_transpose2d in value and gradients,
    /// with candle's autograd and with the adjoint: the VQ levels' k4 s2
    /// p1, a kernel equal to the stride, stride 3, odd sizes whose last
    /// row and column feed no output. (Not every such size: for k2 s2 on
    /// a side of 5, or k6 s3 p1 on 8, candle's conv2d backward fails, its
    /// input gradient a row short.)
    #[test]
    fn strided_and_transposed_tapwise_convolutions_match_candle() {
        let dev = Device::Cpu;
        for (k, s, p, b, h, w) in [
            (4, 2, 1, 2, 8, 8),
            (4, 2, 1, 1, 7, 9),
            (4, 2, 0, 1, 9, 9),
            (2, 2, 0, 2, 6, 4),
            (6, 3, 1, 2, 7, 10),
        ] {
            for (c, o) in [(2, 5), (6, 1)] {
                let (down_vars, up_vars) = (SeededVars::new(1), SeededVars::new(2));
                let conv = Conv::new(c, o, k, s, p, down_vars.var_builder(&dev)).unwrap();
                let up = ConvTranspose::new(c, o, k, s, p, up_vars.var_builder(&dev)).unwrap();
                let x = input((b, c, h, w), 2);
                for (kernels, path) in TAPWISE_PATHS {
                    let what = format!("tap-wise ({path}) k{k} s{s} p{p}, {b}x{c}x{h}x{w} -> {o}");
                    let (down, transposed) =
                        (format!("conv {what}"), format!("conv_transpose {what}"));
                    compare(
                        &InScope(kernels, &Via(&conv, Conv::forward_strided_tapwise)),
                        &down_vars,
                        &x,
                        &down,
                    );
                    compare(
                        &InScope(kernels, &Via(&up, ConvTranspose::forward_tapwise)),
                        &up_vars,
                        &x,
                        &transposed,
                    );
                    // The same through `forward` and `forward_relu`.
                    compare(&InScope(kernels, &conv), &down_vars, &x, &down);
                    compare(
                        &InScope(kernels, &Relu(&up)),
                        &up_vars,
                        &x,
                        &format!("{transposed}, fused ReLU"),
                    );
                }
            }
        }
    }

    /// The adjoint's columns a chunk of images at a time: a budget of two
    /// images' columns splits 5 images 2 + 2 + 1, forward and backward,
    /// with the same values and gradients as candle's conv2d.
    #[test]
    fn the_tapwise_adjoint_in_chunks_matches_candle() {
        let (k, c, o, side) = (3, 2, 4, 5);
        let (conv, vars) = masked_conv(c, o, k, 1, 4, 8);
        let two_images = 2 * 4 * c * side * side * 4;
        compare(
            &Chunked(&conv, two_images),
            &vars,
            &input((5, c, side, side), 3),
            "tap-wise adjoint in chunks of 2 images",
        );
    }

    /// A frozen layer computes the layer's values, with the kernels and
    /// each GPU path (candle's, tap-wise, tap-wise with the adjoint, which
    /// a frozen layer on an untracked input skips), and nothing of it is
    /// tracked.
    #[test]
    fn a_frozen_layer_computes_the_layers_values() {
        let (k, c, o) = (5, 3, 4);
        let (conv, _) = masked_conv(c, o, k, 2, 12, 4);
        let x = input((2, c, 6, 5), 7).as_tensor().detach();
        let gpu_paths = [GpuConv::Candle, GpuConv::Tapwise, GpuConv::TapwiseAdjoint];
        for kernels in [Kernels::default()]
            .into_iter()
            .chain(gpu_paths.map(Kernels::gpu_convs))
        {
            let (want, got) = crate::models::reference::with(kernels, || {
                let frozen = conv.frozen(DType::F32).unwrap();
                (conv.forward(&x).unwrap(), frozen.forward(&x).unwrap())
            });
            assert!(!got.track_op(), "{kernels:?}: tracked");
            let d = crate::models::max_abs_diff(&got, &want);
            assert!(d == 0.0, "{kernels:?}: differs by {d}");
        }
        // (bf16 computes on a GPU only; the weights are cast once.)
        let bf16 = conv.frozen(DType::BF16).unwrap();
        assert_eq!(bf16.weight().unwrap().dtype(), DType::BF16);
        assert_eq!(bf16.bias.dtype(), DType::BF16);
    }

    /// A layer through [`TapwiseConv`] with a column budget of `.1` bytes.
    struct Chunked<'a>(&'a Conv, usize);

    impl Module for Chunked<'_> {
        fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
            let conv = self.0;
            let op = TapwiseConv {
                taps: Taps::from_bits(conv.k, conv.cfg.padding, conv.taps),
                column_bytes: self.1,
            };
            x.apply_op2(&conv.weight()?, op)?
                .broadcast_add(&conv.bias.reshape((1, (), 1, 1))?)
        }
    }

    impl WithReference for Chunked<'_> {
        fn reference(&self, x: &Tensor) -> candle_core::Result<Tensor> {
            self.0.forward_reference(x)
        }
    }

    #[test]
    fn transposed_convolutions_match_candle_forward_and_backward() {
        let dev = Device::Cpu;
        for case in [
            (4, 2, 1, 2, 4, 4),
            (4, 2, 1, 1, 3, 5),
            (4, 2, 1, 11, 2, 2),
            (3, 1, 1, 2, 5, 5),
            (2, 2, 0, 2, 3, 3),
            (3, 2, 1, 1, 4, 3),
        ]
        .into_iter()
        // 3 output channels take the columns at stride 1, 5 the implicit
        // kernels.
        .flat_map(|c| [(c, 3), (c, 5)])
        {
            let ((k, s, p, b, h, w), c_out) = case;
            let vars = SeededVars::new(3);
            let up = ConvTranspose::new(4, c_out, k, s, p, vars.var_builder(&dev)).unwrap();
            let x = input((b, 4, h, w), 4);
            let what = format!("conv_transpose k{k} s{s} p{p}, {b}x4x{h}x{w} -> {c_out}");
            compare(&up, &vars, &x, &what);
            compare(&Relu(&up), &vars, &x, &format!("{what}, fused ReLU"));
        }
    }
}
