//! FLOP counting, following the FlashAttention-2 paper: the forward costs
//! `4 · b · h · d` per visible (query, key) pair (two matrix products of `2·d` FLOPs per
//! pair); causal masking and a sliding window count only the pairs they leave visible; the
//! backward is 2.5× the forward.

use crate::options::Window;
use crate::shape::{KeyRange, Shape};

/// The number of (query, key) pairs of one head that causal masking leaves visible
/// (all `n_q · n_k` without it). Bottom-right alignment: row `i` sees keys
/// `0 ..= i + n_k − n_q`.
pub fn visible_pairs(n_q: usize, n_k: usize, causal: bool) -> u64 {
    if !causal {
        return n_q as u64 * n_k as u64;
    }
    KeyRange::new(n_q, n_k, causal, None).visible_pairs()
}

/// Forward FLOPs: `4 · b · h · d · visible pairs`.
pub fn forward_flops(shape: &Shape, causal: bool) -> f64 {
    forward_flops_windowed(shape, causal, None)
}

/// Forward FLOPs with a sliding window: `4 · b · h · d` per pair the window and causal
/// masking keep.
pub fn forward_flops_windowed(shape: &Shape, causal: bool, window: Option<Window>) -> f64 {
    let keys = KeyRange::new(shape.n_q, shape.n_k, causal, window);
    let pairs = if keys.is_full() {
        shape.n_q as f64 * shape.n_k as f64
    } else {
        keys.visible_pairs() as f64
    };
    4.0 * (shape.batch * shape.heads * shape.head_dim) as f64 * pairs
}

/// Backward FLOPs: 2.5 × the forward.
pub fn backward_flops(shape: &Shape, causal: bool) -> f64 {
    backward_flops_windowed(shape, causal, None)
}

/// Backward FLOPs with a sliding window: 2.5 × the forward's.
pub fn backward_flops_windowed(shape: &Shape, causal: bool, window: Option<Window>) -> f64 {
    2.5 * forward_flops_windowed(shape, causal, window)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_pairs_count_the_lower_triangle() {
        assert_eq!(visible_pairs(4, 4, true), 10);
        assert_eq!(visible_pairs(4, 4, false), 16);
        // Fewer queries than keys: bottom-right alignment shows every row n_k − n_q more keys.
        assert_eq!(visible_pairs(2, 4, true), 3 + 4);
        // More queries than keys: the first n_q − n_k rows see nothing.
        assert_eq!(visible_pairs(4, 2, true), 1 + 2);
    }

    #[test]
    fn a_window_counts_the_band_it_keeps() {
        let shape = Shape::new(1, 1, 6, 1);
        // left 2, right 1 on 6 × 6: rows keep 2, 3, 4, 4, 4, 3 keys.
        assert_eq!(forward_flops_windowed(&shape, false, Some(Window::new(2, 1))), 4.0 * 20.0);
        // With causal, right is 0: rows keep 1, 2, 3, 3, 3, 3.
        assert_eq!(forward_flops_windowed(&shape, true, Some(Window::new(2, 1))), 4.0 * 15.0);
        // Unbounded on both sides is the full square.
        assert_eq!(forward_flops_windowed(&shape, false, Some(Window::new(-1, -1))), 4.0 * 36.0);
        // n_q < n_k: the band slides right by n_k − n_q = 4; left 0, right 0 keeps one key a row.
        let cross = Shape::new(1, 1, 2, 1).with_n_k(6);
        let keys = KeyRange::new(2, 6, false, Some(Window::new(0, 0)));
        assert_eq!((keys.start(0), keys.end(0), keys.start(1), keys.end(1)), (4, 5, 5, 6));
        assert_eq!(forward_flops_windowed(&cross, false, Some(Window::new(0, 0))), 4.0 * 2.0);
        // n_q > n_k with causal: the first rows see nothing, start ≤ end always.
        let keys = KeyRange::new(5, 2, true, Some(Window::new(1, -1)));
        let rows: Vec<_> = (0..5).map(|i| (keys.start(i), keys.end(i))).collect();
        assert_eq!(rows, [(0, 0), (0, 0), (0, 0), (0, 1), (0, 2)]);
        assert!(keys.tile_hidden((0, 3), (0, 2)) && !keys.tile_hidden((3, 5), (1, 1)));
    }

    #[test]
    fn forward_flops_of_a_known_problem() {
        let shape = Shape::new(1, 8, 1024, 64);
        assert_eq!(forward_flops(&shape, false), 4.0 * 8.0 * 64.0 * 1024.0 * 1024.0);
        assert_eq!(backward_flops(&shape, true), 2.5 * 4.0 * 8.0 * 64.0 * (1024.0 * 1025.0 / 2.0));
    }
}
