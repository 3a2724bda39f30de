//! The float64 reference: the contract evaluated directly, one score at a time.
//!
//! It is written for obviousness, not speed: every score is a dot product, every mask rule
//! is checked where the score is formed, the softmax is the textbook one. It shares no tile
//! code with the stages (only the validation and the dropout hash, which *define* the
//! contract), so a bug in a stage's masking cannot hide behind the same bug here.

use ndarray::{Array2, Array3, Array4, ArrayView1, ArrayView4, s};
use rayon::prelude::*;

use crate::dropout::DropoutParams;
use crate::error::Result;
use crate::options::{Inputs, Options, Placement, Window};
use crate::problem::Problem;
use crate::shape::Shape;

/// A problem in float64, owned: what the reference computes on.
#[derive(Clone, Debug)]
pub struct RefProblem {
    pub q: Array4<f64>,
    pub k: Array4<f64>,
    pub v: Array4<f64>,
    /// Broadcastable to `[b, h, n_q, n_k]`; `true` keeps.
    pub mask: Option<Array4<bool>>,
    /// Broadcastable to `[b, h, n_q, n_k]`.
    pub bias: Option<Array4<f64>>,
    pub scale: f64,
    pub causal: bool,
    pub window: Option<Window>,
    pub softcap: Option<f64>,
    /// `[batch or 1, heads]`
    pub alibi: Option<Array2<f64>>,
    pub dropout: Option<DropoutParams>,
    /// The block of a larger problem this one is ([`Placement`]): positions are the whole's.
    pub placement: Option<Placement>,
}

/// The reference forward: output `[b, h, n_q, d]` and log-sum-exp `[b, h, n_q]`.
#[derive(Clone, Debug)]
pub struct RefForward {
    pub out: Array4<f64>,
    pub lse: Array3<f64>,
}

/// The reference gradients.
#[derive(Clone, Debug)]
pub struct RefGrads {
    pub dq: Array4<f64>,
    pub dk: Array4<f64>,
    pub dv: Array4<f64>,
    /// The bias gradient in the bias's shape, when there is a bias.
    pub dbias: Option<Array4<f64>>,
}

/// Validates like every stage, then runs the float64 forward.
pub fn forward(inputs: &Inputs<'_>, opts: &Options) -> Result<RefForward> {
    Ok(RefProblem::from_inputs(inputs, opts)?.forward())
}

/// Validates like every stage, then runs the float64 backward for the upstream gradient
/// `d_out`, `[b, h, n_q, d]`.
pub fn backward(
    inputs: &Inputs<'_>,
    opts: &Options,
    d_out: ArrayView4<'_, f32>,
) -> Result<RefGrads> {
    let p = RefProblem::from_inputs(inputs, opts)?;
    crate::problem::check_d_out(&p.shape(), d_out)?;
    Ok(p.backward(&d_out.mapv(f64::from)))
}

/// One (batch, key/value head)'s share of the gradients: b, kv head, dQ of its query
/// heads, dK, dV, and its terms of dBias (in the bias's shape).
type KvHeadGrads = (usize, usize, Array3<f64>, Array2<f64>, Array2<f64>, Option<Array4<f64>>);

fn bidx(len: usize, i: usize) -> usize {
    if len == 1 { 0 } else { i }
}

impl RefProblem {
    /// Validates the inputs ([`Problem::new`]) and converts them to float64.
    pub fn from_inputs(inputs: &Inputs<'_>, opts: &Options) -> Result<Self> {
        let p = Problem::new(inputs, opts)?;
        let to64 = |a: ArrayView4<'_, f32>| a.mapv(f64::from);
        Ok(Self {
            q: to64(p.q),
            k: to64(p.k),
            v: to64(p.v),
            mask: p.mask.map(|m| m.to_owned()),
            bias: p.bias.map(to64),
            scale: p.scale as f64,
            causal: p.causal,
            window: opts.window,
            softcap: p.softcap.map(f64::from),
            alibi: p.alibi.map(|a| a.mapv(f64::from)),
            dropout: p.dropout,
            placement: p.placement,
        })
    }

    pub fn shape(&self) -> Shape {
        Shape::from_dims(self.q.dim(), self.k.dim())
    }

    /// `(i, j)` as positions in the whole problem (itself, unless it is a placed block) and
    /// the whole problem's `(n_q, n_k)`.
    fn whole(&self, i: usize, j: usize) -> ((usize, usize), (usize, usize)) {
        let sh = self.shape();
        match self.placement {
            None => ((i, j), (sh.n_q, sh.n_k)),
            Some(p) => ((p.q_start + i, p.k_start + j), (p.n_q, p.n_k)),
        }
    }

    /// Whether a rule removes `(b, h, i, j)`: causal masking, the window or the mask.
    pub fn removed(&self, b: usize, h: usize, i: usize, j: usize) -> bool {
        let ((wi, wj), (n_q, n_k)) = self.whole(i, j);
        // Causal, bottom-right aligned: key j is hidden from query i when j > i + n_k − n_q.
        if self.causal && wj + n_q > wi + n_k {
            return true;
        }
        // The window keeps i + n_k − n_q − left ≤ j ≤ i + n_k − n_q + right (−1: unbounded).
        if let Some(w) = self.window {
            let diagonal = wi as i64 + n_k as i64 - n_q as i64;
            let j = wj as i64;
            if (w.left >= 0 && j < diagonal - w.left) || (w.right >= 0 && j > diagonal + w.right) {
                return true;
            }
        }
        if let Some(m) = &self.mask {
            let d = m.dim();
            if !m[[bidx(d.0, b), bidx(d.1, h), bidx(d.2, i), bidx(d.3, j)]] {
                return true;
            }
        }
        false
    }

    /// The scaled score `scale · q_i · k_j` of `(b, h, i, j)`, before any modifier.
    pub fn raw_score(&self, b: usize, h: usize, i: usize, j: usize) -> f64 {
        let sh = self.shape();
        let kv_h = h / (sh.heads / sh.kv_heads);
        let qi: ArrayView1<f64> = self.q.slice(s![b, h, i, ..]);
        let kj: ArrayView1<f64> = self.k.slice(s![b, kv_h, j, ..]);
        self.scale * qi.dot(&kj)
    }

    /// d score / d raw score: the softcap's 1 − tanh²(raw/c), else 1.
    pub fn softcap_slope(&self, b: usize, h: usize, i: usize, j: usize) -> f64 {
        self.softcap.map_or(1.0, |c| 1.0 - (self.raw_score(b, h, i, j) / c).tanh().powi(2))
    }

    /// The score of `(b, h, i, j)` with every modifier, in the contract's order — softcap,
    /// bias, ALiBi — or −∞ where a rule removes it.
    pub fn score(&self, b: usize, h: usize, i: usize, j: usize) -> f64 {
        if self.removed(b, h, i, j) {
            return f64::NEG_INFINITY;
        }
        let mut x = self.raw_score(b, h, i, j);
        if let Some(c) = self.softcap {
            x = c * (x / c).tanh();
        }
        if let Some(bias) = &self.bias {
            let d = bias.dim();
            x += bias[[bidx(d.0, b), bidx(d.1, h), bidx(d.2, i), bidx(d.3, j)]];
        }
        if let Some(slopes) = &self.alibi {
            let ((wi, wj), (n_q, n_k)) = self.whole(i, j);
            let distance = (wi as f64 + n_k as f64 - n_q as f64 - wj as f64).abs();
            x -= slopes[[bidx(slopes.nrows(), b), h]] * distance;
        }
        x
    }

    /// Where `(b, h, i, j)` lands in the bias (its broadcast axes at 0).
    fn bias_index(&self, b: usize, h: usize, i: usize, j: usize) -> Option<[usize; 4]> {
        let d = self.bias.as_ref()?.dim();
        Some([bidx(d.0, b), bidx(d.1, h), bidx(d.2, i), bidx(d.3, j)])
    }

    /// Row `i` of head `(b, h)`: the softmax weights P (before dropout), the dropout factors
    /// Z (0 or 1/(1 − p)), and the log-sum-exp. A row with every key removed has P = 0 and
    /// log-sum-exp −∞.
    pub fn row(&self, b: usize, h: usize, i: usize) -> (Vec<f64>, Vec<f64>, f64) {
        let n_k = self.k.dim().2;
        let scores: Vec<f64> = (0..n_k).map(|j| self.score(b, h, i, j)).collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let z: Vec<f64> = (0..n_k)
            .map(|j| {
                let (wi, wj) = self.whole(i, j).0; // dropout hashes the whole problem's (i, j)
                match &self.dropout {
                    Some(d) if !d.keep(b, h, wi, wj) => 0.0,
                    Some(d) => 1.0 / (1.0 - d.p as f64),
                    None => 1.0,
                }
            })
            .collect();
        if max == f64::NEG_INFINITY {
            return (vec![0.0; n_k], z, f64::NEG_INFINITY);
        }
        let e: Vec<f64> = scores.iter().map(|&x| (x - max).exp()).collect();
        let sum: f64 = e.iter().sum();
        (e.iter().map(|x| x / sum).collect(), z, max + sum.ln())
    }

    /// out = (P ∘ Z) V, row by row.
    pub fn forward(&self) -> RefForward {
        let sh = self.shape();
        let mut out = Array4::zeros(sh.q_dims());
        let mut lse = Array3::zeros(sh.lse_dims());
        let rows: Vec<(usize, usize, usize, Vec<f64>, f64)> = (0..sh.batch * sh.heads * sh.n_q)
            .into_par_iter()
            .map(|flat| {
                let (b, h, i) =
                    (flat / (sh.heads * sh.n_q), flat / sh.n_q % sh.heads, flat % sh.n_q);
                let (p, z, l) = self.row(b, h, i);
                let kv_h = h / sh.group();
                let mut o = vec![0.0; sh.head_dim];
                for j in 0..sh.n_k {
                    let w = p[j] * z[j];
                    if w != 0.0 {
                        for (oc, vc) in o.iter_mut().zip(self.v.slice(s![b, kv_h, j, ..])) {
                            *oc += w * vc;
                        }
                    }
                }
                (b, h, i, o, l)
            })
            .collect();
        for (b, h, i, o, l) in rows {
            out.slice_mut(s![b, h, i, ..]).assign(&ndarray::aview1(&o));
            lse[[b, h, i]] = l;
        }
        RefForward { out, lse }
    }

    /// The gradients of `sum(out ∘ d_out)` by the chain rule through the softmax:
    /// dV = (P∘Z)ᵀ dO, dP = (dO Vᵀ) ∘ Z, dS = P ∘ (dP − rowsum(P ∘ dP)), dBias = dS summed
    /// over the bias's broadcast axes, and through the softcap's slope σ = 1 − tanh²:
    /// dQ = scale · (dS∘σ) K, dK = scale · (dS∘σ)ᵀ Q (key/value heads sum over their query
    /// heads).
    pub fn backward(&self, d_out: &Array4<f64>) -> RefGrads {
        let sh = self.shape();
        let group = sh.group();
        // One task per (batch, key/value head) owns its dK, dV and its query heads' dQ.
        let parts: Vec<KvHeadGrads> = (0..sh.batch * sh.kv_heads)
            .into_par_iter()
            .map(|flat| {
                let (b, kv_h) = (flat / sh.kv_heads, flat % sh.kv_heads);
                let mut dq = Array3::zeros((group, sh.n_q, sh.head_dim));
                let mut dk = Array2::zeros((sh.n_k, sh.head_dim));
                let mut dv = Array2::zeros((sh.n_k, sh.head_dim));
                let mut dbias = self.bias.as_ref().map(|t| Array4::zeros(t.dim()));
                let k = self.k.slice(s![b, kv_h, .., ..]);
                let v = self.v.slice(s![b, kv_h, .., ..]);
                for g in 0..group {
                    let h = kv_h * group + g;
                    for i in 0..sh.n_q {
                        let (p, z, _) = self.row(b, h, i);
                        let d_o = d_out.slice(s![b, h, i, ..]);
                        let qi = self.q.slice(s![b, h, i, ..]);
                        let dp: Vec<f64> = (0..sh.n_k).map(|j| d_o.dot(&v.row(j)) * z[j]).collect();
                        let d_row: f64 = (0..sh.n_k).map(|j| p[j] * dp[j]).sum();
                        for j in 0..sh.n_k {
                            if p[j] == 0.0 {
                                continue;
                            }
                            dv.row_mut(j).scaled_add(p[j] * z[j], &d_o);
                            let ds = p[j] * (dp[j] - d_row);
                            if let (Some(db), Some(at)) = (&mut dbias, self.bias_index(b, h, i, j))
                            {
                                db[at] += ds;
                            }
                            let ds = ds * self.softcap_slope(b, h, i, j);
                            dq.slice_mut(s![g, i, ..]).scaled_add(self.scale * ds, &k.row(j));
                            dk.row_mut(j).scaled_add(self.scale * ds, &qi);
                        }
                    }
                }
                (b, kv_h, dq, dk, dv, dbias)
            })
            .collect();
        let mut grads = RefGrads {
            dq: Array4::zeros(sh.q_dims()),
            dk: Array4::zeros(sh.kv_dims()),
            dv: Array4::zeros(sh.kv_dims()),
            dbias: self.bias.as_ref().map(|t| Array4::zeros(t.dim())),
        };
        for (b, kv_h, dq, dk, dv, dbias) in parts {
            grads.dq.slice_mut(s![b, kv_h * group..(kv_h + 1) * group, .., ..]).assign(&dq);
            grads.dk.slice_mut(s![b, kv_h, .., ..]).assign(&dk);
            grads.dv.slice_mut(s![b, kv_h, .., ..]).assign(&dv);
            if let (Some(total), Some(part)) = (&mut grads.dbias, dbias) {
                *total += &part;
            }
        }
        grads
    }

    /// The magnitudes of the terms each gradient entry sums, `M`: the backward with absolute
    /// values, where dP and D are replaced by the sums of |dO|·|v| and |dO|·|O| their dot
    /// products add up. An f32 backward cannot be more accurate than float32's rounding of
    /// these terms: where they cancel (a row whose weights are nearly one-hot has
    /// dP_j − D ≈ 0) the result is tiny and its relative error large, whatever the algorithm.
    /// The stage checks discount `u · M` (see `testing`).
    pub fn backward_magnitudes(&self, d_out: &Array4<f64>) -> RefGrads {
        let sh = self.shape();
        let group = sh.group();
        let fwd = self.forward();
        let mut m = RefGrads {
            dq: Array4::zeros(sh.q_dims()),
            dk: Array4::zeros(sh.kv_dims()),
            dv: Array4::zeros(sh.kv_dims()),
            dbias: self.bias.as_ref().map(|t| Array4::zeros(t.dim())),
        };
        for b in 0..sh.batch {
            for h in 0..sh.heads {
                let kv_h = h / group;
                for i in 0..sh.n_q {
                    let (p, z, _) = self.row(b, h, i);
                    let d_o = d_out.slice(s![b, h, i, ..]).mapv(f64::abs);
                    let d_mag = d_o.dot(&fwd.out.slice(s![b, h, i, ..]).mapv(f64::abs));
                    let q_abs = self.q.slice(s![b, h, i, ..]).mapv(f64::abs);
                    for j in 0..sh.n_k {
                        if p[j] == 0.0 {
                            continue;
                        }
                        let v_abs = self.v.slice(s![b, kv_h, j, ..]).mapv(f64::abs);
                        let k_abs = self.k.slice(s![b, kv_h, j, ..]).mapv(f64::abs);
                        let ds = p[j] * (d_o.dot(&v_abs) * z[j] + d_mag);
                        if let (Some(db), Some(at)) = (&mut m.dbias, self.bias_index(b, h, i, j)) {
                            db[at] += ds;
                        }
                        let ds = ds * self.softcap_slope(b, h, i, j);
                        m.dq.slice_mut(s![b, h, i, ..]).scaled_add(self.scale.abs() * ds, &k_abs);
                        m.dk.slice_mut(s![b, kv_h, j, ..])
                            .scaled_add(self.scale.abs() * ds, &q_abs);
                        m.dv.slice_mut(s![b, kv_h, j, ..]).scaled_add(p[j] * z[j], &d_o);
                    }
                }
            }
        }
        m
    }

    /// `sum(out ∘ d_out)`: the scalar whose gradients [`RefProblem::backward`] computes, for
    /// finite-difference checks.
    pub fn loss(&self, d_out: &Array4<f64>) -> f64 {
        (&self.forward().out * d_out).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{AlibiKind, BiasKind, Case, MaskKind};
    use crate::varlen::{merge_partials, sequence_inputs};

    #[test]
    fn placed_blocks_merged_by_the_log_sum_exp_are_the_whole_problem() {
        // the whole problem's rows 4..13, their keys cut in three placed blocks
        let case = Case {
            causal: true,
            window: Some((6, -1)),
            mask: MaskKind::Full,
            bias: BiasKind::Full,
            alibi: AlibiKind::PerBatchHead,
            dropout: Some(0.3),
            softcap: Some(2.0),
            ..Case::new(Shape::new(2, 2, 17, 8).with_n_k(21), 5)
        };
        let data = case.build();
        let inputs = data.inputs();
        let whole = forward(&inputs, &data.opts).unwrap();
        let rows = 4..13;
        let parts: Vec<RefForward> = [0..6, 6..15, 15..21]
            .into_iter()
            .map(|keys| {
                let cut = sequence_inputs(&inputs, rows.clone(), keys.clone());
                let pl = Placement { q_start: rows.start, k_start: keys.start, n_q: 17, n_k: 21 };
                forward(&cut, &data.opts.clone().placed(pl)).unwrap()
            })
            .collect();
        let to32 = |x: &RefForward| (x.out.mapv(|v| v as f32), x.lse.mapv(|v| v as f32));
        let parts: Vec<_> = parts.iter().map(to32).collect();
        for (b, h, i) in every_row(2, 2, rows.len()) {
            let mut out = ndarray::Array1::<f32>::zeros(8);
            let lse = merge_partials(
                parts.iter().map(|(o, l)| (o.slice(s![b, h, i, ..]), l[[b, h, i]])),
                out.view_mut(),
            );
            let want = whole.out.slice(s![b, h, rows.start + i, ..]);
            let want_lse = whole.lse[[b, h, rows.start + i]];
            assert!((lse as f64 - want_lse).abs() < 1e-5 * want_lse.abs().max(1.0), "{b} {h} {i}");
            for (x, y) in out.iter().zip(want) {
                assert!((*x as f64 - y).abs() < 1e-5, "{b} {h} {i}: {x} vs {y}");
            }
        }
    }

    fn every_row(b: usize, h: usize, n: usize) -> impl Iterator<Item = (usize, usize, usize)> {
        (0..b).flat_map(move |b| (0..h).flat_map(move |h| (0..n).map(move |i| (b, h, i))))
    }
}
