//! Validation, and the per-head view every stage computes with.
//!
//! [`Problem::new`] checks the whole contract once (shapes, heads, masks, bias, scale,
//! dropout, block sizes, finite inputs) and resolves the defaults; a stage then asks for a
//! [`Head`] per `(batch, head)` and applies the score modifiers (softcap, bias, ALiBi, the
//! masks and the window) and dropout to its score tiles with [`Head::modify_scores`] and
//! [`Head::apply_dropout`], so every stage has one semantics.

use ndarray::{ArrayView2, ArrayView4, ArrayViewMut2, Axis, Dimension, Zip, s};

use crate::dropout::{DropoutParams, row_key};
use crate::error::{AttnError, Result};
use crate::memory::default_memory_limit;
use crate::options::{Inputs, Mask, Options, Placement};
use crate::shape::{KeyRange, Shape};

/// The largest score magnitude a problem may reach: float32's range with room for a bias and
/// for the backward's products.
pub const SCORE_LIMIT: f64 = 1e30;

/// A validated attention problem.
#[derive(Clone, Debug)]
pub struct Problem<'a> {
    pub shape: Shape,
    /// The resolved scale (`1/√head_dim` unless given).
    pub scale: f32,
    pub causal: bool,
    /// The keys each query sees: causal masking and the sliding window together.
    pub keys: KeyRange,
    /// The softcap `c` of `s ← c · tanh(s / c)`.
    pub softcap: Option<f32>,
    /// Whether the backward returns the bias gradient.
    pub bias_grad: bool,
    pub dropout: Option<DropoutParams>,
    pub q_block: Option<usize>,
    pub k_block: Option<usize>,
    /// Where this call sits in a larger problem ([`Placement`]), checked against the shapes.
    pub placement: Option<Placement>,
    memory_limit: Option<u64>,
    pub q: ArrayView4<'a, f32>,
    pub k: ArrayView4<'a, f32>,
    pub v: ArrayView4<'a, f32>,
    /// The mask as a 4-D view broadcastable to `[b, h, n_q, n_k]` (key padding becomes
    /// `[b, 1, 1, n_k]`).
    pub mask: Option<ArrayView4<'a, bool>>,
    pub bias: Option<ArrayView4<'a, f32>>,
    /// ALiBi slopes `[batch or 1, heads]`.
    pub alibi: Option<ArrayView2<'a, f32>>,
}

fn dims<D: Dimension>(a: &ndarray::ArrayView<'_, impl Sized, D>) -> Vec<usize> {
    a.shape().to_vec()
}

/// Checks that `got` broadcasts to `full` (each axis equal or 1).
fn check_broadcast(arg: &'static str, got: &[usize], full: [usize; 4]) -> Result<()> {
    let ok = got.iter().zip(full).all(|(&g, f)| g == f || g == 1);
    if ok {
        Ok(())
    } else {
        Err(AttnError::ShapeMismatch {
            arg,
            got: got.to_vec(),
            expected: format!(
                "it must broadcast to [batch, heads, n_q, n_k] = {full:?} (each axis its full length or 1)"
            ),
        })
    }
}

/// An element type whose values the checks read as f32: f32 itself, or a 16-bit float (the
/// tensor-core stage's bf16 / f16 from the `half` crate).
pub trait Element: Copy + Into<f32> + Send + Sync {}
impl<E: Copy + Into<f32> + Send + Sync> Element for E {}

/// One parallel pass over the rows (last axis) of a 4-D tensor: whether every element is
/// finite, and the largest squared row norm (accumulated in f64).
/// A tensor below `SERIAL_SCAN` elements is scanned on the calling thread: handing a few
/// microseconds of work to the thread pool costs more than the work (the caller sleeps until
/// a worker wakes, runs it and wakes the caller), and every call scans three tensors.
fn scan_rows<E: Element>(t: &ArrayView4<'_, E>) -> (bool, f64) {
    const SERIAL_SCAN: usize = 1 << 16;
    let lane = |(ok, m): (bool, f64), lane: ndarray::ArrayView1<'_, E>| {
        let (finite, norm2) = match lane.as_slice() {
            Some(xs) => row_stats(xs),
            None => row_stats(&lane.to_vec()),
        };
        (ok && finite, m.max(norm2))
    };
    let lanes = Zip::from(t.lanes(Axis(3)));
    if t.len() < SERIAL_SCAN {
        lanes.fold((true, 0.0f64), lane)
    } else {
        lanes.par_fold(|| (true, 0.0f64), lane, |a, b| (a.0 && b.0, a.1.max(b.1)))
    }
}

/// Whether every element of a row is finite, and its squared norm in f64. Eight partial
/// sums, so the compiler can keep them in vector registers instead of waiting on one
/// chain of dependent f64 additions (the scan runs on every call, before any tile).
fn row_stats<E: Element>(xs: &[E]) -> (bool, f64) {
    const LANES: usize = 8;
    let (mut finite, mut acc) = (true, [0.0f64; LANES]);
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            let x: f32 = x.into();
            finite &= x.is_finite();
            *a += f64::from(x) * f64::from(x);
        }
    }
    for &x in rest {
        let x: f32 = x.into();
        finite &= x.is_finite();
        acc[0] += f64::from(x) * f64::from(x);
    }
    (finite, acc.iter().sum())
}

/// Index of the first element that fails `ok`, if any (called only once a scan has found
/// one, to name it).
fn first_bad<E: Element, D: Dimension>(
    a: &ndarray::ArrayView<'_, E, D>,
    ok: impl Fn(f32) -> bool + Sync,
) -> Option<(Vec<usize>, f32)> {
    // `iter` walks in logical (row-major) order, so the position unravels over the shape.
    let (mut flat, value) = a.iter().map(|&x| x.into()).enumerate().find(|&(_, x)| !ok(x))?;
    let mut index = vec![0; a.ndim()];
    for (axis, &len) in a.shape().iter().enumerate().rev() {
        index[axis] = flat % len;
        flat /= len;
    }
    Some((index, value))
}

impl<'a> Problem<'a> {
    /// Validates `inputs` and `opts` against the contract (DESIGN.md) and resolves defaults.
    pub fn new(inputs: &Inputs<'a>, opts: &Options) -> Result<Self> {
        let p = Self::shapes_only(inputs, opts)?;
        check_values(inputs.q, inputs.k, inputs.v, inputs.bias, p.scale)?;
        Ok(p)
    }

    /// [`Problem::new`] without reading the values of q, k, v and the bias: shapes, masks,
    /// options, ALiBi slopes. For a caller whose tensors have another element type (the
    /// tensor cores' bf16 / f16): it passes stand-ins of the right shapes here and its own
    /// tensors to [`check_values`].
    pub fn shapes_only(inputs: &Inputs<'a>, opts: &Options) -> Result<Self> {
        let (q, k, v) = (inputs.q, inputs.k, inputs.v);
        if q.is_empty() {
            return Err(AttnError::EmptyAxis { arg: "q", shape: dims(&q) });
        }
        let (batch, heads, _, head_dim) = q.dim();
        let (kb, kv_heads, n_k, kd) = k.dim();
        if kb != batch || kd != head_dim {
            return Err(AttnError::ShapeMismatch {
                arg: "k",
                got: dims(&k),
                expected: format!(
                    "q is {:?}, so k must be [{batch}, kv_heads, n_k, {head_dim}]",
                    dims(&q)
                ),
            });
        }
        if k.is_empty() {
            return Err(AttnError::EmptyAxis { arg: "k", shape: dims(&k) });
        }
        if v.dim() != k.dim() {
            return Err(AttnError::ShapeMismatch {
                arg: "v",
                got: dims(&v),
                expected: format!("k is {:?}, and v must have the same shape", dims(&k)),
            });
        }
        if heads % kv_heads != 0 {
            return Err(AttnError::HeadsNotDivisible { heads, kv_heads });
        }
        let shape = Shape::from_dims(q.dim(), k.dim());
        let full = shape.score_dims();

        let mask = match inputs.mask {
            None => None,
            Some(Mask::KeyPadding(m)) => {
                let (mb, mk) = m.dim();
                if (mb != batch && mb != 1) || mk != n_k {
                    return Err(AttnError::ShapeMismatch {
                        arg: "mask",
                        got: dims(&m),
                        expected: format!(
                            "a key-padding mask must be [batch, n_k] = [{batch}, {n_k}]"
                        ),
                    });
                }
                Some(m.insert_axis(Axis(1)).insert_axis(Axis(1)))
            }
            Some(Mask::Full(m)) => {
                check_broadcast("mask", m.shape(), full)?;
                Some(m)
            }
        };
        if let Some(b) = inputs.bias {
            check_broadcast("bias", b.shape(), full)?;
        }
        if let Some(a) = inputs.alibi {
            let (ab, ah) = a.dim();
            if (ab != batch && ab != 1) || ah != heads {
                return Err(AttnError::ShapeMismatch {
                    arg: "alibi",
                    got: dims(&a),
                    expected: format!(
                        "ALiBi slopes must be [heads] = [{heads}] or [batch, heads] = [{batch}, {heads}]"
                    ),
                });
            }
        }
        if let Some(w) = opts.window
            && (w.left < -1 || w.right < -1)
        {
            return Err(AttnError::InvalidWindow { left: w.left, right: w.right });
        }
        if let Some(c) = opts.softcap
            && !(c.is_finite() && c > 0.0)
        {
            return Err(AttnError::InvalidSoftcap(c));
        }
        if opts.bias_grad && inputs.bias.is_none() {
            return Err(AttnError::BiasGradWithoutBias);
        }

        let scale = opts.scale.unwrap_or(1.0 / (head_dim as f32).sqrt());
        if !scale.is_finite() || scale == 0.0 {
            return Err(AttnError::InvalidScale(scale));
        }
        let dropout = opts.dropout.map(DropoutParams::new).transpose()?;
        if opts.q_block == Some(0) {
            return Err(AttnError::ZeroBlockSize { arg: "q_block" });
        }
        if opts.k_block == Some(0) {
            return Err(AttnError::ZeroBlockSize { arg: "k_block" });
        }
        if opts.sram == Some(0) {
            return Err(AttnError::ZeroBlockSize { arg: "sram" });
        }
        if let Some(pl) = opts.placement {
            check_placement(&pl, &shape)?;
        }
        let diagonal = opts.placement.map_or(n_k as i64 - shape.n_q as i64, |pl| pl.diagonal());

        let p = Self {
            shape,
            scale,
            causal: opts.causal,
            keys: KeyRange::placed(shape.n_q, n_k, diagonal, opts.causal, opts.window),
            softcap: opts.softcap,
            bias_grad: opts.bias_grad,
            dropout,
            q_block: opts.q_block,
            k_block: opts.k_block,
            placement: opts.placement,
            memory_limit: opts.memory_limit,
            q,
            k,
            v,
            mask,
            bias: inputs.bias,
            alibi: inputs.alibi,
        };
        p.check_alibi()?;
        Ok(p)
    }

    /// ALiBi slopes must be finite, and the scores they make must stay within f32's range.
    fn check_alibi(&self) -> Result<()> {
        let Some(a) = self.alibi else { return Ok(()) };
        if let Some((index, value)) = first_bad(&a, f32::is_finite) {
            return Err(AttnError::NonFinite { arg: "alibi", index, value });
        }
        let max_slope = a.iter().fold(0.0f64, |m, &x| m.max((x as f64).abs()));
        // distances are the whole problem's when the call is a block of one
        let (n_q, n_k) =
            self.placement.map_or((self.shape.n_q, self.shape.n_k), |p| (p.n_q, p.n_k));
        let bound = max_slope * (n_q + n_k) as f64;
        if bound > SCORE_LIMIT {
            return Err(AttnError::ScoreOverflow { bound });
        }
        Ok(())
    }

    /// [`Problem::new`] for a backward call, which also checks what the forward returned
    /// ([`check_saved`]) and the upstream gradient ([`check_d_out`]).
    pub fn for_backward(
        inputs: &Inputs<'a>,
        opts: &Options,
        fwd: &crate::stage::Forward,
        d_out: ArrayView4<'_, f32>,
    ) -> Result<Self> {
        let p = Self::new(inputs, opts)?;
        check_saved(&p.shape, fwd.out.view(), fwd.lse.view())?;
        check_d_out(&p.shape, d_out)?;
        Ok(p)
    }

    /// The workspace limit in bytes: the caller's, or the machine's available memory.
    pub fn memory_limit(&self) -> u64 {
        self.memory_limit.unwrap_or_else(default_memory_limit)
    }

    /// Refuses, before anything is allocated, a workspace of `needed_bytes` above the limit.
    pub fn check_workspace(
        &self,
        stage: &'static str,
        what: &'static str,
        needed_bytes: u64,
        advice: &'static str,
    ) -> Result<()> {
        let limit_bytes = self.memory_limit();
        if needed_bytes > limit_bytes {
            return Err(AttnError::WorkspaceTooLarge {
                stage,
                what,
                needed_bytes,
                limit_bytes,
                advice,
            });
        }
        Ok(())
    }

    /// The view of query head `h` of batch entry `b`.
    pub fn head(&self, b: usize, h: usize) -> Head<'a> {
        let Shape { n_q, n_k, .. } = self.shape;
        let kv_h = self.shape.kv_head(h);
        let pick = |len: usize, i: usize| if len == 1 { 0 } else { i };
        let bias = self.bias.map(|t| {
            let (tb, th, _, _) = t.dim();
            t.index_axis_move(Axis(0), pick(tb, b)).index_axis_move(Axis(0), pick(th, h))
        });
        let mask = self.mask.map(|t| {
            let (tb, th, _, _) = t.dim();
            t.index_axis_move(Axis(0), pick(tb, b)).index_axis_move(Axis(0), pick(th, h))
        });
        let alibi = self.alibi.map(|a| a[[pick(a.nrows(), b), h]]);
        Head {
            b,
            h,
            kv_h,
            q: self.q.index_axis_move(Axis(0), b).index_axis_move(Axis(0), h),
            k: self.k.index_axis_move(Axis(0), b).index_axis_move(Axis(0), kv_h),
            v: self.v.index_axis_move(Axis(0), b).index_axis_move(Axis(0), kv_h),
            n_q,
            n_k,
            q_start: self.placement.map_or(0, |p| p.q_start),
            k_start: self.placement.map_or(0, |p| p.k_start),
            keys: self.keys,
            softcap: self.softcap,
            alibi,
            bias,
            mask,
            dropout: self.dropout,
        }
    }
}

/// One `(batch, head)` slice of a problem, with its masks, bias and dropout resolved.
#[derive(Clone, Debug)]
pub struct Head<'a> {
    pub b: usize,
    pub h: usize,
    /// The key/value head this query head reads (GQA).
    pub kv_h: usize,
    /// `[n_q, head_dim]`
    pub q: ArrayView2<'a, f32>,
    /// `[n_k, head_dim]`
    pub k: ArrayView2<'a, f32>,
    /// `[n_k, head_dim]`
    pub v: ArrayView2<'a, f32>,
    pub n_q: usize,
    pub n_k: usize,
    /// Where row 0 and key 0 sit in the whole problem ([`Placement`]; 0 for a whole one):
    /// dropout hashes the whole problem's positions.
    q_start: usize,
    k_start: usize,
    /// The keys each query sees (causal masking and the window).
    pub keys: KeyRange,
    softcap: Option<f32>,
    /// This head's ALiBi slope.
    alibi: Option<f32>,
    /// `[n_q or 1, n_k or 1]`, broadcast on use.
    bias: Option<ArrayView2<'a, f32>>,
    /// `[n_q or 1, n_k or 1]`, broadcast on use.
    mask: Option<ArrayView2<'a, bool>>,
    dropout: Option<DropoutParams>,
}

impl Head<'_> {
    /// The first key query `i` of this head sees ([`KeyRange::start`]).
    #[inline]
    pub fn key_start(&self, i: usize) -> usize {
        self.keys.start(i)
    }

    /// One past the last key query `i` of this head sees ([`KeyRange::end`]).
    #[inline]
    pub fn key_end(&self, i: usize) -> usize {
        self.keys.end(i)
    }

    /// The key blocks of size `b_c` the query rows `i0 .. i0 + rows` see, as block starts on
    /// the grid `0, b_c, 2·b_c, …`: the tiles causal masking and the window leave out entirely
    /// are never visited.
    pub fn key_blocks(
        &self,
        i0: usize,
        rows: usize,
        b_c: usize,
    ) -> impl Iterator<Item = usize> + use<> {
        let (start, end) = (self.key_start(i0), self.key_end(i0 + rows - 1));
        let first = if end > start { start / b_c * b_c } else { end };
        (first..end).step_by(b_c)
    }

    /// True when causal masking and the window hide every key `j0 .. j0 + cols` from every
    /// query `i0 .. i0 + rows`, so a tiled stage can skip the whole tile.
    #[inline]
    pub fn tile_hidden(&self, (i0, rows): (usize, usize), (j0, cols): (usize, usize)) -> bool {
        self.keys.tile_hidden((i0, i0 + rows), (j0, cols))
    }

    /// Whether a tile of scores (rows `i0 .. i0 + rows`, columns `j0 .. j0 + cols`) needs
    /// [`Head::modify_scores`] at all: it does with a softcap, a bias, ALiBi or a mask, or when
    /// the causal or window limit of some row falls inside it. Tiles inside the band skip it.
    #[inline]
    pub fn tile_needs_mods(&self, (i0, rows): (usize, usize), (j0, cols): (usize, usize)) -> bool {
        self.softcap.is_some()
            || self.bias.is_some()
            || self.alibi.is_some()
            || self.mask.is_some()
            || self.keys.tile_cut((i0, i0 + rows), (j0, cols))
    }

    // ANCHOR: modify_scores
    /// Applies the score modifiers, in the contract's order, to a tile of scaled scores `s`
    /// (rows `i0..`, columns `j0..`): the softcap `s ← c·tanh(s/c)`, the bias, ALiBi's
    /// −slope·|i + n_k − n_q − j|, then −∞ where the mask, causal masking or the window removes
    /// a position. With a softcap, `tanh` (when given, the tile's shape) keeps tanh(s/c) for
    /// the backward's derivative ([`Head::softcap_grad`]).
    pub fn modify_scores(
        &self,
        i0: usize,
        j0: usize,
        mut s: ArrayViewMut2<'_, f32>,
        mut tanh: Option<ArrayViewMut2<'_, f32>>,
    ) {
        let cols = s.ncols();
        for (r, mut row) in s.rows_mut().into_iter().enumerate() {
            let i = i0 + r;
            if let Some(c) = self.softcap {
                match tanh.as_mut() {
                    Some(t) => Zip::from(&mut row).and(t.row_mut(r)).for_each(|x, t| {
                        *t = (*x / c).tanh();
                        *x = c * *t;
                    }),
                    None => row.mapv_inplace(|x| c * (x / c).tanh()),
                }
            }
            if let Some(bias) = &self.bias {
                let b = bias.row(if bias.nrows() == 1 { 0 } else { i });
                if b.len() == 1 {
                    row += b[0];
                } else {
                    row += &b.slice(s![j0..j0 + cols]);
                }
            }
            if let Some(slope) = self.alibi {
                let diagonal = i as i64 + self.keys.diagonal;
                for (c, x) in row.iter_mut().enumerate() {
                    *x -= slope * (diagonal - (j0 + c) as i64).abs() as f32;
                }
            }
            if let Some(mask) = &self.mask {
                let m = mask.row(if mask.nrows() == 1 { 0 } else { i });
                for (c, x) in row.iter_mut().enumerate() {
                    if !m[if m.len() == 1 { 0 } else { j0 + c }] {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
            self.keys.hide_outside(i, j0, row);
        }
    }
    // ANCHOR_END: modify_scores

    // ANCHOR: softcap_grad
    /// The softcap's chain rule on a tile of score gradients: d(c·tanh(s/c))/ds = 1 − tanh²(s/c),
    /// with `tanh` as [`Head::modify_scores`] kept it. Without a softcap, nothing.
    pub fn softcap_grad(&self, ds: ArrayViewMut2<'_, f32>, tanh: ArrayView2<'_, f32>) {
        if self.softcap.is_some() {
            Zip::from(ds).and(tanh).for_each(|g, &t| *g *= 1.0 - t * t);
        }
    }
    // ANCHOR_END: softcap_grad

    /// Bytes of mask and bias read per score entry (4 for a bias, 1 for a boolean mask):
    /// what a tile of scores costs to load besides Q and K.
    pub fn score_mod_bytes(&self) -> usize {
        4 * self.bias.is_some() as usize + self.mask.is_some() as usize
    }

    /// Whether this head has dropout.
    pub fn has_dropout(&self) -> bool {
        self.dropout.is_some()
    }

    /// Multiplies a tile of attention weights (rows `i0..`, columns `j0..`) by the dropout
    /// factors: 0 for a dropped weight, `1/(1 − p)` for a kept one.
    pub fn apply_dropout(&self, i0: usize, j0: usize, mut p: ArrayViewMut2<'_, f32>) {
        let Some(d) = &self.dropout else { return };
        for (r, mut row) in p.rows_mut().into_iter().enumerate() {
            let key = row_key(d.seed, self.b, self.h, self.q_start + i0 + r);
            for (c, x) in row.iter_mut().enumerate() {
                *x *= d.factor(key, self.k_start + j0 + c);
            }
        }
    }
}

/// Refuses a [`Placement`] where `stage` takes whole problems only (packed batches, KV
/// caches, the GPU kernels).
pub fn refuse_placement(placement: Option<Placement>, stage: &'static str) -> Result<()> {
    if placement.is_some() {
        return Err(AttnError::Unsupported {
            stage,
            what: "a placement (a block of a larger problem)",
            advice: "run the blocks on the CPU stages, or pass the whole problem",
        });
    }
    Ok(())
}

/// A placement must hold the call's queries and keys inside the whole problem.
fn check_placement(pl: &Placement, shape: &Shape) -> Result<()> {
    let fits =
        |start: usize, len: usize, whole: usize| start.checked_add(len).is_some_and(|e| e <= whole);
    if !fits(pl.q_start, shape.n_q, pl.n_q) || !fits(pl.k_start, shape.n_k, pl.n_k) {
        return Err(AttnError::InvalidLengths {
            arg: "placement",
            reason: format!(
                "puts {} queries at {} and {} keys at {} of a problem of {} queries and {} keys: the block must lie inside the whole problem",
                shape.n_q, pl.q_start, shape.n_k, pl.k_start, pl.n_q, pl.n_k
            ),
        });
    }
    Ok(())
}

/// A zero-strided f32 view of `dims` (every element the one zero): the stand-in for a tensor
/// of another element type, or not yet on the host, whose shape alone [`Problem::shapes_only`]
/// checks.
pub fn stand_in(dims: (usize, usize, usize, usize)) -> ArrayView4<'static, f32> {
    static ZERO: [f32; 1] = [0.0];
    use ndarray::ShapeBuilder;
    ArrayView4::from_shape(dims.strides((0, 0, 0, 0)), &ZERO[..])
        .expect("zero strides address the one element")
}

/// The checks on the values of a call's operands: q, k, v finite, a bias without NaN or
/// +∞, and no score that could overflow f32 (bounded by Cauchy–Schwarz from the largest row
/// norms of q and k, the scale and the largest finite bias).
pub fn check_values<E: Element>(
    q: ArrayView4<'_, E>,
    k: ArrayView4<'_, E>,
    v: ArrayView4<'_, E>,
    bias: Option<ArrayView4<'_, f32>>,
    scale: f32,
) -> Result<()> {
    let mut max_norms = [0.0f64; 3];
    for (i, (arg, t)) in [("q", q), ("k", k), ("v", v)].into_iter().enumerate() {
        let (finite, max_norm2) = scan_rows(&t);
        if !finite && let Some((index, value)) = first_bad(&t, f32::is_finite) {
            return Err(AttnError::NonFinite { arg, index, value });
        }
        max_norms[i] = max_norm2.sqrt();
    }
    if let Some(b) = bias
        && let Some((index, value)) = first_bad(&b, |x| !x.is_nan() && x != f32::INFINITY)
    {
        return Err(AttnError::InvalidBias { index, value });
    }

    // Cauchy–Schwarz bounds every score and every partial sum of its dot product, so
    // below this bound no score can overflow, whatever the order of summation.
    let max_bias = bias.map_or(0.0, |b| {
        b.iter().filter(|x| x.is_finite()).fold(0.0f64, |m, &x| m.max((x as f64).abs()))
    });
    let bound = (scale as f64).abs() * max_norms[0] * max_norms[1] + max_bias;
    if bound > SCORE_LIMIT {
        return Err(AttnError::ScoreOverflow { bound });
    }
    Ok(())
}

/// Checks the upstream gradient of a backward call: `[b, h, n_q, d]`, finite.
pub fn check_d_out<E: Element>(shape: &Shape, d_out: ArrayView4<'_, E>) -> Result<()> {
    let (b, h, n, d) = shape.q_dims();
    if d_out.dim() != (b, h, n, d) {
        return Err(AttnError::ShapeMismatch {
            arg: "d_out",
            got: dims(&d_out),
            expected: format!("it must have the shape of the output, [{b}, {h}, {n}, {d}]"),
        });
    }
    if !scan_rows(&d_out).0
        && let Some((index, value)) = first_bad(&d_out, f32::is_finite)
    {
        return Err(AttnError::NonFinite { arg: "d_out", index, value });
    }
    Ok(())
}

/// Checks what a backward call gets back from the forward: the output `[b, h, n_q, d]`
/// and the log-sum-exp `[b, h, n_q]`.
pub fn check_saved<E: Element>(
    shape: &Shape,
    out: ArrayView4<'_, E>,
    lse: ndarray::ArrayView3<'_, f32>,
) -> Result<()> {
    let (b, h, n, d) = shape.q_dims();
    if out.dim() != (b, h, n, d) {
        return Err(AttnError::ShapeMismatch {
            arg: "out",
            got: dims(&out),
            expected: format!("the forward's output must be [{b}, {h}, {n}, {d}]"),
        });
    }
    if lse.dim() != (b, h, n) {
        return Err(AttnError::ShapeMismatch {
            arg: "lse",
            got: lse.shape().to_vec(),
            expected: format!("the forward's log-sum-exp must be [{b}, {h}, {n}]"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_stats_sums_every_element_and_finds_a_non_finite_one_anywhere() {
        for len in [1, 7, 8, 9, 23, 64] {
            let xs: Vec<f32> = (0..len).map(|i| (i as f32 - 3.5) * 0.25).collect();
            let want: f64 = xs.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
            let (finite, norm2) = row_stats(&xs);
            assert!(finite);
            assert!((norm2 - want).abs() <= 1e-12 * want.max(1.0), "len {len}");
            for bad in [0, len / 2, len - 1] {
                let mut ys = xs.clone();
                ys[bad] = f32::NAN;
                assert!(!row_stats(&ys).0, "NaN at {bad} of {len} not seen");
                ys[bad] = f32::NEG_INFINITY;
                assert!(!row_stats(&ys).0, "-inf at {bad} of {len} not seen");
            }
        }
    }

    #[test]
    fn scan_rows_gives_one_answer_on_the_calling_thread_and_on_the_pool() {
        // 2 x 3 x 5 x 7 elements scan on the caller; 2 x 3 x 200 x 70 (84 000) on the pool.
        for (n, d) in [(5, 7), (200, 70)] {
            let mut t = ndarray::Array4::<f32>::from_shape_fn((2, 3, n, d), |(b, h, i, j)| {
                ((b * 31 + h * 17 + i * 7 + j) % 23) as f32 * 0.125 - 1.0
            });
            t[[1, 2, n - 1, d - 1]] = 9.0;
            let want = t
                .lanes(Axis(3))
                .into_iter()
                .map(|l| l.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>())
                .fold(0.0f64, f64::max);
            let (finite, norm2) = scan_rows(&t.view());
            assert!(finite, "n {n}");
            assert!((norm2 - want).abs() <= 1e-12 * want, "n {n}: {norm2} against {want}");
            // a transposed view: rows that are not contiguous
            let (finite, norm2) = scan_rows(&t.view().permuted_axes([1, 0, 2, 3]));
            assert!(finite && (norm2 - want).abs() <= 1e-12 * want, "n {n}, permuted");
            for at in [[0, 0, 0, 0], [1, 1, n / 2, d / 3], [1, 2, n - 1, d - 1]] {
                let mut bad = t.clone();
                bad[at] = f32::NAN;
                assert!(!scan_rows(&bad.view()).0, "NaN at {at:?} of n {n} not seen");
            }
        }
    }
}
