//! Stage 2 on the GPU: the chunk loop runs on the host, as the paper's JAX code maps over
//! chunks, and launches stage 1's kernels (`attn_naive::gpu`) on one `q_chunk × k_chunk`
//! window of every head at a time. Device memory is the outputs plus one window of scores
//! and one chunk of partial outputs: O(n · chunk), not O(n²).
//!
//! ```text
//! for each query chunk Q_i:                       (host loop)
//!     m_i = −∞, ℓ_i = 0, O_i = 0
//!     for each key chunk K_j, V_j:                (host loop; causal: hidden chunks skipped)
//!         S_ij = scale · Q_i K_jᵀ + bias, masked  gemm_batched, modify_scores
//!         m̃, P̃ = exp(S_ij − m̃), ℓ̃ = rowsum P̃    chunk_softmax
//!         Õ = (P̃ ∘ Z) V_j                         apply_dropout, gemm_batched
//!         (m_i, ℓ_i, O_i) ← merge with (m̃, ℓ̃, Õ)  merge_chunk
//! O = O / ℓ, lse = m + ln ℓ                       finish_rows
//! ```
//!
//! The backward is checkpointed the same way: nothing but the log-sum-exp is kept from the
//! forward, and each window's P is recomputed ([`attn_naive::gpu::backward_windows`] with
//! the chunk sizes).

use attn_core::{Forward, Grads, Inputs, Options, Result, Shape};
use attn_naive::gpu::{
    DeviceProblem, DeviceStats, Kernels, Operand, backward_on_device, backward_windows,
    forward_on_device,
};
use ndarray::ArrayView4;

use crate::cpu::{NAME, chunk_sizes};

// ANCHOR: forward_device
/// The forward on uploaded tensors: (O, lse) on the device.
pub fn forward_device(
    k: &Kernels,
    dev: &DeviceProblem,
    (q_chunk, k_chunk): (usize, usize),
) -> Result<(attn_cuda::DeviceBuffer<f32>, attn_cuda::DeviceBuffer<f32>)> {
    let gpu = k.gpu();
    let Shape { batch, heads, kv_heads, n_q, n_k, head_dim: d } = dev.shape;
    let (z, group) = (batch * heads, heads / kv_heads);
    // Outputs and the running statistics of every row: O, ℓ, m (m starts at −∞).
    let out = gpu.zeros::<f32>(z * n_q * d)?;
    let lse = gpu.zeros::<f32>(z * n_q)?;
    let l = gpu.zeros::<f32>(z * n_q)?;
    let m = gpu.upload(&vec![f32::NEG_INFINITY; z * n_q])?;
    // One window of every head: S_ij / P̃, Õ, m̃, ℓ̃.
    // (each written by a product or chunk_softmax before it is read)
    let s = gpu.uninit_f32(z * q_chunk * k_chunk)?;
    let o_c = gpu.uninit_f32(z * q_chunk * d)?;
    let m_c = gpu.uninit_f32(z * q_chunk)?;
    let l_c = gpu.uninit_f32(z * q_chunk)?;

    for i0 in (0..n_q).step_by(q_chunk) {
        let rows = q_chunk.min(n_q - i0);
        let q_i = Operand::rows(gpu.ptr(&dev.q), heads, n_q, d, i0);
        for j0 in (0..n_k).step_by(k_chunk) {
            if dev.window_hidden(i0 + rows, j0) {
                break; // causal: the rest of these rows' keys are hidden
            }
            let cols = k_chunk.min(n_k - j0);
            let s_w = Operand::rows(gpu.ptr(&s), heads, rows, cols, 0);
            let k_j = Operand::rows(gpu.ptr(&dev.k), kv_heads, n_k, d, j0).shared_by(group);
            let v_j = Operand::rows(gpu.ptr(&dev.v), kv_heads, n_k, d, j0).shared_by(group);
            // S_ij = scale · Q_i K_jᵀ + bias, removed positions −∞
            k.gemm((z, heads), (rows, cols, d), dev.scale, q_i, k_j.t(), 0.0, s_w)?;
            if dev.window_needs_mods(i0, j0, cols) {
                k.modify_scores(&s, &dev.mods, z, (i0, j0, rows, cols))?;
            }
            // the chunk's summaries: m̃, P̃ = exp(S_ij − m̃), ℓ̃
            k.chunk_softmax(&s, &m_c, &l_c, z, (rows, cols))?;
            if dev.dropout.enabled() {
                k.apply_dropout(&s, &dev.dropout, heads, z, (i0, j0, rows, cols))?;
            }
            // Õ = (P̃ ∘ Z) V_j
            let o_w = Operand::rows(gpu.ptr(&o_c), heads, rows, d, 0);
            k.gemm((z, heads), (rows, d, cols), 1.0, s_w, v_j, 0.0, o_w)?;
            // fold into the running (m, ℓ, O) of rows i0..
            k.merge_chunk((&m, &l, &out), (&m_c, &l_c, &o_c), z, (i0, rows, n_q, d))?;
        }
    }
    k.finish_rows(&out, &lse, (&m, &l), z, (n_q, d))?;
    Ok((out, lse))
}
// ANCHOR_END: forward_device

/// The forward with uploads and downloads, and its device statistics.
pub fn forward_with_stats(inputs: &Inputs<'_>, opts: &Options) -> Result<(Forward, DeviceStats)> {
    forward_on_device(inputs, opts, |gpu, dev| {
        forward_device(&Kernels::new(gpu)?, dev, chunk_sizes(&dev.shape, opts))
    })
}

/// The checkpointed backward with uploads and downloads, and its device statistics.
pub fn backward_with_stats(
    inputs: &Inputs<'_>,
    opts: &Options,
    fwd: &Forward,
    d_out: ArrayView4<'_, f32>,
) -> Result<(Grads, DeviceStats)> {
    backward_on_device(inputs, opts, fwd, d_out, |gpu, dev, saved| {
        let chunks = chunk_sizes(&dev.shape, opts);
        backward_windows(&Kernels::new(gpu)?, dev, &saved.out, &saved.lse, &saved.d_out, chunks)
    })
}

attn_core::cuda_stage!(
    /// Chunked attention on the GPU, as a [`Stage`]: uploads, runs, downloads.
    ChunkedCuda,
    self
);
