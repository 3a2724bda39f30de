//! Which rows each rank holds: the zigzag layout.
//!
//! A sequence of `n` rows is cut into `2R` chunks of nearly equal length (the first `n mod 2R`
//! one row longer), and rank `r` holds chunks `r` and `2R − 1 − r`: one from the front, its
//! mirror from the back. Under causal masking a query chunk sees every key chunk before it,
//! so the front chunks have little work and the back chunks much; a pair of mirrored chunks
//! has the same amount of work on every rank (Brandon et al.'s striped and zigzag layouts,
//! ring-flash-attention's `zigzag_ring`). Without causal masking any layout balances; one
//! layout for both keeps the code one path.

use std::ops::Range;

// ANCHOR: zigzag
/// Chunk `c` of `2·ranks` nearly equal chunks of `0..n`.
pub fn chunk(n: usize, ranks: usize, c: usize) -> Range<usize> {
    let parts = 2 * ranks;
    let (base, extra) = (n / parts, n % parts);
    let start = c * base + c.min(extra);
    start..start + base + usize::from(c < extra)
}

/// The rows rank `r` holds of a sequence of `n`: chunks `r` and `2R − 1 − r`, front first.
pub fn zigzag(n: usize, ranks: usize, r: usize) -> [Range<usize>; 2] {
    [chunk(n, ranks, r), chunk(n, ranks, 2 * ranks - 1 - r)]
}
// ANCHOR_END: zigzag

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ranks_chunks_cover_every_row_once() {
        for n in [0, 1, 5, 16, 17, 100] {
            for ranks in 1..=8 {
                let mut seen = vec![0u32; n];
                for r in 0..ranks {
                    for c in zigzag(n, ranks, r) {
                        c.for_each(|i| seen[i] += 1);
                    }
                }
                assert!(seen.iter().all(|&s| s == 1), "n {n} ranks {ranks}: {seen:?}");
                // chunk lengths differ by at most one
                let lens: Vec<usize> = (0..2 * ranks).map(|c| chunk(n, ranks, c).len()).collect();
                let (lo, hi) = (lens.iter().min().unwrap(), lens.iter().max().unwrap());
                assert!(hi - lo <= 1, "n {n} ranks {ranks}: {lens:?}");
            }
        }
        assert_eq!(zigzag(16, 4, 0), [0..2, 14..16]);
        assert_eq!(zigzag(16, 4, 3), [6..8, 8..10]);
    }

    #[test]
    fn zigzag_balances_the_causal_work() {
        // visible (query, key) pairs per rank under causal masking, n_q = n_k = n
        let n = 64;
        for ranks in [2, 4, 8] {
            let work: Vec<usize> = (0..ranks)
                .map(|r| zigzag(n, ranks, r).iter().flat_map(|c| c.clone()).map(|i| i + 1).sum())
                .collect();
            assert!(work.iter().all(|&w| w == work[0]), "ranks {ranks}: {work:?}");
        }
    }
}
