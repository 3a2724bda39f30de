//! Splitting output tensors into disjoint mutable blocks, one per parallel task.
//!
//! Tiled stages parallelise over (batch, head, block of rows). These helpers cut a
//! `[batch, heads, rows, cols]` tensor (or a `[batch, heads, rows]` one) into views of at
//! most `block` rows, in a fixed order, so that tensors of the same leading shape split into
//! matching lists that can be zipped and handed to rayon.

use ndarray::{
    ArrayViewMut, ArrayViewMut2, ArrayViewMut3, ArrayViewMut4, Axis, Dimension, RemoveAxis,
};

/// A block of rows of one (batch, head): rows `start .. start + view.nrows()`.
#[derive(Debug)]
pub struct Block<V> {
    pub b: usize,
    pub h: usize,
    pub start: usize,
    pub view: V,
}

/// `[batch, heads, rows, …]` cut into blocks of at most `block` rows, in the order
/// (b, h, start). Works for `[b, h, rows, cols]` (outputs, gradients) and `[b, h, rows]`
/// (log-sum-exp) alike, so lists from tensors with the same leading axes zip.
pub fn row_blocks<'a, D>(
    t: ArrayViewMut<'a, f32, D>,
    block: usize,
) -> Vec<Block<ArrayViewMut<'a, f32, HeadDim<D>>>>
where
    D: RemoveAxis,
    D::Smaller: RemoveAxis,
    HeadDim<D>: RemoveAxis,
{
    let mut blocks = Vec::new();
    for (b, t_b) in t.into_outer_iter_mut().enumerate() {
        for (h, t_bh) in t_b.into_outer_iter_mut().enumerate() {
            for (c, view) in t_bh.into_axis_chunks_iter_mut(Axis(0), block).enumerate() {
                blocks.push(Block { b, h, start: c * block, view });
            }
        }
    }
    blocks
}

/// The dimension of one (batch, head) slice of a tensor of dimension `D`.
pub type HeadDim<D> = <<D as Dimension>::Smaller as Dimension>::Smaller;

/// What one backward task owns when it handles a whole (batch, key/value head): the dQ of
/// the query heads that share it, `[group, n_q, d]`, and its dK and dV, `[n_k, d]`.
#[derive(Debug)]
pub struct KvHeadGrads<'a> {
    pub b: usize,
    pub kv_h: usize,
    pub dq: ArrayViewMut3<'a, f32>,
    pub dk: ArrayViewMut2<'a, f32>,
    pub dv: ArrayViewMut2<'a, f32>,
}

/// Cuts freshly allocated (standard layout) gradients `dq [b, h, n_q, d]`, `dk`, `dv`
/// `[b, kv_heads, n_k, d]` into one [`KvHeadGrads`] per (batch, key/value head), in order.
///
/// # Panics
/// When `dq` is not in standard layout (a programming error: the stages allocate it).
pub fn kv_head_grads<'a>(
    dq: ArrayViewMut4<'a, f32>,
    dk: ArrayViewMut4<'a, f32>,
    dv: ArrayViewMut4<'a, f32>,
) -> Vec<KvHeadGrads<'a>> {
    let (b, h, n_q, d) = dq.dim();
    let kv_heads = dk.dim().1;
    let dq_groups = dq
        .into_shape_with_order((b * kv_heads, h / kv_heads, n_q, d))
        .expect("dQ is allocated in standard layout")
        .into_outer_iter_mut();
    dq_groups
        .zip(row_blocks(dk, usize::MAX))
        .zip(row_blocks(dv, usize::MAX))
        .map(|((dq, dk), dv)| KvHeadGrads { b: dk.b, kv_h: dk.h, dq, dk: dk.view, dv: dv.view })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array3, Array4};

    #[test]
    fn blocks_cover_every_row_once_with_a_short_last_block() {
        let mut t = Array4::<f32>::zeros((2, 3, 10, 4));
        let mut l = Array3::<f32>::zeros((2, 3, 10));
        let blocks = row_blocks(t.view_mut(), 4);
        let lse = row_blocks(l.view_mut(), 4);
        assert_eq!(blocks.len(), 2 * 3 * 3);
        for (x, y) in blocks.iter().zip(&lse) {
            assert_eq!((x.b, x.h, x.start), (y.b, y.h, y.start));
            assert_eq!(x.view.nrows(), if x.start == 8 { 2 } else { 4 });
        }
        for mut blk in blocks {
            blk.view += 1.0;
        }
        assert!(t.iter().all(|&x| x == 1.0));
    }
}
