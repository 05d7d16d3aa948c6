//! Stride-1 convolutions as gemms over the kept taps, for devices where
//! candle's conv2d is the alternative (a GPU with `HAIC_GPU_CONV`): the
//! padded input's shifted copies, one per kept tap, stacked as (B, T*C,
//! H*W) columns, times the weight's kept taps as an O x T*C matrix; a
//! masked PixelCNN layer's zeroed taps cost nothing. (Strided and
//! transposed layers whose kernel is a multiple of the stride reach it
//! over blocks of their input or output: `Conv::forward_strided_tapwise`,
//! `ConvTranspose::forward_tapwise`.)
//!
//! Two backward passes:
//! - `taps`: candle's autograd through the copies and the matmul. It keeps
//!   every layer's columns until the backward, and takes each shifted
//!   copy's adjoint as a zero-padded, full-size tensor added to the rest.
//! - `gemm` ([`TapwiseConv`]): its own adjoint. The input gradient is the
//!   same tap-wise convolution of the output gradient, with the mirrored
//!   taps and the transposed weight; the weight gradient is the output
//!   gradient times the columns, rebuilt in chunks of images and dropped.
//!   Only the input is kept for the backward, and no chunk's columns pass
//!   [`COLUMN_BYTES`].

use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Layout, Shape, Storage, Tensor};

/// The most bytes of columns one chunk of images builds at a time in
/// [`TapwiseConv`]: a decoder1 layer of `imagenet128.yaml` (15 taps of 126
/// channels at 128 x 128) takes 124 MB an image in f32.
pub const COLUMN_BYTES: usize = 1 << 30;

/// The kept taps of a `k x k` kernel (`ky * k + kx`, increasing) and the
/// padding, for a stride-1 layer.
#[derive(Debug, Clone)]
pub struct Taps {
    pub k: usize,
    pub pad: usize,
    pub kept: Vec<usize>,
    /// `kept` as u32 on the weight's device, where already there (a
    /// masked layer's, uploaded once).
    pub index: Option<Tensor>,
}

impl Taps {
    /// The taps of the bit set `taps` (bit `ky * k + kx`).
    pub fn from_bits(k: usize, pad: usize, taps: u128) -> Self {
        let kept = (0..k * k).filter(|&t| taps >> t & 1 == 1).collect();
        Taps {
            k,
            pad,
            kept,
            index: None,
        }
    }

    /// `kept` as u32 on `device`.
    fn index_on(&self, device: &candle_core::Device) -> candle_core::Result<Tensor> {
        match &self.index {
            Some(index) if index.device().same_device(device) => Ok(index.clone()),
            _ => {
                let index: Vec<u32> = self.kept.iter().map(|&t| t as u32).collect();
                Tensor::new(index.as_slice(), device)
            }
        }
    }

    fn all(&self) -> bool {
        self.kept.len() == self.k * self.k
    }

    /// The output side of an input side.
    fn out(&self, side: usize) -> candle_core::Result<usize> {
        match (side + 2 * self.pad).checked_sub(self.k) {
            Some(d) => Ok(d + 1),
            None => candle_core::bail!(
                "a tap-wise convolution needs an input of at least {} (kernel {}, padding {}), got {side}",
                self.k.saturating_sub(2 * self.pad),
                self.k,
                self.pad
            ),
        }
    }

    /// The input gradient's convolution: the same kernel mirrored, the
    /// padding that gives back the input's size (`k - 1 - pad`; `None`
    /// where the padding is wider than that).
    fn mirrored(&self) -> Option<Taps> {
        let kk = self.k * self.k;
        Some(Taps {
            k: self.k,
            pad: (self.k - 1).checked_sub(self.pad)?,
            kept: self.kept.iter().map(|&t| kk - 1 - t).collect(),
            index: None,
        })
    }

    /// Whether [`TapwiseConv`] can take the backward of this layer.
    pub fn adjoint_applies(&self) -> bool {
        self.mirrored().is_some()
    }

    /// The weight (O, C, k, k) at the kept taps, (O, C, T).
    fn kept_weight(&self, weight: &Tensor) -> candle_core::Result<Tensor> {
        let (o, c, _, _) = weight.dims4()?;
        let per_tap = weight.reshape((o, c, self.k * self.k))?;
        if self.all() {
            return Ok(per_tap);
        }
        per_tap.index_select(&self.index_on(weight.device())?, 2)
    }

    /// The weight (O, C, k, k) as the forward's O x T*C matrix (column
    /// `t * C + c`: channel c at the t-th kept tap).
    pub fn matrix(&self, weight: &Tensor) -> candle_core::Result<Tensor> {
        let (o, c, _, _) = weight.dims4()?;
        self.kept_weight(weight)?
            .transpose(1, 2)?
            .reshape((o, self.kept.len() * c))
    }

    /// The weight as the input gradient's C x T*O matrix, for the taps of
    /// [`Taps::mirrored`] in the same order (column `t * O + o`).
    fn adjoint_matrix(&self, weight: &Tensor) -> candle_core::Result<Tensor> {
        let (o, c, _, _) = weight.dims4()?;
        self.kept_weight(weight)?
            .permute((1, 2, 0))?
            .reshape((c, self.kept.len() * o))
    }

    /// The columns of `x` (B, C, H, W): (B, T*C, Ho*Wo), tap-major.
    fn columns(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let (ho, wo) = (self.out(h)?, self.out(w)?);
        if self.k == 1 && self.pad == 0 {
            return x.reshape((b, c, h * w));
        }
        let p = self.pad;
        let padded = x.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)?;
        let shifted = self
            .kept
            .iter()
            .map(|&t| padded.narrow(2, t / self.k, ho)?.narrow(3, t % self.k, wo))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&shifted, 1)?.reshape((b, self.kept.len() * c, ho * wo))
    }

    /// `matrix` (O, T*C) times the columns of `x`: (B, O, Ho, Wo).
    pub fn apply(&self, x: &Tensor, matrix: &Tensor) -> candle_core::Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let o = matrix.dim(0)?;
        matrix
            .broadcast_left(b)?
            .matmul(&self.columns(x)?)?
            .reshape((b, o, self.out(h)?, self.out(w)?))
    }

    /// [`Taps::apply`] a chunk of images at a time, each chunk's columns
    /// within `column_bytes`.
    fn apply_chunked(
        &self,
        x: &Tensor,
        matrix: &Tensor,
        column_bytes: usize,
    ) -> candle_core::Result<Tensor> {
        let chunks = image_chunks(x, self.kept.len(), column_bytes)?;
        if chunks.len() == 1 {
            return self.apply(x, matrix);
        }
        let outputs = chunks
            .into_iter()
            .map(|(i, n)| self.apply(&x.narrow(0, i, n)?, matrix))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&outputs, 0)
    }
}

/// Chunks of `x`'s images (first, count) whose columns for `taps` taps
/// stay within `column_bytes` (one image at least).
fn image_chunks(
    x: &Tensor,
    taps: usize,
    column_bytes: usize,
) -> candle_core::Result<Vec<(usize, usize)>> {
    let (b, c, h, w) = x.dims4()?;
    let per_image = taps * c * h * w * x.dtype().size_in_bytes();
    let n = (column_bytes / per_image.max(1)).clamp(1, b.max(1));
    Ok((0..b).step_by(n).map(|i| (i, n.min(b - i))).collect())
}

/// A stride-1 convolution without bias, `x` (B, C, H, W) and the (masked)
/// weight (O, C, k, k) in one dtype, with the adjoint of the module docs.
/// Candle passes the forward its inputs' storages: they are copied into
/// tensors outside the graph, and the output copied back.
pub struct TapwiseConv {
    pub taps: Taps,
    /// The most bytes of columns a chunk of images builds
    /// ([`COLUMN_BYTES`] but in tests).
    pub column_bytes: usize,
}

impl TapwiseConv {
    /// The forward on copies of the input's and the weight's storages
    /// (with their layouts): the output's storage.
    fn forward_on(
        &self,
        (x, lx): (Storage, &Layout),
        (weight, lw): (Storage, &Layout),
    ) -> candle_core::Result<(Storage, Shape)> {
        let (x, weight) = (detached_copy(x, lx)?, detached_copy(weight, lw)?);
        let matrix = self.taps.matrix(&weight)?;
        owned_storage(&self.taps.apply_chunked(&x, &matrix, self.column_bytes)?)
    }
}

/// A tensor outside the graph holding a copy of `storage` at `layout`
/// (contiguous from its start, as `Conv` hands it over).
fn detached_copy(storage: Storage, layout: &Layout) -> candle_core::Result<Tensor> {
    if layout.contiguous_offsets().map(|(start, _)| start) != Some(0) {
        candle_core::bail!("a tap-wise convolution takes contiguous inputs from their start");
    }
    Ok(Tensor::from_storage(
        storage,
        layout.shape().clone(),
        BackpropOp::none(),
        false,
    ))
}

/// `y`'s values as a storage of its own, contiguous from the start.
fn owned_storage(y: &Tensor) -> candle_core::Result<(Storage, Shape)> {
    let y = super::from_start(y)?;
    let (storage, layout) = y.storage_and_layout();
    let copy = match &*storage {
        Storage::Cpu(s) => Storage::Cpu(s.try_clone(layout)?),
        Storage::Cuda(s) => Storage::Cuda(s.try_clone(layout)?),
        Storage::Metal(_) => candle_core::bail!("a tap-wise convolution on Metal"),
    };
    Ok((copy, layout.shape().clone()))
}

impl CustomOp2 for TapwiseConv {
    fn name(&self) -> &'static str {
        "tapwise-conv"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = Storage::Cpu(s1.try_clone(l1)?);
        match self.forward_on((x, l1), (Storage::Cpu(s2.try_clone(l2)?), l2))? {
            (Storage::Cpu(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("a tap-wise convolution left the CPU"),
        }
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let x = Storage::Cuda(s1.try_clone(l1)?);
        match self.forward_on((x, l1), (Storage::Cuda(s2.try_clone(l2)?), l2))? {
            (Storage::Cuda(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("a tap-wise convolution left the GPU"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let taps = &self.taps;
        let Some(mirrored) = taps.mirrored() else {
            candle_core::bail!(
                "a tap-wise convolution's adjoint needs padding below the kernel ({} for {})",
                taps.pad,
                taps.k
            );
        };
        // Outside the graph: the gradients are values, not further ops.
        let (x, weight, dy) = (x.detach(), weight.detach(), grad.detach().contiguous()?);
        let dx = mirrored.apply_chunked(&dy, &taps.adjoint_matrix(&weight)?, self.column_bytes)?;

        let (b, o, ho, wo) = dy.dims4()?;
        let c = x.dim(1)?;
        let mut dm: Option<Tensor> = None;
        for (i, n) in image_chunks(&x, taps.kept.len(), self.column_bytes)? {
            let columns = taps.columns(&x.narrow(0, i, n)?)?;
            let part = dy
                .narrow(0, i, n)?
                .reshape((n, o, ho * wo))?
                .matmul(&columns.transpose(1, 2)?)?
                .to_dtype(DType::F32)?
                .sum(0)?;
            dm = Some(match dm {
                Some(sum) => (sum + part)?,
                None => part,
            });
        }
        let Some(dm) = dm else {
            candle_core::bail!("a tap-wise convolution of no images ({b})");
        };
        // (O, T*C) -> (O, C, T) -> every tap (O, C, k*k), zero where masked.
        let t = taps.kept.len();
        let per_tap = dm.reshape((o, t, c))?.transpose(1, 2)?.contiguous()?;
        let kk = taps.k * taps.k;
        let full = if taps.all() {
            per_tap
        } else {
            Tensor::zeros((o, c, kk), DType::F32, x.device())?.index_add(
                &taps.index_on(x.device())?,
                &per_tap,
                2,
            )?
        };
        let dw = full
            .reshape((o, c, taps.k, taps.k))?
            .to_dtype(weight.dtype())?;
        Ok((Some(dx), Some(dw)))
    }
}
