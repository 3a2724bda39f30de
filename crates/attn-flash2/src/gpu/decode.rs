//! Decoding from a KV cache on the GPU (`kernels/decode.cu`): the dedicated kernel for a few
//! query rows against a long cache, in f32, bf16 or fp16, with split-KV.
//!
//! Decoding reads every valid key and value once and does little arithmetic with each, so its
//! speed is the memory's. The kernel gives a thread block one key/value head of one batch row
//! and the query rows of that head's whole GQA group (so K and V are read once for the group,
//! not once per query head), and one *split* of the row's keys: with few batch rows and heads
//! a row's keys are cut into enough splits to fill the GPU, each split's partial (O_s, lse_s)
//! written in f32, and a second small kernel merges them by the log-sum-exp — attn-core's
//! [`attn_core::varlen::merge_partials`], on the device. The number of splits comes from the
//! problem and the GPU's SM count ([`splits_for`]), or from the caller.
//!
//! The contract is [`attn_core::varlen::forward_cached`]'s: `cache_seqlens`, contiguous or
//! paged caches, GQA, causal masking and the window aligned to each row's length, the softcap,
//! ALiBi, masks and bias (the kernel compiled with `modify_score` when any is present); no
//! dropout, no gradient. Every head dimension up to 256.
//!
//! ```no_run
//! use attn_core::{Inputs, Options, varlen::KvCache};
//! use attn_flash2::gpu::decode;
//!
//! // one new query row per sequence, against caches [batch 2, kv_heads 2, n_max 4096, d 128]
//! let q = attn_core::random::normal((2, 8, 1, 128), 0);
//! let k = attn_core::random::normal((2, 2, 4096, 128), 1);
//! let v = attn_core::random::normal((2, 2, 4096, 128), 2);
//! let cache = KvCache::contiguous(&[4096, 1500])?;
//! let fwd = decode::forward_cached(&cache, &Inputs::new(q.view(), k.view(), v.view()),
//!                                  &Options::default().causal(true), None)?;
//! # Ok::<(), attn_core::AttnError>(())
//! ```

use attn_core::problem::stand_in;
use attn_core::varlen::KvCache;
use attn_core::{AttnError, Element, Forward, Inputs, Mask, Options, Result, check_values};
use attn_cuda::problem::needs_mods_kernel;
use attn_cuda::{CONTRACT_HEADER, MMA, TILES};
use attn_cuda::{CudaFunction, DeviceBuffer, DeviceRepr, Gpu, ScoreInputs, cuda_err};
use attn_cuda::{LaunchConfig, PushKernelArg, gpu, with_shared_bytes};
use half::{bf16, f16};
use ndarray::{Array3, Array4};

use super::tc::{HalfForward, HalfInputs, TcFloat, round, widen};

const STAGE: &str = "flash2 (decode)";
/// decode.cu, and the tensor-core forward's building blocks (tc.cuh) that decode_mma reuses,
/// from the registry's embedded files.
fn sources() -> [&'static str; 5] {
    let file = |f| super::versions::file_source(f).expect("registered in versions.rs");
    [CONTRACT_HEADER, TILES, MMA, file("tc.cuh"), file("decode.cu")]
}
/// Threads a block (`DEC_THREADS`).
const THREADS: u32 = 128;
/// The largest head dimension: 16 lanes of 16 values.
pub const MAX_HEAD_DIM: usize = 256;

/// An element type the decode kernel reads and writes: f32, [`bf16`] or [`f16`].
pub trait DecodeFloat: Element + DeviceRepr + Clone + Default + std::fmt::Debug + 'static {
    /// `DEC_KIND` in decode.cu.
    const KIND: u32;
}
impl DecodeFloat for f32 {
    const KIND: u32 = 0;
}
impl DecodeFloat for bf16 {
    const KIND: u32 = 1;
}
impl DecodeFloat for f16 {
    const KIND: u32 = 2;
}

/// The kernel's arguments (`struct DecodeArgs` in decode.cu).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct DecodeArgs {
    q: u64,
    k: u64,
    v: u64,
    block_table: u64,
    seqlens: u64,
    o: u64,
    lse: u64,
    o_part: u64,
    lse_part: u64,
    batch: i32,
    heads: i32,
    kv_heads: i32,
    n_q: i32,
    d: i32,
    page_size: i32,
    max_blocks: i32,
    splits: i32,
    scale: f32,
    pad_: i32,
}
// SAFETY: plain old data, laid out as `struct DecodeArgs` in decode.cu.
unsafe impl DeviceRepr for DecodeArgs {}

/// How many splits to cut each row's keys into: enough blocks to fill every multiprocessor
/// once with `resident` blocks each (`blocks` is the grid without splits), each split at
/// least 256 keys of the longest row.
pub fn splits_for(blocks: usize, longest: usize, multiprocessors: usize, resident: usize) -> usize {
    // no more than one wave: a second, part-filled one costs a whole block's time
    let want = (resident * multiprocessors) / blocks.max(1);
    want.min(longest.div_ceil(256)).clamp(1, 128)
}

/// A lane's values of a head (`DEC_E`): 16 lanes cover the head dimension.
fn lane_width(d: usize) -> usize {
    d.div_ceil(16).next_power_of_two().max(2)
}

/// The tensor-core kernel's head dimensions (`DEC_D`).
const MMA_HEAD_DIMS: [usize; 3] = [64, 128, 256];

/// decode_mma's pipeline stages at head dimension `d` and its dynamic shared memory: Q's 16
/// rows and the stages of 64 keys and values, rows padded to d + 8 values; `stages`, else as
/// many as fit in 110 KiB (two blocks a multiprocessor), two to four.
fn mma_stages(d: usize, stages: Option<usize>) -> (usize, u32) {
    let row = 2 * (d + 8);
    let stage = 2 * 64 * row;
    let n = stages.unwrap_or(110 * 1024 / stage).clamp(2, 4);
    (n, (16 * row + n * stage) as u32)
}

/// Blocks of decode_mma a multiprocessor holds at once: its shared memory against the
/// 228 KiB of sm_80 and later (1 KiB of it reserved a block), and at most three by its
/// registers.
fn mma_resident(smem: u32) -> usize {
    (228 * 1024 / (smem as usize + 1024)).clamp(1, 3)
}

/// Keys a tile (`DEC_KT`: 8 half-warps of 4 keys).
const TILE_KEYS: usize = 32;

/// Stages of the shared-memory pipeline (`DEC_STAGES`) at head dimension `d` for elements of
/// `size` bytes, and the dynamic shared memory they take: as many tiles of K and V as fit in
/// 96 KiB, two to four.
fn stages(d: usize, e: usize, size: usize) -> (usize, u32) {
    let align = e.max(16 / size);
    let row = d.div_ceil(align) * align * size;
    let stage = 2 * TILE_KEYS * row;
    let n = (96 * 1024 / stage).clamp(2, 4);
    (n, (n * stage) as u32)
}

/// Query rows a block (`DEC_ROWS`): the group's rows up to what the registers hold at
/// that lane width.
fn row_tile(rows: usize, e: usize) -> usize {
    let cap = match e {
        16 => 2,
        8 => 4,
        _ => 8,
    };
    rows.next_power_of_two().min(cap)
}

/// Q, K, V, the lengths and the block table on the device.
type Uploads<T> = (
    DeviceBuffer<T>,
    DeviceBuffer<T>,
    DeviceBuffer<T>,
    DeviceBuffer<i32>,
    Option<DeviceBuffer<i32>>,
);

/// A cached call's tensors on the device, validated once: Q, the caches (or page pools), the
/// lengths and the block table, the score modifiers. [`DeviceDecode::run`] decodes from them,
/// as often as a benchmark likes.
#[derive(Debug)]
pub struct DeviceDecode<T> {
    /// What `args` points at, kept alive with it.
    _uploads: Uploads<T>,
    score: ScoreInputs,
    args: DecodeArgs,
    /// decode_split compiled with modify_score (a bias, mask, ALiBi or the softcap).
    mods: bool,
    /// decode_mma runs the call: 16-bit caches at a head dimension it is built for, no bias,
    /// mask or ALiBi.
    tensor_cores: bool,
    /// The first kernel (and its dynamic shared memory) and the merge.
    kernels: ((CudaFunction, u32), CudaFunction),
    /// The lengths on the host, for the split count and the bytes read.
    lens: Vec<usize>,
}

impl<T: DecodeFloat> DeviceDecode<T> {
    /// Checks a cached call as [`attn_core::varlen::forward_cached`] does — the lengths and
    /// block table, the shapes, masks and options, Q and every row's valid keys and values
    /// finite — and uploads it.
    pub fn upload(
        gpu: &Gpu,
        cache: &KvCache<'_>,
        inputs: &HalfInputs<'_, T>,
        opts: &Options,
    ) -> Result<Self> {
        let f32_inputs = inputs.shapes();
        limits::<T>(gpu, inputs.q.dim().3)?;
        let (score, mods, scale, kv_heads) = cache.checked_call(&f32_inputs, opts, |p| {
            // the values: Q, and each row's valid keys and values (not the slots beyond)
            let mut bias = inputs.bias;
            for (b, &l) in cache.seqlens.iter().enumerate() {
                if l > 0 {
                    let (k, v) = (cache.keys(b, inputs.k), cache.keys(b, inputs.v));
                    let q = inputs.q.slice(ndarray::s![b..b + 1, .., .., ..]);
                    check_values(q, k.view(), v.view(), bias.take(), p.scale)?;
                }
            }
            let mods = (needs_mods_kernel(p), p.softcap.is_some());
            Ok::<_, AttnError>((ScoreInputs::upload(gpu, p)?, mods, p.scale, p.shape.kv_heads))
        })??;
        let uploads =
            (gpu.upload_array(inputs.q)?, gpu.upload_array(inputs.k)?, gpu.upload_array(inputs.v)?);
        let dims = (inputs.q.dim(), inputs.k.dim());
        Self::assemble(gpu, cache, uploads, dims, (score, mods, scale, kv_heads))
    }

    /// A call on synthetic caches made on the device, for the benchmark: Q `[batch, heads,
    /// n_q, d]` and contiguous caches of `kv_heads` heads holding `lens[b]` keys each (as many
    /// slots as the longest), values uniform in [-1, 1), no mask or bias.
    pub fn synthetic(
        gpu: &Gpu,
        (batch, heads, n_q, d): (usize, usize, usize, usize),
        kv_heads: usize,
        lens: &[usize],
        opts: &Options,
    ) -> Result<Self> {
        limits::<T>(gpu, d)?;
        let n_max = lens.iter().copied().max().unwrap_or(0).max(1);
        let k_dims = (batch, kv_heads, n_max, d);
        let cache = KvCache::contiguous(&lens.iter().map(|&l| l as i64).collect::<Vec<_>>())?;
        let shapes =
            Inputs::new(stand_in((batch, heads, n_q, d)), stand_in(k_dims), stand_in(k_dims));
        let checked = cache.checked_call(&shapes, opts, |p| {
            let mods = (needs_mods_kernel(p), p.softcap.is_some());
            Ok::<_, AttnError>((ScoreInputs::upload(gpu, p)?, mods, p.scale, p.shape.kv_heads))
        })??;
        let fill = function(gpu, T::KIND, (2, 1, false, 2, None), "decode_fill")?;
        let filled = |len: usize, seed: u32| -> Result<DeviceBuffer<T>> {
            let buf: DeviceBuffer<T> = gpu.uninit(len)?;
            let (ptr, n) = (gpu.ptr(&buf), len as i64);
            let mut l = gpu.stream().launch_builder(&fill);
            l.arg(&ptr).arg(&n).arg(&seed);
            // SAFETY: decode_fill(x, n, seed) writes the n elements of x.
            unsafe { l.launch(attn_cuda::grid((4096, 1, 1), 256)) }
                .map_err(cuda_err("decode_fill"))?;
            Ok(buf)
        };
        let kv = batch * kv_heads * n_max * d;
        let uploads = (filled(batch * heads * n_q * d, 1)?, filled(kv, 2)?, filled(kv, 3)?);
        Self::assemble(gpu, &cache, uploads, ((batch, heads, n_q, d), k_dims), checked)
    }

    /// The lengths and the block table uploaded beside Q and the caches, and the arguments.
    fn assemble(
        gpu: &Gpu,
        cache: &KvCache<'_>,
        (q, k, v): (DeviceBuffer<T>, DeviceBuffer<T>, DeviceBuffer<T>),
        ((batch, heads, n_q, d), (_, _, page_size, _)): (Dims, Dims),
        (score, (per_head, softcap), scale, kv_heads): (ScoreInputs, (bool, bool), f32, usize),
    ) -> Result<Self> {
        let lens: Vec<i32> = cache.seqlens.iter().map(|&l| l as i32).collect();
        let table = cache
            .block_table
            .map(|t| gpu.upload(&t.iter().map(|&p| p as i32).collect::<Vec<_>>()))
            .transpose()?;
        let seqlens = gpu.upload(&lens)?;
        let args = DecodeArgs {
            q: gpu.ptr(&q),
            k: gpu.ptr(&k),
            v: gpu.ptr(&v),
            block_table: table.as_ref().map_or(0, |t| gpu.ptr(t)),
            seqlens: gpu.ptr(&seqlens),
            batch: batch as i32,
            heads: heads as i32,
            kv_heads: kv_heads as i32,
            n_q: n_q as i32,
            d: d as i32,
            page_size: page_size as i32,
            max_blocks: cache.block_table.map_or(1, |t| t.dim().1 as i32),
            scale,
            ..DecodeArgs::default()
        };
        let _uploads = (q, k, v, seqlens, table);
        let tensor_cores = T::KIND != 0 && MMA_HEAD_DIMS.contains(&d) && !per_head;
        let mods = per_head || softcap;
        let kernels = kernels::<T>(gpu, &args, tensor_cores, mods, None)?;
        let lens = cache.seqlens.clone();
        Ok(Self { _uploads, score, args, mods, tensor_cores, kernels, lens })
    }

    /// Whether the tensor cores run the call (decode_mma), else the CUDA cores (decode_split).
    pub fn uses_tensor_cores(&self) -> bool {
        self.tensor_cores
    }

    /// The same call on the CUDA cores (decode_split) even where the tensor cores could run
    /// it: the benchmark's comparison of the two.
    pub fn on_cuda_cores(self, gpu: &Gpu) -> Result<Self> {
        let kernels = kernels::<T>(gpu, &self.args, false, self.mods, None)?;
        Ok(Self { tensor_cores: false, kernels, ..self })
    }

    /// decode_mma with `stages` (2 to 4) pipeline stages instead of its own choice: fewer
    /// stages, more blocks a multiprocessor (the benchmark's sweep of the two).
    pub fn with_stages(self, gpu: &Gpu, stages: usize) -> Result<Self> {
        let stages = Some(stages.clamp(2, 4));
        let kernels = kernels::<T>(gpu, &self.args, self.tensor_cores, self.mods, stages)?;
        Ok(Self { kernels, ..self })
    }

    /// Row tiles of one split, and the rows a tile.
    fn blocks(&self) -> (usize, usize) {
        row_tiles(&self.args, self.tensor_cores)
    }

    /// The split count [`splits_for`] picks for this call on `gpu`.
    pub fn default_splits(&self, gpu: &Gpu) -> usize {
        let (tiles, _) = self.blocks();
        let base = tiles * self.lens.len() * self.args.kv_heads as usize;
        // blocks a multiprocessor holds at once: decode_mma's by its shared memory,
        // decode_split's registers about four
        let resident = if self.tensor_cores { mma_resident(self.kernels.0.1) } else { 4 };
        splits_for(
            base,
            self.lens.iter().copied().max().unwrap_or(0),
            gpu.multiprocessors(),
            resident,
        )
    }

    /// Bytes of valid keys and values a decode reads: what its bandwidth is measured by.
    pub fn kv_bytes(&self) -> u64 {
        let per_key = 2 * self.args.kv_heads as u64 * self.args.d as u64 * size_of::<T>() as u64;
        self.lens.iter().map(|&l| l as u64 * per_key).sum()
    }

    /// Decodes with `splits` splits (≥ 1): O `[batch, heads, n_q, d]` and lse `[batch,
    /// heads, n_q]` on the device.
    pub fn run(&self, gpu: &Gpu, splits: usize) -> Result<(DeviceBuffer<T>, DeviceBuffer<f32>)> {
        let w = self.workspace(gpu, splits)?;
        self.run_in(gpu, &w)?;
        Ok((w.out, w.lse))
    }

    /// The buffers a decode with `splits` splits writes (≥ 1): O, lse and, with more than
    /// one split, the partials. Made once, a benchmark's steps reuse them (no allocation
    /// between steps).
    pub fn workspace(&self, gpu: &Gpu, splits: usize) -> Result<DecodeWorkspace<T>> {
        if splits == 0 {
            return Err(AttnError::ZeroBlockSize { arg: "splits" });
        }
        // decode_merge's weights fit DEC_MAX_SPLITS
        let splits = splits.min(1024);
        let a = self.args;
        let rows = (a.batch * a.heads * a.n_q) as usize;
        let parts = (splits > 1)
            .then(|| {
                Ok::<_, AttnError>((
                    gpu.uninit_f32(splits * rows * a.d as usize)?,
                    gpu.uninit_f32(splits * rows)?,
                ))
            })
            .transpose()?;
        Ok(DecodeWorkspace {
            out: gpu.uninit(rows * a.d as usize)?,
            lse: gpu.uninit_f32(rows)?,
            parts,
            splits,
        })
    }

    /// Decodes into `w`: the split kernel, then the merge when there is more than one split.
    pub fn run_in(&self, gpu: &Gpu, w: &DecodeWorkspace<T>) -> Result<()> {
        let a = self.args;
        let rows = (a.batch * a.heads * a.n_q) as usize;
        let mut args =
            DecodeArgs { o: gpu.ptr(&w.out), lse: gpu.ptr(&w.lse), splits: w.splits as i32, ..a };
        if let Some((o_part, lse_part)) = &w.parts {
            args.o_part = gpu.ptr(o_part);
            args.lse_part = gpu.ptr(lse_part);
        }
        let (tiles, _) = self.blocks();
        let (split, smem) = &self.kernels.0;
        let cfg = LaunchConfig {
            grid_dim: (tiles as u32, w.splits as u32, (a.batch * a.kv_heads) as u32),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: *smem,
        };
        let mut l = gpu.stream().launch_builder(split);
        l.arg(&args).arg(&self.score.mods);
        // SAFETY: (DecodeArgs, ScoreMods) is decode_split's and decode_mma's parameter list;
        // Q, the pools, the lengths and the table are this call's uploads, O and lse hold
        // `rows` rows and the partials `splits` of them; one stream keeps them alive until the
        // kernels finish.
        unsafe { l.launch(cfg) }.map_err(cuda_err("decode"))?;
        if w.parts.is_some() {
            let cfg = attn_cuda::grid((rows as u32, 1, 1), THREADS);
            let mut l = gpu.stream().launch_builder(&self.kernels.1);
            l.arg(&args);
            // SAFETY: decode_merge reads the partials the first kernel wrote and writes O, lse.
            unsafe { l.launch(cfg) }.map_err(cuda_err("decode_merge"))?;
        }
        Ok(())
    }
}

/// Row tiles of one split of `a`, and the rows a tile: 16 on the tensor cores.
fn row_tiles(a: &DecodeArgs, tensor_cores: bool) -> (usize, usize) {
    let rows = (a.heads / a.kv_heads * a.n_q) as usize;
    let tile = if tensor_cores { 16 } else { row_tile(rows, lane_width(a.d as usize)) };
    (rows.div_ceil(tile), tile)
}

/// The two kernels of a call (decode_mma or decode_split, with its dynamic shared memory;
/// then decode_merge), compiled when first asked for.
fn kernels<T: DecodeFloat>(
    gpu: &Gpu,
    a: &DecodeArgs,
    tensor_cores: bool,
    mods: bool,
    mma: Option<usize>,
) -> Result<((CudaFunction, u32), CudaFunction)> {
    let d = a.d as usize;
    let e = lane_width(d);
    // decode_mma's module compiles decode_split too: at its smallest row tile
    let tile = if tensor_cores { 1 } else { row_tiles(a, false).1 };
    let (n, bytes) = if tensor_cores { mma_stages(d, mma) } else { stages(d, e, size_of::<T>()) };
    let defines = (e, tile, mods, n, tensor_cores.then_some(d));
    let first = if tensor_cores { "decode_mma" } else { "decode_split" };
    let first = with_shared_bytes(function(gpu, T::KIND, defines, first)?, bytes)?;
    Ok((first, function(gpu, T::KIND, defines, "decode_merge")?))
}

/// Kernel `name` of decode.cu compiled for element type `kind`, lane width `e`, row tile
/// `tile`, with or without the score modifiers, and `stages` pipeline stages.
fn function(
    gpu: &Gpu,
    kind: u32,
    (e, tile, mods, stages, mma): (usize, usize, bool, usize, Option<usize>),
    name: &str,
) -> Result<CudaFunction> {
    let (kind, e) = (kind.to_string(), e.to_string());
    let (tile, stages) = (tile.to_string(), stages.to_string());
    let d = mma.map(|d| d.to_string());
    let mut defines = vec![
        ("DEC_KIND", kind.as_str()),
        ("DEC_E", e.as_str()),
        ("DEC_ROWS", tile.as_str()),
        ("DEC_MODS", if mods { "1" } else { "0" }),
        ("DEC_STAGES", stages.as_str()),
    ];
    if let Some(d) = &d {
        defines.push(("DEC_D", d.as_str()));
    }
    gpu.function_with("decode", &sources(), &defines, name)
}

/// What the kernel is built for: head dimensions up to [`MAX_HEAD_DIM`], 16-bit caches from
/// sm_80 on.
fn limits<T: DecodeFloat>(gpu: &Gpu, d: usize) -> Result<()> {
    if T::KIND != 0 && gpu.compute_capability() < 80 {
        return Err(AttnError::Unsupported {
            stage: STAGE,
            what: "16-bit caches on GPUs before sm_80",
            advice: "use f32 on this GPU",
        });
    }
    if d > MAX_HEAD_DIM {
        return Err(AttnError::UnsupportedHeadDim {
            stage: STAGE,
            head_dim: d,
            supported: format!("1 to {MAX_HEAD_DIM}"),
        });
    }
    Ok(())
}

type Dims = (usize, usize, usize, usize);

/// The buffers one decode writes ([`DeviceDecode::workspace`]).
#[derive(Debug)]
pub struct DecodeWorkspace<T> {
    /// O `[batch, heads, n_q, d]`.
    pub out: DeviceBuffer<T>,
    /// lse `[batch, heads, n_q]`.
    pub lse: DeviceBuffer<f32>,
    /// Each split's (O_s, lse_s), f32, when there is more than one split.
    parts: Option<(DeviceBuffer<f32>, DeviceBuffer<f32>)>,
    splits: usize,
}

/// Decoding from a KV cache in f32 on the GPU, as [`attn_core::varlen::forward_cached`] on the
/// CPU: `inputs.k` / `.v` are the caches `[batch, kv_heads, n_max, d]` (or page pools
/// `[num_pages, kv_heads, page_size, d]`), Q `[batch, heads, n_q, d]`. `splits`: None picks
/// them from the problem and the GPU ([`splits_for`]).
pub fn forward_cached(
    cache: &KvCache<'_>,
    inputs: &Inputs<'_>,
    opts: &Options,
    splits: Option<usize>,
) -> Result<Forward> {
    let half = HalfInputs {
        q: inputs.q,
        k: inputs.k,
        v: inputs.v,
        mask: inputs.mask,
        bias: inputs.bias,
        alibi: inputs.alibi,
    };
    let (out, lse) = decode(cache, &half, opts, splits)?;
    Ok(Forward { out, lse, traffic: None })
}

/// [`forward_cached`] with bf16 or fp16 Q and caches: O in `T`, lse in f32.
pub fn forward_cached_half<T: TcFloat + DecodeFloat>(
    cache: &KvCache<'_>,
    inputs: &HalfInputs<'_, T>,
    opts: &Options,
    splits: Option<usize>,
) -> Result<HalfForward<T>> {
    let (out, lse) = decode(cache, inputs, opts, splits)?;
    Ok(HalfForward { out, lse })
}

/// [`forward_cached`] in `T` (bf16 or fp16) on f32 tensors: Q and the caches rounded to `T`
/// (round to nearest even), O widened back to f32 — for comparing with the reference on the
/// same rounded values, and for `attn run --dtype`.
pub fn forward_cached_rounded<T: TcFloat + DecodeFloat>(
    cache: &KvCache<'_>,
    inputs: &Inputs<'_>,
    opts: &Options,
    splits: Option<usize>,
) -> Result<Forward> {
    let (q, k, v) = (round::<T, _>(inputs.q), round::<T, _>(inputs.k), round::<T, _>(inputs.v));
    let half = HalfInputs {
        q: q.view(),
        k: k.view(),
        v: v.view(),
        mask: inputs.mask.map(Mask::shorten),
        bias: inputs.bias,
        alibi: inputs.alibi,
    };
    let f = forward_cached_half(cache, &half, opts, splits)?;
    Ok(Forward { out: widen(f.out.view()), lse: f.lse, traffic: None })
}

fn decode<T: DecodeFloat>(
    cache: &KvCache<'_>,
    inputs: &HalfInputs<'_, T>,
    opts: &Options,
    splits: Option<usize>,
) -> Result<(Array4<T>, Array3<f32>)> {
    let gpu = gpu()?;
    let dev = DeviceDecode::upload(gpu, cache, inputs, opts)?;
    let splits = splits.unwrap_or_else(|| dev.default_splits(gpu));
    let (out, lse) = dev.run(gpu, splits)?;
    let (batch, heads, n_q, d) = inputs.q.dim();
    Ok((
        gpu.download_array(&out, (batch, heads, n_q, d))?,
        gpu.download_array(&lse, (batch, heads, n_q))?,
    ))
}
