//! The batched products and the element-wise window steps the unfused stages (naive,
//! chunked) are built from (`kernels/products.cu`).
//!
//! Every product of the forward and the backward (Q Kᵀ, P V, Pᵀ dO, dS K, dSᵀ Q) is one call
//! of [`Kernels::gemm`] on operands with arbitrary strides and a head-to-KV-head map, so
//! nothing is copied or transposed. It runs on cuBLAS where libcublas is installed
//! ([`crate::blas`]), and otherwise on our own tiled kernel (`gemm_batched`: tiles of up to
//! 128×128 values of C, 8-deep slices of A and B in shared memory, up to 8×8 values per
//! thread), which the tests keep equal to it.

use attn_core::{Result, Shape};

use crate::blas::{self, Blas, GemmBackend};
use crate::{
    CONTRACT_HEADER, CudaFunction, DeviceBuffer, DeviceProblem, DeviceRepr, DropoutArg, Gpu,
    LaunchConfig, ScoreMods, blocks_for, grid, launch_group_sum, launch_row_dot,
};

/// The shared kernels' source, compiled after [`CONTRACT_HEADER`].
pub const PRODUCTS: &str = include_str!("../kernels/products.cu");
const MODULE: &str = "products";

/// One matrix operand of `gemm_batched`: matrix `z` starts at
/// `base + (z / zh)·sb + ((z % zh) / div)·sh`, element `(r, c)` is `rs·r + cs·c` further.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Operand {
    pub(crate) ptr: u64,
    pub(crate) rs: i64,
    pub(crate) cs: i64,
    pub(crate) sb: i64,
    pub(crate) sh: i64,
    pub(crate) base: i64,
    pub(crate) div: i32,
    pub(crate) pad_: i32,
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

/// Typed launchers of the kernels in products.cu.
#[derive(Debug)]
pub struct Kernels {
    gpu: &'static Gpu,
    /// `gemm_batched` with tiles of 128×128, 128×64 and 64×64 values of C.
    gemm: [CudaFunction; 3],
    blas: Option<&'static Blas>,
    modify: CudaFunction,
    dropout: CudaFunction,
    row_dot: CudaFunction,
    probs: CudaFunction,
    ds: CudaFunction,
    score_grads: CudaFunction,
    group_sum: CudaFunction,
}

/// The launch shape of the element-wise window kernels: x over columns, y over rows, z over
/// heads, the kernels looping over what exceeds the grid. A few thousand blocks per head,
/// each thread walking several rows and columns, rather than a block per 256 elements, whose
/// scheduling cost more than their memory traffic (notes/gpu.md has the profile).
fn window_grid(z: usize, rows: usize, cols: usize) -> LaunchConfig {
    grid((blocks_for(cols, 256).min(8), rows.clamp(1, 512) as u32, z as u32), 256)
}

/// Launches kernel `$f` on `$gpu`'s stream with `$cfg` and the arguments after `;`, mapping
/// a launch failure to an error that names `$what`. The caller guarantees what the `unsafe`
/// launch needs: the arguments match the kernel's parameter list, and every pointer they
/// carry addresses a live buffer large enough for the launch.
#[macro_export]
macro_rules! launch {
    ($gpu:expr, $f:expr, $cfg:expr, $what:expr; $($arg:expr),* $(,)?) => {{
        use $crate::PushKernelArg as _;
        let mut b = $gpu.stream().launch_builder(&$f);
        $( b.arg($arg); )*
        let cfg: $crate::LaunchConfig = $cfg;
        // SAFETY: the caller's guarantee (see the macro's documentation).
        unsafe { b.launch(cfg) }.map(|_| ()).map_err($crate::cuda_err($what))
    }};
}

impl Kernels {
    /// The kernels, with the products on cuBLAS where it is open ([`Blas::get`]).
    pub fn new(gpu: &'static Gpu) -> Result<Self> {
        Self::with_blas(gpu, Blas::get(gpu)?)
    }

    /// The kernels with every product on our own kernel, whatever is installed (for tests
    /// and comparisons).
    pub fn own_products(gpu: &'static Gpu) -> Result<Self> {
        Self::with_blas(gpu, None)
    }

    fn with_blas(gpu: &'static Gpu, blas: Option<&'static Blas>) -> Result<Self> {
        let f = |name: &str| gpu.function(MODULE, &[CONTRACT_HEADER, PRODUCTS], name);
        Ok(Self {
            gpu,
            gemm: [f("gemm_128x128")?, f("gemm_128x64")?, f("gemm_64x64")?],
            blas,
            modify: f("modify_scores")?,
            dropout: f("apply_dropout")?,
            row_dot: f("row_dot")?,
            probs: f("probs_from_lse")?,
            ds: f("ds_from_dp")?,
            score_grads: f("score_grads")?,
            group_sum: f("group_sum")?,
        })
    }

    pub fn gpu(&self) -> &'static Gpu {
        self.gpu
    }

    /// Which code runs [`Kernels::gemm`].
    pub fn backend(&self) -> GemmBackend {
        if self.blas.is_some() { GemmBackend::Cublas } else { GemmBackend::Own }
    }

    /// `C = alpha·A·B + beta·C` for `z` matrices of `m × k` by `k × n`; `zh` heads per batch:
    /// on cuBLAS where it is open and the strides allow, else on our own kernel.
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
        if let Some(blas) = self.blas
            && let Some(calls) = blas::plan((z, zh), (m, n, k), a, b, c)
        {
            return blas.run(self.gpu, &calls, alpha, beta);
        }
        // Our own kernel: the largest tile that still gives every multiprocessor two blocks.
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
        launch!(self.gpu, self.gemm[i], cfg, "gemm_batched"; &m, &n, &k, &zh, &alpha, &a, &b, &beta, &c)
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
        launch!(self.gpu, self.modify, window_grid(z, rows, cols), "modify_scores"; &ptr, mods, &i0, &j0, &r, &c)
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
        launch!(self.gpu, self.dropout, window_grid(z, rows, cols), "apply_dropout"; &ptr, d, &h, &i0, &j0, &r, &c)
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
        launch!(self.gpu, self.probs, window_grid(z, rows, cols), "probs_from_lse"; &sp, &lp, &i0, &r, &c, &n)
    }

    /// dS = P ∘ ((dO Vᵀ) ∘ Z − D) on a window, written over the window of dO Vᵀ.
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
        launch!(self.gpu, self.ds, window_grid(z, rows, cols), "ds_from_dp";
            &pp, &dpp, &ddp, d, &h, &i0, &j0, &r, &c, &n)
    }

    /// The raw scores' gradient on a `[z, rows, cols]` window of dS, in place: added into
    /// the dBias at address `dbias` (0: none), then times the softcap's slope at the raw
    /// scores `raw` (`None` without softcap).
    #[allow(clippy::too_many_arguments)]
    pub fn score_grads(
        &self,
        ds: &DeviceBuffer<f32>,
        raw: Option<&DeviceBuffer<f32>>,
        dbias: u64,
        mods: &ScoreMods,
        z: usize,
        (i0, j0, rows, cols): (usize, usize, usize, usize),
    ) -> Result<()> {
        let (dsp, sp) = (self.gpu.ptr(ds), raw.map_or(0, |s| self.gpu.ptr(s)));
        let (i0, j0, r, c) = (i0 as i32, j0 as i32, rows as i32, cols as i32);
        launch!(self.gpu, self.score_grads, window_grid(z, rows, cols), "score_grads";
            &dsp, &sp, &dbias, mods, &i0, &j0, &r, &c)
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

/// The gradients' buffers of an unfused backward and the per-window workspace: dQ, dK, dV
/// (zeroed, accumulated window by window), D = rowsum(dO ∘ O), and one window of P and dP
/// for every head.
#[derive(Debug)]
pub struct WindowGrads {
    pub dq: DeviceBuffer<f32>,
    pub dk: DeviceBuffer<f32>,
    pub dv: DeviceBuffer<f32>,
    /// D, one number per query row.
    pub dvec: DeviceBuffer<f32>,
    p: DeviceBuffer<f32>,
    dp: DeviceBuffer<f32>,
}

impl WindowGrads {
    /// Zeroed gradients, D computed from the saved O and dO, and room for windows of up to
    /// `q_block × k_block` scores of every head.
    pub fn new(
        k: &Kernels,
        dev: &DeviceProblem,
        saved: &crate::DeviceSaved,
        (q_block, k_block): (usize, usize),
    ) -> Result<Self> {
        let gpu = k.gpu();
        let Shape { batch, heads, kv_heads, n_q, n_k, head_dim: d } = dev.shape;
        let (z, zk) = (batch * heads, batch * kv_heads);
        let dvec = gpu.zeros::<f32>(z * n_q)?;
        k.row_dot(&saved.d_out, &saved.out, &dvec, (z * n_q, d))?; // D = rowsum(dO ∘ O)
        Ok(Self {
            dq: gpu.zeros::<f32>(z * n_q * d)?,
            dk: gpu.zeros::<f32>(zk * n_k * d)?,
            dv: gpu.zeros::<f32>(zk * n_k * d)?,
            dvec,
            // each window is written by a product before it is read
            p: gpu.uninit_f32(z * q_block * k_block)?,
            dp: gpu.uninit_f32(z * q_block * k_block)?,
        })
    }

    // ANCHOR: window_backward
    /// Adds the gradients of one window — query rows `i0..i0 + rows`, keys `j0..j0 + cols`
    /// of every head: recompute S and P = exp(S − lse), dP = (dO Vᵀ) ∘ Z, dS = P ∘ (dP − D),
    /// dV += (P∘Z)ᵀ dO, dK += scale·dSᵀ Q, dQ += scale·dS K.
    pub fn add_window(
        &self,
        k: &Kernels,
        dev: &DeviceProblem,
        saved: &crate::DeviceSaved,
        (i0, rows): (usize, usize),
        (j0, cols): (usize, usize),
    ) -> Result<()> {
        let gpu = k.gpu();
        let Shape { batch, heads, kv_heads, n_q, n_k, head_dim: d } = dev.shape;
        let (z, zk, group) = (batch * heads, batch * kv_heads, heads / kv_heads);
        let ptr = |b: &DeviceBuffer<f32>| gpu.ptr(b);
        let win = (i0, j0, rows, cols);
        let q_c = Operand::rows(ptr(&dev.q), heads, n_q, d, i0);
        let do_c = Operand::rows(ptr(&saved.d_out), heads, n_q, d, i0);
        let dq_c = Operand::rows(ptr(&self.dq), heads, n_q, d, i0);
        let p_w = Operand::rows(ptr(&self.p), heads, rows, cols, 0);
        let dp_w = Operand::rows(ptr(&self.dp), heads, rows, cols, 0);
        let k_c = Operand::rows(ptr(&dev.k), kv_heads, n_k, d, j0);
        let v_c = Operand::rows(ptr(&dev.v), kv_heads, n_k, d, j0);
        // P = exp(scale·Q Kᵀ + bias − lse), masked positions 0
        let kt = k_c.shared_by(group).t();
        k.gemm((z, heads), (rows, cols, d), dev.scale, q_c, kt, 0.0, p_w)?;
        if dev.window_needs_mods((i0, rows), (j0, cols)) {
            k.modify_scores(&self.p, &dev.mods, z, win)?;
        }
        k.probs_from_lse(&self.p, &saved.lse, z, (i0, rows, cols, n_q))?;
        // dO Vᵀ, then dP = (dO Vᵀ) ∘ Z and dS = P ∘ (dP − D) in its place
        k.gemm((z, heads), (rows, cols, d), 1.0, do_c, v_c.shared_by(group).t(), 0.0, dp_w)?;
        let dd = &self.dvec;
        k.ds_from_dp(&self.p, &self.dp, dd, &dev.dropout, heads, z, (i0, j0, rows, cols, n_q))?;
        if dev.dropout.enabled() {
            k.apply_dropout(&self.p, &dev.dropout, heads, z, win)?;
        }
        // dV += (P∘Z)ᵀ dO and dK += scale · dSᵀ Q, summed over the query heads that share
        // each key/value head (GQA), one launch per member so no two threads add into the
        // same element.
        let dv_c = Operand::rows(ptr(&self.dv), kv_heads, n_k, d, j0);
        let dk_c = Operand::rows(ptr(&self.dk), kv_heads, n_k, d, j0);
        for g in 0..group {
            let (pt, do_g) = (p_w.member(g, group).t(), do_c.member(g, group));
            k.gemm((zk, kv_heads), (cols, d, rows), 1.0, pt, do_g, 1.0, dv_c)?;
        }
        // dS of the modified scores into dBias, and back through the softcap to the raw
        // scores, recomputed into P's window (P is no longer read)
        if dev.has_score_grads() {
            let raw = if dev.has_softcap() {
                k.gemm((z, heads), (rows, cols, d), dev.scale, q_c, kt, 0.0, p_w)?;
                Some(&self.p)
            } else {
                None
            };
            k.score_grads(&self.dp, raw, dev.dbias_ptr(gpu), &dev.mods, z, win)?;
        }
        for g in 0..group {
            let (dst, q_g) = (dp_w.member(g, group).t(), q_c.member(g, group));
            k.gemm((zk, kv_heads), (cols, d, rows), dev.scale, dst, q_g, 1.0, dk_c)?;
        }
        // dQ += scale · dS K
        k.gemm((z, heads), (rows, d, cols), dev.scale, dp_w, k_c.shared_by(group), 1.0, dq_c)
    }
    // ANCHOR_END: window_backward

    /// dQ, dK, dV.
    pub fn finish(self) -> [DeviceBuffer<f32>; 3] {
        [self.dq, self.dk, self.dv]
    }
}
