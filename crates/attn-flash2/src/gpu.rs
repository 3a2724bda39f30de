//! FlashAttention-2 on the GPU, fp32: one fused forward kernel and a fused backward
//! (`kernels/flash2.cu`).
//!
//! - Forward: thread blocks over (query tile, batch·head); $K_j$, $V_j$ stream through shared
//!   memory; the running max, sum and output stay in registers; normalisation is deferred
//!   to the end and the log-sum-exp written once; causal tiles above the diagonal are never
//!   visited. From sm_80 on the forward (`kernels/flash2_tf32.cu`) does its products on the
//!   tensor cores in 3xTF32 — f32 accuracy, as PyTorch's f32 kernel; before sm_80 it runs on
//!   the CUDA cores (`kernels/flash2.cu`).
//! - Backward (Algorithm 2 of the paper): a small kernel for $D = \mathrm{rowsum}(dO \circ O)$,
//!   a kernel over key tiles that accumulates $dK_j$, $dV_j$ in registers and, as in the
//!   paper, adds $dQ_i$ into device memory with **atomic additions**. From sm_80 on that
//!   kernel does its five products on the tensor cores in 3xTF32
//!   (`kernels/flash2_tf32_backward.cu`), before sm_80 on the CUDA cores. With
//!   [`Options::deterministic`] dQ comes instead from a separate pass over query tiles
//!   (recomputing S and dP there): two more tile products, but every gradient element is
//!   written by one thread in a fixed order, so the results are bitwise reproducible, as on
//!   the CPU. With GQA the key pass writes per query head and a last
//!   kernel sums each group.
//!
//! Head dimensions 32, 64, 96 and 128; others are refused with a clear error.
//!
//! The kernel versions, shipped and on the ladder, are listed once in [`versions`]; [`tc`] is
//! the same stage on the 16-bit tensor cores.

pub mod decode;
pub mod tc;
pub mod versions;

use attn_core::{AttnError, Forward, Grads, Inputs, Options, Result, Shape};
pub use attn_cuda::HEAD_DIMS;
use attn_cuda::pad::{backward_padded, forward_padded, padded_head_dim};

/// How errors name this stage.
const STAGE: &str = "flash2 (cuda)";
use attn_cuda::{
    CudaFunction, DeviceBuffer, DeviceForward, DeviceProblem, DeviceSaved, DeviceStats, FlashArgs,
    FusedBackward, Gpu, backward_on_device, blocks_for, check_head_dim, forward_on_device,
    fused_kernel, launch_fused, launch_fused_with, with_shared_bytes,
};
use ndarray::ArrayView4;

use crate::cpu::NAME;

use versions::{Track, Version};

/// Query rows and keys per tile (`BR`, `BC` in tiles.cuh).
pub const TILE: usize = 64;

/// Head dimensions the stage runs at, every other one up to the largest zero-padded to the
/// next: the CUDA-core kernels' [`HEAD_DIMS`], and 256 in the 3xTF32 kernels (sm_80 on).
pub const STAGE_HEAD_DIMS: [usize; 5] = [32, 64, 96, 128, 256];

/// Refuses a head dimension version `v` is not built for: 256 only in the 3xTF32 versions.
fn check_version_head_dim(v: &Version, d: usize) -> Result<()> {
    if d == 256 && v.is_tf32() {
        return Ok(());
    }
    check_head_dim(STAGE, d).map_err(|e| match e {
        AttnError::UnsupportedHeadDim { stage, head_dim, .. } => AttnError::UnsupportedHeadDim {
            stage,
            head_dim,
            supported: format!(
                "{HEAD_DIMS:?} in version {} of the {}, and 256 in the 3xTF32 versions (sm_80 on)",
                v.number,
                v.track.name()
            ),
        },
        other => other,
    })
}

/// The 3xTF32 forward's tiles at head dimension `d`: (query rows a block, keys a tile) —
/// `TF32_FWD_BR`, `TF32_FWD_BC` in flash2_tf32.cu; 16 rows a warp.
fn tf32_forward_tiles(d: usize) -> (usize, usize) {
    if d > 128 { (TILE, TILE / 2) } else { (2 * TILE, TILE) }
}

/// Kernel `flash2_{name}_d{d}` of the CUDA-core backward `v` (fp32 backward version 1: before
/// sm_80, or when asked for).
fn cuda_core_kernel(gpu: &Gpu, v: &Version, name: &str, d: usize) -> Result<(CudaFunction, u32)> {
    let function = format!("flash2_{name}_d{d}");
    fused_kernel(gpu, v.module(), &v.sources(), &function, shared_bytes(name, d))
}

/// Shared-memory bytes of each CUDA-core kernel at head dimension `d`.
fn shared_bytes(kernel: &str, d: usize) -> u32 {
    let (t, p) = (TILE, TILE * (TILE + 4));
    let floats = match kernel {
        "forward_v1" => 2 * t * (d + 1) + TILE * (TILE + 1), // rows padded to d + 1
        "forward_v2" => 2 * t * (d + 4) + p,
        // Q, K, V; P in K's buffer from d = 64 up, beside them below
        "forward_v3" | "forward_v5" => 3 * t * (d + 4) + if d >= 64 { 0 } else { p },
        // Q with 128 rows, two K buffers, V, and P [128][BC + 4]
        "forward_v7" => 5 * t * (d + 4) + 2 * p,
        "backward_kv" | "backward_kv_atomic_dq" => 4 * t * (d + 4) + 2 * p,
        _ => 4 * t * (d + 4) + p, // backward_q
    };
    (4 * floats) as u32
}

/// The fp32 forward version the stage runs at head dimension `d` on a GPU of
/// `compute_capability` (e.g. 90): [`versions::version_for`].
pub fn forward_version(d: usize, compute_capability: u32) -> u32 {
    versions::version_for(Track::Fp32Forward, d, compute_capability).number
}

/// The fused forward on uploaded tensors: (O, lse) on the device, the version the stage runs.
pub fn forward_device(gpu: &'static Gpu, dev: &DeviceProblem) -> Result<DeviceForward> {
    forward_device_version(gpu, dev, forward_version(dev.shape.head_dim, gpu.compute_capability()))
}

// ANCHOR: forward_device
/// The fused forward of fp32 forward version `version` ([`versions::VERSIONS`]).
pub fn forward_device_version(
    gpu: &'static Gpu,
    dev: &DeviceProblem,
    version: u32,
) -> Result<DeviceForward> {
    let Shape { batch, heads, n_q, head_dim: d, .. } = dev.shape;
    let v = versions::find(Track::Fp32Forward, version)
        .ok_or_else(|| versions::unknown(Track::Fp32Forward, version))?;
    check_version_head_dim(v, d)?;
    let z = batch * heads;
    let out = gpu.uninit_f32(z * n_q * d)?; // every row written by its query tile
    let lse = gpu.uninit_f32(z * n_q)?;
    let a = FlashArgs { o: gpu.ptr(&out), lse: gpu.ptr(&lse), ..FlashArgs::of(gpu, dev) };
    if version == 8 {
        let (rows, _) = tf32_forward_tiles(d);
        let grid = (blocks_for(n_q, rows as u32), z as u32, 1);
        let f = tf32_kernel(gpu, v, dev, d)?;
        let (mods, dropout) = (&dev.mods, Some(&dev.dropout));
        launch_fused_with(gpu, &f, (grid, 2 * rows as u32), &a, mods, dropout, "flash2_forward")?;
        return Ok((out, lse));
    }
    let rows = if version >= 6 { 2 * TILE } else { TILE }; // query rows a block
    let grid = (blocks_for(n_q, rows as u32), z as u32);
    let f = {
        let name = v.kernel_name(d, false);
        let bytes = shared_bytes(&format!("forward_v{version}"), d);
        fused_kernel(gpu, v.module(), &v.sources(), &name, bytes)?
    };
    launch_fused(gpu, &f, grid, &a, dev, "flash2_forward")?;
    Ok((out, lse))
}

/// The 3xTF32 kernels' refusal before sm_80, which has no tf32 `mma.sync`.
fn require_tf32(gpu: &Gpu, stage: &'static str, advice: &'static str) -> Result<()> {
    if gpu.compute_capability() < 80 {
        return Err(AttnError::Unsupported {
            stage,
            what: "GPUs before sm_80 (no tf32 mma.sync)",
            advice,
        });
    }
    Ok(())
}

/// Version 8's kernel at head dimension `d`: a second one (`_mods`) takes the calls with a
/// bias or mask.
fn tf32_kernel(
    gpu: &Gpu,
    v: &Version,
    dev: &DeviceProblem,
    d: usize,
) -> Result<(CudaFunction, u32)> {
    require_tf32(
        gpu,
        "flash2 (cuda) forward version 8",
        "use forward version 7 (or 5) on this GPU",
    )?;
    let d_str = d.to_string();
    let name = v.kernel_name(d, dev.has_score_mods());
    let f = gpu.function_with(v.module(), &v.sources(), &[("TF32_D", &d_str)], &name)?;
    // Q_i, two K_j and two V_j buffers, rows padded to d + 4 floats
    let (rows, keys) = tf32_forward_tiles(d);
    with_shared_bytes(f, (4 * (rows + 4 * keys) * (d + 4)) as u32)
}
// ANCHOR_END: forward_device

/// The fused backward on the device: dQ, dK, dV, dQ by atomic additions ([`DqMode::Atomic`]).
pub fn backward_device(
    gpu: &'static Gpu,
    dev: &DeviceProblem,
    saved: &DeviceSaved,
) -> Result<[DeviceBuffer<f32>; 3]> {
    backward_device_dq(gpu, dev, saved, DqMode::Atomic)
}

/// How the backward computes dQ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DqMode {
    /// A pass over query tiles that recomputes S and dP (7 tile products per tile pair):
    /// bitwise reproducible. What the stage runs with [`Options::deterministic`].
    SeparatePass,
    /// Atomic additions from the key-tile pass, as in the FlashAttention-2 paper (5 tile
    /// products): faster, but the order of the additions varies from run to run. The
    /// stage's default.
    Atomic,
}

impl DqMode {
    /// The mode `opts` asks for.
    pub fn of(opts: &Options) -> Self {
        if opts.deterministic { DqMode::SeparatePass } else { DqMode::Atomic }
    }
}

/// The fp32 backward version the stage runs at head dimension `d` on a GPU of
/// `compute_capability` (e.g. 90): [`versions::version_for`].
pub fn backward_version(d: usize, compute_capability: u32) -> u32 {
    versions::version_for(Track::Fp32Backward, d, compute_capability).number
}

/// The fused backward with dQ computed as `mode` says, the version the stage runs.
pub fn backward_device_dq(
    gpu: &'static Gpu,
    dev: &DeviceProblem,
    saved: &DeviceSaved,
    mode: DqMode,
) -> Result<[DeviceBuffer<f32>; 3]> {
    let version = backward_version(dev.shape.head_dim, gpu.compute_capability());
    backward_device_version(gpu, dev, saved, mode, version)
}

// ANCHOR: backward_device
/// The fused backward of fp32 backward version `version` ([`versions::VERSIONS`]), dQ as
/// `mode` says: dK and dV (and dQ by atomics) from a pass over key tiles, with
/// [`DqMode::SeparatePass`] dQ from a pass over query tiles after it; on the tensor cores in
/// version 2, on the CUDA cores in version 1.
pub fn backward_device_version(
    gpu: &'static Gpu,
    dev: &DeviceProblem,
    saved: &DeviceSaved,
    mode: DqMode,
    version: u32,
) -> Result<[DeviceBuffer<f32>; 3]> {
    let Shape { batch, heads, n_q, n_k, head_dim: d, .. } = dev.shape;
    let v = versions::find(Track::Fp32Backward, version)
        .ok_or_else(|| versions::unknown(Track::Fp32Backward, version))?;
    check_version_head_dim(v, d)?;
    let z = (batch * heads) as u32;
    let atomic = mode == DqMode::Atomic;
    // Atomics add into dQ (zeroed); the separate pass writes each element once.
    let bwd = FusedBackward::new(gpu, dev, saved, atomic)?;
    let (a, mods, dropout) = (&bwd.args, &dev.mods, Some(&dev.dropout));
    if v.is_tf32() {
        let tiles = Tf32Tiles::at(d);
        let kv = if atomic { "" } else { "_kv" };
        let f = tf32_backward_kernel(gpu, v, dev, kv, tiles.shared_bytes(d, atomic))?;
        // one block a key tile for every 128 gradient columns (TF32B_DH)
        let grid = (blocks_for(n_k, tiles.keys() as u32), z, d.div_ceil(128) as u32);
        let threads = 32 * tiles.warps as u32;
        launch_fused_with(gpu, &f, (grid, threads), a, mods, dropout, "flash2_backward_kv")?;
        if mode == DqMode::SeparatePass {
            let f = tf32_backward_kernel(gpu, v, dev, "_q", Tf32Tiles::dq_pass_shared_bytes(d))?;
            let (rows, _) = Tf32Tiles::dq_pass_tiles(d);
            let grid = (blocks_for(n_q, rows as u32), z, 1);
            let threads = 2 * rows as u32; // 16 rows a warp
            launch_fused_with(gpu, &f, (grid, threads), a, mods, dropout, "flash2_backward_q")?;
        }
    } else {
        let kv = if atomic { "backward_kv_atomic_dq" } else { "backward_kv" };
        let grid = (blocks_for(n_k, TILE as u32), z);
        launch_fused(gpu, &cuda_core_kernel(gpu, v, kv, d)?, grid, a, dev, "flash2_backward_kv")?;
        if mode == DqMode::SeparatePass {
            let q = cuda_core_kernel(gpu, v, "backward_q", d)?;
            let grid = (blocks_for(n_q, TILE as u32), z);
            launch_fused(gpu, &q, grid, a, dev, "flash2_backward_q")?;
        }
    }
    bwd.finish(dev)
}

/// How the 3xTF32 backward tiles a head: `warps` warps of 16 keys a block, `rows` query
/// rows a step of its loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tf32Tiles {
    pub warps: usize,
    pub rows: usize,
}

impl Tf32Tiles {
    /// Keys a block.
    pub fn keys(self) -> usize {
        16 * self.warps
    }

    /// The tiling at head dimension `d`: 32 query rows a step (64 ran slower at d = 64 and
    /// do not fit the shared memory with 8 warps at d = 128), 4 warps up to d = 64 (two
    /// blocks a SM), 8 above (one block a SM: 4 warps would leave it half idle). The
    /// tilings compared are in `notes/gpu.md`. At d = 256, 4 warps and 16 rows: what the
    /// shared memory holds in f32 (`TF32B_KW`, `TF32B_BR` at the kernels' compilation).
    pub fn at(d: usize) -> Self {
        match d {
            ..=64 => Self { warps: 4, rows: 32 },
            65..=128 => Self { warps: 8, rows: 32 },
            _ => Self { warps: 4, rows: 16 },
        }
    }

    /// (query rows a block, keys a tile) of the separate dQ pass at head dimension `d`: 4
    /// warps of 16 rows over 64-key tiles, at d = 256 2 warps over 32-key tiles (`TF32Q_W`,
    /// `TF32Q_KB`).
    pub fn dq_pass_tiles(d: usize) -> (usize, usize) {
        if d > 128 { (32, 32) } else { (64, 64) }
    }

    /// Shared-memory bytes of the dQ pass: Q_i and dO_i, two buffers each of K_j and V_j
    /// (rows padded to d + 4 floats).
    pub fn dq_pass_shared_bytes(d: usize) -> u32 {
        let (rows, keys) = Self::dq_pass_tiles(d);
        (4 * (2 * rows + 4 * keys) * (d + 4)) as u32
    }

    /// Shared-memory bytes: K_j, V_j, two buffers each of Q_i and dO_i (rows padded to
    /// d + 4 floats), dS [rows][keys + 8] when dQ is computed, and lse, D and the dropout
    /// row keys of a tile's rows.
    pub fn shared_bytes(self, d: usize, dq: bool) -> u32 {
        let (k, r) = (self.keys(), self.rows);
        let ds = if dq { r * (k + 8) } else { 0 };
        (4 * (2 * k * (d + 4) + 4 * r * (d + 4) + ds + 3 * r)) as u32
    }
}

/// Version 2's kernel `flash2_backward_v2{part}` (part: "" with dQ by atomics, "_kv" without
/// dQ, "_q" the dQ pass) for `dev`'s head dimension and options (`_mods` with a mask, bias or
/// ALiBi, else `_cut` with the softcap), allowed `shared_bytes`.
fn tf32_backward_kernel(
    gpu: &Gpu,
    v: &Version,
    dev: &DeviceProblem,
    part: &str,
    shared_bytes: u32,
) -> Result<(CudaFunction, u32)> {
    require_tf32(gpu, "flash2 (cuda) backward version 2", "use backward version 1 on this GPU")?;
    let d = dev.shape.head_dim;
    let tiles = Tf32Tiles::at(d);
    let (d_str, w, r) = (d.to_string(), tiles.warps.to_string(), tiles.rows.to_string());
    let defines = [("TF32_D", d_str.as_str()), ("TF32B_KW", &w), ("TF32B_BR", &r)];
    let mods = match (dev.has_score_mods(), dev.has_softcap()) {
        (true, _) => "_mods",
        (false, true) => "_cut",
        (false, false) => "",
    };
    let name = format!("flash2_backward_v{}{part}{mods}", v.number);
    with_shared_bytes(gpu.function_with(v.module(), &v.sources(), &defines, &name)?, shared_bytes)
}
// ANCHOR_END: backward_device

/// The forward with uploads and downloads, and its device statistics.
pub fn forward_with_stats(inputs: &Inputs<'_>, opts: &Options) -> Result<(Forward, DeviceStats)> {
    let to = padded_head_dim(STAGE, inputs.q.dim().3, &STAGE_HEAD_DIMS)?;
    forward_padded(inputs, opts, to, |i, o| forward_on_device(i, o, forward_device))
}

/// [`forward_with_stats`] for fp32 forward version `version` ([`versions::VERSIONS`]).
pub fn forward_version_with_stats(
    inputs: &Inputs<'_>,
    opts: &Options,
    version: u32,
) -> Result<(Forward, DeviceStats)> {
    let to = padded_head_dim(STAGE, inputs.q.dim().3, &STAGE_HEAD_DIMS)?;
    forward_padded(inputs, opts, to, |i, o| {
        forward_on_device(i, o, |gpu, dev| forward_device_version(gpu, dev, version))
    })
}

/// The backward with uploads and downloads, and its device statistics; dQ as
/// [`DqMode::of`] `opts` says.
pub fn backward_with_stats(
    inputs: &Inputs<'_>,
    opts: &Options,
    fwd: &Forward,
    d_out: ArrayView4<'_, f32>,
) -> Result<(Grads, DeviceStats)> {
    let mode = DqMode::of(opts);
    let to = padded_head_dim(STAGE, inputs.q.dim().3, &STAGE_HEAD_DIMS)?;
    backward_padded(inputs, opts, (fwd, d_out), to, |i, o, f, d| {
        backward_on_device(i, o, f, d, |gpu, dev, saved| backward_device_dq(gpu, dev, saved, mode))
    })
}

/// [`backward_with_stats`] for fp32 backward version `version` ([`versions::VERSIONS`]).
pub fn backward_version_with_stats(
    inputs: &Inputs<'_>,
    opts: &Options,
    fwd: &Forward,
    d_out: ArrayView4<'_, f32>,
    version: u32,
) -> Result<(Grads, DeviceStats)> {
    let mode = DqMode::of(opts);
    let to = padded_head_dim(STAGE, inputs.q.dim().3, &STAGE_HEAD_DIMS)?;
    backward_padded(inputs, opts, (fwd, d_out), to, |i, o, f, d| {
        backward_on_device(i, o, f, d, |gpu, dev, saved| {
            backward_device_version(gpu, dev, saved, mode, version)
        })
    })
}

attn_core::cuda_stage!(
    /// FlashAttention-2 on the GPU, as a [`Stage`]: uploads, runs the fused kernels, downloads.
    Flash2Cuda,
    self
);

#[cfg(test)]
mod tests {
    use super::*;

    /// Every head dimension's tiling of the 3xTF32 backward fits the shared memory of a
    /// sm_80 / sm_90 block (227 KiB), and its dQ blocks of 16 rows cover the tile's rows.
    #[test]
    fn the_tf32_backward_tilings_fit_a_block() {
        for d in STAGE_HEAD_DIMS {
            let (rows, keys) = tf32_forward_tiles(d);
            assert!(4 * (rows + 4 * keys) * (d + 4) <= 227 * 1024, "d {d}: the forward");
            let t = Tf32Tiles::at(d);
            assert!(t.shared_bytes(d, true) <= 227 * 1024, "d {d}: {t:?}");
            assert!(Tf32Tiles::dq_pass_shared_bytes(d) <= 227 * 1024, "d {d}: the dQ pass");
            assert_eq!(t.warps % (t.rows / 16), 0, "d {d}: {t:?}");
        }
        // K_j, V_j, Q_i and dO_i twice (rows of d + 4 floats), dS, lse, D and row keys
        let t = Tf32Tiles { warps: 4, rows: 32 };
        assert_eq!(t.shared_bytes(64, true), 4 * (2 * 64 * 68 + 4 * 32 * 68 + 32 * 72 + 96));
        assert_eq!(t.shared_bytes(64, false), 4 * (2 * 64 * 68 + 4 * 32 * 68 + 96));
    }
}
