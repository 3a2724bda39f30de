//! What a caller hands a stage: the tensors ([`Inputs`]) and the knobs ([`Options`]).

use ndarray::{ArrayView2, ArrayView4};

use crate::dropout::Dropout;

/// A boolean mask; `true` keeps a position, `false` removes it.
#[derive(Clone, Copy, Debug)]
pub enum Mask<'a> {
    /// `[batch, n_k]`: key padding, the same for every head and every query.
    KeyPadding(ArrayView2<'a, bool>),
    /// Broadcastable to `[batch, heads, n_q, n_k]`: each axis has its full length or 1.
    Full(ArrayView4<'a, bool>),
}

impl<'a> Mask<'a> {
    /// The same mask under a shorter borrow, for a call whose other tensors live less long
    /// (the rebuilt enum lets the compiler shorten the lifetime where a plain copy does not).
    pub fn shorten<'b>(self) -> Mask<'b>
    where
        'a: 'b,
    {
        match self {
            Mask::KeyPadding(m) => Mask::KeyPadding(m),
            Mask::Full(m) => Mask::Full(m),
        }
    }
}

/// The tensors of one attention call, borrowed.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    /// `[batch, heads, n_q, head_dim]`
    pub q: ArrayView4<'a, f32>,
    /// `[batch, kv_heads, n_k, head_dim]`
    pub k: ArrayView4<'a, f32>,
    /// `[batch, kv_heads, n_k, head_dim]`
    pub v: ArrayView4<'a, f32>,
    pub mask: Option<Mask<'a>>,
    /// Additive bias broadcastable to `[batch, heads, n_q, n_k]`; may hold −∞.
    pub bias: Option<ArrayView4<'a, f32>>,
    /// ALiBi slopes `[batch or 1, heads]`: query head `h` of batch entry `b` adds
    /// −slope·|i + (n_k − n_q) − j| to the score of `(i, j)` (FlashAttention-2's convention).
    pub alibi: Option<ArrayView2<'a, f32>>,
}

impl<'a> Inputs<'a> {
    pub fn new(q: ArrayView4<'a, f32>, k: ArrayView4<'a, f32>, v: ArrayView4<'a, f32>) -> Self {
        Self { q, k, v, mask: None, bias: None, alibi: None }
    }

    pub fn with_mask(self, mask: Mask<'a>) -> Self {
        Self { mask: Some(mask), ..self }
    }

    pub fn with_bias(self, bias: ArrayView4<'a, f32>) -> Self {
        Self { bias: Some(bias), ..self }
    }

    /// ALiBi slopes, `[batch or 1, heads]` (a `[heads]` vector is `[1, heads]`).
    pub fn with_alibi(self, slopes: ArrayView2<'a, f32>) -> Self {
        Self { alibi: Some(slopes), ..self }
    }
}

// ANCHOR: window
/// A sliding window, FlashAttention-2's `window_size`: key `j` is kept for query `i` iff
/// `i + (n_k − n_q) − left ≤ j ≤ i + (n_k − n_q) + right` (bottom-right aligned, as causal
/// masking is); −1 leaves that side unbounded. Causal masking is `right = 0`; with both, the
/// tighter bound holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Window {
    pub left: i64,
    pub right: i64,
}
// ANCHOR_END: window

// ANCHOR: alibi_slopes
/// The ALiBi paper's slopes for `heads` heads (Press et al., 2022): the geometric sequence
/// 2^(−8/n), 2^(−16/n), …, 2^(−8) for the largest power of two n ≤ heads; the remaining heads
/// take every other slope of the sequence for 2n, as the paper's code does.
pub fn alibi_slopes(heads: usize) -> Vec<f32> {
    let geometric = |n: usize| (1..=n).map(move |i| 2f64.powf(-8.0 * i as f64 / n as f64));
    let n = if heads == 0 { 0 } else { 1 << heads.ilog2() };
    geometric(n).chain(geometric(2 * n).step_by(2).take(heads - n)).map(|x| x as f32).collect()
}
// ANCHOR_END: alibi_slopes

impl Window {
    pub fn new(left: i64, right: i64) -> Self {
        Self { left, right }
    }
}

// ANCHOR: placement
/// Where a call's queries and keys sit inside a larger problem of `n_q` queries and `n_k`
/// keys: its rows are queries `q_start ..` and its keys are keys `k_start ..` of the whole.
/// Ring attention computes the whole problem block by block this way. Everything that
/// depends on a position is measured in the whole problem: causal masking, the window and
/// ALiBi use the whole problem's diagonal (query `i` on key `i + n_k − n_q`), and dropout
/// hashes the whole problem's `(i, j)`. A block's output and log-sum-exp are therefore exactly
/// the whole problem's answer restricted to the block's keys. The mask and bias are the
/// block's own: pass them already sliced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Placement {
    pub q_start: usize,
    pub k_start: usize,
    /// Queries in the whole problem.
    pub n_q: usize,
    /// Keys in the whole problem.
    pub n_k: usize,
}
// ANCHOR_END: placement

impl Placement {
    /// Query 0's diagonal in the block's keys: the whole problem's `n_k − n_q`, moved by the
    /// block's corner.
    pub fn diagonal(&self) -> i64 {
        (self.q_start as i64 + self.n_k as i64 - self.n_q as i64) - self.k_start as i64
    }
}

/// The knobs every stage understands. Stages ignore the ones that do not concern them
/// (naive attention has no blocks).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Options {
    /// Multiplies `QKᵀ`; `None` means `1/√head_dim`.
    pub scale: Option<f32>,
    /// Hide key `j` from query `i` when `j > i + (n_k − n_q)` (bottom-right alignment).
    pub causal: bool,
    pub dropout: Option<Dropout>,
    /// Rows of Q per block (chunk, tile); `None` lets the stage choose.
    pub q_block: Option<usize>,
    /// Rows of K/V per block; `None` lets the stage choose.
    pub k_block: Option<usize>,
    /// The on-chip memory ("SRAM") a tiled stage sizes its blocks for, in f32 elements (the
    /// FlashAttention paper's M); `None` lets the stage choose. Explicit `q_block` /
    /// `k_block` take precedence.
    pub sram: Option<usize>,
    /// Largest workspace a stage may allocate, in bytes; `None` means the machine's
    /// available memory ([`crate::memory::default_memory_limit`]).
    pub memory_limit: Option<u64>,
    /// Bitwise-reproducible gradients where a stage has a faster order-dependent path: the
    /// GPU FlashAttention-2 backward then computes dQ in a separate pass instead of by atomic
    /// additions (two more tile products: slower; the book's GPU chapter has the figures).
    /// The CPU stages and the other GPU stages are
    /// always reproducible; the values agree to rounding either way.
    pub deterministic: bool,
    /// A sliding window over the keys ([`Window`]); `None` keeps every key.
    pub window: Option<Window>,
    /// Logit soft-capping (Gemma 2): each scaled score `s` becomes `c · tanh(s / c)` before the
    /// bias, ALiBi and the masks; `c` must be finite and positive.
    pub softcap: Option<f32>,
    /// Return the gradient of the additive bias ([`crate::Grads::dbias`]) from the backward,
    /// summed over the bias's broadcast axes.
    pub bias_grad: bool,
    /// This call is one block of a larger problem ([`Placement`]); `None`: the whole problem.
    /// The CPU stages take it; the GPU stages, packed batches and KV caches refuse it.
    pub placement: Option<Placement>,
}

impl Options {
    /// The block sizes `(q_block, k_block)` a tiled stage runs with: the caller's, else the
    /// stage's `defaults`, each clipped to its sequence length (a block never exceeds it).
    pub fn block_sizes(&self, shape: &crate::Shape, defaults: (usize, usize)) -> (usize, usize) {
        (
            self.q_block.unwrap_or(defaults.0).clamp(1, shape.n_q),
            self.k_block.unwrap_or(defaults.1).clamp(1, shape.n_k),
        )
    }

    pub fn causal(self, causal: bool) -> Self {
        Self { causal, ..self }
    }

    pub fn scale(self, scale: f32) -> Self {
        Self { scale: Some(scale), ..self }
    }

    pub fn dropout(self, p: f32, seed: u64) -> Self {
        Self { dropout: Some(Dropout::new(p, seed)), ..self }
    }

    pub fn blocks(self, q_block: usize, k_block: usize) -> Self {
        Self { q_block: Some(q_block), k_block: Some(k_block), ..self }
    }

    pub fn sram(self, elems: usize) -> Self {
        Self { sram: Some(elems), ..self }
    }

    pub fn memory_limit(self, bytes: u64) -> Self {
        Self { memory_limit: Some(bytes), ..self }
    }

    pub fn deterministic(self, deterministic: bool) -> Self {
        Self { deterministic, ..self }
    }

    pub fn window(self, left: i64, right: i64) -> Self {
        Self { window: Some(Window::new(left, right)), ..self }
    }

    pub fn softcap(self, cap: f32) -> Self {
        Self { softcap: Some(cap), ..self }
    }

    pub fn bias_grad(self, bias_grad: bool) -> Self {
        Self { bias_grad, ..self }
    }

    pub fn placed(self, placement: Placement) -> Self {
        Self { placement: Some(placement), ..self }
    }
}

#[cfg(test)]
mod tests {
    use super::alibi_slopes;

    #[test]
    fn alibi_slopes_follow_the_paper() {
        // 8 heads: 1/2, 1/4, …, 1/256.
        let eight: Vec<f32> = (1..=8).map(|i| 0.5f32.powi(i)).collect();
        assert_eq!(alibi_slopes(8), eight);
        // 12 heads: the 8 above, then 2^(−8/16 · k) for k = 1, 3, 5, 7.
        let twelve = alibi_slopes(12);
        assert_eq!(twelve[..8], eight[..]);
        for (slope, k) in twelve[8..].iter().zip([1, 3, 5, 7]) {
            assert!((slope - 2f32.powf(-0.5 * k as f32)).abs() < 1e-7);
        }
        assert_eq!(alibi_slopes(1), [2f32.powi(-8)]);
    }
}
