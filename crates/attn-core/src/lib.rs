//! # attn-core — the shared language of every attention stage
//!
//! Each stage of this workspace (naive, chunked, FlashAttention-1, FlashAttention-2, on the
//! CPU and the GPU) computes the same function:
//!
//! ```text
//! out = softmax(scale · Q Kᵀ + bias, with masked positions removed) · V
//! ```
//!
//! and this crate says exactly which function that is, so that every stage gives the same
//! answer for every option:
//!
//! - [`Shape`]: tensors are `[batch, heads, seq, head_dim]`; keys/values may have fewer heads
//!   (GQA/MQA) and another length (cross attention);
//! - [`Options`] and [`Inputs`]: scale, causal masking (bottom-right aligned), key-padding and
//!   full boolean masks, additive bias, the score modifiers (a sliding [`Window`], softcap,
//!   ALiBi), [`dropout`] through a counter-based hash;
//! - [`Problem`]: validation with typed [`AttnError`]s, and the per-head view ([`Head`]) whose
//!   [`Head::modify_scores`] and [`Head::apply_dropout`] every CPU stage uses on its tiles;
//!   [`KeyRange`], the one rule for which keys a query sees; [`BiasGrad`], dBias from the
//!   backward's dS tiles;
//! - [`reference`]: the float64 forward and backward every stage is checked against;
//! - [`varlen`]: packed variable-length batches (`cu_seqlens`) and the KV cache (contiguous
//!   or paged) for any stage, each sequence run as the call it is;
//! - [`metrics`], [`flops`], [`memory`] and [`random`]: how we measure;
//! - [`simd`]: the CPU kernels the stages' tiles are computed with — tile products and the
//!   vectorised softmax steps, at the widest vector width the host has — as attn-cuda holds
//!   what their GPU variants share.
//!
//! What this crate must never hold: an attention algorithm (its loops). The stages own those.

pub mod bias_grad;
pub mod blocks;
pub mod dropout;
pub mod error;
pub mod flops;
pub mod memory;
pub mod metrics;
pub mod options;
pub mod problem;
pub mod random;
pub mod reference;
pub mod shape;
pub mod simd;
pub mod stage;
pub mod testing;
pub mod tolerance;
pub mod trace;
pub mod traffic;
pub mod varlen;

pub use ndarray;

pub use bias_grad::BiasGrad;
pub use dropout::{Dropout, DropoutParams};
pub use error::{AttnError, Result};
pub use options::{Inputs, Mask, Options, Placement, Window};
pub use problem::{
    Element, Head, Problem, check_d_out, check_saved, check_values, refuse_placement,
};
pub use shape::{KeyRange, Shape};
pub use stage::{Device, Forward, Grads, Stage};
pub use traffic::{Traffic, TrafficCounter};
pub use varlen::{KvCache, SeqLens};
