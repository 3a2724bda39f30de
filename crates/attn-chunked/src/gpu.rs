//! Stage 2 on the GPU: the chunk loop runs on the host, as the paper's JAX code maps over
//! chunks, and launches attn-cuda's products and window steps ([`attn_cuda::Kernels`]) and
//! this stage's own kernels (`kernels/chunked.cu`: the chunk summaries, their merge, the
//! final normalisation) on one `q_chunk × k_chunk` window of every head at a time. Device memory is the outputs plus one window of scores
//! and one chunk of partial outputs: O(n · chunk), not O(n²).
//!
//! ```text
//! for each query chunk Q_i:                       (host loop)
//!     m_i = −∞, ℓ_i = 0, O_i = 0
//!     for each key chunk K_j, V_j:                (host loop; causal: hidden chunks skipped)
//!         S_ij = scale · Q_i K_jᵀ + bias, masked  gemm, modify_scores
//!         m̃, P̃ = exp(S_ij − m̃), ℓ̃ = rowsum P̃    chunk_softmax
//!         Õ = (P̃ ∘ Z) V_j                         apply_dropout, gemm
//!         (m_i, ℓ_i, O_i) ← merge with (m̃, ℓ̃, Õ)  merge_chunk
//! O = O / ℓ, lse = m + ln ℓ                       finish_rows
//! ```
//!
//! The backward is checkpointed the same way: nothing but the log-sum-exp is kept from the
//! forward, and each window's P is recomputed (attn-cuda's [`WindowGrads`], window by
//! window over the chunk grid).

use attn_core::{Forward, Grads, Inputs, Options, Result, Shape};
use attn_cuda::{
    CONTRACT_HEADER, CudaFunction, DeviceBuffer, DeviceProblem, DeviceSaved, DeviceStats, Gpu,
    Kernels, Operand, ROWS, WindowGrads, backward_on_device, forward_on_device, grid, launch,
};
use ndarray::ArrayView4;

use crate::cpu::{NAME, chunk_sizes};

/// This stage's own kernels: chunk summaries, their merge, the final normalisation.
pub const KERNELS: &str = include_str!("../kernels/chunked.cu");
/// The module's sources, as NVRTC compiles them.
pub const SOURCES: [&str; 3] = [CONTRACT_HEADER, ROWS, KERNELS];

/// Typed launchers of kernels/chunked.cu.
struct ChunkKernels {
    gpu: &'static Gpu,
    summaries: CudaFunction,
    merge: CudaFunction,
    finish: CudaFunction,
}

impl ChunkKernels {
    fn new(gpu: &'static Gpu) -> Result<Self> {
        let f = |name: &str| gpu.function("chunked", &SOURCES, name);
        Ok(Self {
            gpu,
            summaries: f("chunk_softmax")?,
            merge: f("merge_chunk")?,
            finish: f("finish_rows")?,
        })
    }

    /// A chunk's summaries: P̃ = exp(S − m_c) in place, m_c and ℓ_c `[z, rows]`.
    fn chunk_softmax(
        &self,
        s: &DeviceBuffer<f32>,
        (m_c, l_c): (&DeviceBuffer<f32>, &DeviceBuffer<f32>),
        z: usize,
        (rows, cols): (usize, usize),
    ) -> Result<()> {
        let cfg = grid((rows as u32, z as u32, 1), 256);
        let g = self.gpu;
        let (sp, mp, lp, r, c) = (g.ptr(s), g.ptr(m_c), g.ptr(l_c), rows as i32, cols as i32);
        // (s, m_c, l_c, rows, cols): s holds z·rows·cols floats, m_c and l_c z·rows.
        launch!(g, self.summaries, cfg, "chunk_softmax"; &sp, &mp, &lp, &r, &c)
    }

    /// Folds a chunk's (m_c, ℓ_c, O_c) into the running (m, ℓ, O) of rows `i0..i0 + rows`.
    fn merge_chunk(
        &self,
        (m, l, o): (&DeviceBuffer<f32>, &DeviceBuffer<f32>, &DeviceBuffer<f32>),
        (m_c, l_c, o_c): (&DeviceBuffer<f32>, &DeviceBuffer<f32>, &DeviceBuffer<f32>),
        z: usize,
        (i0, rows, n_q, d): (usize, usize, usize, usize),
    ) -> Result<()> {
        let cfg = grid((rows as u32, z as u32, 1), 64);
        let g = self.gpu;
        let ptrs = [g.ptr(m), g.ptr(l), g.ptr(o), g.ptr(m_c), g.ptr(l_c), g.ptr(o_c)];
        let (i0, r, n, d) = (i0 as i32, rows as i32, n_q as i32, d as i32);
        // merge_chunk's parameters; the running buffers hold z·n_q rows, the chunk's z·rows.
        launch!(g, self.merge, cfg, "merge_chunk";
            &ptrs[0], &ptrs[1], &ptrs[2], &ptrs[3], &ptrs[4], &ptrs[5], &i0, &r, &n, &d)
    }

    /// O /= ℓ, lse = m + ln ℓ over `[z, n_q]` rows.
    fn finish_rows(
        &self,
        o: &DeviceBuffer<f32>,
        lse: &DeviceBuffer<f32>,
        (m, l): (&DeviceBuffer<f32>, &DeviceBuffer<f32>),
        z: usize,
        (n_q, d): (usize, usize),
    ) -> Result<()> {
        let cfg = grid((n_q as u32, z as u32, 1), 64);
        let g = self.gpu;
        let (op, lp, mp, llp, d) = (g.ptr(o), g.ptr(lse), g.ptr(m), g.ptr(l), d as i32);
        // (o, lse, m, l, d): o holds z·n_q·d floats, the others z·n_q.
        launch!(g, self.finish, cfg, "finish_rows"; &op, &lp, &mp, &llp, &d)
    }
}

// ANCHOR: forward_device
/// The forward on uploaded tensors: (O, lse) on the device.
pub fn forward_device(
    k: &Kernels,
    dev: &DeviceProblem,
    (q_chunk, k_chunk): (usize, usize),
) -> Result<(DeviceBuffer<f32>, DeviceBuffer<f32>)> {
    let gpu = k.gpu();
    let chunk = ChunkKernels::new(gpu)?;
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
            let cols = k_chunk.min(n_k - j0);
            if dev.window_hidden((i0, rows), (j0, cols)) {
                continue; // causal masking or the window hides this window of scores
            }
            let s_w = Operand::rows(gpu.ptr(&s), heads, rows, cols, 0);
            let k_j = Operand::rows(gpu.ptr(&dev.k), kv_heads, n_k, d, j0).shared_by(group);
            let v_j = Operand::rows(gpu.ptr(&dev.v), kv_heads, n_k, d, j0).shared_by(group);
            // S_ij = scale · Q_i K_jᵀ with its modifiers, removed positions −∞
            k.gemm((z, heads), (rows, cols, d), dev.scale, q_i, k_j.t(), 0.0, s_w)?;
            if dev.window_needs_mods((i0, rows), (j0, cols)) {
                k.modify_scores(&s, &dev.mods, z, (i0, j0, rows, cols))?;
            }
            // the chunk's summaries: m̃, P̃ = exp(S_ij − m̃), ℓ̃
            chunk.chunk_softmax(&s, (&m_c, &l_c), z, (rows, cols))?;
            if dev.dropout.enabled() {
                k.apply_dropout(&s, &dev.dropout, heads, z, (i0, j0, rows, cols))?;
            }
            // Õ = (P̃ ∘ Z) V_j
            let o_w = Operand::rows(gpu.ptr(&o_c), heads, rows, d, 0);
            k.gemm((z, heads), (rows, d, cols), 1.0, s_w, v_j, 0.0, o_w)?;
            // fold into the running (m, ℓ, O) of rows i0..
            chunk.merge_chunk((&m, &l, &out), (&m_c, &l_c, &o_c), z, (i0, rows, n_q, d))?;
        }
    }
    chunk.finish_rows(&out, &lse, (&m, &l), z, (n_q, d))?;
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
        backward_device(&Kernels::new(gpu)?, dev, saved, chunk_sizes(&dev.shape, opts))
    })
}

// ANCHOR: backward_device
/// The checkpointed backward on the device, chunk pair by chunk pair: each window's P is
/// recomputed from the saved log-sum-exp, and its gradients added to dQ, dK, dV.
pub fn backward_device(
    k: &Kernels,
    dev: &DeviceProblem,
    saved: &DeviceSaved,
    (q_chunk, k_chunk): (usize, usize),
) -> Result<[DeviceBuffer<f32>; 3]> {
    let Shape { n_q, n_k, .. } = dev.shape;
    let grads = WindowGrads::new(k, dev, saved, (q_chunk, k_chunk))?;
    for i0 in (0..n_q).step_by(q_chunk) {
        let rows = q_chunk.min(n_q - i0);
        for j0 in (0..n_k).step_by(k_chunk) {
            let cols = k_chunk.min(n_k - j0);
            if !dev.window_hidden((i0, rows), (j0, cols)) {
                grads.add_window(k, dev, saved, (i0, rows), (j0, cols))?;
            }
        }
    }
    Ok(grads.finish())
}
// ANCHOR_END: backward_device

attn_core::cuda_stage!(
    /// Chunked attention on the GPU, as a [`Stage`]: uploads, runs, downloads.
    ChunkedCuda,
    self
);
