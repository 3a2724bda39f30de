//! Packed variable-length batches, natively: the tiles of every sequence in one parallel
//! pass, written straight into the packed outputs.
//!
//! [`attn_core::varlen::forward_packed`] runs a stage once per sequence: each call checks its
//! inputs again, allocates its results, copies them into the packed tensors and ends in a
//! barrier where the threads wait for the call's last tile. Here the checks run once over the
//! packed call, each sequence is a [`Problem`] over its spans (shapes only), and the tasks of
//! all sequences — a query block each in the forward, a key/value head each in the backward —
//! run together, the costliest first. The numbers are those of the stage called per
//! sequence: the same tiles, in the same order within each task.

use std::cmp::Reverse;
use std::ops::Range;

use attn_core::blocks::{KvHeadGrads, row_blocks};
use attn_core::memory::zeros_written;
use attn_core::problem::{check_d_out, check_saved};
use attn_core::varlen::{self, SeqLens, check_packed, sequence_inputs, sequence_options};
use attn_core::{Forward, Grads, Inputs, Options, Problem, Result, TrafficCounter};
use ndarray::{Array3, Array4, ArrayView4, ArrayViewMut, Axis, Dimension, s};
use rayon::prelude::*;

use super::{RowSource, Scratch, TileBufs, block_sizes, forward_block, kv_head_backward, row_dots};

/// Each sequence's problem over its spans, `None` for one without queries or keys (its rows
/// stay zero, their log-sum-exp −∞, as a fully masked row's).
fn sequences<'a>(
    seqs: &SeqLens,
    inputs: &Inputs<'a>,
    opts: &Options,
) -> Result<Vec<Option<Problem<'a>>>> {
    (0..seqs.num_seqs())
        .map(|s| {
            let (q, k) = (seqs.q_span(s), seqs.k_span(s));
            if q.is_empty() || k.is_empty() {
                return Ok(None);
            }
            Problem::shapes_only(&sequence_inputs(inputs, q, k), &sequence_options(opts, s))
                .map(Some)
        })
        .collect()
}

/// `t` cut along `axis` into the consecutive `spans` that cover it.
fn split_spans<'a, D: Dimension>(
    mut t: ArrayViewMut<'a, f32, D>,
    axis: Axis,
    spans: impl Iterator<Item = Range<usize>>,
) -> Vec<ArrayViewMut<'a, f32, D>> {
    let mut parts = Vec::new();
    for span in spans {
        let (part, rest) = t.split_at(axis, span.len());
        parts.push(part);
        t = rest;
    }
    parts
}

/// The largest block sizes any sequence uses: one worker's buffers serve every sequence.
fn largest_blocks(parts: &[Option<Problem<'_>>], opts: &Options) -> (usize, usize) {
    parts.iter().flatten().fold((1, 1), |(r, c), p| {
        let (b_r, b_c) = block_sizes(&p.shape, opts);
        (r.max(b_r), c.max(b_c))
    })
}

// ANCHOR: packed_forward
/// The forward of a packed batch: one task per (sequence, head, query block).
pub fn forward(seqs: &SeqLens, inputs: &Inputs<'_>, opts: &Options) -> Result<Forward> {
    let shape = check_packed(seqs, inputs, opts)?;
    let parts = sequences(seqs, inputs, opts)?;
    let mut out = Array4::<f32>::zeros(shape.q_dims());
    let mut lse = Array3::from_elem(shape.lse_dims(), f32::NEG_INFINITY);
    let q_spans = || (0..seqs.num_seqs()).map(|s| seqs.q_span(s));
    let outs = split_spans(out.view_mut(), Axis(2), q_spans());
    let lses = split_spans(lse.view_mut(), Axis(2), q_spans());
    let mut tasks = Vec::new();
    for ((p, o), l) in parts.iter().zip(outs).zip(lses) {
        let Some(p) = p else { continue };
        let (b_r, b_c) = block_sizes(&p.shape, opts);
        for (o, l) in row_blocks(o, b_r).into_iter().zip(row_blocks(l, b_r)) {
            let rows = o.view.nrows();
            let keys = p.keys.end(o.start + rows - 1).saturating_sub(p.keys.start(o.start));
            tasks.push((rows * keys, p, b_c, o, l));
        }
    }
    tasks.sort_by_key(|t| Reverse(t.0));
    let traffic = TrafficCounter::default();
    let blocks = largest_blocks(&parts, opts);
    tasks.into_par_iter().for_each_init(
        || Scratch::new(blocks, shape.head_dim),
        |sc, (_, p, b_c, o, l)| {
            let head = p.head(o.b, o.h);
            traffic.add(forward_block(&head, p.scale, (o.start, b_c), o.view, l.view, sc, None));
        },
    );
    Ok(Forward { out, lse, traffic: Some(traffic.get()) })
}
// ANCHOR_END: packed_forward

/// The backward of a packed batch: one task per (sequence, key/value head), each running
/// Algorithm 2's loops over its sequence and owning its gradients. Where those tasks are too
/// few or too uneven for the threads (the longest more than half a thread's share), and for
/// the bias gradient (one tensor every sequence adds into), the stage runs per sequence
/// ([`varlen::backward_packed`]) and parallelises inside each.
pub fn backward(
    seqs: &SeqLens,
    inputs: &Inputs<'_>,
    opts: &Options,
    fwd: &Forward,
    d_out: ArrayView4<'_, f32>,
) -> Result<Grads> {
    // decided from the spans alone, before any check: the fallback checks the call itself
    let pairs = (0..seqs.num_seqs()).map(|s| seqs.sequence_pairs(s, opts));
    let largest = pairs.clone().max().unwrap_or(0);
    let total = pairs.sum::<u64>() * inputs.k.dim().1 as u64; // a task a key/value head
    let threads = rayon::current_num_threads() as u64;
    if (opts.bias_grad && inputs.bias.is_some()) || 2 * threads * largest > total {
        return varlen::backward_packed(seqs, inputs, opts, fwd, d_out, super::backward);
    }
    let shape = check_packed(seqs, inputs, opts)?;
    check_d_out(&shape, d_out)?;
    check_saved(&shape, fwd.out.view(), fwd.lse.view())?;
    let parts = sequences(seqs, inputs, opts)?;
    let cost = |p: &Problem<'_>| p.keys.visible_pairs();

    let traffic = TrafficCounter::default();
    // line 4: D = rowsum(dO ∘ O), for every sequence at once
    let d = row_dots(d_out, fwd.out.view(), &traffic);
    let mut dq = zeros_written(shape.q_dims());
    let mut dk = zeros_written(shape.kv_dims());
    let mut dv = zeros_written(shape.kv_dims());
    let q_spans = || (0..seqs.num_seqs()).map(|s| seqs.q_span(s));
    let k_spans = || (0..seqs.num_seqs()).map(|s| seqs.k_span(s));
    let dqs = split_spans(dq.view_mut(), Axis(2), q_spans());
    let dks = split_spans(dk.view_mut(), Axis(2), k_spans());
    let dvs = split_spans(dv.view_mut(), Axis(2), k_spans());

    let mut sources = Vec::new();
    let mut tasks = Vec::new();
    for (s, (((p, dq), dk), dv)) in parts.iter().zip(dqs).zip(dks).zip(dvs).enumerate() {
        let Some(p) = p else { continue };
        let q = seqs.q_span(s);
        sources.push(RowSource {
            q: p.q,
            d_out: d_out.slice_move(s![.., .., q.clone(), ..]),
            lse: fwd.lse.slice(s![.., .., q.clone()]),
            d: d.slice(s![.., .., q]),
        });
        let (dq, dk, dv) = (
            dq.index_axis_move(Axis(0), 0),
            dk.index_axis_move(Axis(0), 0),
            dv.index_axis_move(Axis(0), 0),
        );
        let groups = dq.into_axis_chunks_iter_mut(Axis(0), shape.group());
        let kv = dk.into_outer_iter_mut().zip(dv.into_outer_iter_mut());
        for (kv_h, (dq, (dk, dv))) in groups.zip(kv).enumerate() {
            tasks.push((cost(p), p, sources.len() - 1, KvHeadGrads { b: 0, kv_h, dq, dk, dv }));
        }
    }
    tasks.sort_by_key(|t| Reverse(t.0));
    let blocks = largest_blocks(&parts, opts);
    let softcap = parts.iter().flatten().any(|p| p.softcap.is_some());
    tasks.into_par_iter().for_each_init(
        || TileBufs::new(blocks, softcap),
        |bufs, (_, p, src, g)| {
            let io = kv_head_backward(p, &sources[src], block_sizes(&p.shape, opts), None, g, bufs);
            traffic.add(io);
        },
    );
    Ok(Grads { dq, dk, dv, dbias: None, traffic: Some(traffic.get()) })
}
