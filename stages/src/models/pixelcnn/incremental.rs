//! Fast sampling: the logits of one position at a time, computing only what
//! that position adds (the caching of Ramachandran et al. 2017, "Fast
//! generation for convolutional autoregressive models", for the gated
//! PixelCNN).
//!
//! - The vertical stack at row y sees input rows < y only, so it runs once
//!   per row: each layer computes its row y from the last `k / 2 + 1` rows
//!   of the layer below (the input's rows < y for the first), which are
//!   cached as they are computed, so a row costs each layer a window of
//!   `k / 2 + 1` rows, not the whole band of rows its receptive field
//!   covers. Each layer's pre-activation at row y is kept (and `v_to_h` of
//!   it, which the horizontal stack adds).
//! - The horizontal stack at (y, x) sees columns <= x of row y: each
//!   layer's input columns are cached once final (drawn in full), and a
//!   new position runs every layer only on the columns not final yet (x,
//!   and x - 1 whose last channel was drawn after its logits) and the
//!   `k / 2` cached ones left of them.
//! - The label's and the code map's terms of each layer are computed for
//!   the current row when it starts: for whole images they would be (n,
//!   2h, H, W) a layer (by count, 17 GB for 64 images of 128x128 through
//!   imagenet128.yaml's decoder1).
//!
//! The logits equal [`PixelCnn::forward`]'s at that position bit for bit
//! (same weights, same taps, and the convolutions sum each output in the
//! same order whatever the number of positions computed with it; tested
//! here and, through the samples drawn, in `train_ar::model`).

use candle_core::{DType, Module, Tensor};

use super::{PixelCnn, extra_term, gate};
use crate::models::conv::Conv;
use crate::models::precision;

/// A gated layer's convolutions, frozen ([`Conv::frozen`]).
struct FrozenLayer {
    vertical: Conv,
    horizontal: Conv,
    v_to_h: Conv,
    h_out: Conv,
    /// The code map's 1x1 layer, if the network has one.
    cond: Option<Conv>,
}

pub struct Incremental<'a> {
    net: &'a PixelCnn,
    /// The network's convolutions, frozen for the positions to come: per
    /// layer, then the two output layers.
    layers: Vec<FrozenLayer>,
    out: [Conv; 2],
    /// The labels u32 (n,) and the conditioning features (n, cond_hidden,
    /// H, W): each row's terms are computed from them when it starts.
    labels: Option<Tensor>,
    cond: Option<Tensor>,
    /// Per layer, at the current row: `v_to_h` of the vertical stack's
    /// pre-activation (n, 2h, 1, W), and the extra term (n, 2h, 1, W | 1).
    v_to_h: Vec<Tensor>,
    extra_row: Vec<Option<Tensor>>,
    /// Per layer: its horizontal input's final columns of the current row,
    /// each (n, c, 1, 1); `final_columns` of them (the columns left of the
    /// last position asked for).
    columns: Vec<Vec<Tensor>>,
    final_columns: usize,
    /// The vertical stack's last rows, oldest first: `below[0]` the input's
    /// (embedded) final rows, `below[l + 1]` layer l's gated output, each
    /// row (n, c, 1, W); what the next row's windows read.
    below: Vec<Vec<Tensor>>,
    /// The row `start_row` expects next.
    next_row: usize,
}

impl<'a> Incremental<'a> {
    /// `labels` u32 (n,); `cond` the conditioning features of the whole
    /// target (n, cond_hidden, H, W), as [`PixelCnn::condition`] gives.
    pub fn new(
        net: &'a PixelCnn,
        labels: Option<&Tensor>,
        cond: Option<&Tensor>,
    ) -> candle_core::Result<Self> {
        if net.cond.is_some() != cond.is_some() {
            candle_core::bail!(
                "PixelCNN: the code map must be given exactly when the model was built for one"
            );
        }
        // The dtype the convolutions compute in on this device and thread.
        let dtype = precision::compute_dtype_on(net.out1.weight_device(), DType::F32);
        let layers = net
            .layers
            .iter()
            .map(|l| {
                Ok(FrozenLayer {
                    vertical: l.vertical.frozen(dtype)?,
                    horizontal: l.horizontal.frozen(dtype)?,
                    v_to_h: l.v_to_h.frozen(dtype)?,
                    h_out: l.h_out.frozen(dtype)?,
                    cond: l.cond.as_ref().map(|c| c.frozen(dtype)).transpose()?,
                })
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Incremental {
            net,
            layers,
            out: [net.out1.frozen(dtype)?, net.out2.frozen(dtype)?],
            labels: labels.cloned(),
            cond: cond.cloned(),
            v_to_h: Vec::new(),
            extra_row: Vec::new(),
            columns: Vec::new(),
            final_columns: 0,
            below: vec![Vec::new(); net.layers.len() + 1],
            next_row: 0,
        })
    }

    /// Starts row `y` (rows in order from 0). `above`: the input on row
    /// `y - 1` (pixels f32 (n, C, 1, W), codes u32 (n, 1, W)), final now;
    /// for row 0, a row of that shape whose values are not read.
    pub fn start_row(&mut self, y: usize, above: &Tensor) -> candle_core::Result<()> {
        if y != self.next_row {
            candle_core::bail!(
                "incremental sampling: row {y} started where row {} was next (rows go in order)",
                self.next_row
            );
        }
        let half = self.net.kernel / 2;
        let input = self.net.input.forward(above)?;
        // Row y of the input is not final; the first layer's mask (A) reads
        // no tap of it, so zeros stand in.
        let unread = input.zeros_like()?;
        if y > 0 {
            keep_last(&mut self.below[0], input, half);
        }
        // The conditioning terms of row y only: a whole image's would be
        // (n, 2h, H, W) for every layer at once.
        let cond_row = match &self.cond {
            Some(c) => Some(c.narrow(2, y, 1)?),
            None => None,
        };
        self.v_to_h.clear();
        self.extra_row.clear();
        for (l, layer) in self.net.layers.iter().enumerate() {
            let mut window = self.below[l].clone();
            if l == 0 {
                window.push(unread.clone());
            }
            let window = Tensor::cat(&window, 2)?;
            let rows = window.dim(2)?;
            let frozen = &self.layers[l];
            let v_pre = frozen.vertical.forward(&window)?.narrow(2, rows - 1, 1)?;
            self.v_to_h.push(frozen.v_to_h.forward(&v_pre)?);
            let extra = extra_term(
                layer.label.as_ref(),
                frozen.cond.as_ref(),
                self.labels.as_ref(),
                cond_row.as_ref(),
            )?;
            let v_pre = match &extra {
                Some(e) => v_pre.broadcast_add(e)?,
                None => v_pre,
            };
            self.extra_row.push(extra);
            keep_last(&mut self.below[l + 1], gate(&v_pre)?, half + 1);
        }
        self.columns = vec![Vec::new(); self.net.layers.len()];
        self.final_columns = 0;
        self.next_row = y + 1;
        Ok(())
    }

    /// The logits (n, G x K) at (y, x) of the current row, given `row`,
    /// the input on that row (pixels (n, C, 1, W), codes (n, 1, W)) whose
    /// columns < x are final; columns > x and channels at x not drawn yet
    /// are not read (the masks hide them). Columns go left to right; x
    /// again (the next channel of the same pixel) is allowed.
    pub fn logits(&mut self, x: usize, row: &Tensor) -> candle_core::Result<Tensor> {
        let c = self.net.kernel / 2;
        let done = self.final_columns;
        if x < done {
            candle_core::bail!("incremental sampling: column {x} after column {done}");
        }
        // The columns not final before this call: done..=x.
        let fresh = x + 1 - done;
        let mut h = self
            .net
            .input
            .forward(&row.narrow(row.rank() - 1, done, fresh)?)?;
        for (l, layer) in self.net.layers.iter().enumerate() {
            let cached = &mut self.columns[l];
            let start = done.saturating_sub(c);
            let mut window: Vec<Tensor> = cached[start..done].to_vec();
            window.push(h.clone());
            for j in 0..fresh.saturating_sub(1) {
                cached.push(h.narrow(3, j, 1)?);
            }
            let window = Tensor::cat(&window, 3)?;
            let m = window.dim(3)?;
            let frozen = &self.layers[l];
            let mut h_pre = (frozen
                .horizontal
                .forward(&window)?
                .narrow(3, m - fresh, fresh)?
                + self.v_to_h[l].narrow(3, done, fresh)?)?;
            if let Some(e) = &self.extra_row[l] {
                let e = if e.dim(3)? > 1 {
                    e.narrow(3, done, fresh)?
                } else {
                    e.clone()
                };
                h_pre = h_pre.broadcast_add(&e)?;
            }
            let h_new = frozen.h_out.forward(&gate(&h_pre)?)?;
            h = if layer.residual { (h + h_new)? } else { h_new };
        }
        self.final_columns = x;
        let h = h.narrow(3, fresh - 1, 1)?;
        let [out1, out2] = &self.out;
        let out = out2.forward_relu(&out1.forward_relu(&h)?)?;
        out.flatten_from(1)
    }
}

/// Appends `row` to `rows`, keeping the last `keep`.
fn keep_last(rows: &mut Vec<Tensor>, row: Tensor, keep: usize) {
    rows.push(row);
    if rows.len() > keep {
        rows.drain(..rows.len() - keep);
    }
}
