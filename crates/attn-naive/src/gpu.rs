//! Stage 1 on the GPU: the same three steps as the CPU variant, each a kernel over all
//! `b·h` heads at once, with S and P for every head in device memory.
//!
//! ```text
//! gemm            S = scale · Q Kᵀ          [b·h, n_q, n_k] in device memory
//! modify_scores   + bias, masks → −∞
//! softmax_rows    P = exp(S − lse), lse      one thread block per row (kernels/naive.cu)
//! apply_dropout   P ∘ Z
//! gemm            O = P V
//! ```
//!
//! The products and the element-wise steps are attn-cuda's ([`attn_cuda::Kernels`]), shared
//! with chunked attention; the softmax over whole rows is this stage's own kernel. The
//! backward is one window of attn-cuda's window backward covering the whole matrix: P and dP
//! of every head in memory at once.

use attn_core::{Forward, Grads, Inputs, Options, Result, Shape};
use attn_cuda::{
    CONTRACT_HEADER, CudaFunction, DeviceBuffer, DeviceForward, DeviceProblem, DeviceStats, Gpu,
    Kernels, Operand, ROWS, WindowGrads, backward_on_device, forward_on_device, grid, launch,
    refuse_if_too_large,
};
use ndarray::ArrayView4;

use crate::cpu::{ADVICE, NAME};

/// This stage's own kernel: the softmax of whole rows.
pub const KERNELS: &str = include_str!("../kernels/naive.cu");
/// The module's sources, as NVRTC compiles them.
pub const SOURCES: [&str; 3] = [CONTRACT_HEADER, ROWS, KERNELS];
const STAGE: &str = "naive (cuda)";

/// Row softmax over whole rows of `[z, rows, cols]` scores: P in place, lse `[z, rows]`.
fn softmax_rows(
    gpu: &Gpu,
    f: &CudaFunction,
    s: &DeviceBuffer<f32>,
    lse: &DeviceBuffer<f32>,
    z: usize,
    (rows, cols): (usize, usize),
) -> Result<()> {
    let cfg = grid((rows as u32, z as u32, 1), 256);
    let (sp, lp, r, c) = (gpu.ptr(s), gpu.ptr(lse), rows as i32, cols as i32);
    // (s, lse, rows, cols) is softmax_rows's parameter list; s holds z·rows·cols floats, lse
    // z·rows.
    launch!(gpu, f, cfg, "softmax_rows"; &sp, &lp, &r, &c)
}

// ANCHOR: forward_device
/// The forward on uploaded tensors: (O `[b, h, n_q, d]`, lse `[b, h, n_q]`) on the device.
pub fn forward_device(k: &Kernels, dev: &DeviceProblem) -> Result<DeviceForward> {
    let gpu = k.gpu();
    let Shape { batch, heads, kv_heads, n_q, n_k, head_dim: d } = dev.shape;
    let z = batch * heads;
    let group = heads / kv_heads;
    let s = gpu.uninit_f32(z * n_q * n_k)?; // every entry written by the first product
    let out = gpu.zeros::<f32>(z * n_q * d)?;
    let lse = gpu.zeros::<f32>(z * n_q)?;
    let s_op = Operand::rows(gpu.ptr(&s), heads, n_q, n_k, 0);
    // S = scale · Q Kᵀ
    let q = Operand::rows(gpu.ptr(&dev.q), heads, n_q, d, 0);
    let kt = Operand::rows(gpu.ptr(&dev.k), kv_heads, n_k, d, 0).shared_by(group).t();
    k.gemm((z, heads), (n_q, n_k, d), dev.scale, q, kt, 0.0, s_op)?;
    // the score modifiers (softcap, bias, ALiBi), removed positions −∞
    if dev.window_needs_mods((0, n_q), (0, n_k)) {
        k.modify_scores(&s, &dev.mods, z, (0, 0, n_q, n_k))?;
    }
    // P = softmax(S), lse
    let softmax = gpu.function("naive", &SOURCES, "softmax_rows")?;
    softmax_rows(gpu, &softmax, &s, &lse, z, (n_q, n_k))?;
    // P ∘ Z
    if dev.dropout.enabled() {
        k.apply_dropout(&s, &dev.dropout, heads, z, (0, 0, n_q, n_k))?;
    }
    // O = P V
    let v = Operand::rows(gpu.ptr(&dev.v), kv_heads, n_k, d, 0).shared_by(group);
    let o = Operand::rows(gpu.ptr(&out), heads, n_q, d, 0);
    k.gemm((z, heads), (n_q, d, n_k), 1.0, s_op, v, 0.0, o)?;
    Ok((out, lse))
}
// ANCHOR_END: forward_device

/// The forward through [`forward_device`], uploads and downloads included, with its device
/// statistics; refused before anything is allocated when S would not fit.
pub fn forward_with_stats(inputs: &Inputs<'_>, opts: &Options) -> Result<(Forward, DeviceStats)> {
    forward_on_device(inputs, opts, |gpu, dev| {
        let needed = crate::forward_workspace_bytes(&dev.shape);
        let what = (STAGE, "score matrices S/P in device memory");
        refuse_if_too_large(gpu, opts, what, needed, ADVICE)?;
        forward_device(&Kernels::new(gpu)?, dev)
    })
}

/// The backward: one window covering the whole matrix (P and dP of every head at once),
/// uploads and downloads included.
pub fn backward_with_stats(
    inputs: &Inputs<'_>,
    opts: &Options,
    fwd: &Forward,
    d_out: ArrayView4<'_, f32>,
) -> Result<(Grads, DeviceStats)> {
    backward_on_device(inputs, opts, fwd, d_out, |gpu, dev, saved| {
        let Shape { n_q, n_k, .. } = dev.shape;
        let needed = crate::backward_workspace_bytes(&dev.shape);
        let what = (STAGE, "matrices P and dP in device memory");
        refuse_if_too_large(gpu, opts, what, needed, ADVICE)?;
        let k = Kernels::new(gpu)?;
        let grads = WindowGrads::new(&k, dev, saved, (n_q, n_k))?;
        if !dev.window_hidden((0, n_q), (0, n_k)) {
            grads.add_window(&k, dev, saved, (0, n_q), (0, n_k))?;
        }
        Ok(grads.finish())
    })
}

attn_core::cuda_stage!(
    /// Naive attention on the GPU, as a [`Stage`]: uploads, runs, downloads.
    NaiveCuda,
    self
);
