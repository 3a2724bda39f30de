//! # attn-naive — stage 1: attention as the formula reads
//!
//! ```text
//! S = scale · Q Kᵀ + bias        [n_q × n_k] per head, masked positions set to −∞
//! P = softmax(S)                 row by row, the row max subtracted first
//! O = (P ∘ Z) V                  Z: dropout's 0 or 1/(1 − p)
//! ```
//!
//! Every (batch, head) gets its whole `n_q × n_k` score matrix, and this stage materialises
//! all of them at once, as a framework's eager attention does: `4·b·h·n_q·n_k` bytes. At
//! `b = 1, h = 8, n = 65 536` that is 128 GiB, so the stage refuses, before allocating, a
//! problem whose matrices would not fit in the memory limit, and names the stages that need
//! only O(n) memory.
//!
//! The backward recomputes P from the saved log-sum-exp (`P = exp(S − lse)`) and keeps P and
//! dP for every head, twice the forward's memory:
//!
//! ```text
//! dV = (P ∘ Z)ᵀ dO     dP = (dO Vᵀ) ∘ Z     D = rowsum(dO ∘ O)
//! dS = P ∘ (dP − D)    dQ = scale · dS K    dK = scale · dSᵀ Q
//! ```
//!
//! Work is spread over (batch, head) with rayon; matrix products go through ndarray's
//! `general_mat_mul`. Every stage is tested against the float64 reference in `attn-core`, and
//! the tiled stages against this one in the facade's tests (`crates/attn/tests/stages.rs`).
//! On the GPU ([`gpu`]) the products and element-wise steps are attn-cuda's; the softmax over
//! whole rows is this stage's own kernel (`kernels/naive.cu`).

pub mod cpu;
pub mod gpu;

pub use cpu::{backward_workspace_bytes, forward_workspace_bytes};
pub use gpu::NaiveCuda;

attn_core::cpu_stage!(
    /// Naive attention on the CPU, as a [`Stage`].
    NaiveCpu,
    cpu
);
