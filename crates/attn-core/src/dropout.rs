//! Dropout on the attention weights through a counter-based hash.
//!
//! Whether weight `(b, h, i, j)` is kept depends only on `(seed, b, h, i, j)`, never on the
//! order in which a stage visits the tiles, so every stage — CPU or GPU, any block sizes —
//! drops exactly the same weights. The hash uses only 32-bit multiplies, shifts and xors,
//! which a CUDA kernel computes bit for bit the same way:
//!
//! ```text
//! mix(x)      = lowbias32: x ^= x>>16; x *= 0x7feb352d; x ^= x>>15; x *= 0x846ca68b; x ^= x>>16
//! row_key     = mix(mix(mix(mix(mix(lo(seed) ^ 0x9e3779b9) ^ hi(seed)) ^ b) ^ h) ^ i)
//! hash(i, j)  = mix(mix(row_key ^ j) + row_key)            (wrapping add)
//! keep        = hash >= threshold,   threshold = floor(p · 2³²)
//! ```
//!
//! `h` is the query head. A kept weight is scaled by `1 / (1 − p)`; `p = 0` keeps everything.

use crate::error::{AttnError, Result};

/// Dropout requested by the caller: probability `p` of dropping a weight, and the seed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
}

impl Dropout {
    pub fn new(p: f32, seed: u64) -> Self {
        Self { p, seed }
    }
}

// ANCHOR: hash
/// Chris Wellons' `lowbias32` integer hash: a bijection on `u32` with low bias.
#[inline(always)]
pub const fn mix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

/// The per-row part of the hash, computed once per query row.
#[inline]
pub fn row_key(seed: u64, b: usize, h: usize, i: usize) -> u32 {
    let mut x = mix32(seed as u32 ^ 0x9e37_79b9);
    x = mix32(x ^ (seed >> 32) as u32);
    x = mix32(x ^ b as u32);
    x = mix32(x ^ h as u32);
    mix32(x ^ i as u32)
}

/// The hash of weight `(i, j)` given its row's key.
#[inline(always)]
pub fn element_hash(row_key: u32, j: usize) -> u32 {
    mix32(mix32(row_key ^ j as u32).wrapping_add(row_key))
}
// ANCHOR_END: hash

/// Validated dropout, ready to apply: the integer threshold and the scale of kept weights.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DropoutParams {
    pub p: f32,
    pub seed: u64,
    /// A weight is kept when its hash is at least this.
    pub threshold: u32,
    /// `1 / (1 − p)`, the factor of kept weights.
    pub keep_scale: f32,
}

impl DropoutParams {
    /// Checks `p ∈ [0, 1)`.
    pub fn new(dropout: Dropout) -> Result<Self> {
        let p = dropout.p;
        if !(0.0..1.0).contains(&p) {
            return Err(AttnError::InvalidDropout(p));
        }
        let threshold = (p as f64 * 4_294_967_296.0).floor() as u32;
        Ok(Self { p, seed: dropout.seed, threshold, keep_scale: (1.0 / (1.0 - p as f64)) as f32 })
    }

    /// Whether weight `(b, h, i, j)` survives.
    pub fn keep(&self, b: usize, h: usize, i: usize, j: usize) -> bool {
        element_hash(row_key(self.seed, b, h, i), j) >= self.threshold
    }

    /// The factor weight `(i, j)` of a row is multiplied by: `0` or `1/(1 − p)`.
    #[inline(always)]
    pub fn factor(&self, row_key: u32, j: usize) -> f32 {
        if element_hash(row_key, j) >= self.threshold { self.keep_scale } else { 0.0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_matches_an_independent_implementation() {
        // Values computed by a separate Python implementation of the formulas in the module
        // docs; a CUDA port checks itself against the same numbers.
        assert_eq!(mix32(0), 0);
        assert_eq!(mix32(1), 0x6889_90c0);
        assert_eq!(row_key(42, 1, 2, 3), 2_019_880_571);
        assert_eq!(element_hash(2_019_880_571, 5), 1_460_338_756);
    }

    #[test]
    fn p_zero_keeps_everything() {
        let d = DropoutParams::new(Dropout::new(0.0, 7)).unwrap();
        assert_eq!(d.threshold, 0);
        assert!((0..1000).all(|j| d.keep(0, 0, 3, j)));
    }

    #[test]
    fn bad_probabilities_are_refused() {
        for p in [-0.1, 1.0, 1.5, f32::NAN] {
            assert!(matches!(
                DropoutParams::new(Dropout::new(p, 0)),
                Err(AttnError::InvalidDropout(_))
            ));
        }
    }
}
