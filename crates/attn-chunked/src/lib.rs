//! # attn-chunked — stage 2: attention without the n² matrix (Rabe & Staats, 2021)
//!
//! "Self-attention Does Not Need O(n²) Memory" observes that a row of attention needs only
//! three running quantities, not its whole row of scores. Split the queries into chunks
//! Q_i of `q_chunk` rows and the keys/values into chunks K_j, V_j of `k_chunk` rows. For each
//! pair, summarise (the paper's `summarize_chunk`):
//!
//! ```text
//! S_ij = scale · Q_i K_jᵀ + bias     m_ij = rowmax(S_ij)
//! ℓ_ij = rowsum(exp(S_ij − m_ij))    W_ij = (exp(S_ij − m_ij) ∘ Z) V_j
//! ```
//!
//! then merge the chunks of a row exactly, with the log-sum-exp rescaling:
//!
//! ```text
//! m_i = max_j m_ij     O_i = Σ_j W_ij e^(m_ij − m_i) / Σ_j ℓ_ij e^(m_ij − m_i)
//! lse_i = m_i + log Σ_j ℓ_ij e^(m_ij − m_i)
//! ```
//!
//! Only one `q_chunk × k_chunk` score chunk per thread is alive at a time, plus the
//! summaries: memory O(n·d) for the outputs and O(q_chunk·k_chunk) per thread, instead of
//! `4·b·h·n²` bytes. Key chunks that causal masking hides from a whole query chunk are
//! skipped.
//!
//! The backward is checkpointed, as in the paper: nothing but O and the log-sum-exp is kept
//! from the forward, and each chunk's scores are recomputed (`P_ij = exp(S_ij − lse_i)`).
//! Two parallel passes avoid write races without atomics: dQ by (batch, head, query chunk),
//! dK and dV by (batch, key/value head, key chunk); each recomputes the scores it needs.
//!
//! Defaults follow the seed project: `q_chunk = 1024`, `k_chunk = 2048` (`q_bucket_size`,
//! `k_bucket_size`); any positive sizes work, dividing the lengths or not.

pub mod cpu;
pub mod gpu;

pub use cpu::{
    DEFAULT_K_CHUNK, DEFAULT_Q_CHUNK, backward_memory_bound, chunk_sizes, forward_memory_bound,
};
pub use gpu::ChunkedCuda;

attn_core::cpu_stage!(
    /// Chunked attention on the CPU, as a [`Stage`].
    ChunkedCpu,
    cpu
);
