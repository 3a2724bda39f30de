//! Launch helpers: kernels with large shared memory, the fused kernels' argument list, the
//! row reductions every backward needs, head-dimension and memory checks.

use attn_core::{AttnError, Options, Result};

use crate::{
    CudaFunction, DeviceBuffer, DeviceProblem, DeviceRepr, DropoutArg, FlashArgs, Gpu,
    LaunchConfig, PushKernelArg, ScoreMods, blocks_for, cuda_err, grid,
};

/// Launches `f`, a kernel of contract.cuh's `row_dot_rows` `(d_out, out, D, rows, d)`:
/// D = rowsum(dO ∘ O) over `rows` rows of length `d`, one warp a row; dO and O of any element
/// type the kernel reads (f32 here, bf16 / fp16 on the tensor cores).
pub fn launch_row_dot<T>(
    gpu: &Gpu,
    f: &CudaFunction,
    d_out: &DeviceBuffer<T>,
    out: &DeviceBuffer<T>,
    dd: &DeviceBuffer<f32>,
    rows_d: (usize, usize),
) -> Result<()> {
    // SAFETY: the three buffers are live device allocations of the sizes the caller states
    unsafe { launch_row_dot_at(gpu, f, (gpu.ptr(d_out), gpu.ptr(out), gpu.ptr(dd)), rows_d) }
}

/// [`launch_row_dot`] on device addresses (dO, O, D).
///
/// # Safety
/// dO and O must address `rows · d` elements of the type `f` reads, D `rows` floats, all live
/// until the stream reaches the kernel.
pub unsafe fn launch_row_dot_at(
    gpu: &Gpu,
    f: &CudaFunction,
    (a, b, c): (u64, u64, u64),
    (rows, d): (usize, usize),
) -> Result<()> {
    let cfg = grid((blocks_for(rows, 8), 1, 1), 256);
    let (r, d) = (rows as i64, d as i32);
    let mut l = gpu.stream().launch_builder(f);
    l.arg(&a).arg(&b).arg(&c).arg(&r).arg(&d);
    // SAFETY: (d_out, out, D, rows, d) is the parameter list of every row_dot_rows kernel;
    // the caller vouches for the addresses.
    unsafe { l.launch(cfg) }.map(|_| ()).map_err(cuda_err("row_dot"))
}

/// Launches `f`, a kernel of contract.cuh's `group_sum_rows`
/// `(per_head, out, heads, kv_heads, per_head_elems, total)`: per-query-head gradients
/// `[b, heads, rows, d]` summed over each GQA group into a new `[b, kv_heads, rows, d]` buffer
/// of the type `f` stores (f32 here, rounded to bf16 / fp16 on the tensor cores), in a fixed
/// order (bitwise reproducible).
pub fn launch_group_sum<T: DeviceRepr>(
    gpu: &Gpu,
    f: &CudaFunction,
    per_head: &DeviceBuffer<f32>,
    (batch, heads, kv_heads, rows, d): (usize, usize, usize, usize, usize),
) -> Result<DeviceBuffer<T>> {
    let (slices, per) = (batch * kv_heads, rows * d);
    let total = slices * per;
    let out: DeviceBuffer<T> = gpu.uninit(total)?;
    // y: the [b, kv_heads] slices; x: a slice's elements — about 4096 blocks in all
    let y = slices.clamp(1, 65_535) as u32;
    let cfg = grid((blocks_for(per, 256).min((4096 / y).max(1)), y, 1), 256);
    let (src, dst) = (gpu.ptr(per_head), gpu.ptr(&out));
    let (h, kvh, per, tot) = (heads as i32, kv_heads as i32, per as i64, total as i64);
    let mut l = gpu.stream().launch_builder(f);
    l.arg(&src).arg(&dst).arg(&h).arg(&kvh).arg(&per).arg(&tot);
    // SAFETY: the parameter list of every group_sum_rows kernel; per_head holds
    // batch · heads · rows · d floats, out the total elements of T it stores.
    unsafe { l.launch(cfg) }.map(|_| ()).map_err(cuda_err("group_sum"))?;
    Ok(out)
}

/// The head dimensions the fused kernels (tiles.cuh and the flash stages) are built for.
pub const HEAD_DIMS: [usize; 4] = [32, 64, 96, 128];

/// Refuses a head dimension the fused kernels of `stage` are not built for, naming those
/// they are.
pub fn check_head_dim(stage: &'static str, d: usize) -> Result<()> {
    check_head_dim_in(stage, d, &HEAD_DIMS)
}

/// [`check_head_dim`] for a stage whose kernels are built for `dims`.
pub fn check_head_dim_in(stage: &'static str, d: usize, dims: &[usize]) -> Result<()> {
    if dims.contains(&d) {
        return Ok(());
    }
    let list: Vec<String> = dims.iter().map(usize::to_string).collect();
    Err(AttnError::UnsupportedHeadDim {
        stage,
        head_dim: d,
        supported: format!("{} (use the CPU stages, or pad the head dimension)", list.join(", ")),
    })
}

/// A fused kernel `function` of `module` that uses `shared_bytes` of dynamic shared memory
/// (more than the default 48 KiB is asked for explicitly).
pub fn fused_kernel(
    gpu: &Gpu,
    module: &'static str,
    sources: &[&str],
    function: &str,
    shared_bytes: u32,
) -> Result<(CudaFunction, u32)> {
    with_shared_bytes(gpu.function(module, sources, function)?, shared_bytes)
}

/// `f` allowed `shared_bytes` of dynamic shared memory (more than the default 48 KiB is
/// asked for explicitly).
pub fn with_shared_bytes(f: CudaFunction, shared_bytes: u32) -> Result<(CudaFunction, u32)> {
    use cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES as MAX_SHARED;
    f.set_attribute(MAX_SHARED, shared_bytes as i32)
        .map_err(cuda_err(format!("asking for {shared_bytes} B of shared memory")))?;
    Ok((f, shared_bytes))
}

/// Launches a fused kernel `(FlashArgs, ScoreMods, Dropout)` with 256 threads per block.
pub fn launch_fused(
    gpu: &Gpu,
    f: &(CudaFunction, u32),
    grid: (u32, u32),
    a: &FlashArgs,
    dev: &DeviceProblem,
    what: &str,
) -> Result<()> {
    launch_fused_with(gpu, f, ((grid.0, grid.1, 1), 256), a, &dev.mods, Some(&dev.dropout), what)
}

/// Launches a fused kernel of `threads` a block over `grid` (x, y, z) whose parameters are
/// `(FlashArgs, ScoreMods)`, followed by `Dropout` when `dropout` is given (the CUDA-core
/// kernels take it; the 16-bit tensor-core kernels, which refuse dropout, do not).
pub fn launch_fused_with(
    gpu: &Gpu,
    (f, smem): &(CudaFunction, u32),
    (grid, threads): ((u32, u32, u32), u32),
    a: &FlashArgs,
    mods: &ScoreMods,
    dropout: Option<&DropoutArg>,
    what: &str,
) -> Result<()> {
    let cfg = LaunchConfig { grid_dim: grid, block_dim: (threads, 1, 1), shared_mem_bytes: *smem };
    let mut b = gpu.stream().launch_builder(f);
    b.arg(a).arg(mods);
    if let Some(d) = dropout {
        b.arg(d);
    }
    // SAFETY: (FlashArgs, ScoreMods[, Dropout]) is the fused kernels' parameter list; every
    // pointer in them addresses a live buffer of the problem's shape (the mask and bias behind
    // `mods` live until the launch completes: one stream), and `smem` is what the kernel lays
    // out for its head dimension.
    unsafe { b.launch(cfg) }.map(|_| ()).map_err(cuda_err(what.to_string()))
}

/// The device memory limit: the caller's, else what the driver reports free.
pub fn device_memory_limit(gpu: &Gpu, opts: &Options) -> Result<u64> {
    Ok(match opts.memory_limit {
        Some(l) => l,
        None => gpu.mem_info()?.0 as u64,
    })
}

/// Refuses, before anything is allocated, a workspace of `needed` bytes above the device
/// memory limit, naming what it is for and the stages that need less.
pub fn refuse_if_too_large(
    gpu: &Gpu,
    opts: &Options,
    (stage, what): (&'static str, &'static str),
    needed: u64,
    advice: &'static str,
) -> Result<()> {
    let limit = device_memory_limit(gpu, opts)?;
    if needed > limit {
        return Err(AttnError::WorkspaceTooLarge {
            stage,
            what,
            needed_bytes: needed,
            limit_bytes: limit,
            advice,
        });
    }
    Ok(())
}
