//! The bias gradient, dBias: the score gradient dS summed over the bias's broadcast axes.
//!
//! dS is exactly what a backward forms tile by tile, so dBias falls out of it — but the sum
//! over broadcast axes crosses the parallel tasks (a bias shared by every head gets terms from
//! every head's tiles). A fixed summation order keeps the CPU stages bitwise reproducible, so
//! no task adds into a shared total: each tile writes its own slot of a partial sum, and
//! [`BiasGrad::finish`] adds the slots up in one order. A slot is one entry per score along
//! an axis the bias spans, and one entry per block along an axis it broadcasts (the tile's
//! row or column sums), for every (batch, head).

use std::sync::Mutex;

use ndarray::{Array2, Array4, ArrayView2, Axis};

use crate::error::Result;
use crate::problem::Problem;

/// Collects a backward's dS tiles into dBias (when the problem asks for it).
#[derive(Debug)]
pub struct BiasGrad {
    /// The bias's shape, `[batch or 1, heads or 1, n_q or 1, n_k or 1]`.
    dims: [usize; 4],
    heads: usize,
    /// The tile grid the stage's tiles lie on: tile `(i0, j0)` has `i0 % b_r == 0` and
    /// `j0 % b_c == 0`.
    blocks: (usize, usize),
    /// One partial per (batch, head), `[n_q or query blocks, n_k or key blocks]`.
    parts: Vec<Mutex<Array2<f32>>>,
}

impl BiasGrad {
    /// The collector for a problem whose stage forms dS on tiles of `blocks` (`(n_q, n_k)` for
    /// one tile a head), or `None` when the bias gradient was not asked for. Refuses, before
    /// allocating, partials beyond the memory limit.
    pub fn new(
        p: &Problem<'_>,
        stage: &'static str,
        blocks: (usize, usize),
    ) -> Result<Option<Self>> {
        let Some(bias) = p.bias.filter(|_| p.bias_grad) else { return Ok(None) };
        let sh = p.shape;
        let dims: [usize; 4] = bias.shape().try_into().expect("a 4-D bias");
        let rows = if dims[2] == 1 { sh.n_q.div_ceil(blocks.0) } else { sh.n_q };
        let cols = if dims[3] == 1 { sh.n_k.div_ceil(blocks.1) } else { sh.n_k };
        let heads = sh.batch * sh.heads;
        p.check_workspace(
            stage,
            "bias-gradient partials",
            4 * (heads * rows * cols) as u64,
            "give the bias its batch and head axes, or raise the limit (--memory-limit, ATTN_MEMORY_LIMIT)",
        )?;
        let parts = (0..heads).map(|_| Mutex::new(Array2::zeros((rows, cols)))).collect();
        Ok(Some(Self { dims, heads: sh.heads, blocks, parts }))
    }

    // ANCHOR: add
    /// Adds the score gradients `ds` of the tile at rows `i0..`, columns `j0..` of head
    /// `(b, h)` — dS before the softcap's chain rule. Each tile of the grid must be added at
    /// most once (a tile never added counts as zeros).
    pub fn add(&self, b: usize, h: usize, i0: usize, j0: usize, ds: ArrayView2<'_, f32>) {
        let (b_r, b_c) = self.blocks;
        debug_assert!(
            i0.is_multiple_of(b_r) && j0.is_multiple_of(b_c),
            "tile ({i0}, {j0}) is off the grid"
        );
        let mut part = self.parts[b * self.heads + h].lock().expect("no panic while adding");
        let (per_row, per_col) = (self.dims[2] != 1, self.dims[3] != 1);
        let (rows, cols) = ds.dim();
        match (per_row, per_col) {
            (true, true) => {
                let mut slot = part.slice_mut(ndarray::s![i0..i0 + rows, j0..j0 + cols]);
                slot += &ds;
            }
            (true, false) => {
                let slot = part.slice_mut(ndarray::s![i0..i0 + rows, j0 / b_c]);
                for (x, row) in slot.into_iter().zip(ds.rows()) {
                    *x += row.sum();
                }
            }
            (false, true) => {
                let mut slot = part.slice_mut(ndarray::s![i0 / b_r, j0..j0 + cols]);
                for row in ds.rows() {
                    slot += &row;
                }
            }
            (false, false) => part[[i0 / b_r, j0 / b_c]] += ds.sum(),
        }
    }
    // ANCHOR_END: add

    /// dBias in the bias's shape: the partials summed, batch, head and block in order.
    pub fn finish(self) -> Array4<f32> {
        let [bb, bh, bq, bk] = self.dims;
        let mut out = Array4::<f32>::zeros((bb, bh, bq, bk));
        for (flat, part) in self.parts.into_iter().enumerate() {
            let part = part.into_inner().expect("no panic while adding");
            let (b, h) = (flat / self.heads, flat % self.heads);
            let mut target = out.slice_mut(ndarray::s![
                if bb == 1 { 0 } else { b },
                if bh == 1 { 0 } else { h },
                ..,
                ..
            ]);
            // A broadcast axis sums its block slots; a full axis maps one to one.
            let part = if bq == 1 { part.sum_axis(Axis(0)).insert_axis(Axis(0)) } else { part };
            let part = if bk == 1 { part.sum_axis(Axis(1)).insert_axis(Axis(1)) } else { part };
            target += &part;
        }
        out
    }
}
