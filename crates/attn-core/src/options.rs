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
}

impl<'a> Inputs<'a> {
    pub fn new(q: ArrayView4<'a, f32>, k: ArrayView4<'a, f32>, v: ArrayView4<'a, f32>) -> Self {
        Self { q, k, v, mask: None, bias: None }
    }

    pub fn with_mask(self, mask: Mask<'a>) -> Self {
        Self { mask: Some(mask), ..self }
    }

    pub fn with_bias(self, bias: ArrayView4<'a, f32>) -> Self {
        Self { bias: Some(bias), ..self }
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
}
