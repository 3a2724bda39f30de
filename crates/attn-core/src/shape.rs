//! Shapes: every tensor is `[batch, heads, seq, head_dim]`, row-major.

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

    /// The keys query `i` sees: `0 .. key_end(…)` ([`key_end`]).
    #[inline]
    pub fn key_end(&self, causal: bool, i: usize) -> usize {
        key_end(self.n_q, self.n_k, causal, i)
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

// ANCHOR: key_end
/// Causal masking lets query `i` see the keys `0 .. key_end(i)`: key `j` is hidden when
/// `j > i + (n_k − n_q)` (bottom-right alignment). Without causal masking, all `n_k`. Every
/// stage, CPU and GPU, and the FLOP count use this one rule.
#[inline]
pub fn key_end(n_q: usize, n_k: usize, causal: bool, i: usize) -> usize {
    if causal { (i + 1 + n_k).saturating_sub(n_q).min(n_k) } else { n_k }
}
// ANCHOR_END: key_end
