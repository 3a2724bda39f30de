//! # attn-flash1 — stage 3: FlashAttention-1 and IO-awareness (Dao et al., 2022)
//!
//! Chunked attention made memory O(n); FlashAttention asks what the *traffic* costs. A GPU
//! computes in a small, fast SRAM (on the A100, 192 KiB per streaming multiprocessor) and
//! stores in a large, slow HBM; standard attention writes S and P to HBM and reads them back,
//! Θ(Nd + N²) bytes, and is bound by that traffic rather than by its FLOPs. FlashAttention
//! tiles the computation so that S and P never leave SRAM:
//!
//! ```text
//! B_c = ⌈M / 4d⌉, B_r = min(B_c, d)            blocks sized for the SRAM budget M
//! for each K/V block j:                        outer loop: K_j, V_j loaded once
//!     for each Q block i:                      inner loop: Q_i, O_i, ℓ_i, m_i loaded...
//!         S_ij = τ Q_i K_jᵀ; m̃, P̃, ℓ̃ of the tile
//!         m_new, ℓ_new merge the tile into the running row statistics
//!         O_i ← diag(ℓ_new)⁻¹ (diag(ℓ_i) e^(m_i − m_new) O_i + e^(m̃ − m_new) P̃ V_j)
//!         ...and O_i, ℓ_i, m_i written back to HBM
//! ```
//!
//! Its HBM traffic is Θ(N² d² / M): each of the N/B_c outer steps streams all of Q and O
//! through SRAM. This stage counts those bytes as it moves them ([`attn_core::Traffic`]), and
//! the tests check the count against the paper's analysis: halving M doubles it.
//!
//! The backward (Algorithm 4) keeps dK_j, dV_j in SRAM over the outer loop and reads,
//! updates and writes dQ_i in HBM at every step, recomputing S and P from the saved
//! log-sum-exp. Parallelism is over (batch, head) only, as in the paper: the outer loop over
//! K/V revisits every O_i, so query blocks cannot run apart. FlashAttention-2 (stage 4)
//! turns the loops around to fix exactly that.

pub mod cpu;
pub mod gpu;

pub use cpu::{DEFAULT_SRAM, block_sizes, forward_traffic_model};
pub use gpu::Flash1Cuda;

attn_core::cpu_stage!(
    /// FlashAttention-1 on the CPU, as a [`attn_core::Stage`].
    Flash1Cpu,
    cpu
);
