//! Fast sampling: the logits of one position at a time, computing only what
//! that position adds (the caching of Ramachandran et al. 2017, "Fast
//! generation for convolutional autoregressive models", for the gated
//! PixelCNN).
//!
//! - The vertical stack at row y sees input rows < y only, so it runs once
//!   per row, on the band of rows its receptive field covers; each layer's
//!   pre-activation at row y is kept (and `v_to_h` of it, which the
//!   horizontal stack adds).
//! - The horizontal stack at (y, x) sees columns <= x of row y: each
//!   layer's input columns are cached once final (drawn in full), and a
//!   new position runs every layer only on the columns not final yet (x,
//!   and x - 1 whose last channel was drawn after its logits) and the
//!   `k / 2` cached ones left of them.
//!
//! The logits equal [`PixelCnn::forward`]'s at that position bit for bit
//! (same weights, same taps, and the convolutions sum each output in the
//! same order whatever the number of positions computed with it; tested
//! here and, through the samples drawn, in `train_ar::model`).

use candle_core::{Module, Tensor};

use super::{PixelCnn, gate};

pub struct Incremental<'a> {
    net: &'a PixelCnn,
    /// Per layer: the label and code-map terms every gated layer adds,
    /// (n, 2h, 1, 1) or (n, 2h, H, W).
    extra: Vec<Option<Tensor>>,
    /// Per layer, at the current row: `v_to_h` of the vertical stack's
    /// pre-activation (n, 2h, 1, W), and the extra term (n, 2h, 1, W | 1).
    v_to_h: Vec<Tensor>,
    extra_row: Vec<Option<Tensor>>,
    /// Per layer: its horizontal input's final columns of the current row,
    /// each (n, c, 1, 1); `final_columns` of them (the columns left of the
    /// last position asked for).
    columns: Vec<Vec<Tensor>>,
    final_columns: usize,
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
        let extra = net
            .layers
            .iter()
            .map(|layer| layer.extra(labels, cond))
            .collect::<candle_core::Result<_>>()?;
        Ok(Incremental {
            net,
            extra,
            v_to_h: Vec::new(),
            extra_row: Vec::new(),
            columns: Vec::new(),
            final_columns: 0,
        })
    }

    /// The extra term of `layer` on rows `y0..y0 + rows`.
    fn extra_rows(
        &self,
        layer: usize,
        y0: usize,
        rows: usize,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(match &self.extra[layer] {
            Some(e) if e.dim(2)? > 1 => Some(e.narrow(2, y0, rows)?),
            other => other.clone(),
        })
    }

    /// Starts row `y`. `band`: the input (pixels f32 (n, C, r, W), codes
    /// u32 (n, r, W)) on rows `y + 1 - r ..= y` with r = min(y, rows_above)
    /// + 1; row y itself is not read.
    pub fn start_row(&mut self, y: usize, band: &Tensor) -> candle_core::Result<()> {
        let rows = band.dim(if band.rank() == 4 { 2 } else { 1 })?;
        if rows != y.min(self.net.rows_above()) + 1 {
            candle_core::bail!(
                "incremental sampling: row {y} needs a band of {} rows, got {rows}",
                y.min(self.net.rows_above()) + 1
            );
        }
        let y0 = y + 1 - rows;
        let mut v = self.net.input.forward(band)?;
        self.v_to_h.clear();
        self.extra_row.clear();
        for (l, layer) in self.net.layers.iter().enumerate() {
            let mut v_pre = layer.vertical.forward(&v)?;
            let last = v_pre.narrow(2, rows - 1, 1)?;
            self.v_to_h.push(layer.v_to_h.forward(&last)?);
            self.extra_row.push(self.extra_rows(l, y, 1)?);
            if let Some(e) = self.extra_rows(l, y0, rows)? {
                v_pre = v_pre.broadcast_add(&e)?;
            }
            v = gate(&v_pre)?;
        }
        self.columns = vec![Vec::new(); self.net.layers.len()];
        self.final_columns = 0;
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
            let mut h_pre = (layer
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
            let h_new = layer.h_out.forward(&gate(&h_pre)?)?;
            h = if layer.residual { (h + h_new)? } else { h_new };
        }
        self.final_columns = x;
        let h = h.narrow(3, fresh - 1, 1)?;
        let out = self
            .net
            .out2
            .forward_relu(&self.net.out1.forward_relu(&h)?)?;
        out.flatten_from(1)
    }
}
