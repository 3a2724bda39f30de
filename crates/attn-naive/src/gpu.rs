//! Stage 1 on the GPU: the same three steps as the CPU variant, each a kernel over all
//! `b·h` heads at once, with S and P for every head in device memory.
//!
//! ```text
//! gemm_batched    S = scale · Q Kᵀ          [b·h, n_q, n_k] in device memory
//! modify_scores   + bias, masks → −∞
//! softmax_rows    P = exp(S − lse), lse      one thread block per row
//! apply_dropout   P ∘ Z
//! gemm_batched    O = P V
//! ```
//!
//! The products are our own tiled kernel (`gemm_batched` in `kernels/attention.cu`: tiles of
//! up to 128×128 values of C, 8-deep slices of A and B in shared memory, up to 8×8 values per
//! thread), not
//! cuBLAS: one kernel with arbitrary strides and a head-to-KV-head map covers every product
//! of the forward and the backward (Q Kᵀ, P V, Pᵀ dO, dS K, dSᵀ Q) without copies or
//! transposes, and a reader can see all of it.
//!
//! The kernels work on *windows* of rows `i0..` and columns `j0..`; stage 2 (chunked) on the
//! GPU launches the same kernels once per chunk, and the backward here is its backward with
//! one window covering the whole matrix ([`backward_windows`]).

use attn_core::problem::Problem;
use attn_core::{AttnError, Forward, Grads, Inputs, Options, Result, Shape};
use attn_cuda::{
    CONTRACT_HEADER, CudaFunction, DeviceBuffer, DevicePeak, DeviceRepr, Gpu, LaunchConfig,
    PushKernelArg, blocks_for, cuda_err, gpu, grid,
};
use ndarray::ArrayView4;

use crate::cpu::{ADVICE, NAME};

/// The kernels of the unfused GPU stages, shared with stage 2.
pub const KERNELS: &str = include_str!("../kernels/attention.cu");
/// Building blocks of the fused kernels (FlashAttention-1 and -2 on the GPU), to prepend
/// after [`attn_cuda::CONTRACT_HEADER`].
pub const TILES: &str = include_str!("../kernels/tiles.cuh");
const MODULE: &str = "attention";

/// One matrix operand of `gemm_batched`: matrix `z` starts at
/// `base + (z / zh)·sb + ((z % zh) / div)·sh`, element `(r, c)` is `rs·r + cs·c` further.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Operand {
    ptr: u64,
    rs: i64,
    cs: i64,
    sb: i64,
    sh: i64,
    base: i64,
    div: i32,
    pad_: i32,
}
// SAFETY: plain old data, laid out as `struct Operand` in attention.cu.
unsafe impl DeviceRepr for Operand {}

impl Operand {
    /// Rows `row0..` of a row-major `[batch, heads, rows, cols]` tensor at `ptr`, one matrix
    /// per (batch, head).
    pub fn rows(ptr: u64, heads: usize, rows: usize, cols: usize, row0: usize) -> Self {
        let m = (rows * cols) as i64;
        Self {
            ptr,
            rs: cols as i64,
            cs: 1,
            sb: heads as i64 * m,
            sh: m,
            base: (row0 * cols) as i64,
            div: 1,
            pad_: 0,
        }
    }

    /// The transposed matrices.
    pub fn t(self) -> Self {
        Self { rs: self.cs, cs: self.rs, ..self }
    }

    /// A key/value tensor read by `group` query heads each (GQA): z counts query heads.
    pub fn shared_by(self, group: usize) -> Self {
        Self { div: group as i32, ..self }
    }

    /// Query head `kv·group + g` of a query-head tensor, for a launch whose z counts
    /// key/value heads.
    pub fn member(self, g: usize, group: usize) -> Self {
        Self { base: self.base + g as i64 * self.sh, sh: self.sh * group as i64, ..self }
    }
}

/// The score modifiers (`struct ScoreMods` in contract.cuh).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ScoreMods {
    bias: u64,
    bias_stride: [i64; 4],
    mask: u64,
    mask_stride: [i64; 4],
    causal: i32,
    n_q: i32,
    n_k: i32,
    heads: i32,
}
// SAFETY: plain old data, laid out as `struct ScoreMods` in contract.cuh.
unsafe impl DeviceRepr for ScoreMods {}

/// Dropout parameters (`struct Dropout` in contract.cuh).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DropoutArg {
    seed: u64,
    threshold: u32,
    keep_scale: f32,
    enabled: i32,
    pad_: i32,
}
// SAFETY: plain old data, laid out as `struct Dropout` in contract.cuh.
unsafe impl DeviceRepr for DropoutArg {}

impl DropoutArg {
    /// Whether dropout is on.
    pub fn enabled(&self) -> bool {
        self.enabled != 0
    }
}

/// A validated problem with its tensors in device memory.
#[derive(Debug)]
pub struct DeviceProblem {
    pub shape: Shape,
    pub scale: f32,
    pub causal: bool,
    has_mods: bool,
    pub q: DeviceBuffer<f32>,
    pub k: DeviceBuffer<f32>,
    pub v: DeviceBuffer<f32>,
    _bias: Option<DeviceBuffer<f32>>,
    _mask: Option<DeviceBuffer<u8>>,
    pub mods: ScoreMods,
    pub dropout: DropoutArg,
}

/// Row-major strides of an array of `dims`, 0 on axes of length 1 (broadcast).
fn broadcast_strides(dims: &[usize]) -> [i64; 4] {
    let mut strides = [0i64; 4];
    let mut s = 1i64;
    for a in (0..4).rev() {
        strides[a] = if dims[a] == 1 { 0 } else { s };
        s *= dims[a] as i64;
    }
    strides
}

/// What modifies the scores of a validated problem, in device memory: the bias, the mask (as
/// bytes), the kernels' argument that points at them, and the dropout parameters.
#[derive(Debug)]
pub struct ScoreInputs {
    pub mods: ScoreMods,
    pub dropout: DropoutArg,
    pub bias: Option<DeviceBuffer<f32>>,
    pub mask: Option<DeviceBuffer<u8>>,
}

impl ScoreInputs {
    pub fn upload(gpu: &Gpu, p: &Problem<'_>) -> Result<Self> {
        let sh = p.shape;
        let bias = p.bias.map(|b| gpu.upload_array(b)).transpose()?;
        let mask = p.mask.map(|m| gpu.upload_array(m.mapv(u8::from).view())).transpose()?;
        let mods = ScoreMods {
            bias: bias.as_ref().map_or(0, |b| gpu.ptr(b)),
            bias_stride: p.bias.map_or([0; 4], |b| broadcast_strides(b.shape())),
            mask: mask.as_ref().map_or(0, |m| gpu.ptr(m)),
            mask_stride: p.mask.map_or([0; 4], |m| broadcast_strides(m.shape())),
            causal: p.causal.into(),
            n_q: sh.n_q as i32,
            n_k: sh.n_k as i32,
            heads: sh.heads as i32,
        };
        let dropout = p.dropout.map_or(DropoutArg::default(), |d| DropoutArg {
            seed: d.seed,
            threshold: d.threshold,
            keep_scale: d.keep_scale,
            enabled: 1,
            pad_: 0,
        });
        Ok(Self { mods, dropout, bias, mask })
    }
}

impl DeviceProblem {
    /// Uploads Q, K, V, the mask (as bytes) and the bias of a validated problem.
    pub fn upload(gpu: &Gpu, p: &Problem<'_>) -> Result<Self> {
        let sh = p.shape;
        if sh.batch * sh.heads > 65_535 {
            return Err(AttnError::Cuda {
                context: "planning the launch".into(),
                message: format!(
                    "batch × heads = {} exceeds the 65 535 heads one launch can cover; split the batch",
                    sh.batch * sh.heads
                ),
            });
        }
        let ScoreInputs { mods, dropout, bias, mask } = ScoreInputs::upload(gpu, p)?;
        Ok(Self {
            shape: sh,
            scale: p.scale,
            causal: p.causal,
            has_mods: p.bias.is_some() || p.mask.is_some(),
            q: gpu.upload_array(p.q)?,
            k: gpu.upload_array(p.k)?,
            v: gpu.upload_array(p.v)?,
            _bias: bias,
            _mask: mask,
            mods,
            dropout,
        })
    }

    /// Query rows `i0 .. i_end` see no key at or after `j0` (a window causal masking hides).
    pub fn window_hidden(&self, i_end: usize, j0: usize) -> bool {
        i_end == 0 || j0 >= self.shape.key_end(self.causal, i_end - 1)
    }

    /// Whether the problem has a bias or a mask (kernels without them are leaner).
    pub fn has_bias_or_mask(&self) -> bool {
        self.has_mods
    }

    /// Whether a window's scores need `modify_scores`: a bias or mask, or causal masking
    /// that reaches into it.
    pub fn window_needs_mods(&self, i0: usize, j0: usize, cols: usize) -> bool {
        self.has_mods || (self.causal && j0 + cols > self.shape.key_end(true, i0))
    }
}

/// Typed launchers of the kernels in attention.cu.
#[derive(Debug)]
pub struct Kernels {
    gpu: &'static Gpu,
    /// `gemm_batched` with tiles of 128×128, 128×64 and 64×64 values of C.
    gemm: [CudaFunction; 3],
    modify: CudaFunction,
    softmax: CudaFunction,
    chunk_softmax: CudaFunction,
    dropout: CudaFunction,
    merge: CudaFunction,
    finish: CudaFunction,
    row_dot: CudaFunction,
    probs: CudaFunction,
    ds: CudaFunction,
    group_sum: CudaFunction,
}

/// The launch shape of the element-wise window kernels: x over columns, y over rows (the
/// kernels loop when rows exceed the grid), z over heads.
fn window_grid(z: usize, rows: usize, cols: usize) -> LaunchConfig {
    grid((blocks_for(cols, 256).min(64), rows.min(65_535) as u32, z as u32), 256)
}

macro_rules! launch {
    ($k:expr, $f:expr, $cfg:expr, $what:expr; $($arg:expr),* $(,)?) => {{
        let mut b = $k.gpu.stream().launch_builder(&$f);
        $( b.arg($arg); )*
        // SAFETY: the arguments match the kernel's parameter list in attention.cu, and every
        // pointer they carry addresses a live DeviceBuffer large enough for the launch.
        unsafe { b.launch($cfg) }.map(|_| ()).map_err(cuda_err($what))
    }};
}

impl Kernels {
    pub fn new(gpu: &'static Gpu) -> Result<Self> {
        let f = |name: &str| gpu.function(MODULE, &[CONTRACT_HEADER, KERNELS], name);
        Ok(Self {
            gpu,
            gemm: [f("gemm_128x128")?, f("gemm_128x64")?, f("gemm_64x64")?],
            modify: f("modify_scores")?,
            softmax: f("softmax_rows")?,
            chunk_softmax: f("chunk_softmax")?,
            dropout: f("apply_dropout")?,
            merge: f("merge_chunk")?,
            finish: f("finish_rows")?,
            row_dot: f("row_dot")?,
            probs: f("probs_from_lse")?,
            ds: f("ds_from_dp")?,
            group_sum: f("group_sum")?,
        })
    }

    pub fn gpu(&self) -> &'static Gpu {
        self.gpu
    }

    /// `C = alpha·A·B + beta·C` for `z` matrices of `m × k` by `k × n`; `zh` heads per batch.
    pub fn gemm(
        &self,
        (z, zh): (usize, usize),
        (m, n, k): (usize, usize, usize),
        alpha: f32,
        a: Operand,
        b: Operand,
        beta: f32,
        c: Operand,
    ) -> Result<()> {
        // The largest tile that still gives every multiprocessor two blocks.
        let blocks = |bm: usize, bn: usize| m.div_ceil(bm) * n.div_ceil(bn) * z;
        let enough = 2 * self.gpu.multiprocessors();
        let (i, bm, bn) = if n > 64 && blocks(128, 128) >= enough {
            (0, 128, 128)
        } else if blocks(128, 64) >= enough {
            (1, 128, 64)
        } else {
            (2, 64, 64)
        };
        let cfg = grid((blocks_for(n, bn), blocks_for(m, bm), z as u32), 256);
        let (m, n, k, zh) = (m as i32, n as i32, k as i32, zh as i32);
        launch!(self, self.gemm[i], cfg, "gemm_batched"; &m, &n, &k, &zh, &alpha, &a, &b, &beta, &c)
    }

    /// Bias, mask and causal masking on a `[z, rows, cols]` window of scores.
    pub fn modify_scores(
        &self,
        s: &DeviceBuffer<f32>,
        mods: &ScoreMods,
        z: usize,
        (i0, j0, rows, cols): (usize, usize, usize, usize),
    ) -> Result<()> {
        let ptr = self.gpu.ptr(s);
        let (i0, j0, r, c) = (i0 as i32, j0 as i32, rows as i32, cols as i32);
        launch!(self, self.modify, window_grid(z, rows, cols), "modify_scores"; &ptr, mods, &i0, &j0, &r, &c)
    }

    /// Stage 1's row softmax over whole rows: P in place, lse `[z, rows]`.
    pub fn softmax_rows(
        &self,
        s: &DeviceBuffer<f32>,
        lse: &DeviceBuffer<f32>,
        z: usize,
        (rows, cols): (usize, usize),
    ) -> Result<()> {
        let cfg = grid((rows as u32, z as u32, 1), 256);
        let (sp, lp, r, c) = (self.gpu.ptr(s), self.gpu.ptr(lse), rows as i32, cols as i32);
        launch!(self, self.softmax, cfg, "softmax_rows"; &sp, &lp, &r, &c)
    }

    /// Stage 2's chunk summaries: P̃ = exp(S − m_c) in place, m_c and ℓ_c `[z, rows]`.
    pub fn chunk_softmax(
        &self,
        s: &DeviceBuffer<f32>,
        m_c: &DeviceBuffer<f32>,
        l_c: &DeviceBuffer<f32>,
        z: usize,
        (rows, cols): (usize, usize),
    ) -> Result<()> {
        let cfg = grid((rows as u32, z as u32, 1), 256);
        let g = self.gpu;
        let (sp, mp, lp, r, c) = (g.ptr(s), g.ptr(m_c), g.ptr(l_c), rows as i32, cols as i32);
        launch!(self, self.chunk_softmax, cfg, "chunk_softmax"; &sp, &mp, &lp, &r, &c)
    }

    /// Dropout on a `[z, rows, cols]` window of weights.
    pub fn apply_dropout(
        &self,
        p: &DeviceBuffer<f32>,
        d: &DropoutArg,
        heads: usize,
        z: usize,
        (i0, j0, rows, cols): (usize, usize, usize, usize),
    ) -> Result<()> {
        let ptr = self.gpu.ptr(p);
        let (h, i0, j0, r, c) = (heads as i32, i0 as i32, j0 as i32, rows as i32, cols as i32);
        launch!(self, self.dropout, window_grid(z, rows, cols), "apply_dropout"; &ptr, d, &h, &i0, &j0, &r, &c)
    }

    /// Stage 2: folds a chunk's (m_c, ℓ_c, O_c) into the running (m, ℓ, O).
    #[allow(clippy::too_many_arguments)]
    pub fn merge_chunk(
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
        launch!(self, self.merge, cfg, "merge_chunk";
            &ptrs[0], &ptrs[1], &ptrs[2], &ptrs[3], &ptrs[4], &ptrs[5], &i0, &r, &n, &d)
    }

    /// Stage 2: O /= ℓ, lse = m + ln ℓ over `[z, n_q]` rows.
    pub fn finish_rows(
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
        launch!(self, self.finish, cfg, "finish_rows"; &op, &lp, &mp, &llp, &d)
    }

    /// D = rowsum(dO ∘ O) over `rows` rows of length `d`.
    pub fn row_dot(
        &self,
        d_out: &DeviceBuffer<f32>,
        out: &DeviceBuffer<f32>,
        dd: &DeviceBuffer<f32>,
        rows_d: (usize, usize),
    ) -> Result<()> {
        launch_row_dot(self.gpu, &self.row_dot, d_out, out, dd, rows_d)
    }

    /// P = exp(S − lse) on a window, in place.
    pub fn probs_from_lse(
        &self,
        s: &DeviceBuffer<f32>,
        lse: &DeviceBuffer<f32>,
        z: usize,
        (i0, rows, cols, n_q): (usize, usize, usize, usize),
    ) -> Result<()> {
        let (sp, lp) = (self.gpu.ptr(s), self.gpu.ptr(lse));
        let (i0, r, c, n) = (i0 as i32, rows as i32, cols as i32, n_q as i32);
        launch!(self, self.probs, window_grid(z, rows, cols), "probs_from_lse"; &sp, &lp, &i0, &r, &c, &n)
    }

    /// dS = P ∘ (Z ∘ dP − D) on a window, over dP.
    #[allow(clippy::too_many_arguments)]
    pub fn ds_from_dp(
        &self,
        p: &DeviceBuffer<f32>,
        dp: &DeviceBuffer<f32>,
        dd: &DeviceBuffer<f32>,
        d: &DropoutArg,
        heads: usize,
        z: usize,
        (i0, j0, rows, cols, n_q): (usize, usize, usize, usize, usize),
    ) -> Result<()> {
        let g = self.gpu;
        let (pp, dpp, ddp) = (g.ptr(p), g.ptr(dp), g.ptr(dd));
        let (h, i0, j0, r, c, n) =
            (heads as i32, i0 as i32, j0 as i32, rows as i32, cols as i32, n_q as i32);
        launch!(self, self.ds, window_grid(z, rows, cols), "ds_from_dp";
            &pp, &dpp, &ddp, d, &h, &i0, &j0, &r, &c, &n)
    }
}

impl Kernels {
    /// Sums per-query-head gradients `[b, heads, n_k, d]` over each GQA group into a new
    /// `[b, kv_heads, n_k, d]` buffer (a fixed order: bitwise reproducible).
    pub fn group_sum(
        &self,
        per_head: &DeviceBuffer<f32>,
        dims: (usize, usize, usize, usize, usize),
    ) -> Result<DeviceBuffer<f32>> {
        launch_group_sum(self.gpu, &self.group_sum, per_head, dims)
    }
}

/// Launches `f`, a kernel of contract.cuh's `row_dot_rows` `(d_out, out, D, rows, d)`:
/// D = rowsum(dO ∘ O) over `rows` rows of length `d`, one warp a row; dO and O of any element
/// type the kernel reads (f32 here, bf16 / fp16 on the tensor cores).
pub fn launch_row_dot<T>(
    gpu: &Gpu,
    f: &CudaFunction,
    d_out: &DeviceBuffer<T>,
    out: &DeviceBuffer<T>,
    dd: &DeviceBuffer<f32>,
    (rows, d): (usize, usize),
) -> Result<()> {
    let cfg = grid((blocks_for(rows, 8), 1, 1), 256);
    let (a, b, c, r, d) = (gpu.ptr(d_out), gpu.ptr(out), gpu.ptr(dd), rows as i64, d as i32);
    let mut l = gpu.stream().launch_builder(f);
    l.arg(&a).arg(&b).arg(&c).arg(&r).arg(&d);
    // SAFETY: (d_out, out, D, rows, d) is the parameter list of every row_dot_rows kernel;
    // d_out and out hold rows · d elements of the type f reads, D rows floats.
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

/// The arguments of the fused kernels (`struct FlashArgs` in tiles.cuh): device pointers and
/// sizes. Unused pointers stay 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FlashArgs {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub o: u64,
    pub lse: u64,
    pub d_out: u64,
    pub dvec: u64,
    pub dq: u64,
    pub dk: u64,
    pub dv: u64,
    pub n_q: i32,
    pub n_k: i32,
    pub heads: i32,
    pub kv_heads: i32,
    pub scale: f32,
    pub pad_: i32,
}
// SAFETY: plain old data, laid out as `struct FlashArgs` in tiles.cuh.
unsafe impl DeviceRepr for FlashArgs {}

impl FlashArgs {
    /// Q, K, V and the sizes of an uploaded problem.
    pub fn of(gpu: &Gpu, dev: &DeviceProblem) -> Self {
        Self {
            q: gpu.ptr(&dev.q),
            k: gpu.ptr(&dev.k),
            v: gpu.ptr(&dev.v),
            ..Self::new(&dev.shape, dev.scale)
        }
    }

    /// The sizes and scale of a problem, every pointer 0.
    pub fn new(shape: &Shape, scale: f32) -> Self {
        let Shape { heads, kv_heads, n_q, n_k, .. } = *shape;
        Self {
            n_q: n_q as i32,
            n_k: n_k as i32,
            heads: heads as i32,
            kv_heads: kv_heads as i32,
            scale,
            ..Self::default()
        }
    }
}

/// What a fused backward (FlashAttention-1 or -2) works on: D = rowsum(dO ∘ O) computed,
/// dQ (zeroed when the kernels add into it), dK and dV per *query* head, and the kernels'
/// arguments pointing at all of them. [`FusedBackward::finish`] sums dK and dV over each GQA
/// group.
#[derive(Debug)]
pub struct FusedBackward {
    pub args: FlashArgs,
    pub dq: DeviceBuffer<f32>,
    pub dk_h: DeviceBuffer<f32>,
    pub dv_h: DeviceBuffer<f32>,
    /// D, one number per query row.
    pub dvec: DeviceBuffer<f32>,
    kernels: Kernels,
}

impl FusedBackward {
    /// Allocates the gradients and computes D; `zero_dq` where the kernels accumulate into dQ
    /// (in place or by atomics) rather than write every element once.
    pub fn new(
        gpu: &'static Gpu,
        dev: &DeviceProblem,
        saved: &DeviceSaved,
        zero_dq: bool,
    ) -> Result<Self> {
        let Shape { batch, heads, n_q, n_k, head_dim: d, .. } = dev.shape;
        let z = batch * heads;
        let kernels = Kernels::new(gpu)?;
        let dvec = gpu.uninit_f32(z * n_q)?;
        kernels.row_dot(&saved.d_out, &saved.out, &dvec, (z * n_q, d))?; // D = rowsum(dO ∘ O)
        let dq =
            if zero_dq { gpu.zeros::<f32>(z * n_q * d)? } else { gpu.uninit_f32(z * n_q * d)? };
        let dk_h = gpu.uninit_f32(z * n_k * d)?;
        let dv_h = gpu.uninit_f32(z * n_k * d)?;
        let args = FlashArgs {
            o: gpu.ptr(&saved.out),
            lse: gpu.ptr(&saved.lse),
            d_out: gpu.ptr(&saved.d_out),
            dvec: gpu.ptr(&dvec),
            dq: gpu.ptr(&dq),
            dk: gpu.ptr(&dk_h),
            dv: gpu.ptr(&dv_h),
            ..FlashArgs::of(gpu, dev)
        };
        Ok(Self { args, dq, dk_h, dv_h, dvec, kernels })
    }

    /// dQ, dK, dV, with dK and dV summed over each group of query heads sharing a key/value
    /// head (a fixed order: reproducible).
    pub fn finish(self, dev: &DeviceProblem) -> Result<[DeviceBuffer<f32>; 3]> {
        let Shape { batch, heads, kv_heads, n_k, head_dim: d, .. } = dev.shape;
        if heads == kv_heads {
            return Ok([self.dq, self.dk_h, self.dv_h]);
        }
        let dims = (batch, heads, kv_heads, n_k, d);
        let (dk, dv) =
            (self.kernels.group_sum(&self.dk_h, dims)?, self.kernels.group_sum(&self.dv_h, dims)?);
        Ok([self.dq, dk, dv])
    }
}

/// The head dimensions the fused kernels (tiles.cuh and the flash stages) are built for.
pub const HEAD_DIMS: [usize; 4] = [32, 64, 96, 128];

/// Refuses a head dimension the fused kernels of `stage` are not built for, naming those
/// they are.
pub fn check_head_dim(stage: &'static str, d: usize) -> Result<()> {
    if HEAD_DIMS.contains(&d) {
        return Ok(());
    }
    Err(AttnError::UnsupportedHeadDim {
        stage,
        head_dim: d,
        supported: "32, 64, 96, 128 (use the CPU stages, or pad the head dimension)".into(),
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
    use attn_cuda::cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES as MAX_SHARED;
    f.set_attribute(MAX_SHARED, shared_bytes as i32)
        .map_err(cuda_err(format!("asking for {shared_bytes} B of shared memory")))?;
    Ok((f, shared_bytes))
}

/// Launches a fused kernel `(FlashArgs, ScoreMods, Dropout)` with 256 threads per block.
pub fn launch_fused(
    gpu: &Gpu,
    (f, smem): &(CudaFunction, u32),
    grid: (u32, u32),
    a: &FlashArgs,
    dev: &DeviceProblem,
    what: &str,
) -> Result<()> {
    let cfg = LaunchConfig {
        grid_dim: (grid.0, grid.1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: *smem,
    };
    let mut b = gpu.stream().launch_builder(f);
    b.arg(a).arg(&dev.mods).arg(&dev.dropout);
    // SAFETY: (FlashArgs, ScoreMods, Dropout) is the fused kernels' parameter list; every
    // pointer in them addresses a live buffer of the problem's shape, and `smem` is what the
    // kernel lays out for its head dimension.
    unsafe { b.launch(cfg) }.map(|_| ()).map_err(cuda_err(what.to_string()))
}

/// The device memory limit: the caller's, else what the driver reports free.
pub fn device_memory_limit(gpu: &Gpu, opts: &Options) -> Result<u64> {
    Ok(match opts.memory_limit {
        Some(l) => l,
        None => gpu.mem_info()?.0 as u64,
    })
}

// ANCHOR: forward_device
/// The forward on uploaded tensors: (O `[b, h, n_q, d]`, lse `[b, h, n_q]`) on the device.
pub fn forward_device(
    k: &Kernels,
    dev: &DeviceProblem,
) -> Result<(DeviceBuffer<f32>, DeviceBuffer<f32>)> {
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
    // + bias, masked positions −∞
    if dev.window_needs_mods(0, 0, n_k) {
        k.modify_scores(&s, &dev.mods, z, (0, 0, n_q, n_k))?;
    }
    // P = softmax(S), lse
    k.softmax_rows(&s, &lse, z, (n_q, n_k))?;
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

// ANCHOR: backward_windows
/// The gradients on the device, window by window (`q_block × k_block` of every head at
/// once): recompute S and P = exp(S − lse), dP = dO Vᵀ, dS = P ∘ (Z∘dP − D),
/// dV += (P∘Z)ᵀ dO, dK += scale·dSᵀ Q, dQ += scale·dS K. Stage 1 calls it with one window
/// covering everything (P and dP of every head in memory); stage 2 with its chunks.
pub fn backward_windows(
    k: &Kernels,
    dev: &DeviceProblem,
    out: &DeviceBuffer<f32>,
    lse: &DeviceBuffer<f32>,
    d_out: &DeviceBuffer<f32>,
    (q_block, k_block): (usize, usize),
) -> Result<[DeviceBuffer<f32>; 3]> {
    let gpu = k.gpu();
    let Shape { batch, heads, kv_heads, n_q, n_k, head_dim: d } = dev.shape;
    let (z, zk, group) = (batch * heads, batch * kv_heads, heads / kv_heads);
    let dd = gpu.zeros::<f32>(z * n_q)?;
    k.row_dot(d_out, out, &dd, (z * n_q, d))?;
    let dq = gpu.zeros::<f32>(z * n_q * d)?;
    let dk = gpu.zeros::<f32>(zk * n_k * d)?;
    let dv = gpu.zeros::<f32>(zk * n_k * d)?;
    // Windows of P and dP: each window is written by a product before it is read.
    let p = gpu.uninit_f32(z * q_block * k_block)?;
    let dp = gpu.uninit_f32(z * q_block * k_block)?;
    let ptr = |b: &DeviceBuffer<f32>| gpu.ptr(b);

    for i0 in (0..n_q).step_by(q_block) {
        let rows = q_block.min(n_q - i0);
        let q_c = Operand::rows(ptr(&dev.q), heads, n_q, d, i0);
        let do_c = Operand::rows(ptr(d_out), heads, n_q, d, i0);
        let dq_c = Operand::rows(ptr(&dq), heads, n_q, d, i0);
        for j0 in (0..n_k).step_by(k_block) {
            if dev.window_hidden(i0 + rows, j0) {
                break; // causal: every later window of these rows is hidden too
            }
            let cols = k_block.min(n_k - j0);
            let win = (i0, j0, rows, cols);
            let p_w = Operand::rows(ptr(&p), heads, rows, cols, 0);
            let dp_w = Operand::rows(ptr(&dp), heads, rows, cols, 0);
            let k_c = Operand::rows(ptr(&dev.k), kv_heads, n_k, d, j0);
            let v_c = Operand::rows(ptr(&dev.v), kv_heads, n_k, d, j0);
            // P = exp(scale·Q Kᵀ + bias − lse), masked positions 0
            k.gemm(
                (z, heads),
                (rows, cols, d),
                dev.scale,
                q_c,
                k_c.shared_by(group).t(),
                0.0,
                p_w,
            )?;
            if dev.window_needs_mods(i0, j0, cols) {
                k.modify_scores(&p, &dev.mods, z, win)?;
            }
            k.probs_from_lse(&p, lse, z, (i0, rows, cols, n_q))?;
            // dP = dO Vᵀ, then dS = P ∘ (Z∘dP − D) in its place
            k.gemm((z, heads), (rows, cols, d), 1.0, do_c, v_c.shared_by(group).t(), 0.0, dp_w)?;
            k.ds_from_dp(&p, &dp, &dd, &dev.dropout, heads, z, (i0, j0, rows, cols, n_q))?;
            if dev.dropout.enabled() {
                k.apply_dropout(&p, &dev.dropout, heads, z, win)?;
            }
            // dV += (P∘Z)ᵀ dO and dK += scale · dSᵀ Q, summed over the query heads that share
            // each key/value head (GQA), one launch per member so no two threads add into
            // the same element.
            let dv_c = Operand::rows(ptr(&dv), kv_heads, n_k, d, j0);
            let dk_c = Operand::rows(ptr(&dk), kv_heads, n_k, d, j0);
            for g in 0..group {
                let (pt, dst) = (p_w.member(g, group).t(), dp_w.member(g, group).t());
                k.gemm((zk, kv_heads), (cols, d, rows), 1.0, pt, do_c.member(g, group), 1.0, dv_c)?;
                k.gemm(
                    (zk, kv_heads),
                    (cols, d, rows),
                    dev.scale,
                    dst,
                    q_c.member(g, group),
                    1.0,
                    dk_c,
                )?;
            }
            // dQ += scale · dS K
            k.gemm((z, heads), (rows, d, cols), dev.scale, dp_w, k_c.shared_by(group), 1.0, dq_c)?;
        }
    }
    Ok([dq, dk, dv])
}
// ANCHOR_END: backward_windows

/// What a GPU stage reports besides its results: device bytes it allocated above the
/// uploaded inputs, and device milliseconds of its kernels.
#[derive(Clone, Copy, Debug, Default)]
pub struct DeviceStats {
    pub peak_bytes: u64,
    pub kernel_ms: f64,
}

fn refuse_if_too_large(gpu: &Gpu, opts: &Options, what: &'static str, needed: u64) -> Result<()> {
    let limit = device_memory_limit(gpu, opts)?;
    if needed > limit {
        return Err(AttnError::WorkspaceTooLarge {
            stage: "naive (cuda)",
            what,
            needed_bytes: needed,
            limit_bytes: limit,
            advice: ADVICE,
        });
    }
    Ok(())
}

/// Device results of a forward: (O `[b, h, n_q, d]`, lse `[b, h, n_q]`).
pub type DeviceForward = (DeviceBuffer<f32>, DeviceBuffer<f32>);

/// What every GPU stage's forward does around its kernels: validate, upload, run `kernels`
/// (timed with events, device bytes measured above the uploaded inputs), download.
pub fn forward_on_device(
    inputs: &Inputs<'_>,
    opts: &Options,
    kernels: impl FnOnce(&'static Gpu, &DeviceProblem) -> Result<DeviceForward>,
) -> Result<(Forward, DeviceStats)> {
    let p = Problem::new(inputs, opts)?;
    let gpu = gpu()?;
    let dev = DeviceProblem::upload(gpu, &p)?;
    let meter = DevicePeak::start(gpu);
    let timer = attn_cuda::Timer::start(gpu)?;
    let (out, lse) = kernels(gpu, &dev)?;
    let kernel_ms = timer.stop(gpu)?;
    let stats = DeviceStats { peak_bytes: meter.peak(gpu), kernel_ms };
    let sh = p.shape;
    Ok((
        Forward {
            out: gpu.download_array(&out, sh.q_dims())?,
            lse: gpu.download_array(&lse, sh.lse_dims())?,
            traffic: None,
        },
        stats,
    ))
}

/// The saved forward results and the upstream gradient on the device: (O, lse, dO).
#[derive(Debug)]
pub struct DeviceSaved {
    pub out: DeviceBuffer<f32>,
    pub lse: DeviceBuffer<f32>,
    pub d_out: DeviceBuffer<f32>,
}

/// What every GPU stage's backward does around its kernels (see [`forward_on_device`]);
/// `kernels` returns dQ, dK, dV.
pub fn backward_on_device(
    inputs: &Inputs<'_>,
    opts: &Options,
    fwd: &Forward,
    d_out: ArrayView4<'_, f32>,
    kernels: impl FnOnce(&'static Gpu, &DeviceProblem, &DeviceSaved) -> Result<[DeviceBuffer<f32>; 3]>,
) -> Result<(Grads, DeviceStats)> {
    let p = Problem::for_backward(inputs, opts, fwd, d_out)?;
    let gpu = gpu()?;
    let sh = p.shape;
    let dev = DeviceProblem::upload(gpu, &p)?;
    let saved = DeviceSaved {
        out: gpu.upload_array(fwd.out.view())?,
        lse: gpu.upload_array(fwd.lse.view())?,
        d_out: gpu.upload_array(d_out)?,
    };
    let meter = DevicePeak::start(gpu);
    let timer = attn_cuda::Timer::start(gpu)?;
    let [dq, dk, dv] = kernels(gpu, &dev, &saved)?;
    let kernel_ms = timer.stop(gpu)?;
    let stats = DeviceStats { peak_bytes: meter.peak(gpu), kernel_ms };
    Ok((
        Grads {
            dq: gpu.download_array(&dq, sh.q_dims())?,
            dk: gpu.download_array(&dk, sh.kv_dims())?,
            dv: gpu.download_array(&dv, sh.kv_dims())?,
            traffic: None,
        },
        stats,
    ))
}

/// The forward through [`forward_device`], uploads and downloads included, with its device
/// statistics; refused before anything is allocated when S would not fit.
pub fn forward_with_stats(inputs: &Inputs<'_>, opts: &Options) -> Result<(Forward, DeviceStats)> {
    forward_on_device(inputs, opts, |gpu, dev| {
        let needed = crate::forward_workspace_bytes(&dev.shape);
        refuse_if_too_large(gpu, opts, "score matrices S/P in device memory", needed)?;
        forward_device(&Kernels::new(gpu)?, dev)
    })
}

/// The backward through [`backward_windows`] with one window, uploads and downloads included.
pub fn backward_with_stats(
    inputs: &Inputs<'_>,
    opts: &Options,
    fwd: &Forward,
    d_out: ArrayView4<'_, f32>,
) -> Result<(Grads, DeviceStats)> {
    backward_on_device(inputs, opts, fwd, d_out, |gpu, dev, saved| {
        let sh = dev.shape;
        let needed = crate::backward_workspace_bytes(&sh);
        refuse_if_too_large(gpu, opts, "matrices P and dP in device memory", needed)?;
        let k = Kernels::new(gpu)?;
        backward_windows(&k, dev, &saved.out, &saved.lse, &saved.d_out, (sh.n_q, sh.n_k))
    })
}

attn_core::cuda_stage!(
    /// Naive attention on the GPU, as a [`Stage`]: uploads, runs, downloads.
    NaiveCuda,
    self
);
