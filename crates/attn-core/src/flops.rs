//! FLOP counting, following the FlashAttention-2 paper: the forward costs
//! `4 · b · h · d` per visible (query, key) pair (two matrix products of `2·d` FLOPs per
//! pair); causal masking counts only the pairs it leaves visible; the backward is 2.5× the
//! forward.

use crate::shape::Shape;

/// The number of (query, key) pairs of one head that causal masking leaves visible
/// (all `n_q · n_k` without it). Bottom-right alignment: row `i` sees keys
/// `0 ..= i + n_k − n_q`.
pub fn visible_pairs(n_q: usize, n_k: usize, causal: bool) -> u64 {
    if !causal {
        return n_q as u64 * n_k as u64;
    }
    (0..n_q).map(|i| crate::shape::key_end(n_q, n_k, causal, i) as u64).sum()
}

/// Forward FLOPs: `4 · b · h · d · visible pairs`.
pub fn forward_flops(shape: &Shape, causal: bool) -> f64 {
    4.0 * (shape.batch * shape.heads * shape.head_dim) as f64
        * visible_pairs(shape.n_q, shape.n_k, causal) as f64
}

/// Backward FLOPs: 2.5 × the forward.
pub fn backward_flops(shape: &Shape, causal: bool) -> f64 {
    2.5 * forward_flops(shape, causal)
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
    fn forward_flops_of_a_known_problem() {
        let shape = Shape::new(1, 8, 1024, 64);
        assert_eq!(forward_flops(&shape, false), 4.0 * 8.0 * 64.0 * 1024.0 * 1024.0);
        assert_eq!(backward_flops(&shape, true), 2.5 * 4.0 * 8.0 * 64.0 * (1024.0 * 1025.0 / 2.0));
    }
}
