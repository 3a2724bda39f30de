//! Stage 2 on the CPU: Rabe & Staats, "Self-attention Does Not Need O(n²) Memory" (2021),
//! Figure 1, with the backward by checkpointing (recomputing each chunk's scores).

use attn_core::blocks::row_blocks;
use attn_core::memory::zeros_written;
use attn_core::simd::{ds_from_dp, probs_from_lse};
use attn_core::simd::{matmul, tile_summaries};
use attn_core::trace::{self, State, Trace, Tracer};
use attn_core::{
    BiasGrad, Forward, Grads, Head, Inputs, Options, Problem, Result, Shape, Traffic,
    TrafficCounter,
};
use ndarray::{
    Array1, Array2, Array3, Array4, ArrayView1, ArrayView2, ArrayViewMut1, ArrayViewMut2, Axis,
    Zip, s,
};
use rayon::prelude::*;

/// The name the CLI and the errors use.
pub const NAME: &str = "chunked";
/// Query rows per chunk unless `q_block` says otherwise (the seed's `q_bucket_size`).
pub const DEFAULT_Q_CHUNK: usize = 1024;
/// Key/value rows per chunk unless `k_block` says otherwise (the seed's `k_bucket_size`).
pub const DEFAULT_K_CHUNK: usize = 2048;

/// The chunk sizes a problem runs with, clipped to the sequence lengths.
pub fn chunk_sizes(shape: &Shape, opts: &Options) -> (usize, usize) {
    opts.block_sizes(shape, (DEFAULT_Q_CHUNK, DEFAULT_K_CHUNK))
}

// ANCHOR: summarize
/// What one key chunk K_j, V_j tells a query chunk Q_i (the paper's `summarize_chunk`):
/// per query row, the chunk's score max m_ij, its exp-sum ℓ_ij = Σ exp(S − m_ij) and the
/// exp-weighted values Σ exp(S − m_ij) Z v.
struct Summary {
    values: Array2<f32>,
    exp_sum: Array1<f32>,
    max: Array1<f32>,
}

fn summarize_chunk(
    head: &Head<'_>,
    scale: f32,
    i0: usize,
    j0: usize,
    q_i: ArrayView2<'_, f32>,
    mut s: ArrayViewMut2<'_, f32>,
) -> Summary {
    let (k_j, v_j) =
        (head.k.slice(s![j0..j0 + s.ncols(), ..]), head.v.slice(s![j0..j0 + s.ncols(), ..]));
    // S_ij = scale · Q_i K_jᵀ with its modifiers (softcap, bias, ALiBi), removed positions −∞
    matmul(scale, &q_i, &k_j.t(), 0.0, &mut s);
    head.modify_scores(i0, j0, s.view_mut(), None);
    // m_ij = rowmax(S_ij); exp(S_ij − m_ij) and ℓ_ij = its row sums (before dropout: ℓ
    // normalises); a row with nothing visible here stays 0
    let (mut max, mut exp_sum) = (Array1::zeros(s.nrows()), Array1::zeros(s.nrows()));
    tile_summaries(s.view_mut(), max.view_mut(), exp_sum.view_mut());
    head.apply_dropout(i0, j0, s.view_mut());
    let mut values = Array2::zeros((s.nrows(), v_j.ncols()));
    matmul(1.0, &s.view(), &v_j, 0.0, &mut values.view_mut());
    Summary { values, exp_sum, max }
}
// ANCHOR_END: summarize

// ANCHOR: merge
/// Merges the summaries of every key chunk of a query chunk: with the global max
/// m_i = max_j m_ij, each chunk is rescaled by exp(m_ij − m_i), then
/// O_i = Σ_j values_ij exp(m_ij − m_i) / Σ_j ℓ_ij exp(m_ij − m_i), lse_i = m_i + log(denominator).
fn merge(
    summaries: &[Summary],
    mut out: ArrayViewMut2<'_, f32>,
    mut lse: ArrayViewMut1<'_, f32>,
) -> (Array1<f32>, Array1<f32>) {
    let mut global_max = Array1::from_elem(out.nrows(), f32::NEG_INFINITY);
    for c in summaries {
        Zip::from(&mut global_max).and(&c.max).for_each(|g, &m| *g = g.max(m));
    }
    let mut denominator = Array1::<f32>::zeros(out.nrows());
    out.fill(0.0);
    for c in summaries {
        Zip::from(out.rows_mut())
            .and(c.values.rows())
            .and(&mut denominator)
            .and(&c.exp_sum)
            .and(&c.max)
            .and(&global_max)
            .for_each(|mut o, values, den, &exp_sum, &m, &g| {
                // exp(m_ij − m_i): 0 for a chunk that saw nothing of this row
                let factor = if m == f32::NEG_INFINITY { 0.0 } else { (m - g).exp() };
                *den += factor * exp_sum;
                o.scaled_add(factor, &values);
            });
    }
    // ANCHOR: finish
    Zip::from(out.rows_mut()).and(&mut lse).and(&global_max).and(&denominator).for_each(
        |mut o, lse, &m, &den| {
            if m == f32::NEG_INFINITY {
                *lse = f32::NEG_INFINITY; // every key removed: O_i stays 0
            } else {
                o /= den;
                *lse = m + den.ln();
            }
        },
    );
    // ANCHOR_END: finish
    (global_max, denominator)
}
// ANCHOR_END: merge

// ANCHOR: forward
/// Forward: one rayon task per (batch, head, query chunk); inside it, a summary per key
/// chunk that causal masking and the window do not hide entirely, then the merge.
pub fn forward(inputs: &Inputs<'_>, opts: &Options) -> Result<Forward> {
    forward_with(inputs, opts, None)
}

fn forward_with(inputs: &Inputs<'_>, opts: &Options, trace: Option<&Tracer>) -> Result<Forward> {
    let p = Problem::new(inputs, opts)?;
    let sh = p.shape;
    let (q_chunk, k_chunk) = chunk_sizes(&sh, opts);
    let mut out = Array4::<f32>::zeros(sh.q_dims());
    let mut lse = Array3::<f32>::zeros(sh.lse_dims());
    let tasks: Vec<_> = row_blocks(out.view_mut(), q_chunk)
        .into_iter()
        .zip(row_blocks(lse.view_mut(), q_chunk))
        .collect();
    let traffic = TrafficCounter::default();
    tasks.into_par_iter().for_each(|(mut o, l)| {
        let head = p.head(o.b, o.h);
        let (i0, rows) = (o.start, o.view.nrows());
        let q_i = head.q.slice(s![i0..i0 + rows, ..]);
        let mut summaries = Vec::new();
        let mut io = Traffic::default();
        io.read_f32(rows * sh.head_dim); // Q_i
        let mut s = Array2::<f32>::zeros((rows, k_chunk));
        // only the key chunks some row of Q_i sees (causal masking and the window)
        for j0 in head.key_blocks(i0, rows, k_chunk) {
            let cols = k_chunk.min(sh.n_k - j0);
            let c = summarize_chunk(&head, p.scale, i0, j0, q_i, s.slice_mut(s![.., ..cols]));
            if let Some(t) = trace {
                t.record_tile(
                    &head,
                    (i0, j0),
                    ((i0, rows), (j0, cols)),
                    State { m: c.max.view(), ell: c.exp_sum.view(), acc: c.values.view() },
                );
            }
            summaries.push(c);
            // K_j, V_j and the chunk's mask/bias in; its summary out (and back in to merge)
            io.read_f32(2 * cols * sh.head_dim);
            io.read_bytes(rows * cols * head.score_mod_bytes());
            io.write_f32(rows * (sh.head_dim + 2));
            io.read_f32(rows * (sh.head_dim + 2));
        }
        let (m, ell) = merge(&summaries, o.view.view_mut(), l.view);
        if let Some(t) = trace {
            t.record_finish(
                &head,
                (i0, rows),
                State { m: m.view(), ell: ell.view(), acc: o.view.view() },
            );
        }
        io.write_f32(rows * (sh.head_dim + 1)); // O_i, lse_i
        traffic.add(io);
    });
    Ok(Forward { out, lse, traffic: Some(traffic.get()) })
}
// ANCHOR_END: forward

/// [`forward`], recording every key chunk's summary and every merge (for small problems:
/// the book's pictures and worked example). The numbers are those of [`forward`], bit for bit.
pub fn forward_traced(inputs: &Inputs<'_>, opts: &Options) -> Result<(Forward, Trace)> {
    trace::traced(inputs, opts, chunk_sizes, |t| forward_with(inputs, opts, Some(t)))
}

// ANCHOR: recompute
/// The checkpointed step of the backward for query chunk i and key chunk j: recompute
/// P_ij = exp(S_ij − lse_i) from the saved log-sum-exp, then dP_ij = (dO_i V_jᵀ) ∘ Z and
/// dS_ij = P_ij ∘ (dP_ij − D_i) into `ds` — added to dBias when `dbias` is given, then times
/// the softcap's slope (`tanh`, the chunk's shape, with a softcap); `p` is left holding
/// P_ij ∘ Z for dV.
fn recompute_chunk(
    head: &Head<'_>,
    scale: f32,
    (i0, j0): (usize, usize),
    (lse_i, d_i, d_o_i): (ArrayView1<'_, f32>, ArrayView1<'_, f32>, ArrayView2<'_, f32>),
    (mut p, mut ds): (ArrayViewMut2<'_, f32>, ArrayViewMut2<'_, f32>),
    mut tanh: Option<ArrayViewMut2<'_, f32>>,
    dbias: Option<&BiasGrad>,
) {
    let (rows, cols) = p.dim();
    let q_i = head.q.slice(s![i0..i0 + rows, ..]);
    let (k_j, v_j) = (head.k.slice(s![j0..j0 + cols, ..]), head.v.slice(s![j0..j0 + cols, ..]));
    matmul(scale, &q_i, &k_j.t(), 0.0, &mut p);
    head.modify_scores(i0, j0, p.view_mut(), tanh.as_mut().map(|t| t.view_mut()));
    probs_from_lse(p.view_mut(), lse_i);
    matmul(1.0, &d_o_i, &v_j.t(), 0.0, &mut ds);
    head.apply_dropout(i0, j0, ds.view_mut());
    ds_from_dp(ds.view_mut(), p.view(), d_i);
    if let Some(db) = dbias {
        db.add(head.b, head.h, i0, j0, ds.view());
    }
    if let Some(t) = &tanh {
        head.softcap_grad(ds.view_mut(), t.view());
    }
    head.apply_dropout(i0, j0, p.view_mut());
}
// ANCHOR_END: recompute

// ANCHOR: backward
/// Backward by checkpointing: only O and the log-sum-exp were kept, so every chunk's scores
/// are recomputed. Two passes keep the parallel tasks from writing the same gradient:
/// dQ over (batch, head, query chunk), then dK, dV over (batch, key/value head, key chunk).
pub fn backward(
    inputs: &Inputs<'_>,
    opts: &Options,
    fwd: &Forward,
    d_out: ndarray::ArrayView4<'_, f32>,
) -> Result<Grads> {
    let p = Problem::for_backward(inputs, opts, fwd, d_out)?;
    let sh = p.shape;
    let (q_chunk, k_chunk) = chunk_sizes(&sh, opts);
    // D_i = rowsum(dO_i ∘ O_i)
    let d =
        Zip::from(d_out.lanes(Axis(3))).and(fwd.out.lanes(Axis(3))).map_collect(|a, b| a.dot(&b));
    let saved = |b: usize, h: usize, i0: usize, rows: usize| {
        (
            fwd.lse.slice(s![b, h, i0..i0 + rows]),
            d.slice(s![b, h, i0..i0 + rows]),
            d_out.slice(s![b, h, i0..i0 + rows, ..]),
        )
    };

    let dbias = BiasGrad::new(&p, NAME, (q_chunk, k_chunk))?;
    let tanh_buf = |rows: usize, cols: usize| p.softcap.map(|_| Array2::zeros((rows, cols)));

    let traffic = TrafficCounter::default();
    let mut io = Traffic::default();
    io.read_f32(2 * sh.batch * sh.heads * sh.n_q * sh.head_dim); // dO, O
    io.write_f32(sh.batch * sh.heads * sh.n_q); // D
    traffic.add(io);

    // dQ_i = scale · Σ_j dS_ij K_j
    let mut dq = zeros_written(sh.q_dims());
    row_blocks(dq.view_mut(), q_chunk).into_par_iter().for_each(|mut dq_i| {
        let head = p.head(dq_i.b, dq_i.h);
        let (i0, rows) = (dq_i.start, dq_i.view.nrows());
        let (mut pm, mut ds) = (Array2::zeros((rows, k_chunk)), Array2::zeros((rows, k_chunk)));
        let mut tanh = tanh_buf(rows, k_chunk);
        let mut io = Traffic::default();
        io.read_f32(rows * (2 * sh.head_dim + 2)); // Q_i, dO_i, lse_i, D_i
        io.write_f32(rows * sh.head_dim); // dQ_i
        for j0 in head.key_blocks(i0, rows, k_chunk) {
            let cols = k_chunk.min(sh.n_k - j0);
            let (pm, mut ds) = (pm.slice_mut(s![.., ..cols]), ds.slice_mut(s![.., ..cols]));
            recompute_chunk(
                &head,
                p.scale,
                (i0, j0),
                saved(dq_i.b, dq_i.h, i0, rows),
                (pm, ds.view_mut()),
                tanh.as_mut().map(|t| t.slice_mut(s![.., ..cols])),
                None,
            );
            matmul(p.scale, &ds, &head.k.slice(s![j0..j0 + cols, ..]), 1.0, &mut dq_i.view);
            io.read_f32(2 * cols * sh.head_dim); // K_j, V_j
            io.read_bytes(rows * cols * head.score_mod_bytes());
        }
        traffic.add(io);
    });

    // dK_j = scale · Σ_i dS_ijᵀ Q_i,  dV_j = Σ_i (P_ij ∘ Z)ᵀ dO_i, over the query heads of the group
    let mut dk = zeros_written(sh.kv_dims());
    let mut dv = zeros_written(sh.kv_dims());
    let tasks: Vec<_> = row_blocks(dk.view_mut(), k_chunk)
        .into_iter()
        .zip(row_blocks(dv.view_mut(), k_chunk))
        .collect();
    tasks.into_par_iter().for_each(|(mut dk_j, mut dv_j)| {
        let (j0, cols) = (dk_j.start, dk_j.view.nrows());
        let (mut pm, mut ds) = (Array2::zeros((q_chunk, cols)), Array2::zeros((q_chunk, cols)));
        let mut tanh = tanh_buf(q_chunk, cols);
        let mut io = Traffic::default();
        io.read_f32(2 * cols * sh.head_dim); // K_j, V_j
        io.write_f32(2 * cols * sh.head_dim); // dK_j, dV_j
        for h in dk_j.h * sh.group()..(dk_j.h + 1) * sh.group() {
            let head = p.head(dk_j.b, h);
            for i0 in (0..sh.n_q).step_by(q_chunk) {
                let rows = q_chunk.min(sh.n_q - i0);
                if head.tile_hidden((i0, rows), (j0, cols)) {
                    continue;
                }
                let (mut pm, mut ds) = (pm.slice_mut(s![..rows, ..]), ds.slice_mut(s![..rows, ..]));
                let saved = saved(dk_j.b, h, i0, rows);
                // dBias from this pass only: each chunk pair adds to it once
                recompute_chunk(
                    &head,
                    p.scale,
                    (i0, j0),
                    saved,
                    (pm.view_mut(), ds.view_mut()),
                    tanh.as_mut().map(|t| t.slice_mut(s![..rows, ..])),
                    dbias.as_ref(),
                );
                matmul(1.0, &pm.t(), &saved.2, 1.0, &mut dv_j.view);
                matmul(p.scale, &ds.t(), &head.q.slice(s![i0..i0 + rows, ..]), 1.0, &mut dk_j.view);
                io.read_f32(rows * (2 * sh.head_dim + 2)); // Q_i, dO_i, lse_i, D_i
                io.read_bytes(rows * cols * head.score_mod_bytes());
            }
        }
        traffic.add(io);
    });
    Ok(Grads { dq, dk, dv, dbias: dbias.map(BiasGrad::finish), traffic: Some(traffic.get()) })
}
// ANCHOR_END: backward

/// An upper bound on the forward's heap above its inputs, from the chunk sizes: the output
/// and log-sum-exp, and per busy thread one score chunk `q_chunk × k_chunk`, the summaries
/// of every key chunk (`⌈n_k / k_chunk⌉ × q_chunk × (d + 2)`), the merge's global max and
/// denominator. (The `gemm` crate's packing buffers are its own scratch, sized by the host:
/// not counted, see attn_core::memory::library_scratch.)
pub fn forward_memory_bound(shape: &Shape, q_chunk: usize, k_chunk: usize, threads: usize) -> u64 {
    let (q, k, d) = (q_chunk.min(shape.n_q), k_chunk.min(shape.n_k), shape.head_dim);
    let outputs = (shape.batch * shape.heads * shape.n_q * (d + 1)) as u64;
    let per_task = q * k + shape.n_k.div_ceil(k) * q * (d + 2) + 2 * q;
    4 * (outputs + (threads * per_task) as u64)
}

/// An upper bound on the backward's heap above its inputs: the gradients, D, and per busy
/// thread two chunks (P and dS) of `q_chunk × k_chunk` (the products' scratch not counted).
pub fn backward_memory_bound(shape: &Shape, q_chunk: usize, k_chunk: usize, threads: usize) -> u64 {
    let (q, k, d) = (q_chunk.min(shape.n_q), k_chunk.min(shape.n_k), shape.head_dim);
    let grads = shape.batch * (shape.heads * shape.n_q + 2 * shape.kv_heads * shape.n_k) * d;
    let d_rows = shape.batch * shape.heads * shape.n_q;
    4 * (grads + d_rows + threads * 2 * q * k) as u64
}
