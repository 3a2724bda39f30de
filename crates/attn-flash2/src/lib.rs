//! # attn-flash2 — stage 4: FlashAttention-2 (Dao, 2023)
//!
//! FlashAttention-1 (stage 3) already keeps S and P on chip. FlashAttention-2 keeps the
//! algorithm and changes how the work is laid out:
//!
//! - **Loop order.** The outer loop runs over query blocks Q_i, the inner over K/V blocks.
//!   The running max m_i, sum ℓ_i and output Õ_i of a query block stay on chip for the whole
//!   inner loop instead of travelling to HBM and back at every step.
//! - **Deferred normalisation.** Õ_i is kept unnormalised, rescaled by e^(m_old − m_new) when
//!   the max grows, and divided by ℓ_i once at the end — fewer non-matmul FLOPs per tile.
//! - **Log-sum-exp only.** The forward saves L_i = m_i + log ℓ_i, one number per row, for
//!   the backward (FlashAttention-1 saved ℓ and m).
//! - **Work partitioning.** Query blocks are independent, so the forward runs one task per
//!   (batch, head, query block) and fills a machine even at batch 1 with few heads; the
//!   backward runs one task per (batch, key/value head, key block) for dK, dV.
//! - **Causal.** Key blocks wholly above the diagonal are never visited; only the tiles the
//!   diagonal crosses are masked.
//!
//! On the CPU ([`cpu`]) the speed comes from two kernels (attn-core's [`attn_core::simd`],
//! shared with the other tiled stages): tile products
//! through the `gemm` crate and a vectorised `exp`, both chosen at run time for the CPU at
//! hand. On the GPU ([`gpu`], the default feature `gpu`) the stage runs fused kernels in fp32
//! and, on bf16 / fp16 inputs, on the tensor cores ([`tc`]); [`gpu::versions`] lists every
//! kernel version. Without that feature the crate is the CPU stage alone, which also builds
//! for wasm32 (the book's step-through widget).

pub mod cpu;
#[cfg(feature = "gpu")]
pub mod gpu;

pub use cpu::{DEFAULT_K_BLOCK, DEFAULT_Q_BLOCK, block_sizes};
#[cfg(feature = "gpu")]
pub use gpu::Flash2Cuda;
#[cfg(feature = "gpu")]
pub use gpu::tc::{self, Flash2TensorCores};

attn_core::cpu_stage!(
    /// FlashAttention-2 on the CPU, as a [`attn_core::Stage`].
    Flash2Cpu,
    cpu,
    native
);
