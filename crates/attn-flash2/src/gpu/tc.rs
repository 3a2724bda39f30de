//! FlashAttention-2 on the tensor cores (`kernels/flash2_tc_forward.cu`,
//! `kernels/flash2_tc_backward.cu`): bf16 or fp16 Q, K, V and O,
//! f32 accumulation and softmax statistics, warp-level `mma.sync.m16n8k16` (sm_80 and later).
//!
//! The same contract as every stage — cross attention, GQA, causal (bottom-right), key-padding
//! and full masks, bias, fully masked rows (O = 0, lse = −∞) — except dropout, which the
//! tensor-core kernels refuse. Head dimensions 64 and 128.
//!
//! The inputs are the [`half`] crate's [`bf16`] or [`f16`] ([`HalfInputs`]); [`round`] makes
//! them from f32 arrays. Accuracy is that of the rounded inputs: compare with the float64
//! reference computed on the *same rounded values* (DESIGN.md: ≤ 1e-2 normwise forward).
//!
//! ```no_run
//! use attn_core::{Options, Shape};
//! use attn_flash2::tc::{self, HalfInputs, bf16};
//!
//! let shape = Shape::new(4, 16, 4096, 128).with_kv_heads(4); // GQA: 4 key/value heads
//! let (q, k, v) = attn_core::random::qkv(&shape, 0);
//! let (q, k, v) = (tc::round::<bf16, _>(q.view()), tc::round(k.view()), tc::round(v.view()));
//! let inputs = HalfInputs::new(q.view(), k.view(), v.view());
//! let fwd = tc::forward(&inputs, &Options::default().causal(true))?; // O in bf16, lse in f32
//! # Ok::<(), attn_core::AttnError>(())
//! ```

use attn_core::problem::Problem;
use attn_core::varlen::{SeqLens, check_packed_shape};
use attn_core::{AttnError, Element, Inputs, Mask, Options, Result, Shape, Stage};
use attn_core::{KeyRange, check_d_out, check_saved, check_values};
use attn_cuda::pad::{backward_padded, forward_padded, padded_head_dim};
use attn_cuda::problem::{needs_cut_kernel, needs_mods_kernel};
use attn_cuda::{CudaFunction, DeviceBuffer, DeviceRepr, DeviceStats, FlashArgs, Gpu};
use attn_cuda::{LaunchConfig, PushKernelArg, ScoreMods, cuda_err};
use attn_cuda::{ScoreInputs, blocks_for, gpu, measured, with_shared_bytes};
use attn_cuda::{launch_fused_with, launch_group_sum, launch_row_dot_at};
pub use half::{bf16, f16};
use ndarray::{Array, Array3, Array4, ArrayView4, Dimension};

use super::versions::{self, Track, Version};

const STAGE: &str = "flash2 (tensor cores)";
/// Head dimensions the tensor-core kernels are compiled for.
pub const TC_HEAD_DIMS: [usize; 3] = [64, 128, 256];
/// Query rows a block (`TC_BR`) and keys a tile (`TC_BC`) in tc.cuh.
const ROWS: usize = 64;
const KEYS: usize = 64;

/// The forward version the stage runs ([`versions::default_version`]).
pub fn forward_version() -> u32 {
    versions::default_version(Track::TcForward).number
}

/// The tile a thread block of the shipped forward works through at head dimension `d`:
/// (query rows it owns, keys a step) — the shape the book's picture of the grid draws.
pub fn forward_block_tile(d: usize) -> (usize, usize) {
    (block_rows(forward_version(), d), KEYS)
}

/// The backward version the stage runs ([`versions::default_version`]).
pub fn backward_version() -> u32 {
    versions::default_version(Track::TcBackward).number
}

/// Kernel `name` of `version` for element type `T` at head dimension `d`: its module is
/// compiled for that type and head dimension alone (`TC_BF16`, `TC_D`), the packed forward's
/// kernels (`…_varlen`) in a module of their own (`TC_VARLEN`).
fn tc_function<T: TcFloat>(gpu: &Gpu, v: &Version, d: usize, name: &str) -> Result<CudaFunction> {
    let d = d.to_string();
    let defines = [
        ("TC_D", d.as_str()),
        ("TC_BF16", if T::NAME == "bf16" { "1" } else { "0" }),
        ("TC_VARLEN", if name.ends_with("_varlen") { "1" } else { "0" }),
    ];
    gpu.function_with(v.module(), &v.sources(), &defines, name)
}

/// Compiles (once a process) the module of `track`'s `version` for element type `T` at head
/// dimension `d`, so that a later call finds it ready; threads may compile several at once.
pub fn prepare<T: TcFloat>(track: Track, version: u32, d: usize) -> Result<()> {
    let v = versions::find(track, version).ok_or_else(|| versions::unknown(track, version))?;
    let gpu = gpu()?;
    check_architecture(gpu)?;
    tc_function::<T>(gpu, v, d, &v.kernel_name(d, false)).map(|_| ())
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
}

/// A 16-bit float the tensor-core kernels take: [`bf16`] or [`f16`] (uploaded as they are:
/// the kernels read the same bits).
pub trait TcFloat:
    sealed::Sealed + Element + DeviceRepr + Default + std::fmt::Debug + 'static
{
    /// "bf16" or "f16": the kernels' suffix and the CLI's `--dtype`.
    const NAME: &'static str;
    /// Rounded to nearest even.
    fn from_f32(x: f32) -> Self;
}
impl TcFloat for bf16 {
    const NAME: &'static str = "bf16";
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}
impl TcFloat for f16 {
    const NAME: &'static str = "f16";
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

/// An f32 array rounded to `T` (round to nearest even).
pub fn round<T: TcFloat, D: Dimension>(a: ndarray::ArrayView<'_, f32, D>) -> Array<T, D> {
    // On every core: at the paper's sizes a tensor is 33 M values, and a benchmark point
    // rounds eight of them.
    ndarray::Zip::from(&a).par_map_collect(|&x| T::from_f32(x))
}

/// A `T` array widened to f32 (exact).
pub fn widen<T: TcFloat, D: Dimension>(a: ndarray::ArrayView<'_, T, D>) -> Array<f32, D> {
    ndarray::Zip::from(&a).par_map_collect(|&x| x.into())
}

/// The tensors of one call in 16 bits; mask and bias as in [`Inputs`] (the bias stays f32).
#[derive(Clone, Copy, Debug)]
pub struct HalfInputs<'a, T> {
    /// `[batch, heads, n_q, head_dim]`
    pub q: ArrayView4<'a, T>,
    /// `[batch, kv_heads, n_k, head_dim]`
    pub k: ArrayView4<'a, T>,
    /// `[batch, kv_heads, n_k, head_dim]`
    pub v: ArrayView4<'a, T>,
    pub mask: Option<Mask<'a>>,
    pub bias: Option<ArrayView4<'a, f32>>,
    /// ALiBi slopes `[batch or 1, heads]`.
    pub alibi: Option<ndarray::ArrayView2<'a, f32>>,
}

impl<'a, T: TcFloat> HalfInputs<'a, T> {
    pub fn new(q: ArrayView4<'a, T>, k: ArrayView4<'a, T>, v: ArrayView4<'a, T>) -> Self {
        Self { q, k, v, mask: None, bias: None, alibi: None }
    }
    pub fn with_mask(self, mask: Mask<'a>) -> Self {
        Self { mask: Some(mask), ..self }
    }
    pub fn with_bias(self, bias: ArrayView4<'a, f32>) -> Self {
        Self { bias: Some(bias), ..self }
    }
}

impl<'a, T> HalfInputs<'a, T> {
    /// f32 inputs of the same shapes — zero-strided stand-ins for Q, K, V, and the same mask,
    /// bias and slopes — for the checks that read shapes only ([`Problem::shapes_only`]).
    pub fn shapes(&self) -> Inputs<'a> {
        use attn_core::problem::stand_in;
        Inputs {
            q: stand_in(self.q.dim()),
            k: stand_in(self.k.dim()),
            v: stand_in(self.v.dim()),
            mask: self.mask,
            bias: self.bias,
            alibi: self.alibi,
        }
    }
}

/// The forward's results: O in `T`, the log-sum-exp of each row in f32 (`[b, h, n_q]`).
#[derive(Debug)]
pub struct HalfForward<T> {
    pub out: Array4<T>,
    pub lse: Array3<f32>,
}

/// The tensor-core forward, the version the stage runs.
pub fn forward<T: TcFloat>(inputs: &HalfInputs<'_, T>, opts: &Options) -> Result<HalfForward<T>> {
    forward_version_with_stats(inputs, opts, forward_version()).map(|(f, _)| f)
}

/// Validates a 16-bit call with the checks every stage makes — the shapes, masks and options
/// by [`Problem::shapes_only`] on zero-strided f32 stand-ins of the same shapes, the values
/// of q, k, v and the bias by [`check_values`] on the 16-bit tensors themselves — then the
/// tensor cores' own limits.
fn validate<'a, T: TcFloat>(inputs: &HalfInputs<'a, T>, opts: &Options) -> Result<Problem<'a>> {
    let p = validate_shapes(&inputs.shapes(), opts)?;
    check_values(inputs.q, inputs.k, inputs.v, inputs.bias, p.scale)?;
    Ok(p)
}

/// [`validate`] without the values: the shapes, masks and options, the tensor cores' limits.
fn validate_shapes<'a>(shapes: &Inputs<'a>, opts: &Options) -> Result<Problem<'a>> {
    let p = Problem::shapes_only(shapes, opts)?;
    if !TC_HEAD_DIMS.contains(&p.shape.head_dim) {
        return Err(AttnError::UnsupportedHeadDim {
            stage: STAGE,
            head_dim: p.shape.head_dim,
            supported: "64, 128, 256 (`forward_rounded` / `attn run --dtype` pad every head dimension up to 256)".into(),
        });
    }
    if p.dropout.is_some() {
        return Err(AttnError::Unsupported {
            stage: STAGE,
            what: "dropout",
            advice: "set the dropout probability to 0, or use --dtype f32",
        });
    }
    Ok(p)
}

/// The tensor-core forward of kernel `version` ([`versions::VERSIONS`]), with the kernel's
/// device time and the device memory it needed beyond the uploaded inputs.
pub fn forward_version_with_stats<T: TcFloat>(
    inputs: &HalfInputs<'_, T>,
    opts: &Options,
    version: u32,
) -> Result<(HalfForward<T>, DeviceStats)> {
    forward_on_device(inputs, opts, version, None)
}

/// The forward of a packed batch ([`attn_core::varlen`]) in one launch of the shipped kernel
/// (`kernels/tc.cuh`'s `varlen_view`): a block per (sequence, query tile) and head, the tiles
/// ordered costliest first; each sequence attends inside its spans, and no tile is spent on
/// pairs across sequences. Q `[1, heads, total_q, d]`, K and V `[1, kv_heads, total_k, d]`;
/// O and lse packed the same way.
pub fn forward_packed<T: TcFloat>(
    seqs: &SeqLens,
    inputs: &HalfInputs<'_, T>,
    opts: &Options,
) -> Result<HalfForward<T>> {
    forward_packed_with_stats(seqs, inputs, opts).map(|(f, _)| f)
}

/// [`forward_packed`] with the kernel's device time and the device memory it needed.
pub fn forward_packed_with_stats<T: TcFloat>(
    seqs: &SeqLens,
    inputs: &HalfInputs<'_, T>,
    opts: &Options,
) -> Result<(HalfForward<T>, DeviceStats)> {
    forward_on_device(inputs, opts, forward_version(), Some(seqs))
}

/// The forward: one batch, or (`packed`) a packed batch through the `_varlen` kernels.
fn forward_on_device<T: TcFloat>(
    inputs: &HalfInputs<'_, T>,
    opts: &Options,
    version: u32,
    packed: Option<&SeqLens>,
) -> Result<(HalfForward<T>, DeviceStats)> {
    let p = validate(inputs, opts)?;
    let plan = ForwardPlan::new::<T>(&p, opts, version, packed)?;
    let gpu = gpu()?;
    let Shape { batch, heads, n_q, head_dim: d, .. } = p.shape;
    let (q, k, v) =
        (gpu.upload_array(inputs.q)?, gpu.upload_array(inputs.k)?, gpu.upload_array(inputs.v)?);
    let ((out, lse), stats) = measured(gpu, || {
        let out: DeviceBuffer<T> = gpu.uninit(batch * heads * n_q * d)?;
        let lse = gpu.uninit_f32(batch * heads * n_q)?;
        let at = [gpu.ptr(&q), gpu.ptr(&k), gpu.ptr(&v), gpu.ptr(&out), gpu.ptr(&lse)];
        // SAFETY: the buffers above hold the call's shapes, and live past the launch
        unsafe { plan.launch(gpu, &p, at) }?;
        Ok((out, lse))
    })?;
    let forward = HalfForward {
        out: gpu.download_array(&out, p.shape.q_dims())?,
        lse: gpu.download_array(&lse, p.shape.lse_dims())?,
    };
    Ok((forward, stats))
}

/// A forward ready to launch: its kernel compiled and its score inputs on the device.
struct ForwardPlan {
    f: (CudaFunction, u32),
    varlen: Option<PackedWork>,
    rows: usize,
    score: ScoreInputs,
}

impl ForwardPlan {
    fn new<T: TcFloat>(
        p: &Problem<'_>,
        opts: &Options,
        version: u32,
        packed: Option<&SeqLens>,
    ) -> Result<Self> {
        if let Some(seqs) = packed {
            check_packed_shape(seqs, &p.shape)?;
        }
        let v = versions::find(Track::TcForward, version)
            .ok_or_else(|| versions::unknown(Track::TcForward, version))?;
        let d = p.shape.head_dim;
        check_version_head_dim(v, d)?;
        // every refusal above is made before the device is opened
        let gpu = gpu()?;
        check_architecture(gpu)?;
        let score = ScoreInputs::upload(gpu, p)?;
        let (with_mods, cut) = (needs_mods_kernel(p), needs_cut_kernel(p));
        let capped = p.softcap.is_some_and(|c| versions::cap_in_fp16(c, p.scale));
        let rows = block_rows(version, d);
        let (name, varlen) = match packed {
            None => (v.forward_kernel_name(d, with_mods, cut, capped), None),
            Some(seqs) => {
                // a query tile's cost: the keys its rows see
                let work = packed_work(seqs, opts, (rows, false), |range, first, last| {
                    range.end(last).saturating_sub(range.start(first))
                });
                let name = format!("{}_varlen", v.forward_kernel_name(d, with_mods, cut, capped));
                (name, Some(PackedWork::upload(gpu, seqs, &work)?))
            }
        };
        let f = with_shared_bytes(tc_function::<T>(gpu, v, d, &name)?, shared_bytes(version, d))?;
        Ok(Self { f, varlen, rows, score })
    }

    /// Launches the forward on the device addresses of Q, K, V, O and lse.
    ///
    /// # Safety
    /// Each address must hold its tensor of `p`'s shape, row-major (`T`; lse f32), live until
    /// the stream reaches the kernel.
    unsafe fn launch(&self, gpu: &Gpu, p: &Problem<'_>, [q, k, v, o, lse]: [u64; 5]) -> Result<()> {
        let Shape { batch, heads, n_q, .. } = p.shape;
        let args = FlashArgs { q, k, v, o, lse, ..FlashArgs::new(&p.shape, p.scale) };
        match &self.varlen {
            None => {
                let grid = (blocks_for(n_q, self.rows as u32), (batch * heads) as u32, 1);
                let (f, mods) = (&self.f, &self.score.mods);
                launch_fused_with(gpu, f, (grid, 128), &args, mods, None, "flash2_tc_forward")
            }
            Some(w) => w.launch(
                gpu,
                &self.f,
                (heads, 1, 128),
                &args,
                &self.score.mods,
                "flash2_tc_forward_varlen",
            ),
        }
    }
}

/// Device addresses of a call's tensors, row-major in `T` (lse in f32), as a framework holds
/// them (PyTorch's CUDA tensors): the forward's inputs and outputs, or the backward's.
#[derive(Clone, Copy, Debug, Default)]
pub struct DeviceAt {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub out: u64,
    pub lse: u64,
    pub d_out: u64,
    pub dq: u64,
    pub dk: u64,
    pub dv: u64,
}

/// The tensor-core forward on tensors already on the device: Q, K, V read and O, lse written
/// at `at`, on this library's stream (order it against the owner's with
/// [`attn_cuda::Gpu::wait_for`] and [`attn_cuda::Gpu::make_wait`]). `shapes` gives Q, K and
/// V's shapes ([`attn_core::problem::stand_in`] views) and, on the host, the mask and ALiBi
/// slopes; every check of [`forward`] is made but the values', which stay on the device for
/// the caller to check. Head dimensions 64, 128 and 256; no bias.
///
/// # Safety
/// Each address must hold a live allocation of its tensor's shape in the current context,
/// contiguous and row-major, not written by other work until the stream reaches the kernel.
pub unsafe fn forward_at<T: TcFloat>(
    shapes: &Inputs<'_>,
    opts: &Options,
    at: DeviceAt,
) -> Result<()> {
    let p = validate_shapes(shapes, opts)?;
    refuse_bias_at(&p)?;
    let plan = ForwardPlan::new::<T>(&p, opts, forward_version(), None)?;
    let gpu = gpu()?;
    // SAFETY: the caller vouches for the addresses
    unsafe { plan.launch(gpu, &p, [at.q, at.k, at.v, at.out, at.lse]) }
}

/// The tensor-core backward on tensors already on the device: Q, K, V, O, lse and dO read at
/// `at`, dQ, dK and dV written there (as [`forward_at`]: the caller's stream to order, the
/// values its to check).
///
/// # Safety
/// As [`forward_at`], for the nine addresses.
pub unsafe fn backward_at<T: TcFloat>(
    shapes: &Inputs<'_>,
    opts: &Options,
    at: DeviceAt,
) -> Result<()> {
    let p = validate_shapes(shapes, opts)?;
    refuse_bias_at(&p)?;
    let plan = BackwardPlan::new::<T>(&p, opts, backward_version(), None)?;
    let gpu = gpu()?;
    // SAFETY: the caller vouches for the addresses
    let (dq, dk, dv) =
        unsafe { plan.launch::<T>(gpu, &p, [at.q, at.k, at.v, at.out, at.d_out], at.lse) }?;
    for (src, dst) in [(&dq, at.dq), (&dk, at.dk), (&dv, at.dv)] {
        // SAFETY: dst holds a tensor of src's shape (the caller), src is this call's buffer
        unsafe { gpu.copy_to(src, dst) }?;
    }
    Ok(())
}

/// A bias lives on the host in [`Inputs`]; on device addresses it is not taken.
fn refuse_bias_at(p: &Problem<'_>) -> Result<()> {
    if p.bias.is_some() {
        return Err(AttnError::Unsupported {
            stage: STAGE,
            what: "a bias with tensors on the device",
            advice: "pass the bias with host tensors, or fold it into a mask",
        });
    }
    Ok(())
}

/// [`forward_packed_with_stats`] on f32 inputs, rounded to `T` on the host (not timed), O
/// widened back; head dimensions padded as [`forward_rounded`] pads them.
pub fn forward_packed_rounded<T: TcFloat>(
    seqs: &SeqLens,
    inputs: &Inputs<'_>,
    opts: &Options,
) -> Result<(attn_core::Forward, DeviceStats)> {
    // the spans are checked with the rest of the call, on the rounded values (validate)
    rounded_forward::<T>(inputs, opts, |half, opts| forward_packed_with_stats(seqs, half, opts))
}

/// A packed launch's work list, flattened (sequence, tile) pairs: every tile of `rows` rows
/// of every sequence (of its queries in the forward, of its keys in the backward: `keys`; a
/// sequence with rows but nothing on the other side still writes its zeros), the costliest
/// first by `cost(key range, first, last)` of the tile's rows, so that the longest blocks do
/// not start last. Ties keep the sequences' order.
fn packed_work(
    seqs: &SeqLens,
    opts: &Options,
    (rows, keys): (usize, bool),
    cost: impl Fn(&KeyRange, usize, usize) -> usize,
) -> Vec<i32> {
    let mut tiles = Vec::new();
    for s in 0..seqs.num_seqs() {
        let (nq, nk) = (seqs.q_span(s).len(), seqs.k_span(s).len());
        let range = KeyRange::new(nq, nk, opts.causal, opts.window);
        let n = if keys { nk } else { nq };
        for t in 0..n.div_ceil(rows) {
            let (first, last) = (t * rows, ((t + 1) * rows).min(n) - 1);
            let c = if nq == 0 || nk == 0 { 0 } else { cost(&range, first, last) };
            tiles.push((c, s as i32, t as i32));
        }
    }
    tiles.sort_by_key(|t| std::cmp::Reverse(t.0));
    tiles.into_iter().flat_map(|(_, s, t)| [s, t]).collect()
}

/// The first i in 0..n where `pred` holds, for a `pred` that once true stays true (n if none).
fn first_where(n: usize, pred: impl Fn(usize) -> bool) -> usize {
    let (mut lo, mut hi) = (0, n);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if pred(mid) { hi = mid } else { lo = mid + 1 }
    }
    lo
}

/// A packed launch's offsets and work list on the device, and the kernels' `Varlen`.
struct PackedWork {
    _buffers: [DeviceBuffer<i32>; 3],
    args: Varlen,
    blocks: u32,
}

impl PackedWork {
    fn upload(gpu: &Gpu, seqs: &SeqLens, work: &[i32]) -> Result<Self> {
        let to_i32 = |x: usize| {
            i32::try_from(x).map_err(|_| AttnError::Unsupported {
                stage: STAGE,
                what: "packed batches of 2^31 rows or more",
                advice: "split the batch into packed calls of fewer rows",
            })
        };
        let offsets = |span: &dyn Fn(usize) -> std::ops::Range<usize>| -> Result<Vec<i32>> {
            std::iter::once(Ok(0))
                .chain((0..seqs.num_seqs()).map(|s| to_i32(span(s).end)))
                .collect()
        };
        let cu_q = gpu.upload(&offsets(&|s| seqs.q_span(s))?)?;
        let cu_k = gpu.upload(&offsets(&|s| seqs.k_span(s))?)?;
        let work_buf = gpu.upload(work)?;
        let (total_q, total_k) = seqs.totals();
        let args = Varlen {
            cu_q: gpu.ptr(&cu_q),
            cu_k: gpu.ptr(&cu_k),
            work: gpu.ptr(&work_buf),
            total_q: to_i32(total_q)?,
            total_k: to_i32(total_k)?,
        };
        Ok(Self { _buffers: [cu_q, cu_k, work_buf], args, blocks: (work.len() / 2) as u32 })
    }

    /// Launches `f` over the work list × `heads` × `columns` blocks of `threads`.
    fn launch(
        &self,
        gpu: &Gpu,
        (f, smem): &(CudaFunction, u32),
        (heads, columns, threads): (usize, u32, u32),
        args: &FlashArgs,
        mods: &ScoreMods,
        what: &str,
    ) -> Result<()> {
        if self.blocks == 0 {
            return Ok(()); // no rows at all
        }
        let cfg = LaunchConfig {
            grid_dim: (self.blocks, heads as u32, columns),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: *smem,
        };
        let mut b = gpu.stream().launch_builder(f);
        b.arg(args).arg(mods).arg(&self.args);
        // SAFETY: (FlashArgs, ScoreMods, Varlen) is the _varlen kernels' parameter list; the
        // pointers address live buffers of the packed shape (the offsets and the work list
        // live in `self`: num_seqs + 1 and 2 · blocks i32, every tile inside its sequence's
        // spans), and `smem` is what the kernel lays out at this head dimension.
        unsafe { b.launch(cfg) }.map(|_| ()).map_err(cuda_err(what.to_string()))
    }
}

/// The kernels' `Varlen` (tc.cuh): the offsets, the work list, the totals.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct Varlen {
    cu_q: u64,
    cu_k: u64,
    work: u64,
    total_q: i32,
    total_k: i32,
}

// SAFETY: Varlen is #[repr(C)] plain data laid out as the kernels' struct of the same name.
unsafe impl DeviceRepr for Varlen {}

/// Query rows a block of forward `version` at head dimension `d` (`TC_BR`; twice that from
/// version 4 on, but for the shipped kernel at d = 256: one m-tile a warp).
fn block_rows(version: u32, d: usize) -> usize {
    if version >= 4 && d <= 128 { 2 * ROWS } else { ROWS }
}

/// Only the shipped kernels are compiled for head dimensions above 128.
fn check_version_head_dim(v: &Version, d: usize) -> Result<()> {
    if d > 128 && !v.ships() {
        return Err(AttnError::Unsupported {
            stage: STAGE,
            what: "a ladder version at head dimensions above 128",
            advice: "run the shipped version (the default), which takes every head dimension up to 256",
        });
    }
    Ok(())
}

/// The tensor-core kernels need sm_80 or later (bf16 mma.sync, cp.async).
fn check_architecture(gpu: &Gpu) -> Result<()> {
    if gpu.compute_capability() < 80 {
        return Err(AttnError::Unsupported {
            stage: STAGE,
            what: "GPUs before sm_80 (no bf16 mma.sync)",
            advice: "use --dtype f32 on this GPU",
        });
    }
    Ok(())
}

/// Shared-memory bytes of forward `version` at head dimension `d`: Q_i, K_j and V_j (two of
/// each K_j and V_j from version 3), 16-bit, rows padded to d + 8.
fn shared_bytes(version: u32, d: usize) -> u32 {
    let kv_buffers = if version >= 3 { 4 } else { 2 };
    (2 * (block_rows(version, d) + kv_buffers * KEYS) * (d + 8)) as u32
}

/// Q, K, V of an f32 call rounded to `T`.
struct Rounded<T> {
    q: Array4<T>,
    k: Array4<T>,
    v: Array4<T>,
}

impl<T: TcFloat> Rounded<T> {
    fn of(inputs: &Inputs<'_>) -> Self {
        Self { q: round(inputs.q), k: round(inputs.k), v: round(inputs.v) }
    }

    /// The 16-bit call: the rounded tensors with the f32 call's mask and bias.
    fn inputs<'a, 'b: 'a>(&'a self, f32_inputs: &Inputs<'b>) -> HalfInputs<'a, T> {
        // (ndarray's views are invariant in their lifetime: reborrow the mask and bias to ours.)
        let mask = f32_inputs.mask.map(|m| match m {
            Mask::KeyPadding(a) => Mask::KeyPadding(a.reborrow()),
            Mask::Full(a) => Mask::Full(a.reborrow()),
        });
        let bias = f32_inputs.bias.map(|b| b.reborrow());
        let alibi = f32_inputs.alibi.map(|a| a.reborrow());
        HalfInputs { q: self.q.view(), k: self.k.view(), v: self.v.view(), mask, bias, alibi }
    }
}

/// [`forward_version_with_stats`] on f32 inputs: Q, K, V rounded to `T` first (on the host,
/// not timed), O widened back to f32. The benches and `attn run --dtype` use it.
pub fn forward_rounded<T: TcFloat>(
    inputs: &Inputs<'_>,
    opts: &Options,
    version: u32,
) -> Result<(attn_core::Forward, DeviceStats)> {
    rounded_forward::<T>(inputs, opts, |half, opts| forward_version_with_stats(half, opts, version))
}

/// `run` (a 16-bit forward) on f32 inputs: the head dimension padded, Q, K, V rounded to `T`
/// on the host, O widened back.
fn rounded_forward<T: TcFloat>(
    inputs: &Inputs<'_>,
    opts: &Options,
    run: impl FnOnce(&HalfInputs<'_, T>, &Options) -> Result<(HalfForward<T>, DeviceStats)>,
) -> Result<(attn_core::Forward, DeviceStats)> {
    let to = padded_head_dim(STAGE, inputs.q.dim().3, &TC_HEAD_DIMS)?;
    forward_padded(inputs, opts, to, |inputs, opts| {
        let rounded = Rounded::<T>::of(inputs);
        let (f, stats) = run(&rounded.inputs(inputs), opts)?;
        Ok((attn_core::Forward { out: widen(f.out.view()), lse: f.lse, traffic: None }, stats))
    })
}

/// The gradients of a 16-bit call, rounded to `T`: dQ like q, dK and dV like k and v; dBias
/// (f32, like the bias) when [`Options::bias_grad`] asks for it.
#[derive(Debug)]
pub struct HalfGrads<T> {
    pub dq: Array4<T>,
    pub dk: Array4<T>,
    pub dv: Array4<T>,
    pub dbias: Option<Array4<f32>>,
}

/// The tensor-core backward: dQ, dK, dV from the inputs, the forward's O and lse, and dO.
pub fn backward<T: TcFloat>(
    inputs: &HalfInputs<'_, T>,
    opts: &Options,
    fwd: &HalfForward<T>,
    d_out: ArrayView4<'_, T>,
) -> Result<HalfGrads<T>> {
    backward_version_with_stats(inputs, opts, fwd, d_out, backward_version()).map(|(g, _)| g)
}

/// [`backward`] of kernel `version`, with the device time of its kernels (D, the key-tile
/// kernel, the group sums) and the device memory they needed beyond the uploaded tensors.
pub fn backward_version_with_stats<T: TcFloat>(
    inputs: &HalfInputs<'_, T>,
    opts: &Options,
    fwd: &HalfForward<T>,
    d_out: ArrayView4<'_, T>,
    version: u32,
) -> Result<(HalfGrads<T>, DeviceStats)> {
    backward_on_device(inputs, opts, (fwd, d_out), version, None)
}

/// The backward of a packed batch in one launch of the shipped key-tile kernel: a block per
/// (sequence, key tile) and head, as [`forward_packed`] lays out the forward; D and the GQA
/// group sums run over the packed rows as they stand. Gradients packed as the inputs; dBias
/// (when asked for) in the bias's shape.
pub fn backward_packed_with_stats<T: TcFloat>(
    seqs: &SeqLens,
    inputs: &HalfInputs<'_, T>,
    opts: &Options,
    fwd: &HalfForward<T>,
    d_out: ArrayView4<'_, T>,
) -> Result<(HalfGrads<T>, DeviceStats)> {
    backward_on_device(inputs, opts, (fwd, d_out), backward_version(), Some(seqs))
}

/// [`backward_packed_with_stats`] on f32 arrays, rounded and widened as [`backward_rounded`].
pub fn backward_packed_rounded<T: TcFloat>(
    seqs: &SeqLens,
    inputs: &Inputs<'_>,
    opts: &Options,
    fwd: &attn_core::Forward,
    d_out: ArrayView4<'_, f32>,
) -> Result<(attn_core::Grads, DeviceStats)> {
    rounded_backward::<T>(inputs, opts, (fwd, d_out), |half, opts, hf, d_o| {
        backward_packed_with_stats(seqs, half, opts, hf, d_o)
    })
}

/// The backward: one batch, or (`packed`) a packed batch through the `_varlen` kernel.
fn backward_on_device<T: TcFloat>(
    inputs: &HalfInputs<'_, T>,
    opts: &Options,
    (fwd, d_out): (&HalfForward<T>, ArrayView4<'_, T>),
    version: u32,
    packed: Option<&SeqLens>,
) -> Result<(HalfGrads<T>, DeviceStats)> {
    let p = validate(inputs, opts)?;
    let sh = p.shape;
    check_saved(&sh, fwd.out.view(), fwd.lse.view())?;
    check_d_out(&sh, d_out)?;
    let plan = BackwardPlan::new::<T>(&p, opts, version, packed)?;
    let gpu = gpu()?;
    let (q, k, v) =
        (gpu.upload_array(inputs.q)?, gpu.upload_array(inputs.k)?, gpu.upload_array(inputs.v)?);
    let (o, d_o) = (gpu.upload_array(fwd.out.view())?, gpu.upload_array(d_out)?);
    let lse = gpu.upload_array(fwd.lse.view())?;
    let at = [&q, &k, &v, &o, &d_o].map(|b| gpu.ptr(b));
    let ((dq, dk, dv), stats) = measured(gpu, || {
        // SAFETY: the uploads above hold the call's shapes, and live past the launches
        unsafe { plan.launch::<T>(gpu, &p, at, gpu.ptr(&lse)) }
    })?;
    let grads = HalfGrads {
        dq: gpu.download_array(&dq, sh.q_dims())?,
        dk: gpu.download_array(&dk, sh.kv_dims())?,
        dv: gpu.download_array(&dv, sh.kv_dims())?,
        dbias: plan.score.download_dbias(gpu, &p)?,
    };
    Ok((grads, stats))
}

/// A backward ready to launch: its kernels compiled and its score inputs on the device.
struct BackwardPlan {
    row_dot: CudaFunction,
    group_sum: CudaFunction,
    f: (CudaFunction, u32),
    varlen: Option<PackedWork>,
    keys: usize,
    version: u32,
    score: ScoreInputs,
}

impl BackwardPlan {
    fn new<T: TcFloat>(
        p: &Problem<'_>,
        opts: &Options,
        version: u32,
        packed: Option<&SeqLens>,
    ) -> Result<Self> {
        if let Some(seqs) = packed {
            check_packed_shape(seqs, &p.shape)?;
        }
        let v = versions::find(Track::TcBackward, version)
            .ok_or_else(|| versions::unknown(Track::TcBackward, version))?;
        let d = p.shape.head_dim;
        check_version_head_dim(v, d)?;
        // every refusal above is made before the device is opened
        let gpu = gpu()?;
        check_architecture(gpu)?;
        let score = ScoreInputs::upload_for_backward(gpu, p)?;
        // The shipped backward's module holds D = rowsum(dO ∘ O) and the group sums.
        let shipped = versions::default_version(Track::TcBackward);
        let row_dot = tc_function::<T>(gpu, shipped, d, "tc_row_dot")?;
        let group_sum = tc_function::<T>(gpu, shipped, d, "tc_group_sum")?;
        let keys = backward_keys(version, d);
        let name = v.kernel_name_cut(d, needs_mods_kernel(p), p.softcap.is_some());
        let (name, varlen) = match packed {
            None => (name, None),
            Some(seqs) => {
                // a key tile's cost: the query rows that see any of its keys (both bounds of
                // a row's key range grow with the row)
                let work = packed_work(seqs, opts, (keys, true), |range, first, last| {
                    let nq = range.n_q;
                    let from = first_where(nq, |i| range.end(i) > first);
                    first_where(nq, |i| range.start(i) > last).saturating_sub(from)
                });
                (format!("{name}_varlen"), Some(PackedWork::upload(gpu, seqs, &work)?))
            }
        };
        let f = tc_function::<T>(gpu, v, d, &name)?;
        let f = with_shared_bytes(f, backward_shared_bytes(version, d))?;
        Ok(Self { row_dot, group_sum, f, varlen, keys, version, score })
    }

    /// Launches the backward on the device addresses of Q, K, V, O, dO and lse: dQ, dK, dV in
    /// new buffers of `T`.
    ///
    /// # Safety
    /// Each address must hold its tensor of `p`'s shape, row-major (`T`; lse f32), live until
    /// the stream reaches the kernels.
    unsafe fn launch<T: TcFloat>(
        &self,
        gpu: &Gpu,
        p: &Problem<'_>,
        [q, k, v, o, d_o]: [u64; 5],
        lse: u64,
    ) -> Result<(DeviceBuffer<T>, DeviceBuffer<T>, DeviceBuffer<T>)> {
        let sh = p.shape;
        let Shape { batch, heads, kv_heads, n_q, n_k, head_dim: d, .. } = sh;
        let z = batch * heads;
        let dvec = gpu.uninit_f32(z * n_q)?;
        let dq_acc = gpu.zeros::<f32>(z * n_q * d)?; // the key tiles add into it
        // dK, dV: rounded to T by the key-tile kernel itself (from version 3) when each query
        // head has its own K, V head; else f32 per query head, summed over the group and
        // rounded after. Every key row is written by its tile.
        let kv = if self.version >= 3 && heads == kv_heads {
            KvGrads::Rounded(gpu.uninit(z * n_k * d)?, gpu.uninit(z * n_k * d)?)
        } else {
            KvGrads::PerHead(gpu.uninit_f32(z * n_k * d)?, gpu.uninit_f32(z * n_k * d)?)
        };
        let (dk_ptr, dv_ptr) = match &kv {
            KvGrads::Rounded(dk, dv) => (gpu.ptr(dk), gpu.ptr(dv)),
            KvGrads::PerHead(dk, dv) => (gpu.ptr(dk), gpu.ptr(dv)),
        };
        // D = rowsum(dO ∘ O), one warp per row.
        // SAFETY: dO and O as the caller vouches; dvec holds z · n_q floats
        unsafe { launch_row_dot_at(gpu, &self.row_dot, (d_o, o, gpu.ptr(&dvec)), (z * n_q, d)) }?;
        // dK, dV per query head and dQ's f32 accumulator, one block per key tile and head.
        let args = FlashArgs {
            q,
            k,
            v,
            o,
            lse,
            d_out: d_o,
            dvec: gpu.ptr(&dvec),
            dq: gpu.ptr(&dq_acc),
            dk: dk_ptr,
            dv: dv_ptr,
            dbias: self.score.dbias_ptr(gpu),
            ..FlashArgs::new(&sh, p.scale)
        };
        let (columns, threads) = (backward_column_blocks(d), (2 * self.keys) as u32);
        let mods = &self.score.mods;
        match &self.varlen {
            None => {
                let grid = (blocks_for(n_k, self.keys as u32), z as u32, columns);
                launch_fused_with(
                    gpu,
                    &self.f,
                    (grid, threads),
                    &args,
                    mods,
                    None,
                    "flash2_tc_backward",
                )?
            }
            Some(w) => w.launch(
                gpu,
                &self.f,
                (heads, columns, threads),
                &args,
                mods,
                "flash2_tc_backward_varlen",
            )?,
        }
        // dQ rounded; dK, dV summed over each GQA group and rounded.
        let round_sum = |src: &DeviceBuffer<f32>, (kv_heads, rows): (usize, usize)| {
            launch_group_sum::<T>(gpu, &self.group_sum, src, (batch, heads, kv_heads, rows, d))
        };
        let dq = round_sum(&dq_acc, (heads, n_q))?;
        Ok(match kv {
            KvGrads::Rounded(dk, dv) => (dq, dk, dv),
            KvGrads::PerHead(dk_h, dv_h) => {
                (dq, round_sum(&dk_h, (kv_heads, n_k))?, round_sum(&dv_h, (kv_heads, n_k))?)
            }
        })
    }
}

/// dK and dV as the backward's key-tile kernel writes them.
enum KvGrads<T> {
    /// Rounded to `T`: the returned gradients (no GQA group to sum over).
    Rounded(DeviceBuffer<T>, DeviceBuffer<T>),
    /// f32 per query head, for `tc_group_sum`.
    PerHead(DeviceBuffer<f32>, DeviceBuffer<f32>),
}

/// Keys a block of backward `version` at head dimension `d` (16 a warp: 4 warps, 8 from
/// version 6 on at d = 128; `TC_BACKWARD_KW` in flash2_tc_backward.cu).
fn backward_keys(version: u32, d: usize) -> usize {
    if version >= 6 && d == 128 { 2 * KEYS } else { KEYS }
}

/// The blocks of one key tile in the shipped backward: one for every 128 gradient columns
/// (`TC_BACKWARD_DH`).
fn backward_column_blocks(d: usize) -> u32 {
    d.div_ceil(128) as u32
}

/// Shared-memory bytes of backward `version` at head dimension `d`: K_j, V_j, Q_i, dO_i
/// (16-bit, rows padded to d + 8; two Q_i and dO_i from version 2), dS^T (keys x 72), lse
/// and D of the query tile.
fn backward_shared_bytes(version: u32, d: usize) -> u32 {
    let q_buffers = if version >= 2 { 2 } else { 1 };
    let keys = backward_keys(version, d);
    let tiles = 2 * keys + 2 * q_buffers * ROWS;
    (2 * tiles * (d + 8) + 2 * keys * (ROWS + 8) + 4 * 2 * ROWS) as u32
}

/// [`backward_version_with_stats`] on f32 arrays (inputs, O and dO rounded to `T` on the
/// host, gradients widened): the benches' and the smoke run's entry.
pub fn backward_rounded<T: TcFloat>(
    inputs: &Inputs<'_>,
    opts: &Options,
    fwd: &attn_core::Forward,
    d_out: ArrayView4<'_, f32>,
    version: u32,
) -> Result<(attn_core::Grads, DeviceStats)> {
    rounded_backward::<T>(inputs, opts, (fwd, d_out), |half, opts, hf, d_o| {
        backward_version_with_stats(half, opts, hf, d_o, version)
    })
}

/// `run` (a 16-bit backward) on f32 arrays: the head dimension padded, inputs, O and dO
/// rounded to `T` on the host, the gradients widened back.
fn rounded_backward<T: TcFloat>(
    inputs: &Inputs<'_>,
    opts: &Options,
    (fwd, d_out): (&attn_core::Forward, ArrayView4<'_, f32>),
    run: impl FnOnce(
        &HalfInputs<'_, T>,
        &Options,
        &HalfForward<T>,
        ArrayView4<'_, T>,
    ) -> Result<(HalfGrads<T>, DeviceStats)>,
) -> Result<(attn_core::Grads, DeviceStats)> {
    let to = padded_head_dim(STAGE, inputs.q.dim().3, &TC_HEAD_DIMS)?;
    backward_padded(inputs, opts, (fwd, d_out), to, |inputs, opts, fwd, d_out| {
        let rounded = Rounded::<T>::of(inputs);
        let half = rounded.inputs(inputs);
        let hf = HalfForward { out: round::<T, _>(fwd.out.view()), lse: fwd.lse.clone() };
        let d_o = round::<T, _>(d_out);
        let (g, stats) = run(&half, opts, &hf, d_o.view())?;
        let grads = attn_core::Grads {
            dq: widen(g.dq.view()),
            dk: widen(g.dk.view()),
            dv: widen(g.dv.view()),
            dbias: g.dbias,
            traffic: None,
        };
        Ok((grads, stats))
    })
}

/// The tensor-core FlashAttention-2 as a [`Stage`] on f32 arrays, like every other stage:
/// Q, K, V (and in the backward O and dO) rounded to `T` on the host, the results widened
/// back to f32. Compare it with the reference on the rounded inputs (DESIGN.md's bf16 / fp16
/// tolerances).
#[derive(Debug)]
pub struct Flash2TensorCores<T>(std::marker::PhantomData<T>);

impl<T> Flash2TensorCores<T> {
    pub const fn new() -> Self {
        Self(std::marker::PhantomData)
    }
}

impl<T> Default for Flash2TensorCores<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: TcFloat> Stage for Flash2TensorCores<T> {
    fn name(&self) -> &'static str {
        crate::cpu::NAME
    }

    fn device(&self) -> attn_core::Device {
        attn_core::Device::Cuda
    }

    fn forward(&self, inputs: &Inputs<'_>, opts: &Options) -> Result<attn_core::Forward> {
        forward_rounded::<T>(inputs, opts, forward_version()).map(|(f, _)| f)
    }

    fn backward(
        &self,
        inputs: &Inputs<'_>,
        opts: &Options,
        fwd: &attn_core::Forward,
        d_out: ArrayView4<'_, f32>,
    ) -> Result<attn_core::Grads> {
        backward_rounded::<T>(inputs, opts, fwd, d_out, backward_version()).map(|(g, _)| g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array2, s};

    #[test]
    fn rounding_is_to_nearest_even_element_by_element_on_any_layout() {
        // 1 + 2^-8 lies halfway between two bf16 neighbours (spacing 2^-7 above 1): the even
        // one wins, 1; 1 + 3 * 2^-8 is another tie, and its even neighbour is 1 + 2^-6 (up).
        // fp16 keeps both (spacing 2^-10).
        let x = Array2::from_shape_fn((3, 5), |(i, j)| {
            [1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8), -2.5, 1e-3, 65504.0][j]
                * (i + 1) as f32
        });
        let t = x.t(); // a transposed (column-major) view
        let b: Array2<bf16> = round(t);
        let h: Array2<f16> = round(t);
        assert_eq!(b.dim(), (5, 3));
        assert_eq!(f32::from(b[[0, 0]]), 1.0);
        assert_eq!(f32::from(b[[1, 0]]), 1.0 + 2f32.powi(-6));
        assert_eq!(f32::from(h[[0, 0]]), 1.0 + 2f32.powi(-8));
        for ((i, j), &v) in t.indexed_iter() {
            assert_eq!(b[[i, j]], bf16::from_f32(v));
            assert_eq!(h[[i, j]], f16::from_f32(v));
        }
        // widening is exact, and rounding a widened value changes nothing
        let w = widen(b.slice(s![.., 1..]));
        assert_eq!(w.dim(), (5, 2));
        for ((i, j), &v) in w.indexed_iter() {
            assert_eq!(v, f32::from(b[[i, j + 1]]));
        }
        assert_eq!(round::<bf16, _>(w.view()), b.slice(s![.., 1..]));
    }
}
