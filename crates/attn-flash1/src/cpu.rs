//! Stage 3 on the CPU: FlashAttention-1 (Dao et al., 2022). Forward: Algorithm 1, with
//! Algorithm 2's masking and dropout. Backward: Algorithm 4. Line numbers in the comments
//! are the papers' algorithm lines.

use attn_core::blocks::{kv_head_grads, row_blocks};
use attn_core::memory::zeros_written;
use attn_core::simd::{ds_from_dp, probs_from_lse};
use attn_core::simd::{matmul, tile_summaries};
use attn_core::trace::{self, State, Trace, Tracer};
use attn_core::{
    BiasGrad, Forward, Grads, Head, Inputs, Options, Problem, Result, Shape, Traffic,
    TrafficCounter,
};
use ndarray::{Array1, Array2, Array3, Array4, ArrayView4, ArrayViewMut1, ArrayViewMut2, Zip, s};
use rayon::prelude::*;

/// The name the CLI and the errors use.
pub const NAME: &str = "flash1";

/// The default SRAM budget M, in f32 elements: 64 Ki floats (256 KiB), the size of a
/// CPU core's L2 cache, where the A100 of the paper had 192 KiB of SRAM per SM.
pub const DEFAULT_SRAM: usize = 64 * 1024;

// ANCHOR: blocks
/// The block sizes (B_r, B_c) of Algorithm 1, line 1: B_c = ⌈M / 4d⌉, B_r = min(⌈M / 4d⌉, d),
/// so that Q_i, K_j, V_j and O_i fit in M together. `q_block` / `k_block` override them;
/// both are clipped to the sequence lengths.
pub fn block_sizes(shape: &Shape, opts: &Options) -> (usize, usize) {
    let m = opts.sram.unwrap_or(DEFAULT_SRAM);
    let b_c = m.div_ceil(4 * shape.head_dim);
    opts.block_sizes(shape, (b_c.min(shape.head_dim), b_c))
}
// ANCHOR_END: blocks

// ANCHOR: forward_head
/// Algorithm 1 for one (batch, head): `o` is O in "HBM", ℓ and m live beside it there, and
/// every tile is copied into "SRAM" buffers before it is used — the loads and stores that
/// [`Traffic`] counts.
fn forward_head(
    head: &Head<'_>,
    scale: f32,
    (b_r, b_c): (usize, usize),
    mut o: ArrayViewMut2<'_, f32>,
    mut lse: ArrayViewMut1<'_, f32>,
    trace: Option<&Tracer>,
) -> Traffic {
    let (n_q, n_k, d) = (head.n_q, head.n_k, head.q.ncols());
    let mut io = Traffic::default();
    // line 2: O = 0, ℓ = 0, m = −∞ in HBM
    o.fill(0.0);
    let mut ell = Array1::<f32>::zeros(n_q);
    let mut m = Array1::from_elem(n_q, f32::NEG_INFINITY);
    // SRAM: K_j, V_j, Q_i, O_i, ℓ_i, m_i, m̃_ij, ℓ̃_ij, the tile S_ij and P̃_ij V_j
    let (mut k_sram, mut v_sram) = (Array2::zeros((b_c, d)), Array2::zeros((b_c, d)));
    let (mut q_sram, mut o_sram) = (Array2::zeros((b_r, d)), Array2::zeros((b_r, d)));
    let (mut ell_sram, mut m_sram) = (Array1::zeros(b_r), Array1::zeros(b_r));
    let (mut ell_tilde_sram, mut m_tilde_sram) = (Array1::zeros(b_r), Array1::zeros(b_r));
    let (mut s_sram, mut pv_sram) = (Array2::zeros((b_r, b_c)), Array2::zeros((b_r, d)));

    for j0 in (0..n_k).step_by(b_c) {
        // line 5: for 1 ≤ j ≤ T_c — line 6: load K_j, V_j from HBM to SRAM
        let cols = b_c.min(n_k - j0);
        let (mut k_j, mut v_j) =
            (k_sram.slice_mut(s![..cols, ..]), v_sram.slice_mut(s![..cols, ..]));
        k_j.assign(&head.k.slice(s![j0..j0 + cols, ..]));
        v_j.assign(&head.v.slice(s![j0..j0 + cols, ..]));
        io.read_f32(2 * cols * d);

        for i0 in (0..n_q).step_by(b_r) {
            // line 7: for 1 ≤ i ≤ T_r (causal: skip tiles wholly above the diagonal)
            let rows = b_r.min(n_q - i0);
            if head.tile_hidden((i0, rows), (j0, cols)) {
                continue;
            }
            // line 8: load Q_i, O_i, ℓ_i, m_i from HBM to SRAM
            let mut q_i = q_sram.slice_mut(s![..rows, ..]);
            let mut o_i = o_sram.slice_mut(s![..rows, ..]);
            let (mut ell_i, mut m_i) =
                (ell_sram.slice_mut(s![..rows]), m_sram.slice_mut(s![..rows]));
            q_i.assign(&head.q.slice(s![i0..i0 + rows, ..]));
            o_i.assign(&o.slice(s![i0..i0 + rows, ..]));
            ell_i.assign(&ell.slice(s![i0..i0 + rows]));
            m_i.assign(&m.slice(s![i0..i0 + rows]));
            io.read_f32(2 * rows * d + 2 * rows);

            // line 9: S_ij = τ Q_i K_jᵀ, plus the score modifiers and masks (Algorithm 2)
            let mut s_ij = s_sram.slice_mut(s![..rows, ..cols]);
            matmul(scale, &q_i, &k_j.t(), 0.0, &mut s_ij);
            head.modify_scores(i0, j0, s_ij.view_mut(), None);
            io.read_bytes(rows * cols * head.score_mod_bytes());

            // line 10: m̃_ij = rowmax(S_ij), P̃_ij = exp(S_ij − m̃_ij), ℓ̃_ij = rowsum(P̃_ij)
            // (a row with nothing visible in this tile: zeros, ℓ̃ = 0)
            let mut m_tilde = m_tilde_sram.slice_mut(s![..rows]);
            let mut ell_tilde = ell_tilde_sram.slice_mut(s![..rows]);
            tile_summaries(s_ij.view_mut(), m_tilde.view_mut(), ell_tilde.view_mut());
            // Algorithm 2: dropout on P̃_ij (ℓ̃_ij, taken before, still normalises)
            head.apply_dropout(i0, j0, s_ij.view_mut());
            let mut pv = pv_sram.slice_mut(s![..rows, ..]);
            matmul(1.0, &s_ij, &v_j, 0.0, &mut pv);

            for r in 0..rows {
                // line 11: m_new = max(m_i, m̃_ij), ℓ_new = e^(m_i − m_new) ℓ_i + e^(m̃_ij − m_new) ℓ̃_ij
                let m_new = m_i[r].max(m_tilde[r]);
                if m_new == f32::NEG_INFINITY {
                    continue; // no key of this row visible yet: O_i, ℓ_i, m_i stay as they are
                }
                let (alpha, beta) = ((m_i[r] - m_new).exp(), (m_tilde[r] - m_new).exp());
                let ell_new = alpha * ell_i[r] + beta * ell_tilde[r];
                // line 12: O_i ← diag(ℓ_new)⁻¹ (diag(ℓ_i) e^(m_i − m_new) O_i + e^(m̃_ij − m_new) P̃_ij V_j)
                let old = ell_i[r] * alpha;
                for (o_x, &pv_x) in o_i.row_mut(r).iter_mut().zip(pv.row(r)) {
                    *o_x = (old * *o_x + beta * pv_x) / ell_new;
                }
                // line 13 (values): ℓ_i ← ℓ_new, m_i ← m_new
                ell_i[r] = ell_new;
                m_i[r] = m_new;
            }
            // line 13: write O_i, ℓ_i, m_i to HBM
            o.slice_mut(s![i0..i0 + rows, ..]).assign(&o_i);
            ell.slice_mut(s![i0..i0 + rows]).assign(&ell_i);
            m.slice_mut(s![i0..i0 + rows]).assign(&m_i);
            io.write_f32(rows * d + 2 * rows);
            if let Some(t) = trace {
                t.record_tile(
                    head,
                    (j0, i0),
                    ((i0, rows), (j0, cols)),
                    State { m: m_i.view(), ell: ell_i.view(), acc: o_i.view() },
                );
            }
        }
    }
    // The contract's log-sum-exp, m + log ℓ (−∞ where no key was visible), from ℓ and m.
    for ((l, &ell_r), &m_r) in lse.iter_mut().zip(&ell).zip(&m) {
        *l = if m_r == f32::NEG_INFINITY { f32::NEG_INFINITY } else { m_r + ell_r.ln() };
    }
    io.read_f32(2 * n_q);
    io.write_f32(n_q);
    io
}
// ANCHOR_END: forward_head

// ANCHOR: forward
/// Forward: as in the paper, one task per (batch, head) — the only parallelism
/// FlashAttention-1 has, since the outer loop over K/V blocks revisits every O_i.
pub fn forward(inputs: &Inputs<'_>, opts: &Options) -> Result<Forward> {
    forward_with(inputs, opts, None)
}

fn forward_with(inputs: &Inputs<'_>, opts: &Options, trace: Option<&Tracer>) -> Result<Forward> {
    let p = Problem::new(inputs, opts)?;
    let sh = p.shape;
    let blocks = block_sizes(&sh, opts);
    let mut out = Array4::<f32>::zeros(sh.q_dims());
    let mut lse = Array3::<f32>::zeros(sh.lse_dims());
    let heads: Vec<_> = row_blocks(out.view_mut(), sh.n_q)
        .into_iter()
        .zip(row_blocks(lse.view_mut(), sh.n_q))
        .collect();
    let traffic = TrafficCounter::default();
    heads.into_par_iter().for_each(|(o, l)| {
        traffic.add(forward_head(&p.head(o.b, o.h), p.scale, blocks, o.view, l.view, trace));
    });
    Ok(Forward { out, lse, traffic: Some(traffic.get()) })
}
// ANCHOR_END: forward

/// [`forward`], recording every step of Algorithm 1's loops (for small problems: the book's
/// pictures and worked example). The numbers are those of [`forward`], bit for bit.
pub fn forward_traced(inputs: &Inputs<'_>, opts: &Options) -> Result<(Forward, Trace)> {
    trace::traced(inputs, opts, block_sizes, |t| forward_with(inputs, opts, Some(t)))
}

// ANCHOR: backward_head
/// Algorithm 4 for one (batch, key/value head) and the query heads that share it (GQA): the
/// outer loop over K/V blocks keeps dK_j, dV_j in SRAM; dQ_i is read, updated and written
/// back to HBM at every step. P is recomputed from the saved log-sum-exp (the paper keeps ℓ
/// and m; P_ij = diag(ℓ_i)⁻¹ exp(S_ij − m_i) = exp(S_ij − lse_i)).
fn backward_kv_head(
    p: &Problem<'_>,
    (b, kv_h): (usize, usize),
    (b_r, b_c): (usize, usize),
    (fwd, d_out): (&Forward, ArrayView4<'_, f32>),
    mut dq: ndarray::ArrayViewMut3<'_, f32>,
    (mut dk, mut dv): (ArrayViewMut2<'_, f32>, ArrayViewMut2<'_, f32>),
    dbias: Option<&BiasGrad>,
) -> Traffic {
    let sh = p.shape;
    let (n_q, n_k, d) = (sh.n_q, sh.n_k, sh.head_dim);
    let mut io = Traffic::default();
    // SRAM buffers
    let (mut k_sram, mut v_sram) = (Array2::zeros((b_c, d)), Array2::zeros((b_c, d)));
    let (mut dk_sram, mut dv_sram) = (Array2::zeros((b_c, d)), Array2::zeros((b_c, d)));
    let mut tiles = [(); 4].map(|_| Array2::<f32>::zeros((b_r, d))); // Q_i, O_i, dO_i, dQ_i
    let (mut lse_sram, mut d_sram) = (Array1::<f32>::zeros(b_r), Array1::<f32>::zeros(b_r));
    let (mut p_sram, mut ds_sram) = (Array2::zeros((b_r, b_c)), Array2::zeros((b_r, b_c)));
    // tanh(S_ij / c), for the softcap's derivative
    let mut tanh_sram = p.softcap.map(|_| Array2::<f32>::zeros((b_r, b_c)));

    for j0 in (0..n_k).step_by(b_c) {
        // line 5: for 1 ≤ j ≤ T_c — line 6: load K_j, V_j; line 7: dK̃_j = dṼ_j = 0 in SRAM
        let cols = b_c.min(n_k - j0);
        let (mut k_j, mut v_j) =
            (k_sram.slice_mut(s![..cols, ..]), v_sram.slice_mut(s![..cols, ..]));
        k_j.assign(&p.k.slice(s![b, kv_h, j0..j0 + cols, ..]));
        v_j.assign(&p.v.slice(s![b, kv_h, j0..j0 + cols, ..]));
        io.read_f32(2 * cols * d);
        let (mut dk_j, mut dv_j) =
            (dk_sram.slice_mut(s![..cols, ..]), dv_sram.slice_mut(s![..cols, ..]));
        dk_j.fill(0.0);
        dv_j.fill(0.0);

        for g in 0..sh.group() {
            let h = kv_h * sh.group() + g;
            let head = p.head(b, h);
            for i0 in (0..n_q).step_by(b_r) {
                // line 8: for 1 ≤ i ≤ T_r (causal: skip tiles wholly above the diagonal)
                let rows = b_r.min(n_q - i0);
                if head.tile_hidden((i0, rows), (j0, cols)) {
                    continue;
                }
                // line 9: load Q_i, O_i, dO_i, dQ_i and the log-sum-exp of the rows
                let [q_s, o_s, do_s, dq_s] = &mut tiles;
                let (mut q_i, mut o_i) =
                    (q_s.slice_mut(s![..rows, ..]), o_s.slice_mut(s![..rows, ..]));
                let (mut do_i, mut dq_i) =
                    (do_s.slice_mut(s![..rows, ..]), dq_s.slice_mut(s![..rows, ..]));
                let mut lse_i = lse_sram.slice_mut(s![..rows]);
                q_i.assign(&head.q.slice(s![i0..i0 + rows, ..]));
                o_i.assign(&fwd.out.slice(s![b, h, i0..i0 + rows, ..]));
                do_i.assign(&d_out.slice(s![b, h, i0..i0 + rows, ..]));
                dq_i.assign(&dq.slice(s![g, i0..i0 + rows, ..]));
                lse_i.assign(&fwd.lse.slice(s![b, h, i0..i0 + rows]));
                io.read_f32(4 * rows * d + rows);

                // line 10: S_ij = τ Q_i K_jᵀ (+ modifiers, masks); line 13: P_ij = exp(S_ij − lse_i)
                let mut p_ij = p_sram.slice_mut(s![..rows, ..cols]);
                let mut tanh = tanh_sram.as_mut().map(|t| t.slice_mut(s![..rows, ..cols]));
                matmul(p.scale, &q_i, &k_j.t(), 0.0, &mut p_ij);
                head.modify_scores(i0, j0, p_ij.view_mut(), tanh.as_mut().map(|t| t.view_mut()));
                io.read_bytes(rows * cols * head.score_mod_bytes());
                probs_from_lse(p_ij.view_mut(), lse_i.view());
                // lines 17–18: dP_ij = (dO_i V_jᵀ) ∘ Z_ij
                let mut ds_ij = ds_sram.slice_mut(s![..rows, ..cols]);
                matmul(1.0, &do_i, &v_j.t(), 0.0, &mut ds_ij);
                head.apply_dropout(i0, j0, ds_ij.view_mut());
                // lines 19–20: D_i = rowsum(dO_i ∘ O_i), dS_ij = P_ij ∘ (dP_ij − D_i)
                let mut d_i = d_sram.slice_mut(s![..rows]);
                Zip::from(&mut d_i)
                    .and(do_i.rows())
                    .and(o_i.rows())
                    .for_each(|d, do_r, o_r| *d = do_r.dot(&o_r));
                ds_from_dp(ds_ij.view_mut(), p_ij.view(), d_i.view());
                // dBias_ij = dS_ij (summed over its broadcast axes); then the softcap's slope
                if let Some(db) = dbias {
                    db.add(b, h, i0, j0, ds_ij.view());
                }
                if let Some(t) = &tanh {
                    head.softcap_grad(ds_ij.view_mut(), t.view());
                }
                // line 21: dQ_i ← dQ_i + τ dS_ij K_j, written to HBM
                matmul(p.scale, &ds_ij, &k_j, 1.0, &mut dq_i);
                dq.slice_mut(s![g, i0..i0 + rows, ..]).assign(&dq_i);
                io.write_f32(rows * d);
                // line 22: dK̃_j ← dK̃_j + τ dS_ijᵀ Q_i
                matmul(p.scale, &ds_ij.t(), &q_i, 1.0, &mut dk_j);
                // lines 14–16: dṼ_j ← dṼ_j + (P_ij ∘ Z_ij)ᵀ dO_i
                head.apply_dropout(i0, j0, p_ij.view_mut());
                matmul(1.0, &p_ij.t(), &do_i, 1.0, &mut dv_j);
            }
        }
        // line 24: write dK_j, dV_j to HBM
        dk.slice_mut(s![j0..j0 + cols, ..]).assign(&dk_j);
        dv.slice_mut(s![j0..j0 + cols, ..]).assign(&dv_j);
        io.write_f32(2 * cols * d);
    }
    io
}
// ANCHOR_END: backward_head

/// Backward: one task per (batch, key/value head), so that query heads sharing K/V (GQA)
/// add into their dK, dV in turn, never at once.
pub fn backward(
    inputs: &Inputs<'_>,
    opts: &Options,
    fwd: &Forward,
    d_out: ArrayView4<'_, f32>,
) -> Result<Grads> {
    let p = Problem::for_backward(inputs, opts, fwd, d_out)?;
    let sh = p.shape;
    let blocks = block_sizes(&sh, opts);
    let mut dq = zeros_written(sh.q_dims());
    let mut dk = zeros_written(sh.kv_dims());
    let mut dv = zeros_written(sh.kv_dims());
    let dbias = BiasGrad::new(&p, NAME, blocks)?;
    let tasks = kv_head_grads(dq.view_mut(), dk.view_mut(), dv.view_mut());
    let traffic = TrafficCounter::default();
    tasks.into_par_iter().for_each(|g| {
        let task = (g.b, g.kv_h);
        let (saved, grads) = ((fwd, d_out), (g.dk, g.dv));
        traffic.add(backward_kv_head(&p, task, blocks, saved, g.dq, grads, dbias.as_ref()));
    });
    Ok(Grads { dq, dk, dv, dbias: dbias.map(BiasGrad::finish), traffic: Some(traffic.get()) })
}

/// The forward traffic Algorithm 1 performs without causal masking, mask, bias: per
/// (batch, head), K and V once (2·n_k·d), then for each of the T_c key blocks the loads of
/// Q_i, O_i, ℓ_i, m_i and the stores of O_i, ℓ_i, m_i (3·n_q·d + 4·n_q), and finally ℓ, m
/// in and the log-sum-exp out (3·n_q). In bytes; the paper's Θ(N²d²/M) is the middle term.
pub fn forward_traffic_model(shape: &Shape, (b_r, b_c): (usize, usize)) -> u64 {
    let (n_q, n_k, d) = (shape.n_q as u64, shape.n_k as u64, shape.head_dim as u64);
    let t_c = shape.n_k.div_ceil(b_c) as u64;
    let _ = b_r; // every row block is loaded once per key block, whatever its size
    let per_head = 2 * n_k * d + t_c * (3 * n_q * d + 4 * n_q) + 3 * n_q;
    4 * (shape.batch * shape.heads) as u64 * per_head
}
