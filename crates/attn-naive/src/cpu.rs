//! Stage 1 on the CPU: the textbook algorithm, one full score matrix per head.

use attn_core::simd::{ds_from_dp, probs_from_lse};
use attn_core::{BiasGrad, Forward, Grads, Head, Inputs, Options, Problem, Result, Shape, Traffic};
use ndarray::linalg::general_mat_mul;
use ndarray::{Array3, Array4, ArrayView4, ArrayViewMut1, Axis, Zip};

/// The name the CLI and the errors use.
pub const NAME: &str = "naive";

pub(crate) const ADVICE: &str = "use a tiled stage (chunked, flash1 or flash2), whose memory grows as O(n), \
                      or raise the limit (--memory-limit, ATTN_MEMORY_LIMIT)";

/// The forward's workspace: S, then P in its place, for every (batch, head): `4·b·h·n_q·n_k` bytes.
pub fn forward_workspace_bytes(shape: &Shape) -> u64 {
    4 * shape.score_elems()
}

/// The backward's workspace: P and dP (then dS in its place) for every (batch, head).
pub fn backward_workspace_bytes(shape: &Shape) -> u64 {
    2 * 4 * shape.score_elems()
}

/// The passes that make S, in the forward and again in the backward: S = QKᵀ (read Q, K;
/// write S), then the bias/mask pass if any (read S and the mask/bias; write S).
fn scores_traffic(head: &Head<'_>, head_dim: usize) -> Traffic {
    let (n_q, n_k, d) = (head.n_q, head.n_k, head_dim);
    let nn = n_q * n_k;
    let mut t = Traffic::default();
    t.read_f32(n_q * d + n_k * d);
    t.write_f32(nn);
    if head.score_mod_bytes() > 0 {
        t.read_f32(nn);
        t.read_bytes(nn * head.score_mod_bytes());
        t.write_f32(nn);
    }
    t
}

/// The forward's traffic for one head, pass by pass, as the paper's standard attention
/// (its Algorithm 0) moves whole matrices between passes: S = QKᵀ (read Q, K; write S), the
/// bias/mask pass if any (read S and the mask/bias; write S), the softmax (read S; write P
/// and the log-sum-exp), dropout if any (read P; write P), O = PV (read P, V; write O).
pub fn forward_traffic(head: &Head<'_>, head_dim: usize) -> Traffic {
    let (n_q, n_k, d) = (head.n_q, head.n_k, head_dim);
    let nn = n_q * n_k;
    let mut t = scores_traffic(head, head_dim);
    t.read_f32(nn);
    t.write_f32(nn + n_q);
    if head.has_dropout() {
        t.read_f32(nn);
        t.write_f32(nn);
    }
    t.read_f32(nn + n_k * d);
    t.write_f32(n_q * d);
    t
}

/// The backward's traffic for one query head: recompute S (and the bias/mask pass), P from
/// S and the log-sum-exp, dP = dO Vᵀ (and its dropout pass), D from dO and O, dS from P, dP
/// and D, then dQ = dS K, dK += dSᵀ Q, the dropout pass on P, dV += Pᵀ dO (dK and dV are read
/// and written as they accumulate over the query heads of a group).
pub fn backward_traffic(head: &Head<'_>, head_dim: usize) -> Traffic {
    let (n_q, n_k, d) = (head.n_q, head.n_k, head_dim);
    let nn = n_q * n_k;
    let mut t = scores_traffic(head, head_dim);
    t.read_f32(nn + n_q);
    t.write_f32(nn);
    t.read_f32(n_q * d + n_k * d);
    t.write_f32(nn);
    let dropout_passes = 2 * head.has_dropout() as usize;
    t.read_f32(dropout_passes * nn);
    t.write_f32(dropout_passes * nn);
    t.read_f32(2 * n_q * d);
    t.write_f32(n_q);
    t.read_f32(2 * nn + n_q);
    t.write_f32(nn);
    t.read_f32(nn + n_k * d);
    t.write_f32(n_q * d);
    t.read_f32(nn + n_q * d + n_k * d);
    t.write_f32(n_k * d);
    t.read_f32(nn + n_q * d + n_k * d);
    t.write_f32(n_k * d);
    t
}

// ANCHOR: softmax
/// Turns one row of scores into softmax weights in place and returns its log-sum-exp.
/// Subtracting the row max first keeps every `exp` ≤ 1, so logits of ±10⁴ cannot overflow.
fn softmax_row(mut s: ArrayViewMut1<'_, f32>) -> f32 {
    let row_max = s.fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    if row_max == f32::NEG_INFINITY {
        s.fill(0.0); // every key removed: weights 0, log-sum-exp −∞
        return f32::NEG_INFINITY;
    }
    s.mapv_inplace(|x| (x - row_max).exp());
    let row_sum = s.sum();
    s /= row_sum;
    row_max + row_sum.ln()
}
// ANCHOR_END: softmax

// ANCHOR: forward
/// O = softmax(scale·QKᵀ + bias, masked) · V, materialising S and P for every head at once.
pub fn forward(inputs: &Inputs<'_>, opts: &Options) -> Result<Forward> {
    let p = Problem::new(inputs, opts)?;
    let sh = p.shape;
    p.check_workspace(NAME, "score matrices S/P", forward_workspace_bytes(&sh), ADVICE)?;

    // The O(n²) tensor this stage is about: [b·h, n_q, n_k], S first, then P in its place.
    let mut probs = Array3::<f32>::zeros((sh.batch * sh.heads, sh.n_q, sh.n_k));
    let mut out = Array3::<f32>::zeros((sh.batch * sh.heads, sh.n_q, sh.head_dim));
    let mut lse = ndarray::Array2::<f32>::zeros((sh.batch * sh.heads, sh.n_q));

    // One task per (batch, head).
    Zip::indexed(probs.outer_iter_mut())
        .and(out.outer_iter_mut())
        .and(lse.outer_iter_mut())
        .par_for_each(|bh, mut s, mut o, mut lse| {
            let head = p.head(bh / sh.heads, bh % sh.heads);
            // S = scale · Q Kᵀ, then softcap, bias, ALiBi; removed positions −∞
            general_mat_mul(p.scale, &head.q, &head.k.t(), 0.0, &mut s);
            head.modify_scores(0, 0, s.view_mut(), None);
            // P = softmax(S), row by row; keep each row's log-sum-exp
            for (row, lse_i) in s.rows_mut().into_iter().zip(lse.iter_mut()) {
                *lse_i = softmax_row(row);
            }
            // P ∘ Z: dropout on the weights
            head.apply_dropout(0, 0, s.view_mut());
            // O = P V
            general_mat_mul(1.0, &s, &head.v, 0.0, &mut o);
        });

    let traffic = (0..sh.batch * sh.heads)
        .map(|bh| forward_traffic(&p.head(bh / sh.heads, bh % sh.heads), sh.head_dim))
        .sum();
    Ok(Forward {
        traffic: Some(traffic),
        out: out.into_shape_with_order(sh.q_dims()).expect("standard layout"),
        lse: lse.into_shape_with_order(sh.lse_dims()).expect("standard layout"),
    })
}
// ANCHOR_END: forward

// ANCHOR: backward
/// dQ, dK, dV from P, recomputed from the saved log-sum-exp as P = exp(S − lse):
/// dV = (P∘Z)ᵀ dO, dP = (dO Vᵀ) ∘ Z, dS = P ∘ (dP − D) with D = rowsum(dO ∘ O),
/// dBias = dS (summed over the bias's broadcast axes), dS ∘= the softcap's slope,
/// dQ = scale · dS K, dK = scale · dSᵀ Q.
pub fn backward(
    inputs: &Inputs<'_>,
    opts: &Options,
    fwd: &Forward,
    d_out: ArrayView4<'_, f32>,
) -> Result<Grads> {
    let p = Problem::for_backward(inputs, opts, fwd, d_out)?;
    let sh = p.shape;
    let (g, tasks) = (sh.group(), sh.batch * sh.kv_heads);
    // with a softcap, each running task also keeps tanh(S / c) of one head
    let tanh_bytes = p
        .softcap
        .map_or(0, |_| (4 * sh.n_q * sh.n_k * tasks.min(rayon::current_num_threads())) as u64);
    let needed = backward_workspace_bytes(&sh) + tanh_bytes;
    p.check_workspace(NAME, "matrices P and dP", needed, ADVICE)?;

    let mut probs = Array4::<f32>::zeros((tasks, g, sh.n_q, sh.n_k));
    let mut dprobs = Array4::<f32>::zeros((tasks, g, sh.n_q, sh.n_k));
    let mut dq = Array4::<f32>::zeros((tasks, g, sh.n_q, sh.head_dim));
    let mut dk = Array3::<f32>::zeros((tasks, sh.n_k, sh.head_dim));
    let mut dv = Array3::<f32>::zeros((tasks, sh.n_k, sh.head_dim));
    let dbias = BiasGrad::new(&p, NAME, (sh.n_q, sh.n_k))?;

    // One task per (batch, key/value head): it owns dK_j, dV_j and the dQ of its query heads.
    Zip::indexed(probs.outer_iter_mut())
        .and(dprobs.outer_iter_mut())
        .and(dq.outer_iter_mut())
        .and(dk.outer_iter_mut())
        .and(dv.outer_iter_mut())
        .par_for_each(|task, mut probs, mut dprobs, mut dq, mut dk, mut dv| {
            let b = task / sh.kv_heads;
            // tanh(S / c), for the softcap's derivative
            let mut tanh = p.softcap.map(|_| ndarray::Array2::<f32>::zeros((sh.n_q, sh.n_k)));
            for gi in 0..g {
                let h = task % sh.kv_heads * g + gi;
                let head = p.head(b, h);
                let (mut pm, mut dpm) =
                    (probs.index_axis_mut(Axis(0), gi), dprobs.index_axis_mut(Axis(0), gi));
                let (o, d_o) = (
                    fwd.out.slice(ndarray::s![b, h, .., ..]),
                    d_out.slice(ndarray::s![b, h, .., ..]),
                );
                // P = exp(S − lse), S with its modifiers as in the forward; removed positions 0
                general_mat_mul(p.scale, &head.q, &head.k.t(), 0.0, &mut pm);
                head.modify_scores(0, 0, pm.view_mut(), tanh.as_mut().map(|t| t.view_mut()));
                probs_from_lse(pm.view_mut(), fwd.lse.slice(ndarray::s![b, h, ..]));
                // dP = (dO Vᵀ) ∘ Z
                general_mat_mul(1.0, &d_o, &head.v.t(), 0.0, &mut dpm);
                head.apply_dropout(0, 0, dpm.view_mut());
                // dS = P ∘ (dP − D), D_i = rowsum(dO_i ∘ O_i), written over dP
                let d = (&d_o * &o).sum_axis(Axis(1));
                ds_from_dp(dpm.view_mut(), pm.view(), d.view());
                if let Some(db) = &dbias {
                    db.add(b, h, 0, 0, dpm.view());
                }
                if let Some(t) = &tanh {
                    head.softcap_grad(dpm.view_mut(), t.view());
                }
                // dQ = scale · dS K;  dK += scale · dSᵀ Q;  dV += (P∘Z)ᵀ dO
                general_mat_mul(p.scale, &dpm, &head.k, 0.0, &mut dq.index_axis_mut(Axis(0), gi));
                general_mat_mul(p.scale, &dpm.t(), &head.q, 1.0, &mut dk);
                head.apply_dropout(0, 0, pm.view_mut());
                general_mat_mul(1.0, &pm.t(), &d_o, 1.0, &mut dv);
            }
        });

    let traffic = (0..sh.batch * sh.heads)
        .map(|bh| backward_traffic(&p.head(bh / sh.heads, bh % sh.heads), sh.head_dim))
        .sum();
    Ok(Grads {
        traffic: Some(traffic),
        dq: dq.into_shape_with_order(sh.q_dims()).expect("standard layout"),
        dk: dk.into_shape_with_order(sh.kv_dims()).expect("standard layout"),
        dv: dv.into_shape_with_order(sh.kv_dims()).expect("standard layout"),
        dbias: dbias.map(BiasGrad::finish),
    })
}
// ANCHOR_END: backward
