//! The ring on threads: each rank a thread holding its zigzag chunks of Q, K and V, the K/V
//! chunks passed round the ring through [`Channels`], each block computed by a block stage —
//! FlashAttention-2 on the CPU ([`attn_flash2::Flash2Cpu`]) or on the GPU
//! ([`attn_flash2::Flash2Cuda`], every rank sharing the one device) — and folded into the
//! rank's running (O, lse).

use std::ops::Range;

use attn_core::varlen::sequence_inputs;
use attn_core::{
    AttnError, Forward, Grads, Inputs, KeyRange, Mask, Options, Placement, Problem, Result, Shape,
    Stage,
};
use ndarray::{Array3, Array4, ArrayView4, ArrayViewMut4, Axis, Zip, s};

use crate::layout::zigzag;
use crate::transport::{Channels, Transport, is_hang_up};

/// The name the CLI and the errors use.
pub const NAME: &str = "ring";
/// Ranks when nothing says otherwise.
pub const DEFAULT_RANKS: usize = 4;

/// Rows `rows` of the whole sequence's K and V: one chunk, as it travels round the ring.
#[derive(Clone, Debug)]
struct KvChunk {
    rows: Range<usize>,
    k: Array4<f32>,
    v: Array4<f32>,
}

impl KvChunk {
    fn bytes(&self) -> u64 {
        4 * (self.k.len() + self.v.len()) as u64
    }
}

/// Rows `rows` of the whole sequence's queries, which stay on their rank; for the backward
/// also the forward's O and lse of these rows and their dO.
struct QueryChunk {
    rows: Range<usize>,
    q: Array4<f32>,
    saved: Option<(Forward, Array4<f32>)>,
}

/// What every rank knows of the whole problem: its shape, the options, and the tensors that
/// belong to query rows or to no row (the mask, the bias, the ALiBi slopes), of which a rank
/// reads only its own rows.
struct Whole<'a> {
    /// What computes each block (given its placement in the whole problem).
    stage: &'static dyn Stage,
    inputs: Inputs<'a>,
    opts: Options,
    shape: Shape,
    keys: KeyRange,
}

/// What a ring call measured: the blocks each rank computed and skipped, and the bytes it
/// sent to its neighbour.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RingStats {
    pub ranks: usize,
    /// Per rank: (query chunk, key chunk) blocks computed.
    pub blocks: Vec<usize>,
    /// Per rank: blocks causal masking or the window hide entirely, never computed.
    pub skipped: Vec<usize>,
    /// Per rank: bytes sent to the next rank (K and V; in the backward also dK and dV).
    pub bytes_sent: Vec<u64>,
}

impl<'a> Whole<'a> {
    /// Checks the whole call once, before any rank starts, so that an error names the whole
    /// tensors' indices (as every other stage's does).
    fn new(
        stage: &'static dyn Stage,
        inputs: &Inputs<'a>,
        opts: &Options,
        ranks: usize,
    ) -> Result<Self> {
        if ranks == 0 {
            return Err(AttnError::ZeroBlockSize { arg: "ranks" });
        }
        if opts.placement.is_some() {
            return Err(AttnError::Unsupported {
                stage: NAME,
                what: "a placement",
                advice: "pass the whole problem: the ring places its blocks itself",
            });
        }
        let p = Problem::new(inputs, opts)?;
        Ok(Self { stage, inputs: *inputs, opts: opts.clone(), shape: p.shape, keys: p.keys })
    }

    /// Rank `r`'s query chunks and K/V chunks (copies: what a rank holds in its own memory).
    fn shard(&self, r: usize, ranks: usize) -> (Vec<QueryChunk>, Vec<KvChunk>) {
        let i = &self.inputs;
        let queries = zigzag(self.shape.n_q, ranks, r)
            .into_iter()
            .map(|rows| QueryChunk {
                q: i.q.slice(s![.., .., rows.clone(), ..]).to_owned(),
                rows,
                saved: None,
            })
            .collect();
        let kv = zigzag(self.shape.n_k, ranks, r)
            .into_iter()
            .map(|rows| KvChunk {
                k: i.k.slice(s![.., .., rows.clone(), ..]).to_owned(),
                v: i.v.slice(s![.., .., rows.clone(), ..]).to_owned(),
                rows,
            })
            .collect();
        (queries, kv)
    }

    /// Whether the block (query chunk, key chunk) has any work: both non-empty, and not
    /// wholly hidden by causal masking or the window.
    fn visible(&self, q: &QueryChunk, kv: &KvChunk) -> bool {
        let (qr, kr) = (&q.rows, &kv.rows);
        !qr.is_empty()
            && !kr.is_empty()
            && !self.keys.tile_hidden((qr.start, qr.end), (kr.start, kr.len()))
    }

    // ANCHOR: block
    /// The block's inputs and options: the rank's queries, the visiting keys and values, the
    /// mask and bias cut to the block, and its placement in the whole problem, so that
    /// causal masking, the window, ALiBi and dropout see the whole problem's positions.
    fn block<'b>(&'b self, q: &'b QueryChunk, kv: &'b KvChunk) -> (Inputs<'b>, Options) {
        let cut = sequence_inputs(&self.inputs, q.rows.clone(), kv.rows.clone());
        let inputs = Inputs {
            q: q.q.view(),
            k: kv.k.view(),
            v: kv.v.view(),
            mask: cut.mask.map(Mask::shorten),
            bias: cut.bias.map(|b| b.reborrow()),
            alibi: cut.alibi.map(|a| a.reborrow()),
        };
        let placement = Placement {
            q_start: q.rows.start,
            k_start: kv.rows.start,
            n_q: self.shape.n_q,
            n_k: self.shape.n_k,
        };
        (inputs, self.opts.clone().placed(placement))
    }
    // ANCHOR_END: block
}

// ANCHOR: fold
/// Folds a block's partial result into a query chunk's running one: both are softmaxes over
/// disjoint sets of keys, each with its log-sum-exp, and the merged row is
/// `lse = log(e^lse + e^lse_b)`, `O = e^(lse − lse_new) O + e^(lse_b − lse_new) O_b` — the
/// online softmax's step, with whole blocks of keys for tiles. A block row that saw no key
/// (lse_b = −∞) changes nothing; a row no block has reached yet (lse = −∞) takes the block's.
fn fold(o: &mut Array4<f32>, lse: &mut Array3<f32>, part: &Forward) {
    Zip::from(o.lanes_mut(Axis(3))).and(lse).and(part.out.lanes(Axis(3))).and(&part.lse).for_each(
        |mut o, lse, o_b, &lse_b| {
            if lse_b == f32::NEG_INFINITY {
                return;
            }
            let m = lse.max(lse_b);
            let (a, b) = ((*lse - m).exp(), (lse_b - m).exp());
            let sum = a + b;
            Zip::from(&mut o).and(&o_b).for_each(|x, &y| *x = (a * *x + b * y) / sum);
            *lse = m + sum.ln();
        },
    );
}
// ANCHOR_END: fold

// ANCHOR: rank_forward
/// One rank's forward: R steps; at each it sends the K/V chunks it holds on to the next rank,
/// computes its query chunks against them while they travel, and takes the previous rank's.
/// After R steps every query chunk has met every key chunk.
fn rank_forward(
    t: &mut impl Transport<Vec<KvChunk>>,
    whole: &Whole<'_>,
    queries: &[QueryChunk],
    mut held: Vec<KvChunk>,
    stats: &mut RankStats,
) -> Result<Vec<(Array4<f32>, Array3<f32>)>> {
    let mut acc: Vec<_> = queries
        .iter()
        .map(|q| {
            let (b, h, n, d) = q.q.dim();
            (Array4::zeros((b, h, n, d)), Array3::from_elem((b, h, n), f32::NEG_INFINITY))
        })
        .collect();
    for step in 0..t.ranks() {
        let more = step + 1 < t.ranks();
        if more {
            stats.bytes_sent += held.iter().map(KvChunk::bytes).sum::<u64>();
            t.send(held.clone())?;
        }
        for (q, (o, lse)) in queries.iter().zip(&mut acc) {
            for kv in &held {
                if !whole.visible(q, kv) {
                    stats.skipped += usize::from(!q.rows.is_empty() && !kv.rows.is_empty());
                    continue;
                }
                let (inputs, opts) = whole.block(q, kv);
                fold(o, lse, &whole.stage.forward(&inputs, &opts)?);
                stats.blocks += 1;
            }
        }
        if more {
            held = t.recv()?;
        }
    }
    Ok(acc)
}
// ANCHOR_END: rank_forward

/// What travels in the backward: K/V chunks ahead of the compute, and after it the dK, dV
/// accumulated for the chunks, which follow them round the ring and arrive home at the end.
enum BackwardMessage {
    Kv(Vec<KvChunk>),
    Grads(Vec<(Array4<f32>, Array4<f32>)>),
}

/// A rank's share of the gradients: dQ of its query chunks, dK and dV of its own K/V chunks,
/// and its terms of dBias (block rows, block keys, the block's dBias).
type RankGrads = (Vec<Array4<f32>>, Vec<(Array4<f32>, Array4<f32>)>, Vec<BiasTerm>);
type BiasTerm = (Range<usize>, Range<usize>, Array4<f32>);

fn unexpected() -> AttnError {
    AttnError::Unsupported {
        stage: NAME,
        what: "a message out of order",
        advice: "this is a bug in the ring's schedule; please report it",
    }
}

// ANCHOR: rank_backward
/// One rank's backward: the K/V chunks go round as in the forward, each with its dK, dV
/// accumulator behind it. A block's contribution is FlashAttention-2's backward on the block
/// with the whole row's O and lse (P = exp(S − lse) is then the whole softmax's block, and
/// D = rowsum(dO ∘ O) the whole row's), so dQ sums over the blocks a rank computes and dK, dV
/// over the ranks a chunk visits. After the R-th step each accumulator reaches its home rank.
fn rank_backward(
    t: &mut impl Transport<BackwardMessage>,
    whole: &Whole<'_>,
    queries: &[QueryChunk],
    mut held: Vec<KvChunk>,
    stats: &mut RankStats,
) -> Result<RankGrads> {
    let mut dq: Vec<Array4<f32>> = queries.iter().map(|q| Array4::zeros(q.q.dim())).collect();
    let zeros = |kv: &[KvChunk]| -> Vec<_> {
        kv.iter().map(|c| (Array4::zeros(c.k.dim()), Array4::zeros(c.v.dim()))).collect()
    };
    let mut grads = zeros(&held);
    let mut dbias = Vec::new();
    for step in 0..t.ranks() {
        let more = step + 1 < t.ranks();
        if more {
            stats.bytes_sent += held.iter().map(KvChunk::bytes).sum::<u64>();
            t.send(BackwardMessage::Kv(held.clone()))?;
        }
        for (q, dq) in queries.iter().zip(&mut dq) {
            let (fwd, d_out) = q.saved.as_ref().expect("the backward's chunks carry O and dO");
            for (kv, (dk, dv)) in held.iter().zip(&mut grads) {
                if !whole.visible(q, kv) {
                    stats.skipped += usize::from(!q.rows.is_empty() && !kv.rows.is_empty());
                    continue;
                }
                let (inputs, opts) = whole.block(q, kv);
                let g = whole.stage.backward(&inputs, &opts, fwd, d_out.view())?;
                *dq += &g.dq;
                *dk += &g.dk;
                *dv += &g.dv;
                if let Some(db) = g.dbias {
                    dbias.push((q.rows.clone(), kv.rows.clone(), db));
                }
                stats.blocks += 1;
            }
        }
        // the accumulators go on behind their chunks (after the last step: home)
        stats.bytes_sent += grads.iter().map(|(k, v)| 4 * (k.len() + v.len()) as u64).sum::<u64>();
        t.send(BackwardMessage::Grads(grads))?;
        if more {
            let BackwardMessage::Kv(kv) = t.recv()? else { return Err(unexpected()) };
            held = kv;
        }
        let BackwardMessage::Grads(g) = t.recv()? else { return Err(unexpected()) };
        grads = g;
    }
    Ok((dq, grads, dbias))
}
// ANCHOR_END: rank_backward

#[derive(Default)]
struct RankStats {
    blocks: usize,
    skipped: usize,
    bytes_sent: u64,
}

/// Runs `work` on `ranks` threads linked in a ring, rank r's result at index r, with its
/// statistics. A rank that fails makes its neighbours fail when they next talk to it; the
/// first rank's own error is returned, not theirs.
fn on_ranks<M: Send, R: Send>(
    ranks: usize,
    work: impl Fn(usize, &mut Channels<M>, &mut RankStats) -> Result<R> + Sync,
) -> Result<(Vec<R>, RingStats)> {
    let results: Vec<(Result<R>, RankStats)> = std::thread::scope(|s| {
        let handles: Vec<_> = Channels::ring(ranks)
            .into_iter()
            .enumerate()
            .map(|(r, mut link)| {
                let work = &work;
                s.spawn(move || {
                    let mut stats = RankStats::default();
                    (work(r, &mut link, &mut stats), stats)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a rank panicked")).collect()
    });
    let mut stats = RingStats { ranks, ..RingStats::default() };
    let mut values = Vec::with_capacity(ranks);
    let mut first_error = None;
    for (result, rank) in results {
        stats.blocks.push(rank.blocks);
        stats.skipped.push(rank.skipped);
        stats.bytes_sent.push(rank.bytes_sent);
        match result {
            Ok(v) => values.push(v),
            // a rank's own error wins over its neighbours' hang-ups
            Err(e) => match &first_error {
                Some(f) if !is_hang_up(f) || is_hang_up(&e) => {}
                _ => first_error = Some(e),
            },
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok((values, stats)),
    }
}

/// Ring attention's forward over `ranks` ranks: the answer of FlashAttention-2 on the whole
/// problem, to rounding.
pub fn forward(inputs: &Inputs<'_>, opts: &Options) -> Result<Forward> {
    forward_with(&attn_flash2::Flash2Cpu, inputs, opts, DEFAULT_RANKS).map(|(f, _)| f)
}

/// [`forward`] on `ranks` ranks with `stage` computing each block (a stage that honours
/// [`Options::placement`]: FlashAttention-2 on the CPU or the GPU), with what the ring
/// measured.
pub fn forward_with(
    stage: &'static dyn Stage,
    inputs: &Inputs<'_>,
    opts: &Options,
    ranks: usize,
) -> Result<(Forward, RingStats)> {
    let whole = Whole::new(stage, inputs, opts, ranks)?;
    let (parts, stats) = on_ranks(ranks, |r, link, stats| {
        let (queries, kv) = whole.shard(r, ranks);
        let acc = rank_forward(link, &whole, &queries, kv, stats)?;
        Ok(queries.into_iter().map(|q| q.rows).zip(acc).collect::<Vec<_>>())
    })?;
    let sh = whole.shape;
    let mut out = Array4::zeros(sh.q_dims());
    let mut lse = Array3::zeros(sh.lse_dims());
    for (rows, (o, l)) in parts.into_iter().flatten() {
        out.slice_mut(s![.., .., rows.clone(), ..]).assign(&o);
        lse.slice_mut(s![.., .., rows]).assign(&l);
    }
    Ok((Forward { out, lse, traffic: None }, stats))
}

/// Ring attention's backward over [`DEFAULT_RANKS`] ranks.
pub fn backward(
    inputs: &Inputs<'_>,
    opts: &Options,
    fwd: &Forward,
    d_out: ArrayView4<'_, f32>,
) -> Result<Grads> {
    backward_with(&attn_flash2::Flash2Cpu, inputs, opts, fwd, d_out, DEFAULT_RANKS).map(|(g, _)| g)
}

/// [`backward`] on `ranks` ranks with `stage` computing each block, with what the ring
/// measured.
pub fn backward_with(
    stage: &'static dyn Stage,
    inputs: &Inputs<'_>,
    opts: &Options,
    fwd: &Forward,
    d_out: ArrayView4<'_, f32>,
    ranks: usize,
) -> Result<(Grads, RingStats)> {
    let whole = Whole::new(stage, inputs, opts, ranks)?;
    attn_core::check_saved(&whole.shape, fwd.out.view(), fwd.lse.view())?;
    attn_core::check_d_out(&whole.shape, d_out)?;
    let (parts, stats) = on_ranks(ranks, |r, link, stats| {
        let (mut queries, kv) = whole.shard(r, ranks);
        for q in &mut queries {
            let rows = q.rows.clone();
            let saved = Forward {
                out: fwd.out.slice(s![.., .., rows.clone(), ..]).to_owned(),
                lse: fwd.lse.slice(s![.., .., rows.clone()]).to_owned(),
                traffic: None,
            };
            q.saved = Some((saved, d_out.slice(s![.., .., rows, ..]).to_owned()));
        }
        let own: Vec<Range<usize>> = kv.iter().map(|c| c.rows.clone()).collect();
        let (dq, dkv, dbias) = rank_backward(link, &whole, &queries, kv, stats)?;
        let q_rows: Vec<Range<usize>> = queries.into_iter().map(|q| q.rows).collect();
        Ok((
            q_rows.into_iter().zip(dq).collect::<Vec<_>>(),
            own.into_iter().zip(dkv).collect::<Vec<_>>(),
            dbias,
        ))
    })?;
    let sh = whole.shape;
    let mut dq = Array4::zeros(sh.q_dims());
    let mut dk = Array4::zeros(sh.kv_dims());
    let mut dv = Array4::zeros(sh.kv_dims());
    let mut dbias = whole.inputs.bias.filter(|_| opts.bias_grad).map(|b| Array4::zeros(b.dim()));
    for (q_parts, kv_parts, bias_terms) in parts {
        for (rows, g) in q_parts {
            dq.slice_mut(s![.., .., rows, ..]).assign(&g);
        }
        for (rows, (gk, gv)) in kv_parts {
            dk.slice_mut(s![.., .., rows.clone(), ..]).assign(&gk);
            dv.slice_mut(s![.., .., rows, ..]).assign(&gv);
        }
        if let Some(total) = dbias.as_mut() {
            // the bias's broadcast axes gather terms from every rank: a sum across the ring
            for (q_rows, k_rows, term) in bias_terms {
                let mut cut = scores_block_mut(total.view_mut(), q_rows, k_rows);
                cut += &term;
            }
        }
    }
    Ok((Grads { dq, dk, dv, dbias, traffic: None }, stats))
}

/// Rows `q` and keys `k` of a tensor broadcastable to `[.., .., n_q, n_k]` (an axis of
/// length 1 stays whole), as [`sequence_inputs`] cuts the bias.
fn scores_block_mut(
    a: ArrayViewMut4<'_, f32>,
    q: Range<usize>,
    k: Range<usize>,
) -> ArrayViewMut4<'_, f32> {
    let (_, _, nq, nk) = a.dim();
    let q = if nq == 1 { 0..1 } else { q };
    let k = if nk == 1 { 0..1 } else { k };
    a.slice_move(s![.., .., q, k])
}
