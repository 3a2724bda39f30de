//! Stage 4 on the CPU: FlashAttention-2 (Dao, 2023). Forward: Algorithm 1; backward:
//! Algorithm 2, with dQ added by the task that owns it instead of atomic adds. Line numbers in the
//! comments are the paper's algorithm lines.

use attn_core::blocks::{KvHeadGrads, kv_head_grads, row_blocks};
use attn_core::memory::zeros_written;
use attn_core::trace::{self, State, Trace, Tracer};
use attn_core::{
    BiasGrad, Forward, Grads, Head, Inputs, Options, Problem, Result, Shape, Traffic,
    TrafficCounter,
};
use ndarray::ArrayViewMut1;
use ndarray::{Array1, Array2, Array3, Array4, ArrayView1, ArrayView2, ArrayView3, ArrayView4};
use ndarray::{ArrayViewMut2, Axis, Zip, s};
use rayon::prelude::*;

pub use attn_core::simd;

pub mod decode;
pub mod packed;

use simd::{ds_from_dp, matmul, probs_from_lse, softmax_tile};

/// The name the CLI and the errors use.
pub const NAME: &str = "flash2";
/// Query rows per block unless `q_block` says otherwise.
pub const DEFAULT_Q_BLOCK: usize = 128;
/// Key/value rows per block unless `k_block` says otherwise.
pub const DEFAULT_K_BLOCK: usize = 256;

/// The block sizes (B_r, B_c), clipped to the sequence lengths. The defaults keep a score
/// tile (128 × 256 floats, 128 KiB) and the K_j, V_j it reads (2 × 256 × d floats) in a
/// core's L2 cache (the sweep that chose them: notes/cpu.md).
pub fn block_sizes(shape: &Shape, opts: &Options) -> (usize, usize) {
    opts.block_sizes(shape, (DEFAULT_Q_BLOCK, DEFAULT_K_BLOCK))
}

/// One worker's on-chip state, allocated once per rayon job, never in the loops.
struct Scratch {
    s: Array2<f32>,
    acc: Array2<f32>,
    m: Array1<f32>,
    ell: Array1<f32>,
    alpha: Array1<f32>,
}

impl Scratch {
    fn new((b_r, b_c): (usize, usize), d: usize) -> Self {
        Self {
            s: Array2::zeros((b_r, b_c)),
            acc: Array2::zeros((b_r, d)),
            m: Array1::zeros(b_r),
            ell: Array1::zeros(b_r),
            alpha: Array1::zeros(b_r),
        }
    }
}

// ANCHOR: forward_block
/// Algorithm 1 for one query block Q_i (rows `i0..`) of one head: the running statistics
/// m_i, ℓ_i and the unnormalised output Õ_i stay on chip for the whole loop over K/V.
fn forward_block(
    head: &Head<'_>,
    scale: f32,
    (i0, b_c): (usize, usize),
    mut o_i: ArrayViewMut2<'_, f32>,
    mut lse_i: ArrayViewMut1<'_, f32>,
    sc: &mut Scratch,
    trace: Option<&Tracer>,
) -> Traffic {
    let rows = o_i.nrows();
    let mut io = Traffic::default();
    // line 4: load Q_i; line 5: Õ_i = 0, ℓ_i = 0, m_i = −∞ on chip
    let q_i = head.q.slice(s![i0..i0 + rows, ..]);
    io.read_f32(q_i.len());
    let mut acc = sc.acc.slice_mut(s![..rows, ..]);
    let (mut m, mut ell) = (sc.m.slice_mut(s![..rows]), sc.ell.slice_mut(s![..rows]));
    let mut alpha = sc.alpha.slice_mut(s![..rows]);
    acc.fill(0.0);
    m.fill(f32::NEG_INFINITY);
    ell.fill(0.0);
    // Causal masking and the window: keys outside key_start(first row) .. key_end(last
    // row) are hidden from the whole block, and their tiles never visited.
    let kv_end = head.key_end(i0 + rows - 1);
    for j0 in head.key_blocks(i0, rows, b_c) {
        // line 6: for 1 ≤ j ≤ T_c — line 7: load K_j, V_j
        let cols = b_c.min(kv_end - j0);
        let (k_j, v_j) = (head.k.slice(s![j0..j0 + cols, ..]), head.v.slice(s![j0..j0 + cols, ..]));
        io.read_f32(k_j.len() + v_j.len());
        // line 8: S_ij = τ Q_i K_jᵀ; the score modifiers only where the tile has any
        let mut s_ij = sc.s.slice_mut(s![..rows, ..cols]);
        matmul(scale, &q_i, &k_j.t(), 0.0, &mut s_ij);
        if head.tile_needs_mods((i0, rows), (j0, cols)) {
            head.modify_scores(i0, j0, s_ij.view_mut(), None);
            io.read_bytes(rows * cols * head.score_mod_bytes());
        }
        // line 9: m_new = max(m_i, rowmax(S_ij)), P̃_ij = exp(S_ij − m_new),
        //         ℓ_i = e^(m_i − m_new) ℓ_i + rowsum(P̃_ij)
        softmax_tile(s_ij.view_mut(), m.view_mut(), ell.view_mut(), alpha.view_mut());
        head.apply_dropout(i0, j0, s_ij.view_mut());
        // line 10: Õ_i = diag(e^(m_i − m_new)) Õ_i + P̃_ij V_j
        for (mut row, &a) in acc.rows_mut().into_iter().zip(&alpha) {
            if a != 1.0 {
                row *= a;
            }
        }
        matmul(1.0, &s_ij.view(), &v_j, 1.0, &mut acc);
        if let Some(t) = trace {
            t.record_tile(
                head,
                (i0, j0),
                ((i0, rows), (j0, cols)),
                State { m: m.view(), ell: ell.view(), acc: acc.view() },
            );
        }
    }
    // line 12: O_i = diag(ℓ_i)⁻¹ Õ_i — line 13: L_i = m_i + log ℓ_i — lines 14–15: write them
    for (((mut o_row, acc_row), lse), (&m_r, &ell_r)) in
        o_i.rows_mut().into_iter().zip(acc.rows()).zip(lse_i.iter_mut()).zip(m.iter().zip(&ell))
    {
        if m_r == f32::NEG_INFINITY {
            o_row.fill(0.0); // every key removed
            *lse = f32::NEG_INFINITY;
        } else {
            Zip::from(&mut o_row).and(&acc_row).for_each(|o, &a| *o = a / ell_r);
            *lse = m_r + ell_r.ln();
        }
    }
    if let Some(t) = trace {
        t.record_finish(head, (i0, rows), State { m: m.view(), ell: ell.view(), acc: o_i.view() });
    }
    io.write_f32(o_i.len() + rows);
    io
}
// ANCHOR_END: forward_block

// ANCHOR: forward
/// Forward: one rayon task per (batch, head, query block) — the work partitioning that lets
/// FlashAttention-2 fill a machine even with one head. With a tracer, every step of the
/// loops is recorded ([`forward_traced`]).
pub fn forward(inputs: &Inputs<'_>, opts: &Options) -> Result<Forward> {
    forward_with(inputs, opts, None)
}

fn forward_with(inputs: &Inputs<'_>, opts: &Options, trace: Option<&Tracer>) -> Result<Forward> {
    let p = Problem::new(inputs, opts)?;
    let sh = p.shape;
    let (b_r, b_c) = block_sizes(&sh, opts);
    let mut out = Array4::<f32>::zeros(sh.q_dims());
    let mut lse = Array3::<f32>::zeros(sh.lse_dims());
    let tasks: Vec<_> =
        row_blocks(out.view_mut(), b_r).into_iter().zip(row_blocks(lse.view_mut(), b_r)).collect();
    let traffic = TrafficCounter::default();
    tasks.into_par_iter().for_each_init(
        || Scratch::new((b_r, b_c), sh.head_dim),
        |sc, (o, l)| {
            let head = p.head(o.b, o.h);
            traffic.add(forward_block(&head, p.scale, (o.start, b_c), o.view, l.view, sc, trace));
        },
    );
    Ok(Forward { out, lse, traffic: Some(traffic.get()) })
}
// ANCHOR_END: forward

/// [`forward`], recording every step of Algorithm 1's loops (for small problems: the book's
/// pictures and worked example). The numbers are those of [`forward`], bit for bit.
pub fn forward_traced(inputs: &Inputs<'_>, opts: &Options) -> Result<(Forward, Trace)> {
    trace::traced(inputs, opts, block_sizes, |t| forward_with(inputs, opts, Some(t)))
}

/// What a backward tile needs of its query rows: Q_i, dO_i, the log-sum-exp and D_i.
struct QueryRows<'a> {
    q: ArrayView2<'a, f32>,
    d_o: ArrayView2<'a, f32>,
    lse: ArrayView1<'a, f32>,
    d: ArrayView1<'a, f32>,
}

/// Where the backward's query rows come from: Q, dO, the log-sum-exp and D of the call (or,
/// in a packed batch, of one sequence).
struct RowSource<'a> {
    q: ArrayView4<'a, f32>,
    d_out: ArrayView4<'a, f32>,
    lse: ArrayView3<'a, f32>,
    d: ArrayView3<'a, f32>,
}

impl<'a> RowSource<'a> {
    fn rows(&self, b: usize, h: usize, i0: usize, n: usize) -> QueryRows<'a> {
        QueryRows {
            q: self.q.slice_move(s![b, h, i0..i0 + n, ..]),
            d_o: self.d_out.slice_move(s![b, h, i0..i0 + n, ..]),
            lse: self.lse.slice_move(s![b, h, i0..i0 + n]),
            d: self.d.slice_move(s![b, h, i0..i0 + n]),
        }
    }
}

/// Line 4 of Algorithm 2: D = rowsum(dO ∘ O), one number per query row.
fn row_dots(
    d_out: ArrayView4<'_, f32>,
    out: ArrayView4<'_, f32>,
    traffic: &TrafficCounter,
) -> Array3<f32> {
    let (b, h, n, _) = out.dim();
    let mut d = Array3::<f32>::zeros((b, h, n));
    Zip::from(&mut d)
        .and(d_out.lanes(Axis(3)))
        .and(out.lanes(Axis(3)))
        .par_for_each(|d, a, b| *d = a.dot(&b));
    let mut io = Traffic::default();
    io.read_f32(2 * out.len());
    io.write_f32(d.len());
    traffic.add(io);
    d
}

/// The bytes one backward tile of `rows` × `cols` reads.
fn tile_io(sh: &Shape, rows: usize, cols: usize, head: &Head<'_>) -> Traffic {
    let mut io = Traffic::default();
    io.read_f32(rows * (2 * sh.head_dim + 2) + 2 * cols * sh.head_dim);
    io.read_bytes(rows * cols * head.score_mod_bytes());
    io
}

// ANCHOR: backward_tile
/// One worker's tiles for the backward: P_ij, dS_ij, and tanh(S_ij / c) with a softcap.
struct TileBufs {
    p: Array2<f32>,
    ds: Array2<f32>,
    tanh: Option<Array2<f32>>,
}

impl TileBufs {
    fn new((b_r, b_c): (usize, usize), softcap: bool) -> Self {
        let tile = || Array2::<f32>::zeros((b_r, b_c));
        Self { p: tile(), ds: tile(), tanh: softcap.then(tile) }
    }
}

/// The recomputation at the heart of Algorithm 2 (lines 11–14) for query rows `i0..` and key
/// block `j0..` (`cols` keys): P_ij = exp(S_ij − L_i), dP_ij = (dO_i V_jᵀ) ∘ Z_ij,
/// dS_ij = P_ij ∘ (dP_ij − D_i), added to dBias when `dbias` is given, then times the
/// softcap's slope. Returns P_ij ∘ Z_ij (for dV) and dS_ij.
fn recompute_tile<'t>(
    head: &Head<'_>,
    scale: f32,
    (i0, j0, cols): (usize, usize, usize),
    rows: &QueryRows<'_>,
    bufs: &'t mut TileBufs,
    dbias: Option<&BiasGrad>,
) -> (ArrayViewMut2<'t, f32>, ArrayViewMut2<'t, f32>) {
    let n = rows.q.nrows();
    let mut p = bufs.p.slice_mut(s![..n, ..cols]);
    let mut ds = bufs.ds.slice_mut(s![..n, ..cols]);
    let mut tanh = bufs.tanh.as_mut().map(|t| t.slice_mut(s![..n, ..cols]));
    let (k_j, v_j) = (head.k.slice(s![j0..j0 + cols, ..]), head.v.slice(s![j0..j0 + cols, ..]));
    matmul(scale, &rows.q, &k_j.t(), 0.0, &mut p);
    if head.tile_needs_mods((i0, n), (j0, cols)) {
        head.modify_scores(i0, j0, p.view_mut(), tanh.as_mut().map(|t| t.view_mut()));
    }
    probs_from_lse(p.view_mut(), rows.lse);
    matmul(1.0, &rows.d_o, &v_j.t(), 0.0, &mut ds);
    head.apply_dropout(i0, j0, ds.view_mut());
    ds_from_dp(ds.view_mut(), p.view(), rows.d);
    if let Some(db) = dbias {
        db.add(head.b, head.h, i0, j0, ds.view());
    }
    if let Some(t) = &tanh {
        head.softcap_grad(ds.view_mut(), t.view());
    }
    head.apply_dropout(i0, j0, p.view_mut());
    (p, ds)
}
// ANCHOR_END: backward_tile

// ANCHOR: backward
/// Algorithm 2's loops as written for one (batch, key/value head): K/V blocks outside, the
/// query blocks of every query head of its group inside, dQ of those heads added in place —
/// five tile products per tile, no race, a fixed order.
fn kv_head_backward(
    p: &Problem<'_>,
    src: &RowSource<'_>,
    (b_r, b_c): (usize, usize),
    dbias: Option<&BiasGrad>,
    mut g: KvHeadGrads<'_>,
    bufs: &mut TileBufs,
) -> Traffic {
    let (sh, b) = (p.shape, g.b);
    let mut io = Traffic::default();
    for j0 in (0..sh.n_k).step_by(b_c) {
        let cols = b_c.min(sh.n_k - j0);
        let mut dk_j = g.dk.slice_mut(s![j0..j0 + cols, ..]);
        let mut dv_j = g.dv.slice_mut(s![j0..j0 + cols, ..]);
        for gi in 0..sh.group() {
            let h = g.kv_h * sh.group() + gi;
            let head = p.head(b, h);
            for i0 in (0..sh.n_q).step_by(b_r) {
                let n = b_r.min(sh.n_q - i0);
                if head.tile_hidden((i0, n), (j0, cols)) {
                    continue;
                }
                let rows = src.rows(b, h, i0, n);
                let (pm, ds) = recompute_tile(&head, p.scale, (i0, j0, cols), &rows, bufs, dbias);
                // line 12: dV_j += (P_ij ∘ Z_ij)ᵀ dO_i; line 15: dQ_i += τ dS_ij K_j;
                // line 16: dK_j += τ dS_ijᵀ Q_i
                matmul(1.0, &pm.t(), &rows.d_o, 1.0, &mut dv_j);
                let k_j = head.k.slice(s![j0..j0 + cols, ..]);
                matmul(p.scale, &ds.view(), &k_j, 1.0, &mut g.dq.slice_mut(s![gi, i0..i0 + n, ..]));
                matmul(p.scale, &ds.t(), &rows.q, 1.0, &mut dk_j);
                io += tile_io(&sh, n, cols, &head);
                io.read_f32(n * sh.head_dim);
                io.write_f32(n * sh.head_dim); // dQ_i in and out
            }
        }
        io.write_f32(2 * cols * sh.head_dim);
    }
    io
}

/// Backward, Algorithm 2. D = rowsum(dO ∘ O) first. The paper's K/V blocks run in parallel
/// and add into dQ with atomics; a CPU has no cheap float atomics, and per-thread copies of
/// dQ would make the order of the sums (and so the bits) depend on scheduling. So:
///
/// - with at least two (batch, key/value head) pairs per thread, one task per pair runs the
///   paper's loops and owns the dQ of its query heads;
/// - otherwise, the K/V pass — one task per (batch, key/value head, key block), dK_j and dV_j
///   accumulated over every query block of every query head that reads them — and a dQ pass
///   — one task per (batch, head, query block) — each recompute S and dP: two more tile
///   products per tile, bought for parallelism at batch 1 with one key/value head.
///
/// Either way every result is bitwise reproducible run to run.
pub fn backward(
    inputs: &Inputs<'_>,
    opts: &Options,
    fwd: &Forward,
    d_out: ArrayView4<'_, f32>,
) -> Result<Grads> {
    let p = Problem::for_backward(inputs, opts, fwd, d_out)?;
    let sh = p.shape;
    let (b_r, b_c) = block_sizes(&sh, opts);
    let traffic = TrafficCounter::default();

    // line 4: D = rowsum(dO ∘ O)
    let d = row_dots(d_out, fwd.out.view(), &traffic);
    let src = RowSource { q: p.q, d_out, lse: fwd.lse.view(), d: d.view() };
    let scratch = || TileBufs::new((b_r, b_c), p.softcap.is_some());
    let dbias = BiasGrad::new(&p, NAME, (b_r, b_c))?;

    let mut dq = zeros_written(sh.q_dims());
    let mut dk = zeros_written(sh.kv_dims());
    let mut dv = zeros_written(sh.kv_dims());

    if sh.batch * sh.kv_heads >= 2 * rayon::current_num_threads() {
        // Enough (batch, key/value head) pairs to keep every thread busy: one task per pair,
        // owning the dQ of its query heads.
        let tasks = kv_head_grads(dq.view_mut(), dk.view_mut(), dv.view_mut());
        tasks.into_par_iter().for_each_init(scratch, |bufs, g| {
            traffic.add(kv_head_backward(&p, &src, (b_r, b_c), dbias.as_ref(), g, bufs));
        });
        let dbias = dbias.map(BiasGrad::finish);
        return Ok(Grads { dq, dk, dv, dbias, traffic: Some(traffic.get()) });
    }

    // Few (batch, key/value head) pairs: parallelise over key blocks for dK, dV ...
    let tasks: Vec<_> =
        row_blocks(dk.view_mut(), b_c).into_iter().zip(row_blocks(dv.view_mut(), b_c)).collect();
    tasks.into_par_iter().for_each_init(scratch, |bufs, (mut dk_j, mut dv_j)| {
        let (j0, cols) = (dk_j.start, dk_j.view.nrows());
        let mut io = Traffic::default();
        for h in dk_j.h * sh.group()..(dk_j.h + 1) * sh.group() {
            let head = p.head(dk_j.b, h);
            for i0 in (0..sh.n_q).step_by(b_r) {
                let n = b_r.min(sh.n_q - i0);
                if head.tile_hidden((i0, n), (j0, cols)) {
                    continue;
                }
                let rows = src.rows(dk_j.b, h, i0, n);
                // dBias from this pass only: each tile adds to it once
                let (pm, ds) =
                    recompute_tile(&head, p.scale, (i0, j0, cols), &rows, bufs, dbias.as_ref());
                // line 12: dV_j += (P_ij ∘ Z_ij)ᵀ dO_i; line 16: dK_j += τ dS_ijᵀ Q_i
                matmul(1.0, &pm.t(), &rows.d_o, 1.0, &mut dv_j.view);
                matmul(p.scale, &ds.t(), &rows.q, 1.0, &mut dk_j.view);
                io += tile_io(&sh, n, cols, &head);
            }
        }
        io.write_f32(2 * cols * sh.head_dim);
        traffic.add(io);
    });

    // ... and over query blocks for dQ, in a pass of its own: dQ_i = τ Σ_j dS_ij K_j
    row_blocks(dq.view_mut(), b_r).into_par_iter().for_each_init(scratch, |bufs, mut dq_i| {
        let head = p.head(dq_i.b, dq_i.h);
        let (i0, n) = (dq_i.start, dq_i.view.nrows());
        let rows = src.rows(dq_i.b, dq_i.h, i0, n);
        let kv_end = head.key_end(i0 + n - 1);
        let mut io = Traffic::default();
        for j0 in head.key_blocks(i0, n, b_c) {
            let cols = b_c.min(kv_end - j0);
            let (_, ds) = recompute_tile(&head, p.scale, (i0, j0, cols), &rows, bufs, None);
            matmul(p.scale, &ds.view(), &head.k.slice(s![j0..j0 + cols, ..]), 1.0, &mut dq_i.view);
            io += tile_io(&sh, n, cols, &head);
        }
        io.write_f32(n * sh.head_dim);
        traffic.add(io);
    });
    Ok(Grads { dq, dk, dv, dbias: dbias.map(BiasGrad::finish), traffic: Some(traffic.get()) })
}
// ANCHOR_END: backward
