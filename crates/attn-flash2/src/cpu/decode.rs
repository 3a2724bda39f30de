//! Decoding from a KV cache on the CPU: FlashAttention-2's loop with the rows of a tile taken
//! from the whole GQA group.
//!
//! [`attn_core::varlen::forward_cached`] runs the stage on each batch row, and the stage's
//! loops run per *query* head: each of a group's heads reads its key/value head again, and a
//! query block of one row makes every tile product a matrix–vector product. Here one task
//! owns a key/value head g of batch row b (and one split of its keys): Q_g stacks the query
//! rows of every head of g's group, each K_j, V_j block is read once for all of them, and
//! S_ij = τ Q_g K_jᵀ is a product of `group × n_q` rows. The splits' (O_s, lse_s) are merged
//! by [`merge_partials`], as on the GPU.
//!
//! The values are checked as every stage checks them, in the same pass: the score kernel
//! takes each key's norm from the loads of its dot products, a value that is not finite
//! leaves Õ not finite, and only when either shows something does [`check_values`] name it
//! (keys no row sees are scanned apart). Calls with a bias, a mask or ALiBi (per-head
//! modifiers) take the stage's own path.

use attn_core::simd::{decode_add_pv, decode_scores, softmax_tile};
use attn_core::varlen::{KvCache, forward_cached as cached_by_rows, merge_partials};
use attn_core::{AttnError, Forward, Inputs, KeyRange, Options, Result, check_values};
use ndarray::{Array1, Array2, Array3, Array4, ArrayView2, ArrayView4, s};
use rayon::prelude::*;

use super as cpu;

/// Keys a block.
const KEYS: usize = 256;

/// Decoding from a KV cache (contiguous or paged) with the group's rows as a tile's rows, as
/// [`attn_core::varlen::forward_cached`] defines it. `splits`: each row's keys cut into this
/// many parts; None picks enough for the threads.
pub fn forward_cached(
    cache: &KvCache<'_>,
    inputs: &Inputs<'_>,
    opts: &Options,
    splits: Option<usize>,
) -> Result<Forward> {
    if inputs.mask.is_some() || inputs.bias.is_some() || inputs.alibi.is_some() {
        return cached_by_rows(cache, inputs, opts, cpu::forward);
    }
    if splits == Some(0) {
        return Err(AttnError::ZeroBlockSize { arg: "splits" });
    }
    let (scale, softcap, kv_heads) =
        cache.checked_call(inputs, opts, |p| (p.scale, p.softcap, p.shape.kv_heads))?;
    let (batch, heads, n_q, d) = inputs.q.dim();
    let group = heads / kv_heads;
    let longest = cache.seqlens.iter().copied().max().unwrap_or(0);
    let tasks = batch * kv_heads;
    let splits = splits
        .unwrap_or_else(|| (2 * rayon::current_num_threads()).div_ceil(tasks))
        .clamp(1, longest.div_ceil(KEYS).max(1));
    let q_norm = max_row_norm(inputs.q); // infinite when Q is not finite
    // one task per (b, g, split): its (O_s, lse_s) for the group's rows, and what its scan saw
    let parts: Vec<Part> = (0..tasks * splits)
        .into_par_iter()
        .map(|t| {
            let (b, g, sp) = (t / (kv_heads * splits), t / splits % kv_heads, t % splits);
            let run = Run { cache, inputs, scale, softcap, opts, b, g, group };
            run.split(sp, splits)
        })
        .collect();
    let bound = |p: &Part| (scale as f64).abs() * q_norm * p.k_norm;
    if !q_norm.is_finite() || parts.iter().any(|p| !p.finite || bound(p) > SCORE_LIMIT) {
        // the exact check names the offending value
        for (b, &l) in cache.seqlens.iter().enumerate() {
            if l > 0 {
                let (k, v) = (cache.keys(b, inputs.k), cache.keys(b, inputs.v));
                check_values(
                    inputs.q.slice(s![b..b + 1, .., .., ..]),
                    k.view(),
                    v.view(),
                    None,
                    scale,
                )?;
            }
        }
    }
    let mut out = Array4::zeros((batch, heads, n_q, d));
    let mut lse = Array3::from_elem((batch, heads, n_q), f32::NEG_INFINITY);
    for bg in 0..tasks {
        let (b, g) = (bg / kv_heads, bg % kv_heads);
        let mine = &parts[bg * splits..(bg + 1) * splits];
        for r in 0..group * n_q {
            let (h, i) = (g * group + r / n_q, r % n_q);
            let row = mine.iter().map(|p| (p.o.row(r), p.lse[r]));
            lse[(b, h, i)] = merge_partials(row, out.slice_mut(s![b, h, i, ..]));
        }
    }
    Ok(Forward { out, lse, traffic: None })
}

/// The score bound above which a value check refuses the call (attn-core's).
const SCORE_LIMIT: f64 = attn_core::problem::SCORE_LIMIT;

/// One split's result for the group's rows, and its scan of the keys and values.
struct Part {
    o: Array2<f32>,
    lse: Array1<f32>,
    finite: bool,
    k_norm: f64,
}

struct Run<'r, 'c, 'a> {
    cache: &'r KvCache<'c>,
    inputs: &'r Inputs<'a>,
    scale: f32,
    softcap: Option<f32>,
    opts: &'r Options,
    b: usize,
    g: usize,
    group: usize,
}

impl Run<'_, '_, '_> {
    /// Split `sp` of `splits` of row b's keys for the rows of g's group: Algorithm 1's loop
    /// with Q_g as the query block.
    fn split(&self, sp: usize, splits: usize) -> Part {
        let (_, _, n_q, d) = self.inputs.q.dim();
        let (rows, l) = (self.group * n_q, self.cache.seqlens[self.b]);
        let keys = KeyRange::new(n_q, l, self.opts.causal, self.opts.window);
        // Q_g: row r is query i = r % n_q of head g·group + r / n_q
        let q_g = Array2::from_shape_fn((rows, d), |(r, c)| {
            self.inputs.q[(self.b, self.g * self.group + r / n_q, r % n_q, c)]
        });
        let (mut m, mut ell, mut alpha) =
            (Array1::from_elem(rows, f32::NEG_INFINITY), Array1::zeros(rows), Array1::zeros(rows));
        let mut acc = Array2::<f32>::zeros((rows, d));
        let mut s_ij = Array2::<f32>::zeros((rows, KEYS));
        let (mut finite, mut k_norm2) = (true, 0.0f64);
        // the keys any row sees, cut into splits of whole blocks; keys no row sees are scanned
        let (lo, hi) = if l == 0 { (0, 0) } else { (keys.start(0), keys.end(n_q - 1)) };
        let chunk = (hi - lo).div_ceil(splits).div_ceil(KEYS) * KEYS;
        let (j_begin, j_end) = ((lo + sp * chunk).min(hi), (lo + (sp + 1) * chunk).min(hi));
        let mut scan = |k: ArrayView2<'_, f32>, v: ArrayView2<'_, f32>| {
            let (f, n2) = scan_block(k, v);
            finite &= f;
            k_norm2 = k_norm2.max(n2);
        };
        if sp == 0 {
            self.each_block(0, lo, |_, k, v| scan(k, v));
            self.each_block(hi, l, |_, k, v| scan(k, v));
        }
        let mut k_norm2_seen = 0.0f32;
        self.each_block(j_begin, j_end, |j0, k_j, v_j| {
            let cols = k_j.nrows();
            let mut s = s_ij.slice_mut(s![.., ..cols]);
            // S_ij = τ Q_g K_jᵀ (and K_j's row norms: its scan), the softcap, each row's
            // key range
            decode_scores(self.scale, q_g.view(), k_j, s.view_mut(), &mut k_norm2_seen);
            if let Some(cap) = self.softcap {
                s.mapv_inplace(|x| cap * (x / cap).tanh());
            }
            for (r, row) in s.rows_mut().into_iter().enumerate() {
                keys.hide_outside(r % n_q, j0, row);
            }
            // m, ℓ, P̃ = exp(S − m); Õ = diag(e^(m_old − m)) Õ + P̃ V_j
            softmax_tile(s.view_mut(), m.view_mut(), ell.view_mut(), alpha.view_mut());
            for (mut row, &a) in acc.rows_mut().into_iter().zip(&alpha) {
                if a != 1.0 {
                    row *= a;
                }
            }
            decode_add_pv(s.view(), v_j, acc.view_mut());
        });
        // a value that is not finite shows in the norms (K) or in Õ (V: every visited value
        // is multiplied in, 0 · ∞ being NaN)
        finite &= k_norm2_seen.is_finite() && acc.iter().all(|x| x.is_finite());
        k_norm2 = k_norm2.max(k_norm2_seen as f64);
        let mut lse = Array1::from_elem(rows, f32::NEG_INFINITY);
        for r in 0..rows {
            if m[r] != f32::NEG_INFINITY {
                acc.row_mut(r).mapv_inplace(|x| x / ell[r]);
                lse[r] = m[r] + ell[r].ln();
            } else {
                acc.row_mut(r).fill(0.0);
            }
        }
        Part { o: acc, lse, finite, k_norm: k_norm2.sqrt() }
    }

    /// `f(j0, K, V)` over keys j_begin .. j_end of row b, head g, in blocks of at most
    /// [`KEYS`] that never cross a page.
    fn each_block(
        &self,
        j_begin: usize,
        j_end: usize,
        mut f: impl FnMut(usize, ArrayView2<'_, f32>, ArrayView2<'_, f32>),
    ) {
        let (k, v) = (self.inputs.k, self.inputs.v);
        let page = k.dim().2;
        let mut j0 = j_begin;
        while j0 < j_end {
            let (at, slot, room) = match &self.cache.block_table {
                None => (self.b, j0, KEYS),
                Some(t) => (t[(self.b, j0 / page)] as usize, j0 % page, page - j0 % page),
            };
            let cols = room.min(KEYS).min(j_end - j0);
            let (kb, vb) = (
                k.slice(s![at, self.g, slot..slot + cols, ..]),
                v.slice(s![at, self.g, slot..slot + cols, ..]),
            );
            f(j0, kb, vb);
            j0 += cols;
        }
    }
}

/// Whether a block of keys and values is finite, and its largest squared key norm (f64).
fn scan_block(k: ArrayView2<'_, f32>, v: ArrayView2<'_, f32>) -> (bool, f64) {
    let finite = k.iter().chain(v.iter()).all(|x| x.is_finite());
    let norm2 = k
        .rows()
        .into_iter()
        .map(|r| r.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
        .fold(0.0, f64::max);
    (finite, norm2)
}

/// The largest row norm of Q (its values' finiteness is part of the scan's verdict).
fn max_row_norm(q: ArrayView4<'_, f32>) -> f64 {
    let mut n2 = 0.0f64;
    for row in q.lanes(ndarray::Axis(3)) {
        let x: f64 = row
            .iter()
            .map(|&x| if x.is_finite() { (x as f64) * (x as f64) } else { f64::INFINITY })
            .sum();
        n2 = n2.max(x);
    }
    n2.sqrt()
}
