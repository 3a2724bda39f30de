//! Packed variable-length batches and the KV cache, for any stage.
//!
//! A packed batch concatenates sequences of different lengths along the sequence axis (Q is
//! `[1, heads, total_q, d]`, K/V `[1, kv_heads, total_k, d]`) and says where each begins with
//! `cu_seqlens_q` / `cu_seqlens_k` (`[num_seqs + 1]`, from 0, non-decreasing, ending at the
//! packed lengths). Sequence `s` attends only inside its own spans, with causal masking and
//! the window aligned bottom-right inside each, and ALiBi's distances measured there: the
//! answer is exactly that of calling the stage on each sequence alone, which is what
//! [`forward_packed`] and [`backward_packed`] do. So no work is spent on pairs across
//! sequences and a packed batch costs what its sequences cost.
//!
//! A KV cache holds `n_max` key slots per batch row, of which the first `cache_seqlens[b]`
//! are valid; causal masking and the window align to that length. [`forward_cached`] runs
//! each batch row against its valid keys, from contiguous caches `[batch, kv_heads, n_max,
//! d]` or from page pools `[num_pages, kv_heads, page_size, d]` through a block table
//! `[batch, max_blocks]` (vLLM's paged cache). [`append_kv`] writes new keys and values into a
//! cache in place.
//!
//! A mask or bias of a packed call broadcasts to `[1, heads, total_q, total_k]`; each sequence
//! sees its diagonal block. Of a cached call, to `[batch, heads, n_q, n_max]`. Dropout in a
//! packed batch: sequence `s` drops with the seed [`sequence_seed`]`(seed, s)` (sequence 0
//! with the seed itself), so a one-sequence packed call is the plain call bit for bit.
//! Cached calls take no dropout and no gradient (decoding is inference).

use std::ops::Range;

use ndarray::{Array3, Array4, ArrayView2, ArrayView4, ArrayViewMut4, Axis, CowArray, Ix4, s};

use crate::error::{AttnError, Result};
use crate::options::{Inputs, Mask, Options};
use crate::problem::{Problem, check_d_out};
use crate::shape::{KeyRange, Shape};
use crate::stage::{Forward, Grads};
use crate::traffic::Traffic;

/// The spans of a packed batch: sequence `s` holds query rows `q[s]..q[s + 1]` and key rows
/// `k[s]..k[s + 1]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqLens {
    q: Vec<usize>,
    k: Vec<usize>,
}

/// Checks one `cu_seqlens` array against the packed length it must end at.
fn offsets(arg: &'static str, cu: &[i64], total: usize, axis: &str) -> Result<Vec<usize>> {
    let bad = |reason: String| Err(AttnError::InvalidLengths { arg, reason });
    if cu.len() < 2 {
        return bad(format!(
            "has {} entries: it holds num_seqs + 1 offsets, at least [0, {total}]",
            cu.len()
        ));
    }
    if cu[0] != 0 {
        return bad(format!("starts at {}: it must start at 0", cu[0]));
    }
    if let Some(i) = cu.windows(2).position(|w| w[1] < w[0]) {
        return bad(format!(
            "decreases at index {} ({} then {}): offsets must not decrease",
            i + 1,
            cu[i],
            cu[i + 1]
        ));
    }
    let last = *cu.last().expect("two entries at least");
    if last != total as i64 {
        return bad(format!(
            "ends at {last}, but the packed length ({axis}) is {total}: it must end there"
        ));
    }
    Ok(cu.iter().map(|&x| x as usize).collect())
}

impl SeqLens {
    /// `cu_seqlens_q` and `cu_seqlens_k` of a packed batch whose Q has `total_q` rows and K/V
    /// `total_k`, checked.
    pub fn new(cu_q: &[i64], cu_k: &[i64], total_q: usize, total_k: usize) -> Result<Self> {
        let q = offsets("cu_seqlens_q", cu_q, total_q, "Q's axis 2")?;
        let k = offsets("cu_seqlens_k", cu_k, total_k, "K's axis 2")?;
        if q.len() != k.len() {
            return Err(AttnError::InvalidLengths {
                arg: "cu_seqlens_k",
                reason: format!(
                    "has {} entries but cu_seqlens_q has {}: both are num_seqs + 1 long",
                    k.len(),
                    q.len()
                ),
            });
        }
        Ok(Self { q, k })
    }

    /// The spans of sequences of these query and key lengths (self-attention: the same).
    pub fn from_lengths(q_lens: &[usize], k_lens: &[usize]) -> Self {
        assert_eq!(q_lens.len(), k_lens.len(), "one key length per query length");
        let cumulative = |lens: &[usize]| {
            std::iter::once(0)
                .chain(lens.iter().scan(0, |t, &l| {
                    *t += l;
                    Some(*t)
                }))
                .collect()
        };
        Self { q: cumulative(q_lens), k: cumulative(k_lens) }
    }

    pub fn num_seqs(&self) -> usize {
        self.q.len() - 1
    }

    /// Query rows of sequence `s`.
    pub fn q_span(&self, s: usize) -> Range<usize> {
        self.q[s]..self.q[s + 1]
    }

    /// Key rows of sequence `s`.
    pub fn k_span(&self, s: usize) -> Range<usize> {
        self.k[s]..self.k[s + 1]
    }

    /// The packed lengths `(total_q, total_k)`.
    pub fn totals(&self) -> (usize, usize) {
        (*self.q.last().expect("two entries"), *self.k.last().expect("two entries"))
    }

    /// Query-key pairs the sequences keep under causal masking and the window (what FLOP
    /// counts of a packed batch count).
    pub fn visible_pairs(&self, opts: &Options) -> u64 {
        (0..self.num_seqs()).map(|s| self.sequence_pairs(s, opts)).sum()
    }

    /// The query-key pairs sequence `s` keeps.
    pub fn sequence_pairs(&self, s: usize, opts: &Options) -> u64 {
        let (nq, nk) = (self.q_span(s).len(), self.k_span(s).len());
        if nq == 0 || nk == 0 {
            0
        } else {
            KeyRange::new(nq, nk, opts.causal, opts.window).visible_pairs()
        }
    }
}

/// The dropout seed of sequence `s` of a packed batch: `seed` for the first, then a
/// different stream for each (the hash of [`crate::dropout`] keys on the batch index, and
/// every sequence of a packed batch is batch entry 0).
pub fn sequence_seed(seed: u64, s: usize) -> u64 {
    seed.wrapping_add((s as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// Rows `q` and columns `k` of a tensor broadcastable to `[.., .., n_q, n_k]` (an axis of
/// length 1 stays whole).
fn block<'a, T>(a: ArrayView4<'a, T>, q: Range<usize>, k: Range<usize>) -> ArrayView4<'a, T> {
    let (_, _, nq, nk) = a.dim();
    let q = if nq == 1 { 0..1 } else { q };
    let k = if nk == 1 { 0..1 } else { k };
    a.slice_move(s![.., .., q, k])
}

/// The inputs of the sequence whose query rows are `q` and key rows `k` in a packed batch.
pub fn sequence_inputs<'a>(inputs: &Inputs<'a>, q: Range<usize>, k: Range<usize>) -> Inputs<'a> {
    Inputs {
        q: inputs.q.slice_move(s![.., .., q.clone(), ..]),
        k: inputs.k.slice_move(s![.., .., k.clone(), ..]),
        v: inputs.v.slice_move(s![.., .., k.clone(), ..]),
        mask: inputs.mask.map(|m| match m {
            Mask::KeyPadding(m) => Mask::KeyPadding(m.slice_move(s![.., k.clone()])),
            Mask::Full(m) => Mask::Full(block(m, q.clone(), k.clone())),
        }),
        bias: inputs.bias.map(|b| block(b, q.clone(), k.clone())),
        alibi: inputs.alibi,
    }
}

/// The whole packed call's checks, values included, before any sequence runs: an error then
/// names its index in the packed tensors (a sequence's own call would name it in its slice).
/// Returns the packed call's shape.
pub fn check_packed(seqs: &SeqLens, inputs: &Inputs<'_>, opts: &Options) -> Result<Shape> {
    crate::problem::refuse_placement(opts.placement, "a packed batch")?;
    let p = Problem::new(inputs, opts)?;
    check_packed_shape(seqs, &p.shape)?;
    Ok(p.shape)
}

/// The packed call's own shape checks, for a call whose inputs were checked otherwise (a
/// 16-bit call): one batch entry, and cu_seqlens that end at Q's and K's lengths.
pub fn check_packed_shape(seqs: &SeqLens, shape: &Shape) -> Result<()> {
    if shape.batch != 1 {
        return Err(AttnError::ShapeMismatch {
            arg: "q",
            got: vec![shape.batch, shape.heads, shape.n_q, shape.head_dim],
            expected:
                "a packed batch is [1, heads, total_q, head_dim]: its sequences lie along axis 2"
                    .into(),
        });
    }
    let (total_q, total_k) = seqs.totals();
    if (total_q, total_k) != (shape.n_q, shape.n_k) {
        return Err(AttnError::InvalidLengths {
            arg: "cu_seqlens_q",
            reason: format!(
                "describes {total_q} query and {total_k} key rows, but Q has {} and K {}",
                shape.n_q, shape.n_k
            ),
        });
    }
    Ok(())
}

fn add_traffic(total: &mut Option<Traffic>, t: Option<Traffic>) {
    if let Some(t) = t {
        let sum = total.get_or_insert_with(Traffic::default);
        sum.read += t.read;
        sum.written += t.written;
    }
}

// ANCHOR: forward_packed
/// The forward of a packed batch: `run` (a stage's forward) on each sequence, the results
/// in the packed layout. A sequence with queries but no keys gives zero rows and −∞ lse, as
/// a fully masked row does.
pub fn forward_packed(
    seqs: &SeqLens,
    inputs: &Inputs<'_>,
    opts: &Options,
    mut run: impl FnMut(&Inputs<'_>, &Options) -> Result<Forward>,
) -> Result<Forward> {
    let shape = check_packed(seqs, inputs, opts)?;
    let mut out = Array4::zeros(shape.q_dims());
    let mut lse = Array3::from_elem(shape.lse_dims(), f32::NEG_INFINITY);
    let mut traffic = None;
    for s in 0..seqs.num_seqs() {
        let (q, k) = (seqs.q_span(s), seqs.k_span(s));
        if q.is_empty() || k.is_empty() {
            continue;
        }
        let f = run(&sequence_inputs(inputs, q.clone(), k), &sequence_options(opts, s))?;
        out.slice_mut(s![.., .., q.clone(), ..]).assign(&f.out);
        lse.slice_mut(s![.., .., q]).assign(&f.lse);
        add_traffic(&mut traffic, f.traffic);
    }
    Ok(Forward { out, lse, traffic })
}
// ANCHOR_END: forward_packed

/// The options sequence `s` of a packed batch runs with: its own dropout seed.
pub fn sequence_options(opts: &Options, s: usize) -> Options {
    let mut o = opts.clone();
    if let Some(d) = &mut o.dropout {
        d.seed = sequence_seed(d.seed, s);
    }
    o
}

/// The backward of a packed batch: `run` (a stage's backward) on each sequence, with the
/// forward's results of that sequence; the gradients in the packed layout, dBias (when asked
/// for) in the bias's shape, each sequence's part added into its block.
pub fn backward_packed(
    seqs: &SeqLens,
    inputs: &Inputs<'_>,
    opts: &Options,
    fwd: &Forward,
    d_out: ArrayView4<'_, f32>,
    mut run: impl FnMut(&Inputs<'_>, &Options, &Forward, ArrayView4<'_, f32>) -> Result<Grads>,
) -> Result<Grads> {
    let shape = check_packed(seqs, inputs, opts)?;
    check_d_out(&shape, d_out)?;
    crate::problem::check_saved(&shape, fwd.out.view(), fwd.lse.view())?;
    let mut dq = Array4::zeros(shape.q_dims());
    let mut dk = Array4::zeros(shape.kv_dims());
    let mut dv = Array4::zeros(shape.kv_dims());
    let mut dbias = match (opts.bias_grad, inputs.bias) {
        (true, Some(b)) => Some(Array4::zeros(b.raw_dim())),
        _ => None,
    };
    let mut traffic = None;
    for s in 0..seqs.num_seqs() {
        let (q, k) = (seqs.q_span(s), seqs.k_span(s));
        if q.is_empty() || k.is_empty() {
            continue;
        }
        let sub = Forward {
            out: fwd.out.slice(s![.., .., q.clone(), ..]).to_owned(),
            lse: fwd.lse.slice(s![.., .., q.clone()]).to_owned(),
            traffic: None,
        };
        let g = run(
            &sequence_inputs(inputs, q.clone(), k.clone()),
            &sequence_options(opts, s),
            &sub,
            d_out.slice(s![.., .., q.clone(), ..]),
        )?;
        dq.slice_mut(s![.., .., q.clone(), ..]).assign(&g.dq);
        dk.slice_mut(s![.., .., k.clone(), ..]).assign(&g.dk);
        dv.slice_mut(s![.., .., k.clone(), ..]).assign(&g.dv);
        if let (Some(total), Some(part)) = (&mut dbias, &g.dbias) {
            let (_, _, nq, nk) = total.dim();
            let q = if nq == 1 { 0..1 } else { q };
            let k = if nk == 1 { 0..1 } else { k };
            let mut slot = total.slice_mut(s![.., .., q, k]);
            slot += part;
        }
        add_traffic(&mut traffic, g.traffic);
    }
    Ok(Grads { dq, dk, dv, dbias, traffic })
}

/// A KV cache: the valid length of each batch row and, for a paged cache, the block table
/// `[batch, max_blocks]` of page indices into the pools.
#[derive(Clone, Debug)]
pub struct KvCache<'a> {
    pub seqlens: Vec<usize>,
    pub block_table: Option<ArrayView2<'a, i64>>,
}

impl<'a> KvCache<'a> {
    /// Contiguous caches `[batch, kv_heads, n_max, d]` with these valid lengths.
    pub fn contiguous(seqlens: &[i64]) -> Result<Self> {
        Ok(Self { seqlens: lengths(seqlens)?, block_table: None })
    }

    /// Page pools `[num_pages, kv_heads, page_size, d]` read through `block_table`.
    pub fn paged(seqlens: &[i64], block_table: ArrayView2<'a, i64>) -> Result<Self> {
        Ok(Self { seqlens: lengths(seqlens)?, block_table: Some(block_table) })
    }

    /// How many key slots batch row `b` can hold: `n_max`, or the table's pages.
    pub fn capacity<T>(&self, k: &ArrayView4<'_, T>) -> usize {
        match &self.block_table {
            None => k.dim().2,
            Some(t) => t.dim().1 * k.dim().2,
        }
    }

    /// The caches (or pools) `k` as contiguous `[batch, kv_heads, capacity, d]`: each row's
    /// valid keys, zeros beyond them (what a reference over the whole cache reads).
    pub fn gathered(&self, k: ArrayView4<'_, f32>) -> Array4<f32> {
        let (_, kv_heads, _, d) = k.dim();
        let mut all = Array4::zeros((self.seqlens.len(), kv_heads, self.capacity(&k), d));
        for b in 0..self.seqlens.len() {
            let l = self.seqlens[b];
            all.slice_mut(s![b..b + 1, .., ..l, ..]).assign(&self.keys(b, k).view());
        }
        all
    }

    /// Checks the lengths and the table against the caches `k` and the queries' batch.
    fn check<T>(&self, batch: usize, k: &ArrayView4<'_, T>) -> Result<()> {
        let bad = |arg, reason| Err(AttnError::InvalidLengths { arg, reason });
        if self.seqlens.len() != batch {
            return bad(
                "cache_seqlens",
                format!(
                    "has {} entries but Q's batch is {batch}: one length per batch row",
                    self.seqlens.len()
                ),
            );
        }
        let capacity = self.capacity(k);
        if let Some((b, &l)) = self.seqlens.iter().enumerate().find(|&(_, &l)| l > capacity) {
            let what = if self.block_table.is_some() {
                "the block table's pages hold"
            } else {
                "the cache (K's axis 2) holds"
            };
            return bad(
                "cache_seqlens",
                format!("is {l} at batch row {b}, but {what} {capacity} keys"),
            );
        }
        if let Some(t) = &self.block_table {
            let (num_pages, page) = (k.dim().0, k.dim().2);
            if t.dim().0 != batch {
                return bad(
                    "block_table",
                    format!("has {} rows but Q's batch is {batch}: [batch, max_blocks]", t.dim().0),
                );
            }
            for (b, &l) in self.seqlens.iter().enumerate() {
                for (i, &p) in t.row(b).iter().take(l.div_ceil(page)).enumerate() {
                    if p < 0 || p as usize >= num_pages {
                        return bad(
                            "block_table",
                            format!(
                                "holds page {p} at [{b}, {i}], outside the pool of {num_pages} pages"
                            ),
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// Batch row `b`'s valid keys (or values) as `[1, kv_heads, L_b, d]`: a view of a
    /// contiguous cache, or the pages gathered.
    pub fn keys<'k, T: Clone + Default>(
        &self,
        b: usize,
        k: ArrayView4<'k, T>,
    ) -> CowArray<'k, T, Ix4> {
        let l = self.seqlens[b];
        match &self.block_table {
            None => k.slice_move(s![b..b + 1, .., ..l, ..]).into(),
            Some(t) => {
                let (_, kv_heads, page, d) = k.dim();
                let mut g = Array4::from_elem((1, kv_heads, l, d), T::default());
                for (i, &p) in t.row(b).iter().take(l.div_ceil(page)).enumerate() {
                    let rows = (i * page)..((i + 1) * page).min(l);
                    let n = rows.len();
                    g.slice_mut(s![0, .., rows, ..]).assign(&k.slice(s![p as usize, .., ..n, ..]));
                }
                g.into()
            }
        }
    }
}

fn lengths(seqlens: &[i64]) -> Result<Vec<usize>> {
    if let Some((b, &l)) = seqlens.iter().enumerate().find(|&(_, &l)| l < 0) {
        return Err(AttnError::InvalidLengths {
            arg: "cache_seqlens",
            reason: format!("is {l} at batch row {b}: a length is at least 0"),
        });
    }
    Ok(seqlens.iter().map(|&l| l as usize).collect())
}

/// Batch row `b` of a tensor broadcastable to `[batch, .., .., n_k]`, its keys cut to `l`.
fn row_of<'a, T>(a: ArrayView4<'a, T>, b: usize, l: usize) -> ArrayView4<'a, T> {
    let (batch, _, _, nk) = a.dim();
    let b = if batch == 1 { 0..1 } else { b..b + 1 };
    let k = if nk == 1 { 0..1 } else { 0..l };
    a.slice_move(s![b, .., .., k])
}

/// The checks of a cached call, once for the whole call: no dropout or gradient, the
/// lengths and the block table against the caches, and the shapes, masks and options as of a
/// call over the caches' capacity (the caches' values are checked row by row, valid keys only,
/// by the stage itself).
fn check_cached(cache: &KvCache<'_>, inputs: &Inputs<'_>, opts: &Options) -> Result<()> {
    cache.checked_call(inputs, opts, |_| ())
}

impl KvCache<'_> {
    /// Checks a cached call as [`forward_cached`] does (not the values of Q and the caches)
    /// and hands `f` the problem over the caches' capacity: Q, zero stand-ins for K and V of
    /// `[batch, kv_heads, capacity, d]`, the masks, bias, ALiBi and options — what a device
    /// that runs the whole call in one launch needs of it. `inputs.k` may itself be a
    /// zero-strided stand-in of the caches' shape (for caches of another element type).
    pub fn checked_call<R>(
        &self,
        inputs: &Inputs<'_>,
        opts: &Options,
        f: impl FnOnce(&Problem<'_>) -> R,
    ) -> Result<R> {
        crate::problem::refuse_placement(opts.placement, "a KV-cache call")?;
        if opts.dropout.is_some_and(|d| d.p > 0.0) {
            return Err(AttnError::Unsupported {
                stage: "a KV-cache call",
                what: "dropout",
                advice: "decoding is inference: leave dropout out",
            });
        }
        if opts.bias_grad {
            return Err(AttnError::Unsupported {
                stage: "a KV-cache call",
                what: "gradients",
                advice: "decoding is inference: run the backward on the uncached tensors",
            });
        }
        let batch = inputs.q.dim().0;
        if self.block_table.is_none() && inputs.k.dim().0 != batch {
            return Err(AttnError::ShapeMismatch {
                arg: "k",
                got: inputs.k.shape().to_vec(),
                expected: format!(
                    "a KV cache is [batch, kv_heads, n_max, head_dim] with Q's batch {batch}"
                ),
            });
        }
        if inputs.v.dim() != inputs.k.dim() {
            return Err(AttnError::ShapeMismatch {
                arg: "v",
                got: inputs.v.shape().to_vec(),
                expected: format!("k is {:?}, and v must have the same shape", inputs.k.shape()),
            });
        }
        self.check(batch, &inputs.k)?;
        // stand-ins for the caches, of their capacity
        let (_, kv_heads, _, d) = inputs.k.dim();
        let kv = crate::problem::stand_in((batch, kv_heads, self.capacity(&inputs.k), d));
        let whole = Inputs {
            q: inputs.q,
            k: kv,
            v: kv,
            mask: inputs.mask.map(Mask::shorten),
            bias: inputs.bias,
            alibi: inputs.alibi,
        };
        let p = Problem::shapes_only(&whole, opts)?;
        Ok(f(&p))
    }
}

/// Decoding from a KV cache: `run` (a stage's forward) on each batch row against its valid
/// keys. `inputs.k` / `inputs.v` are the caches (or the page pools); Q is `[batch, heads, n_q,
/// d]`, masks and bias broadcast to `[batch, heads, n_q, n_max]`.
pub fn forward_cached(
    cache: &KvCache<'_>,
    inputs: &Inputs<'_>,
    opts: &Options,
    mut run: impl FnMut(&Inputs<'_>, &Options) -> Result<Forward>,
) -> Result<Forward> {
    check_cached(cache, inputs, opts)?;
    let (batch, heads, n_q, d) = inputs.q.dim();
    let mut out = Array4::zeros((batch, heads, n_q, d));
    let mut lse = Array3::from_elem((batch, heads, n_q), f32::NEG_INFINITY);
    for b in 0..batch {
        let l = cache.seqlens[b];
        if l == 0 || n_q == 0 {
            continue;
        }
        let (k, v) = (cache.keys(b, inputs.k), cache.keys(b, inputs.v));
        let row = Inputs {
            q: inputs.q.slice_move(s![b..b + 1, .., .., ..]),
            k: k.view(),
            v: v.view(),
            mask: inputs.mask.map(|m| match m {
                Mask::KeyPadding(m) => Mask::KeyPadding(m.slice_move(s![b..b + 1, ..l])),
                Mask::Full(m) => Mask::Full(row_of(m, b, l)),
            }),
            bias: inputs.bias.map(|x| row_of(x, b, l)),
            alibi: inputs
                .alibi
                .map(|a| if a.dim().0 == 1 { a } else { a.slice_move(s![b..b + 1, ..]) }),
        };
        let f = run(&row, opts)?;
        out.slice_mut(s![b..b + 1, .., .., ..]).assign(&f.out);
        lse.slice_mut(s![b..b + 1, .., ..]).assign(&f.lse);
    }
    Ok(Forward { out, lse, traffic: None })
}

/// Appends `k_new` / `v_new` (`[batch, kv_heads, n_new, d]`) to the caches at each batch
/// row's length, in place (the pages through the block table for a paged cache), and returns
/// the new lengths. Nothing is written when any row would overflow its capacity.
pub fn append_kv(
    cache: &KvCache<'_>,
    mut k_cache: ArrayViewMut4<'_, f32>,
    mut v_cache: ArrayViewMut4<'_, f32>,
    k_new: ArrayView4<'_, f32>,
    v_new: ArrayView4<'_, f32>,
) -> Result<Vec<usize>> {
    let (batch, kv_heads, n_new, d) = k_new.dim();
    if v_new.dim() != k_new.dim() {
        return Err(AttnError::ShapeMismatch {
            arg: "v_new",
            got: v_new.shape().to_vec(),
            expected: format!("it must have k_new's shape {:?}", k_new.shape()),
        });
    }
    let (_, cache_heads, _, cache_d) = k_cache.dim();
    if (cache_heads, cache_d) != (kv_heads, d) || k_cache.dim() != v_cache.dim() {
        return Err(AttnError::ShapeMismatch {
            arg: "k_new",
            got: k_new.shape().to_vec(),
            expected: format!(
                "its kv_heads and head_dim must be the cache's, {:?}",
                k_cache.shape()
            ),
        });
    }
    cache.check(batch, &k_cache.view())?;
    let grown = KvCache {
        seqlens: cache.seqlens.iter().map(|&l| l + n_new).collect(),
        block_table: cache.block_table,
    };
    grown.check(batch, &k_cache.view())?;
    let page = k_cache.dim().2;
    for b in 0..batch {
        for t in 0..n_new {
            let pos = cache.seqlens[b] + t;
            let (slot, row) = match &cache.block_table {
                None => (b, pos),
                Some(table) => (table[(b, pos / page)] as usize, pos % page),
            };
            k_cache.slice_mut(s![slot, .., row, ..]).assign(&k_new.slice(s![b, .., t, ..]));
            v_cache.slice_mut(s![slot, .., row, ..]).assign(&v_new.slice(s![b, .., t, ..]));
        }
    }
    Ok(grown.seqlens)
}

/// The structure of a packed or cached call as one unpacked call: the boolean mask
/// `[batch, 1, n_q, n_k]` of the pairs it keeps (spans, causal and window aligned inside
/// each) and the ALiBi distances `|i + L_k − L_q − j|` inside each span (0 elsewhere),
/// for checking against the reference.
fn explicit_structure(
    batch: usize,
    n_q: usize,
    n_k: usize,
    opts: &Options,
    rows: impl Fn(usize) -> Vec<(Range<usize>, Range<usize>)>,
) -> (Array4<bool>, Array4<f32>) {
    let mut keep = Array4::from_elem((batch, 1, n_q, n_k), false);
    let mut dist = Array4::zeros((batch, 1, n_q, n_k));
    for b in 0..batch {
        for (q, k) in rows(b) {
            if q.is_empty() || k.is_empty() {
                continue;
            }
            let keys = KeyRange::new(q.len(), k.len(), opts.causal, opts.window);
            for i in 0..q.len() {
                for j in keys.start(i)..keys.end(i) {
                    keep[(b, 0, q.start + i, k.start + j)] = true;
                }
                for j in 0..k.len() {
                    let rel = i as f64 + k.len() as f64 - q.len() as f64 - j as f64;
                    dist[(b, 0, q.start + i, k.start + j)] = rel.abs() as f32;
                }
            }
        }
    }
    (keep, dist)
}

/// The mask, bias and options of one unpacked call that computes what a packed (or cached)
/// call computes: `inputs`' own mask and bias combined with [`explicit_structure`], ALiBi
/// turned into bias, causal and window left to the mask. Dropout is not carried over.
fn unpacked_equivalent(
    inputs: &Inputs<'_>,
    opts: &Options,
    structure: (Array4<bool>, Array4<f32>),
) -> (Array4<bool>, Array4<f32>, Options) {
    let (keep, dist) = structure;
    let (batch, heads, n_q, _) = inputs.q.dim();
    let n_k = keep.dim().3;
    let full = (batch, heads, n_q, n_k);
    let mut mask = keep.broadcast(full).expect("[b, 1, n_q, n_k]").to_owned();
    match inputs.mask {
        Some(Mask::KeyPadding(m)) => {
            let m = m.insert_axis(Axis(1)).insert_axis(Axis(1));
            mask.zip_mut_with(&m.broadcast(full).expect("[b, n_k]"), |a, &b| *a &= b);
        }
        Some(Mask::Full(m)) => {
            mask.zip_mut_with(&m.broadcast(full).expect("checked"), |a, &b| *a &= b)
        }
        None => {}
    }
    let mut bias = match inputs.bias {
        Some(b) => b.broadcast(full).expect("checked").to_owned(),
        None => Array4::zeros(full),
    };
    if let Some(slopes) = inputs.alibi {
        for ((b, h, i, j), x) in bias.indexed_iter_mut() {
            let slope = slopes[(if slopes.dim().0 == 1 { 0 } else { b }, h)];
            *x -= slope * dist[(b, 0, i, j)];
        }
    }
    let opts = Options { causal: false, window: None, dropout: None, ..opts.clone() };
    (mask, bias, opts)
}

// ANCHOR: merge_partials
/// Merges the partial results of one query row over disjoint sets of keys — split-KV's
/// second step. Part `s` is `(O_s, lse_s)`, normalised over its own keys; then
/// `lse = log Σ_s e^(lse_s)` and `O = Σ_s e^(lse_s − lse) O_s`: the online softmax's merge,
/// with each ℓ_s = e^(lse_s − m_s) folded into its lse. A part that saw no key (lse −∞)
/// weighs nothing; when none saw one, O is 0 and lse −∞, as for a fully masked row.
pub fn merge_partials<'p>(
    parts: impl Iterator<Item = (ndarray::ArrayView1<'p, f32>, f32)> + Clone,
    mut out: ndarray::ArrayViewMut1<'_, f32>,
) -> f32 {
    let m = parts.clone().fold(f32::NEG_INFINITY, |m, (_, lse)| m.max(lse));
    out.fill(0.0);
    if m == f32::NEG_INFINITY {
        return m;
    }
    let ell: f32 = parts.clone().map(|(_, lse)| (lse - m).exp()).sum();
    for (o, lse) in parts {
        out.scaled_add((lse - m).exp() / ell, &o);
    }
    m + ell.ln()
}
// ANCHOR_END: merge_partials

/// [`forward_cached`] with each batch row's valid keys split into `splits` contiguous parts
/// (split-KV, "flash-decoding"): `run` computes each part's (O, lse) on its own, then
/// [`merge_partials`] combines them. The parts are independent, so a device can give each its
/// own workers; the answer is the unsplit one to rounding. Causal masking, the window and
/// ALiBi are measured against the whole row's length, so each part runs with them written out
/// as its mask and bias.
pub fn forward_cached_split(
    cache: &KvCache<'_>,
    inputs: &Inputs<'_>,
    opts: &Options,
    splits: usize,
    mut run: impl FnMut(&Inputs<'_>, &Options) -> Result<Forward>,
) -> Result<Forward> {
    if splits == 0 {
        return Err(AttnError::ZeroBlockSize { arg: "splits" });
    }
    check_cached(cache, inputs, opts)?;
    let (batch, heads, n_q, d) = inputs.q.dim();
    let n_max = cache.capacity(&inputs.k);
    let mut out = Array4::zeros((batch, heads, n_q, d));
    let mut lse = Array3::from_elem((batch, heads, n_q), f32::NEG_INFINITY);
    let part_opts = Options { causal: false, window: None, ..opts.clone() };
    for b in 0..batch {
        let l = cache.seqlens[b];
        if l == 0 {
            continue;
        }
        let (k, v) = (cache.keys(b, inputs.k), cache.keys(b, inputs.v));
        let keys = KeyRange::new(n_q, l, opts.causal, opts.window);
        let row_bias = inputs.bias.map(|x| row_of(x, b, n_max));
        let step = l.div_ceil(splits);
        let mut parts = Vec::new();
        for j0 in (0..l).step_by(step) {
            let j1 = (j0 + step).min(l);
            // the part's mask: the row's key range and the caller's mask, keys j0..j1
            let mut mask = Array4::from_shape_fn((1, heads, n_q, j1 - j0), |(_, _, i, j)| {
                keys.start(i) <= j0 + j && j0 + j < keys.end(i)
            });
            match inputs.mask {
                Some(Mask::KeyPadding(m)) => {
                    mask.zip_mut_with(&m.slice(s![b..b + 1, j0..j1]), |a, &k| *a &= k)
                }
                Some(Mask::Full(m)) => {
                    let m = row_of(m, b, n_max);
                    let m = if m.dim().3 == 1 { m } else { m.slice_move(s![.., .., .., j0..j1]) };
                    mask.zip_mut_with(&m, |a, &k| *a &= k);
                }
                None => {}
            }
            // the part's bias: the caller's, and ALiBi's distances from the whole row
            let has_bias = row_bias.is_some() || inputs.alibi.is_some();
            let bias = has_bias.then(|| {
                Array4::from_shape_fn((1, heads, n_q, j1 - j0), |(_, h, i, j)| {
                    let mut x = row_bias.as_ref().map_or(0.0, |x| {
                        let (_, bh, bq, bk) = x.dim();
                        let at = |n: usize, idx: usize| if n == 1 { 0 } else { idx };
                        x[(0, at(bh, h), at(bq, i), at(bk, j0 + j))]
                    });
                    if let Some(a) = inputs.alibi {
                        let slope = a[(if a.dim().0 == 1 { 0 } else { b }, h)];
                        x -= slope * (i as f32 + l as f32 - n_q as f32 - (j0 + j) as f32).abs();
                    }
                    x
                })
            });
            let part = Inputs {
                q: inputs.q.slice_move(s![b..b + 1, .., .., ..]),
                k: k.view().slice_move(s![.., .., j0..j1, ..]),
                v: v.view().slice_move(s![.., .., j0..j1, ..]),
                mask: Some(Mask::Full(mask.view())),
                bias: bias.as_ref().map(|x| x.view()),
                alibi: None,
            };
            parts.push(run(&part, &part_opts)?);
        }
        for h in 0..heads {
            for i in 0..n_q {
                let row = parts.iter().map(|f| (f.out.slice(s![0, h, i, ..]), f.lse[(0, h, i)]));
                lse[(b, h, i)] = merge_partials(row, out.slice_mut(s![b, h, i, ..]));
            }
        }
    }
    Ok(Forward { out, lse, traffic: None })
}

/// One unpacked call that computes what a packed or cached call computes, for checking
/// against the reference: the spans (causal, the window) written out as its mask, ALiBi's
/// in-span distances and the caller's bias as its bias, a cache's valid keys gathered
/// contiguous (zeros beyond them). Dropout is not carried over.
#[derive(Clone, Debug)]
pub struct Unpacked {
    pub mask: Array4<bool>,
    pub bias: Array4<f32>,
    pub opts: Options,
    /// A cache's K and V, `[batch, kv_heads, capacity, d]`.
    kv: Option<(Array4<f32>, Array4<f32>)>,
}

impl Unpacked {
    /// The unpacked call's inputs: `inputs`' Q (and K, V unless a cache's), this mask and bias.
    pub fn inputs<'s>(&'s self, inputs: &Inputs<'s>) -> Inputs<'s> {
        let (k, v) = self.kv.as_ref().map_or((inputs.k, inputs.v), |(k, v)| (k.view(), v.view()));
        Inputs::new(inputs.q, k, v)
            .with_mask(Mask::Full(self.mask.view()))
            .with_bias(self.bias.view())
    }
}

impl SeqLens {
    /// The one unpacked call this packed call equals.
    pub fn unpacked(&self, inputs: &Inputs<'_>, opts: &Options) -> Unpacked {
        let (n_q, n_k) = self.totals();
        let spans = (0..self.num_seqs()).map(|s| (self.q_span(s), self.k_span(s))).collect();
        let st = explicit_structure(1, n_q, n_k, opts, |_| Vec::clone(&spans));
        let (mask, bias, opts) = unpacked_equivalent(inputs, opts, st);
        Unpacked { mask, bias, opts, kv: None }
    }
}

impl KvCache<'_> {
    /// The one unpacked call this cached call (over the caches or pools `inputs.k`, `.v`)
    /// equals, over the caches' capacity.
    pub fn unpacked(&self, inputs: &Inputs<'_>, opts: &Options) -> Unpacked {
        let (batch, _, n_q, _) = inputs.q.dim();
        let (k, v) = (self.gathered(inputs.k), self.gathered(inputs.v));
        let n_k = k.dim().2;
        let st = explicit_structure(batch, n_q, n_k, opts, |b| vec![(0..n_q, 0..self.seqlens[b])]);
        let whole = Inputs {
            q: inputs.q,
            k: k.view(),
            v: v.view(),
            mask: inputs.mask.map(Mask::shorten),
            bias: inputs.bias,
            alibi: inputs.alibi,
        };
        let (mask, bias, opts) = unpacked_equivalent(&whole, opts, st);
        Unpacked { mask, bias, opts, kv: Some((k, v)) }
    }
}
