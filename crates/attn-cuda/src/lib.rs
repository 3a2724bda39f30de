//! # attn-cuda — the GPU layer the CUDA stages share
//!
//! No stage's algorithm lives here; only what several stages' GPU variants need around and
//! inside their kernels, a file a job:
//!
//! - [`device`]: the process's CUDA device ([`gpu()`]), opened once. Where there is no CUDA
//!   driver, no NVRTC or no device it returns [`attn_core::AttnError::NoCudaDevice`] — never
//!   a panic (cudarc panics when libcuda is missing, so the libraries are probed first).
//!   Kernels are CUDA C++ embedded with `include_str!`, compiled by NVRTC for the device's own
//!   architecture once per process and cached ([`Gpu::function`]). [`DeviceBuffer`] counts
//!   itself, so a stage's peak device bytes can be measured ([`DevicePeak`]); [`Timer`] times
//!   with CUDA events.
//! - [`problem`]: the contract's operands on the device — Q, K, V, the score modifiers and
//!   dropout as the kernels' argument structs.
//! - [`products`]: the batched matrix product and the element-wise window steps (score
//!   modifiers, dropout, P from the log-sum-exp, dS from dP) of the unfused stages.
//! - [`blas`]: cuBLAS for those products where libcublas is installed (our kernel where it
//!   is not, or where `ATTN_GEMM=own`).
//! - [`launch`]: launch helpers, the row reductions every backward needs (D = rowsum(dO∘O),
//!   the GQA group sums), head-dimension and memory checks.
//! - [`on_device`]: what every GPU stage does around its kernels (upload, time, count,
//!   download).
//! - [`pad`]: every head dimension up to the largest a kernel is built for, by zero columns.
//! - The device headers under `kernels/`: [`CONTRACT_HEADER`] (the dropout hash and masking
//!   rule, bit for bit as attn-core's), [`ROWS`] (block-wide row reductions), [`TILES`] (the
//!   fused kernels' tiles and online-softmax steps on the CUDA cores), [`MMA`] (the same on
//!   the tensor cores: `ldmatrix`, `cp.async`, the softmax step on mma accumulators).
//!
//! Everything runs on the device's default stream, so kernels execute in launch order.

pub use cudarc;

pub mod blas;
pub mod device;
pub mod launch;
pub mod on_device;
pub mod pad;
pub mod problem;
pub mod products;

pub use blas::{Blas, GemmBackend};
pub use device::*;
pub use launch::*;
pub use on_device::*;
pub use problem::*;
pub use products::*;

/// The `contract.cuh` header: the dropout hash and the masking rule of the contract, in CUDA,
/// bit for bit as attn-core computes them on the CPU. Every module starts with it.
pub const CONTRACT_HEADER: &str = include_str!("../kernels/contract.cuh");
/// Block-wide max and sum for kernels that give a thread block to a row (after the contract).
pub const ROWS: &str = include_str!("../kernels/rows.cuh");
/// Building blocks of the fused kernels on the CUDA cores (FlashAttention-1 and -2): the
/// argument struct, tile loads, a tile's scores, the online-softmax step, the backward's
/// recomputation of P and dS for one tile pair. Prepended after [`CONTRACT_HEADER`].
pub const TILES: &str = include_str!("../kernels/tiles.cuh");
/// Building blocks of the tensor-core kernels: the bare exp2, copies and fragment reads at
/// precomputed addresses, the online-softmax step on mma accumulators. After [`TILES`].
pub const MMA: &str = include_str!("../kernels/mma.cuh");
