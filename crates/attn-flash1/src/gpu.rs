//! FlashAttention-1 on the GPU, fp32, in the paper's own loop order (`kernels/flash1.cu`):
//! one thread block per (batch, head); the outer loop over key/value tiles held in shared
//! memory, the inner loop over query tiles; O, ℓ and m read from and written back to device
//! memory at every step (Algorithms 1 and 2). The backward is Algorithm 4: the outer loop over
//! key tiles keeps dK_j, dV_j in registers, dQ_i is read, added to and written back in device
//! memory. This is the algorithm as it ran on the A100, kept so that the reader can see what
//! FlashAttention-2 changed: with one block per (batch, head), a problem of 8 heads occupies 8
//! of the H100's 132 multiprocessors.
//!
//! Head dimensions 32, 64, 96, 128 and 256; the rest zero-padded to the next. At 256, Q_i and
//! dO_i take turns in one shared-memory buffer in the backward (`backward_step_one_buffer`).

use attn_core::{Forward, Grads, Inputs, Options, Result, Shape};
use attn_cuda::pad::{backward_padded, forward_padded, padded_head_dim};

/// How errors name this stage.
const STAGE: &str = "flash1 (cuda)";
use attn_cuda::{
    CONTRACT_HEADER, CudaFunction, DeviceBuffer, DeviceForward, DeviceProblem, DeviceSaved,
    DeviceStats, FlashArgs, FusedBackward, Gpu, PushKernelArg, TILES, backward_on_device,
    blocks_for, check_head_dim_in, cuda_err, forward_on_device, fused_kernel, grid, launch_fused,
};
use ndarray::ArrayView4;

use crate::cpu::NAME;

/// The fused kernels.
pub const KERNELS: &str = include_str!("../kernels/flash1.cu");
const MODULE: &str = "flash1";
const TILE: usize = 64;

/// The head dimensions the kernels are built for.
pub const HEAD_DIMS: [usize; 5] = [32, 64, 96, 128, 256];

fn kernel(gpu: &Gpu, name: &str, d: usize) -> Result<(CudaFunction, u32)> {
    let (t, row) = (TILE, d + 4);
    let floats = match name {
        // K_j, V_j, Q_i, P; the backward at d > 128: K_j, V_j, Q_i or dO_i, Pᵀ or dSᵀ
        _ if name == "forward" || d > 128 => 3 * t * row + t * (t + 4),
        _ => 4 * t * row + 2 * t * (t + 4), // K_j, V_j, Q_i, dO_i, Pᵀ, dSᵀ
    };
    let sources = [CONTRACT_HEADER, TILES, KERNELS];
    fused_kernel(gpu, MODULE, &sources, &format!("flash1_{name}_d{d}"), (4 * floats) as u32)
}

// ANCHOR: forward_device
/// The fused forward on uploaded tensors: (O, lse) on the device.
pub fn forward_device(gpu: &'static Gpu, dev: &DeviceProblem) -> Result<DeviceForward> {
    let Shape { batch, heads, n_q, head_dim: d, .. } = dev.shape;
    check_head_dim_in(STAGE, d, &HEAD_DIMS)?;
    let z = batch * heads;
    // O, ℓ, m in device memory ("HBM"), initialised as in Algorithm 1, line 2.
    let out = gpu.zeros::<f32>(z * n_q * d)?;
    let l = gpu.zeros::<f32>(z * n_q)?;
    let m = gpu.upload(&vec![f32::NEG_INFINITY; z * n_q])?;
    let a = FlashArgs {
        o: gpu.ptr(&out),
        lse: gpu.ptr(&l),
        dvec: gpu.ptr(&m),
        ..FlashArgs::of(gpu, dev)
    };
    // One block per (batch, head): the paper's parallelism.
    launch_fused(gpu, &kernel(gpu, "forward", d)?, (z as u32, 1), &a, dev, "flash1_forward")?;
    // lse = m + ln ℓ, in ℓ's buffer.
    let f = gpu.function(MODULE, &[CONTRACT_HEADER, TILES, KERNELS], "flash1_lse")?;
    let rows = (z * n_q) as i64;
    let cfg = grid((blocks_for(z * n_q, 256), 1, 1), 256);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&a).arg(&rows);
    // SAFETY: (FlashArgs, rows) is flash1_lse's parameter list; ℓ and m hold `rows` floats.
    unsafe { b.launch(cfg) }.map_err(cuda_err("flash1_lse"))?;
    Ok((out, l))
}
// ANCHOR_END: forward_device

/// The fused backward (Algorithm 4) on the device: dQ, dK, dV.
pub fn backward_device(
    gpu: &'static Gpu,
    dev: &DeviceProblem,
    saved: &DeviceSaved,
) -> Result<[DeviceBuffer<f32>; 3]> {
    let Shape { batch, heads, head_dim: d, .. } = dev.shape;
    check_head_dim_in(STAGE, d, &HEAD_DIMS)?;
    // dQ is read, added to and written back for every key tile: it starts at zero.
    let bwd = FusedBackward::new(gpu, dev, saved, true)?;
    let z = (batch * heads) as u32;
    launch_fused(gpu, &kernel(gpu, "backward", d)?, (z, 1), &bwd.args, dev, "flash1_backward")?;
    bwd.finish(dev)
}

/// The forward with uploads and downloads, and its device statistics.
pub fn forward_with_stats(inputs: &Inputs<'_>, opts: &Options) -> Result<(Forward, DeviceStats)> {
    let to = padded_head_dim(STAGE, inputs.q.dim().3, &HEAD_DIMS)?;
    forward_padded(inputs, opts, to, |i, o| forward_on_device(i, o, forward_device))
}

/// The backward with uploads and downloads, and its device statistics.
pub fn backward_with_stats(
    inputs: &Inputs<'_>,
    opts: &Options,
    fwd: &Forward,
    d_out: ArrayView4<'_, f32>,
) -> Result<(Grads, DeviceStats)> {
    let to = padded_head_dim(STAGE, inputs.q.dim().3, &HEAD_DIMS)?;
    backward_padded(inputs, opts, (fwd, d_out), to, |i, o, f, d| {
        backward_on_device(i, o, f, d, backward_device)
    })
}

attn_core::cuda_stage!(
    /// FlashAttention-1 on the GPU, as a [`Stage`].
    Flash1Cuda,
    self
);
