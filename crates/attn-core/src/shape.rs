//! Shapes: every tensor is `[batch, heads, seq, head_dim]`, row-major.

use crate::options::Window;

/// The sizes of one attention problem.
///
/// Queries are `[batch, heads, n_q, head_dim]`; keys and values are
/// `[batch, kv_heads, n_k, head_dim]`, where `heads % kv_heads == 0` (grouped-query and
/// multi-query attention share one key/value head among `heads / kv_heads` query heads).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shape {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub n_q: usize,
    pub n_k: usize,
    pub head_dim: usize,
}

impl Shape {
    /// Self-attention shape: `n_q = n_k = n`, as many key/value heads as query heads.
    pub fn new(batch: usize, heads: usize, n: usize, head_dim: usize) -> Self {
        Self { batch, heads, kv_heads: heads, n_q: n, n_k: n, head_dim }
    }

    /// The shape of Q `[b, h, n_q, d]` and K `[b, kv_heads, n_k, d]` (batch and head_dim of K
    /// are taken from Q; [`crate::Problem::new`] checks that they agree).
    pub fn from_dims(q: (usize, usize, usize, usize), k: (usize, usize, usize, usize)) -> Self {
        let (batch, heads, n_q, head_dim) = q;
        let (_, kv_heads, n_k, _) = k;
        Self { batch, heads, kv_heads, n_q, n_k, head_dim }
    }

    /// Sets a different key/value length (cross attention).
    pub fn with_n_k(self, n_k: usize) -> Self {
        Self { n_k, ..self }
    }

    /// Sets fewer key/value heads (GQA/MQA).
    pub fn with_kv_heads(self, kv_heads: usize) -> Self {
        Self { kv_heads, ..self }
    }

    /// `[batch, heads, n_q, head_dim]`: the shape of Q, O and dO.
    pub fn q_dims(&self) -> (usize, usize, usize, usize) {
        (self.batch, self.heads, self.n_q, self.head_dim)
    }

    /// `[batch, kv_heads, n_k, head_dim]`: the shape of K and V.
    pub fn kv_dims(&self) -> (usize, usize, usize, usize) {
        (self.batch, self.kv_heads, self.n_k, self.head_dim)
    }

    /// `[batch, heads, n_q]`: the shape of the log-sum-exp.
    pub fn lse_dims(&self) -> (usize, usize, usize) {
        (self.batch, self.heads, self.n_q)
    }

    /// `[batch, heads, n_q, n_k]`: the shape a mask or bias broadcasts to.
    pub fn score_dims(&self) -> [usize; 4] {
        [self.batch, self.heads, self.n_q, self.n_k]
    }

    /// Query heads per key/value head.
    pub fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// The key/value head that query head `h` reads.
    pub fn kv_head(&self, h: usize) -> usize {
        h / self.group()
    }

    /// Number of score entries `b·h·n_q·n_k`.
    pub fn score_elems(&self) -> u64 {
        (self.batch * self.heads) as u64 * self.n_q as u64 * self.n_k as u64
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "b={} h={} n_q={} n_k={} d={}",
            self.batch, self.heads, self.n_q, self.n_k, self.head_dim
        )?;
        if self.kv_heads != self.heads {
            write!(f, " kv_heads={}", self.kv_heads)?;
        }
        Ok(())
    }
}

// ANCHOR: key_range
/// Which keys each query sees under causal masking and a sliding window together: query `i`
/// sees the keys `start(i) .. end(i)` around its diagonal `i + (n_k − n_q)`. Both bounds are
/// non-decreasing in `i`, so a block of rows `i0 .. i1` sees at most
/// `start(i0) .. end(i1 − 1)`: the tiled stages skip every tile outside it. Every stage, CPU
/// and GPU, and the FLOP count use this one rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KeyRange {
    pub n_q: usize,
    pub n_k: usize,
    /// The key on query 0's diagonal: `n_k − n_q` for a whole problem; for a block placed in
    /// a larger one ([`crate::Placement`]), the whole problem's diagonal in the block's keys.
    pub diagonal: i64,
    /// At most this many keys before the diagonal; `None`: unbounded.
    pub left: Option<usize>,
    /// At most this many keys after the diagonal (causal masking is `Some(0)`); `None`:
    /// unbounded.
    pub right: Option<usize>,
}

impl KeyRange {
    /// The rule of `causal` and `window` (already validated: each side ≥ −1).
    pub fn new(n_q: usize, n_k: usize, causal: bool, window: Option<Window>) -> Self {
        Self::placed(n_q, n_k, n_k as i64 - n_q as i64, causal, window)
    }

    /// [`KeyRange::new`] with query 0's diagonal at key `diagonal` (which may lie outside
    /// `0 .. n_k`): the rule of a block of a larger problem.
    pub fn placed(
        n_q: usize,
        n_k: usize,
        diagonal: i64,
        causal: bool,
        window: Option<Window>,
    ) -> Self {
        let side = |x: i64| usize::try_from(x).ok();
        let (left, right) = window.map_or((None, None), |w| (side(w.left), side(w.right)));
        // causal masking is right = 0, the tightest a window side can be
        let right = if causal { Some(0) } else { right };
        Self { n_q, n_k, diagonal, left, right }
    }

    /// Key `i + diagonal + offset`, clipped to `0 ..= n_k`.
    #[inline]
    fn clip(&self, i: usize, offset: i64) -> usize {
        (i as i64).saturating_add(self.diagonal).saturating_add(offset).clamp(0, self.n_k as i64)
            as usize
    }

    /// The first key query `i` sees.
    #[inline]
    pub fn start(&self, i: usize) -> usize {
        match self.left {
            None => 0,
            Some(left) => self.clip(i, -(left as i64)),
        }
    }

    // ANCHOR: key_end
    /// One past the last key query `i` sees (at least [`KeyRange::start`]).
    #[inline]
    pub fn end(&self, i: usize) -> usize {
        match self.right {
            None => self.n_k,
            Some(right) => self.clip(i, (right as i64).saturating_add(1)),
        }
        .max(self.start(i))
    }
    // ANCHOR_END: key_end

    /// Whether every query sees every key.
    pub fn is_full(&self) -> bool {
        self.left.is_none() && self.right.is_none()
    }

    /// Whether the keys `j0 .. j0 + cols` are all hidden from the queries `i0 .. i_end`.
    #[inline]
    pub fn tile_hidden(&self, (i0, i_end): (usize, usize), (j0, cols): (usize, usize)) -> bool {
        i_end <= i0 || j0 >= self.end(i_end - 1) || j0 + cols <= self.start(i0)
    }

    /// Whether some query of `i0 .. i_end` sees only part of the keys `j0 .. j0 + cols`.
    #[inline]
    pub fn tile_cut(&self, (i0, i_end): (usize, usize), (j0, cols): (usize, usize)) -> bool {
        i_end > i0 && (j0 + cols > self.end(i0) || j0 < self.start(i_end - 1))
    }

    /// Sets to −∞ the scores in `row` (keys `j0 ..`) of the keys query `i` does not see.
    pub fn hide_outside(&self, i: usize, j0: usize, mut row: ndarray::ArrayViewMut1<'_, f32>) {
        let cols = row.len();
        let start = self.start(i).clamp(j0, j0 + cols) - j0;
        let end = self.end(i).clamp(j0, j0 + cols) - j0;
        row.slice_mut(ndarray::s![..start]).fill(f32::NEG_INFINITY);
        row.slice_mut(ndarray::s![end.max(start)..]).fill(f32::NEG_INFINITY);
    }

    /// The (query, key) pairs the rule keeps.
    pub fn visible_pairs(&self) -> u64 {
        (0..self.n_q).map(|i| (self.end(i) - self.start(i)) as u64).sum()
    }
}
// ANCHOR_END: key_range

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::Placement;

    #[test]
    fn a_placed_block_sees_the_keys_the_whole_problem_gives_its_rows() {
        // every block of a few whole problems: the block's rule is the whole's, cut
        for (n_q, n_k) in [(12, 12), (7, 15), (15, 7)] {
            for (causal, window) in [
                (true, None),
                (false, Some(Window::new(3, 2))),
                (true, Some(Window::new(4, -1))),
                (false, Some(Window::new(-1, 0))),
            ] {
                let whole = KeyRange::new(n_q, n_k, causal, window);
                for (q0, q1, k0, k1) in
                    [(0, 4, 0, 5), (3, n_q, 2, n_k), (5, 6, 6, 7), (0, n_q, 0, 1)]
                {
                    let (q1, k1) = (q1.min(n_q), k1.min(n_k));
                    let pl = Placement { q_start: q0, k_start: k0, n_q, n_k };
                    let block = KeyRange::placed(q1 - q0, k1 - k0, pl.diagonal(), causal, window);
                    for i in 0..q1 - q0 {
                        let (s, e) = (whole.start(q0 + i), whole.end(q0 + i));
                        let want = (s.clamp(k0, k1) - k0, e.clamp(k0, k1) - k0);
                        let what = format!("{n_q}x{n_k} {causal} {window:?} row {i}");
                        if want.1 <= want.0 {
                            assert_eq!(block.end(i), block.start(i), "{what}: sees none"); // no key
                        } else {
                            assert_eq!((block.start(i), block.end(i)), want, "{what}");
                        }
                    }
                }
            }
        }
    }
}
