//! Test cases every stage shares: a [`Case`] describes a configuration (shape, causal,
//! mask, bias, dropout, blocks), [`Case::build`] draws its tensors, and
//! [`check_against_reference`] runs a stage and compares everything it returns with the
//! float64 reference. Stage crates drive these from proptest with random configurations.

use ndarray::{Array2, Array4};

use crate::error::Result;
use crate::metrics::{ErrorReport, compare, compare_floored};
use crate::options::{Inputs, Mask, Options};
use crate::reference::RefProblem;
use crate::shape::Shape;
use crate::stage::Stage;
use crate::{random, tolerance};

/// Which boolean mask a case carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaskKind {
    None,
    /// `[batch, n_k]`, a random kept prefix per batch entry.
    KeyPadding,
    /// `[batch, 1, n_q, n_k]`: broadcast over heads, ~70 % kept.
    Full,
    /// `[1, heads, 1, n_k]`: broadcast over batch and queries.
    Broadcast,
}

/// Which additive bias a case carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BiasKind {
    None,
    /// `[batch, heads, n_q, n_k]`, normal entries.
    Full,
    /// `[1, heads, n_q, n_k]` with ~20 % −∞ entries (an ALiBi-like bias that also masks).
    NegInf,
    /// `[batch, 1, 1, n_k]`: one value per key.
    PerKey,
}

/// Which ALiBi slopes a case carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AlibiKind {
    None,
    /// `[1, heads]`: one slope per head, BLOOM's geometric sequence scaled to the shape.
    PerHead,
    /// `[batch, heads]`: random slopes in (0, 0.5), some negative.
    PerBatchHead,
}

/// One test configuration.
#[derive(Clone, Debug)]
pub struct Case {
    pub shape: Shape,
    pub causal: bool,
    pub mask: MaskKind,
    pub bias: BiasKind,
    pub dropout: Option<f32>,
    pub scale: Option<f32>,
    pub q_block: Option<usize>,
    pub k_block: Option<usize>,
    /// A sliding window `(left, right)`, −1 unbounded.
    pub window: Option<(i64, i64)>,
    pub softcap: Option<f32>,
    pub alibi: AlibiKind,
    /// Ask the backward for dBias (only with a bias).
    pub bias_grad: bool,
    pub seed: u64,
}

impl Case {
    /// A plain case: no mask, no bias, no dropout, default scale and blocks.
    pub fn new(shape: Shape, seed: u64) -> Self {
        Self {
            shape,
            causal: false,
            mask: MaskKind::None,
            bias: BiasKind::None,
            dropout: None,
            scale: None,
            q_block: None,
            k_block: None,
            window: None,
            softcap: None,
            alibi: AlibiKind::None,
            bias_grad: false,
            seed,
        }
    }

    /// Draws the tensors of this case (and an upstream gradient for the backward).
    pub fn build(&self) -> CaseData {
        let sh = self.shape;
        let s = self.seed;
        let (q, k, v) = random::qkv(&sh, s);
        let d_out = random::normal(sh.q_dims(), s.wrapping_add(10));
        let (mut mask2, mut mask4) = (None, None);
        match self.mask {
            MaskKind::None => {}
            MaskKind::KeyPadding => mask2 = Some(random::key_padding(sh.batch, sh.n_k, s + 11)),
            MaskKind::Full => {
                mask4 = Some(random::mask((sh.batch, 1, sh.n_q, sh.n_k), 0.7, s + 12))
            }
            MaskKind::Broadcast => {
                mask4 = Some(random::mask((1, sh.heads, 1, sh.n_k), 0.7, s + 13))
            }
        }
        let bias = match self.bias {
            BiasKind::None => None,
            BiasKind::Full => Some(random::bias((sh.batch, sh.heads, sh.n_q, sh.n_k), 0.0, s + 14)),
            BiasKind::NegInf => Some(random::bias((1, sh.heads, sh.n_q, sh.n_k), 0.2, s + 15)),
            BiasKind::PerKey => Some(random::bias((sh.batch, 1, 1, sh.n_k), 0.0, s + 16)),
        };
        let alibi = match self.alibi {
            AlibiKind::None => None,
            AlibiKind::PerHead => Some(Array2::from_shape_fn((1, sh.heads), |(_, h)| {
                // BLOOM's slopes 2^(−8(h+1)/heads), stretched so that the farthest key
                // loses a few units of score.
                0.5f32.powf(8.0 * (h + 1) as f32 / sh.heads as f32) * 32.0
                    / sh.n_q.max(sh.n_k) as f32
            })),
            AlibiKind::PerBatchHead => {
                Some(random::bias((sh.batch, sh.heads, 1, 1), 0.0, s + 17).mapv(|x| 0.3 * x))
                    .map(|a| a.into_shape_with_order((sh.batch, sh.heads)).expect("standard"))
            }
        };
        let opts = Options {
            scale: self.scale,
            causal: self.causal,
            dropout: self.dropout.map(|p| crate::Dropout::new(p, s ^ 0x5eed)),
            q_block: self.q_block,
            k_block: self.k_block,
            sram: None,
            memory_limit: None,
            deterministic: false,
            window: self.window.map(|(l, r)| crate::Window::new(l, r)),
            softcap: self.softcap,
            bias_grad: self.bias_grad && bias.is_some(),
            placement: None,
        };
        CaseData { q, k, v, mask2, mask4, bias, alibi, d_out, opts }
    }
}

/// The tensors and options of a [`Case`].
#[derive(Clone, Debug)]
pub struct CaseData {
    pub q: Array4<f32>,
    pub k: Array4<f32>,
    pub v: Array4<f32>,
    pub mask2: Option<Array2<bool>>,
    pub mask4: Option<Array4<bool>>,
    pub bias: Option<Array4<f32>>,
    /// `[batch or 1, heads]`
    pub alibi: Option<Array2<f32>>,
    pub d_out: Array4<f32>,
    pub opts: Options,
}

impl CaseData {
    /// Q, K, V and dO as an element type holds them (`round`: f32 → that type → f32), for
    /// the 16-bit stages; the identity leaves them as they are.
    pub fn rounded(mut self, round: fn(f32) -> f32) -> Self {
        for a in [&mut self.q, &mut self.k, &mut self.v, &mut self.d_out] {
            a.mapv_inplace(round);
        }
        self
    }

    pub fn inputs(&self) -> Inputs<'_> {
        let mut inputs = Inputs::new(self.q.view(), self.k.view(), self.v.view());
        if let Some(m) = &self.mask2 {
            inputs = inputs.with_mask(Mask::KeyPadding(m.view()));
        }
        if let Some(m) = &self.mask4 {
            inputs = inputs.with_mask(Mask::Full(m.view()));
        }
        if let Some(b) = &self.bias {
            inputs = inputs.with_bias(b.view());
        }
        if let Some(a) = &self.alibi {
            inputs = inputs.with_alibi(a.view());
        }
        inputs
    }
}

/// A stage's errors against the float64 reference, tensor by tensor. The gradients are
/// compared with [`compare_floored`]: their entries are sums of terms that cancel where a
/// softmax row is nearly one-hot, and float32's rounding of those terms is forgiven.
#[derive(Clone, Debug)]
pub struct Check {
    pub out: ErrorReport,
    pub lse: ErrorReport,
    /// dQ, dK, dV; `None` when only the forward was checked.
    pub grads: Option<[ErrorReport; 3]>,
    /// dBias, when the case asked for it.
    pub dbias: Option<ErrorReport>,
}

impl Check {
    /// A forward's output and log-sum-exp against the reference's (no gradients).
    pub fn forward(f: &crate::stage::Forward, r: &crate::reference::RefForward) -> Self {
        Check {
            out: compare(f.out.view(), r.out.view()),
            lse: compare(f.lse.view(), r.lse.view()),
            grads: None,
            dbias: None,
        }
    }

    /// Panics, naming the tensor and its errors, unless every figure is within the
    /// tolerances (normwise, and [`tolerance::ELEMENTWISE_FACTOR`] times that elementwise).
    pub fn assert_within(&self, forward_tol: f64, backward_tol: f64, what: &str) {
        let ef = tolerance::ELEMENTWISE_FACTOR;
        for (name, e) in [("out", &self.out), ("lse", &self.lse)] {
            assert!(
                e.within(forward_tol, ef * forward_tol),
                "{what}: {name} normwise {:.3e} elementwise {:.3e} (worst at flat index {}) vs tolerance {forward_tol:.0e}",
                e.normwise,
                e.elementwise,
                e.worst
            );
        }
        let grads = self.grads.iter().flat_map(|g| ["dq", "dk", "dv"].into_iter().zip(g));
        for (name, e) in grads.chain(self.dbias.iter().map(|e| ("dbias", e))) {
            {
                assert!(
                    e.within(backward_tol, ef * backward_tol),
                    "{what}: {name} normwise {:.3e} elementwise {:.3e} (worst at flat index {}) vs tolerance {backward_tol:.0e} + rounding floor {:.1e}",
                    e.normwise,
                    e.elementwise,
                    e.worst,
                    e.floor
                );
            }
        }
    }

    /// The largest normwise error as a multiple of its tolerance (the forward's for O and the
    /// lse, the backward's, plus the rounding floor, for the gradients); NaN wins. At most 1
    /// where every normwise figure is within its tolerance.
    pub fn worst_ratio(&self, forward_tol: f64, backward_tol: f64) -> f64 {
        let mut ratios = vec![self.out.normwise / forward_tol, self.lse.normwise / forward_tol];
        for e in self.grads.iter().flatten().chain(&self.dbias) {
            ratios.push(e.normwise / (backward_tol + e.floor));
        }
        ratios
            .into_iter()
            .fold(0.0, |w, r| if w.is_nan() || r.is_nan() { f64::NAN } else { w.max(r) })
    }

    /// [`Check::assert_within`] with the f32 tolerances.
    pub fn assert_f32(&self, what: &str) {
        self.assert_within(tolerance::F32_FORWARD, tolerance::F32_BACKWARD, what);
    }
}

/// Runs `stage` forward (and backward when `backward`) on `data` and compares every result
/// with the float64 reference.
pub fn check_against_reference(
    stage: &dyn Stage,
    data: &CaseData,
    backward: bool,
) -> Result<Check> {
    let inputs = data.inputs();
    let fwd = stage.forward(&inputs, &data.opts)?;
    let reference = RefProblem::from_inputs(&inputs, &data.opts)?;
    let ref_fwd = reference.forward();
    let grads = if backward {
        let g = stage.backward(&inputs, &data.opts, &fwd, data.d_out.view())?;
        let d_out = data.d_out.mapv(f64::from);
        let r = reference.backward(&d_out);
        let m = reference.backward_magnitudes(&d_out);
        let dbias = data.opts.bias_grad.then(|| {
            dbias_report(g.dbias.as_ref(), r.dbias.as_ref(), m.dbias.as_ref().expect("a bias"))
        });
        Some((
            [
                compare_floored(g.dq.view(), r.dq.view(), m.dq.view()),
                compare_floored(g.dk.view(), r.dk.view(), m.dk.view()),
                compare_floored(g.dv.view(), r.dv.view(), m.dv.view()),
            ],
            dbias,
        ))
    } else {
        None
    };
    Ok(Check {
        out: compare(fwd.out.view(), ref_fwd.out.view()),
        lse: compare(fwd.lse.view(), ref_fwd.lse.view()),
        dbias: grads.as_ref().and_then(|g| g.1.clone()),
        grads: grads.map(|g| g.0),
    })
}

/// dBias against its reference; a stage that returned none fails (NaN).
fn dbias_report(
    got: Option<&Array4<f32>>,
    reference: Option<&Array4<f64>>,
    magnitudes: &Array4<f64>,
) -> ErrorReport {
    match (got, reference) {
        (Some(g), Some(r)) if g.dim() == r.dim() => {
            compare_floored(g.view(), r.view(), magnitudes.view())
        }
        _ => ErrorReport { normwise: f64::NAN, elementwise: f64::NAN, worst: 0, floor: 0.0 },
    }
}

/// The bytes `stage` moves forward and backward (its [`crate::Traffic`] counts) on random
/// inputs of `shape`, for stages that count them.
///
/// # Panics
/// When the stage fails or counts no traffic.
pub fn traffic_of(
    stage: &dyn Stage,
    shape: Shape,
    opts: &Options,
) -> (crate::Traffic, crate::Traffic) {
    let (q, k, v) = random::qkv(&shape, 1);
    let d_out = random::normal(shape.q_dims(), 2);
    let inputs = Inputs::new(q.view(), k.view(), v.view());
    let fwd = stage.forward(&inputs, opts).unwrap();
    let grads = stage.backward(&inputs, opts, &fwd, d_out.view()).unwrap();
    (
        fwd.traffic.expect("a stage that counts traffic"),
        grads.traffic.expect("its backward counts too"),
    )
}

/// Runs `stage` and `baseline` (both f32) on `data`, forward and backward, and compares the
/// first against the second, with the gradients' rounding floor taken from the float64
/// reference's magnitudes. Stages that are right agree to about twice the f32 tolerances.
pub fn check_against_stage(
    stage: &dyn Stage,
    baseline: &dyn Stage,
    data: &CaseData,
) -> Result<Check> {
    let inputs = data.inputs();
    let (a, b) = (stage.forward(&inputs, &data.opts)?, baseline.forward(&inputs, &data.opts)?);
    let ga = stage.backward(&inputs, &data.opts, &a, data.d_out.view())?;
    let gb = baseline.backward(&inputs, &data.opts, &b, data.d_out.view())?;
    let m = RefProblem::from_inputs(&inputs, &data.opts)?
        .backward_magnitudes(&data.d_out.mapv(f64::from));
    let to64 = |x: &Array4<f32>| x.mapv(f64::from);
    Ok(Check {
        out: compare(a.out.view(), to64(&b.out).view()),
        lse: compare(a.lse.view(), b.lse.mapv(f64::from).view()),
        grads: Some([
            compare_floored(ga.dq.view(), to64(&gb.dq).view(), m.dq.view()),
            compare_floored(ga.dk.view(), to64(&gb.dk).view(), m.dk.view()),
            compare_floored(ga.dv.view(), to64(&gb.dv).view(), m.dv.view()),
        ]),
        dbias: data.opts.bias_grad.then(|| {
            dbias_report(
                ga.dbias.as_ref(),
                gb.dbias.as_ref().map(to64).as_ref(),
                m.dbias.as_ref().expect("a bias"),
            )
        }),
    })
}

/// Asserts that `stage` matches the float64 reference within the f32 tolerances and
/// `baseline` (another stage, e.g. the CPU variant of a GPU stage) within 2e-5 forward and
/// 2e-4 backward, forward and backward, on `data`.
pub fn assert_matches_reference_and(
    stage: &dyn Stage,
    baseline: &dyn Stage,
    data: &CaseData,
    what: &str,
) {
    check_against_reference(stage, data, true).unwrap().assert_f32(what);
    check_against_stage(stage, baseline, data).unwrap().assert_within(
        2e-5,
        2e-4,
        &format!("against {} ({}): {what}", baseline.name(), baseline.device()),
    );
}

/// The edge cases every tiled stage must get right, as claims a stage's tests call with the
/// stage (and the block sizes that exercise its tiling).
pub mod edge_cases {
    use ndarray::{Array4, s};

    use super::{Case, check_against_reference, check_against_stage};
    use crate::shape::Shape;
    use crate::stage::Stage;

    /// Rows whose every key is removed give zeros, a −∞ log-sum-exp and zero gradients;
    /// rows that lose whole blocks (but not all keys) stay exact; nothing is NaN.
    pub fn fully_masked_rows(stage: &dyn Stage, blocks: (usize, usize)) {
        fully_masked_rows_at(stage, blocks, 8);
    }

    /// [`fully_masked_rows`] at head dimension `head_dim` (for kernels built for a few).
    pub fn fully_masked_rows_at(
        stage: &dyn Stage,
        (q_block, k_block): (usize, usize),
        head_dim: usize,
    ) {
        let case = Case {
            q_block: Some(q_block),
            k_block: Some(k_block),
            ..Case::new(Shape::new(2, 2, 9, head_dim).with_n_k(7), 21)
        };
        let mut data = case.build();
        let mut mask = Array4::from_elem((2, 1, 9, 7), true);
        mask.slice_mut(s![1, 0, 2, ..]).fill(false);
        mask.slice_mut(s![.., 0, 5.., ..3]).fill(false);
        data.mask4 = Some(mask);
        let inputs = data.inputs();
        let fwd = stage.forward(&inputs, &data.opts).unwrap();
        let grads = stage.backward(&inputs, &data.opts, &fwd, data.d_out.view()).unwrap();
        for h in 0..2 {
            assert_eq!(fwd.lse[[1, h, 2]], f32::NEG_INFINITY);
            assert!(fwd.out.slice(s![1, h, 2, ..]).iter().all(|&x| x == 0.0));
            assert!(grads.dq.slice(s![1, h, 2, ..]).iter().all(|&x| x == 0.0));
        }
        for t in [&fwd.out, &grads.dq, &grads.dk, &grads.dv] {
            assert!(t.iter().all(|x| x.is_finite()));
        }
        check_against_reference(stage, &data, true).unwrap().assert_f32("fully masked rows");
    }

    /// Scores of ±10⁴ give finite results and an accurate forward.
    pub fn huge_logits(stage: &dyn Stage, blocks: (usize, usize)) {
        huge_logits_at(stage, blocks, 16);
    }

    /// [`huge_logits`] at head dimension `head_dim`.
    pub fn huge_logits_at(stage: &dyn Stage, (q_block, k_block): (usize, usize), head_dim: usize) {
        let case = Case {
            scale: Some(1e4 / head_dim as f32),
            causal: true,
            q_block: Some(q_block),
            k_block: Some(k_block),
            ..Case::new(Shape::new(1, 2, 32, head_dim), 3)
        };
        let data = case.build();
        let inputs = data.inputs();
        let fwd = stage.forward(&inputs, &data.opts).unwrap();
        let grads = stage.backward(&inputs, &data.opts, &fwd, data.d_out.view()).unwrap();
        for t in [&fwd.out, &grads.dq, &grads.dk, &grads.dv] {
            assert!(t.iter().all(|x| x.is_finite()));
        }
        check_against_reference(stage, &data, false).unwrap().assert_f32("logits 1e4");
    }

    /// Dropout removes exactly the weights `baseline` removes, whatever the tiling.
    pub fn same_dropout_as(stage: &dyn Stage, baseline: &dyn Stage, blocks: (usize, usize)) {
        same_dropout_as_at(stage, baseline, blocks, 8);
    }

    /// [`same_dropout_as`] at head dimension `head_dim`.
    pub fn same_dropout_as_at(
        stage: &dyn Stage,
        baseline: &dyn Stage,
        (q_block, k_block): (usize, usize),
        head_dim: usize,
    ) {
        let case = Case {
            dropout: Some(0.5),
            q_block: Some(q_block),
            k_block: Some(k_block),
            ..Case::new(Shape::new(2, 2, 20, head_dim).with_n_k(30), 4)
        };
        let check = check_against_stage(stage, baseline, &case.build()).unwrap();
        check.assert_within(2e-5, 2e-4, "dropout");
    }
}

/// The checks every fused GPU kernel stage shares (FlashAttention-1 and -2 on the GPU): their
/// kernels are built for a few head dimensions and their tiles are their own, so the
/// options' block sizes do not apply.
pub mod fused {
    use super::{BiasKind, Case, MaskKind, check_against_reference, edge_cases};
    use crate::error::AttnError;
    use crate::options::{Inputs, Options};
    use crate::shape::Shape;
    use crate::stage::Stage;

    /// At each of `head_dims`, one problem with the whole contract at once — grouped-query
    /// attention (4 query heads over 2 key/value heads), cross attention with more and with
    /// fewer queries than keys, `mask`, a bias holding −∞, causal and dropout 0.15 — against
    /// the float64 reference at the f32 tolerances.
    pub fn whole_contract_at_head_dims(stage: &dyn Stage, mask: MaskKind, head_dims: &[usize]) {
        const LENGTHS: [(usize, usize); 4] = [(300, 700), (700, 300), (129, 513), (513, 129)];
        for (i, &d) in head_dims.iter().enumerate() {
            let (n_q, n_k) = LENGTHS[i % LENGTHS.len()];
            let case = Case {
                causal: true,
                mask,
                bias: BiasKind::NegInf,
                dropout: Some(0.15),
                ..Case::new(Shape::new(2, 4, n_q, d).with_n_k(n_k).with_kv_heads(2), 3)
            };
            check_against_reference(stage, &case.build(), true)
                .unwrap()
                .assert_f32(&format!("{case:?}"));
        }
    }

    /// The shared edge cases at the smallest and the largest of `head_dims` (fully masked
    /// rows, logits of 10⁴, the dropout of `baseline`), and more query rows than keys under
    /// causal masking, where the first rows see nothing.
    pub fn edge_cases_at(stage: &dyn Stage, baseline: &dyn Stage, head_dims: &[usize]) {
        let (lo, hi) = (head_dims[0], head_dims[head_dims.len() - 1]);
        for d in [lo, hi] {
            edge_cases::fully_masked_rows_at(stage, (1, 1), d);
            edge_cases::huge_logits_at(stage, (1, 1), d);
            edge_cases::same_dropout_as_at(stage, baseline, (7, 5), d);
        }
        let case = Case { causal: true, ..Case::new(Shape::new(1, 2, 70, lo).with_n_k(40), 5) };
        check_against_reference(stage, &case.build(), true).unwrap().assert_f32("n_q > n_k causal");
    }

    /// A head dimension above the largest kernel's, `largest`, is refused with an error
    /// that names the range, before any device is needed.
    pub fn refuses_head_dims_above(stage: &dyn Stage, largest: usize) {
        let shape = Shape::new(1, 1, 16, largest + 1);
        let (q, k, v) = crate::random::qkv(&shape, 1);
        match stage.forward(&Inputs::new(q.view(), k.view(), v.view()), &Options::default()) {
            Err(AttnError::UnsupportedHeadDim { head_dim, supported, .. })
                if head_dim == largest + 1 =>
            {
                assert!(supported.contains(&format!("1 to {largest}")), "{supported}");
            }
            other => panic!("expected a refusal before the device, got {other:?}"),
        }
    }

    /// Head dimensions the kernels are not built for, up to `largest`, zero-padded inside
    /// the stage: the reference's answer at the caller's head dimension, within
    /// `(forward, backward)`, on inputs rounded by `round`.
    pub fn pads_every_head_dim(
        stage: &dyn Stage,
        largest: usize,
        tol: (f64, f64),
        round: fn(f32) -> f32,
    ) {
        let dims = [1, 16, 24, 40, 48, 56, 80, 100, 127, 129, 160, 200, 255];
        for (i, d) in dims.into_iter().filter(|&d| d <= largest).enumerate() {
            let case = Case {
                causal: i % 2 == 0,
                mask: MaskKind::KeyPadding,
                bias: BiasKind::PerKey,
                ..Case::new(Shape::new(2, 4, 70, d).with_n_k(90).with_kv_heads(2), i as u64)
            };
            let data = case.build().rounded(round);
            let check = check_against_reference(stage, &data, true).unwrap();
            check.assert_within(tol.0, tol.1, &format!("{} head_dim {d}", stage.name()));
        }
    }
}

/// The score modifiers on one stage, at sizes that span several of a GPU kernel's tiles:
/// sliding windows (both sides, one side, with causal masking, n_q ≠ n_k, rows the window
/// leaves empty), softcap, ALiBi of both shapes, with masks and a bias.
pub mod score_mods {
    use super::{AlibiKind, BiasKind, Case, MaskKind, check_against_reference};
    use crate::shape::Shape;
    use crate::stage::Stage;

    /// The cases at head dimension `d`.
    pub fn cases(d: usize) -> Vec<Case> {
        let shape = |b, h, kvh, n_q, n_k| Shape::new(b, h, n_q, d).with_n_k(n_k).with_kv_heads(kvh);
        vec![
            Case { window: Some((40, 16)), ..Case::new(shape(2, 4, 2, 200, 260), 31) },
            Case {
                window: Some((50, -1)),
                causal: true,
                mask: MaskKind::KeyPadding,
                ..Case::new(shape(1, 2, 2, 300, 180), 32)
            },
            Case {
                window: Some((-1, 30)),
                alibi: AlibiKind::PerBatchHead,
                bias: BiasKind::PerKey,
                bias_grad: true,
                ..Case::new(shape(2, 2, 1, 150, 150), 33)
            },
            Case {
                causal: true,
                alibi: AlibiKind::PerHead,
                mask: MaskKind::Full,
                ..Case::new(shape(1, 4, 4, 257, 257), 34)
            },
            Case {
                softcap: Some(2.0),
                causal: true,
                window: Some((64, 0)),
                ..Case::new(shape(2, 2, 2, 190, 210), 35)
            },
            Case {
                softcap: Some(0.5),
                bias: BiasKind::Full,
                bias_grad: true,
                ..Case::new(shape(1, 2, 2, 130, 130), 36)
            },
            // dBias of a bias shared by the batch, its −∞ entries removing keys
            Case {
                bias: BiasKind::NegInf,
                bias_grad: true,
                causal: true,
                ..Case::new(shape(2, 2, 2, 70, 140), 39)
            },
            Case { window: Some((0, 0)), ..Case::new(shape(1, 2, 1, 96, 96), 37) },
            // the first 150 rows see no key: zeros and lse −∞
            Case { window: Some((4, -1)), causal: true, ..Case::new(shape(1, 2, 2, 200, 50), 38) },
        ]
    }

    /// Asserts that `stage` matches the float64 reference, forward and backward (dBias
    /// included where a case asks for it), on every case at every head dimension of
    /// `head_dims` within `(forward, backward)` tolerances, on inputs rounded by `round` (the
    /// identity for f32 stages).
    pub fn check(
        stage: &dyn Stage,
        head_dims: &[usize],
        (forward_tol, backward_tol): (f64, f64),
        round: fn(f32) -> f32,
    ) {
        for &d in head_dims {
            for case in cases(d) {
                let data = case.build().rounded(round);
                let check = check_against_reference(stage, &data, true)
                    .unwrap_or_else(|e| panic!("{} {case:?}: {e}", stage.name()));
                check.assert_within(
                    forward_tol,
                    backward_tol,
                    &format!("{} {case:?}", stage.name()),
                );
            }
        }
    }
}

/// Random configurations for proptest, the same for every stage.
#[cfg(feature = "proptest")]
pub mod strategies {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, RngSeed};

    use super::{AlibiKind, BiasKind, Case, MaskKind};
    use crate::shape::Shape;

    /// A deterministic proptest configuration: `cases` cases from a fixed seed, so CI runs
    /// the same configurations every time. Set `ATTN_PROPTEST_SEED` to explore others.
    pub fn config(cases: u32) -> Config {
        let seed = std::env::var("ATTN_PROPTEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0xA77E_2026);
        Config {
            cases,
            rng_seed: RngSeed::Fixed(seed),
            failure_persistence: None,
            ..Config::default()
        }
    }

    /// Any configuration of the contract: batch 1–2, 1–2 key/value heads shared by 1–3 query
    /// heads, `n_q`, `n_k` in 1..=`max_n` independently, head dims from 1 to 64, causal or
    /// not, every kind of mask and bias, dropout or not, a custom scale or not, and — when
    /// `blocks` — block sizes from 1 to `max_n + 20` that rarely divide the lengths.
    pub fn arb_case(max_n: usize, blocks: bool) -> impl Strategy<Value = Case> {
        let block =
            if blocks { prop::option::of(1usize..=max_n + 20).boxed() } else { Just(None).boxed() };
        (
            (1usize..=2, 1usize..=2, 1usize..=3, 1usize..=max_n, 1usize..=max_n),
            prop::sample::select(vec![1usize, 3, 8, 16, 33, 64]),
            any::<bool>(),
            prop::sample::select(vec![
                MaskKind::None,
                MaskKind::KeyPadding,
                MaskKind::Full,
                MaskKind::Broadcast,
            ]),
            prop::sample::select(vec![
                BiasKind::None,
                BiasKind::Full,
                BiasKind::NegInf,
                BiasKind::PerKey,
            ]),
            (prop::option::of(0.05f32..0.6), prop::option::of(0.05f32..2.0)),
            (block.clone(), block),
            any::<u64>(),
        )
            .prop_map(
                |(
                    (batch, kv_heads, group, n_q, n_k),
                    d,
                    causal,
                    mask,
                    bias,
                    (dropout, scale),
                    (q_block, k_block),
                    seed,
                )| Case {
                    shape: Shape::new(batch, kv_heads * group, n_q, d)
                        .with_n_k(n_k)
                        .with_kv_heads(kv_heads),
                    causal,
                    mask,
                    bias,
                    dropout,
                    scale,
                    q_block,
                    k_block,
                    seed,
                    ..Case::new(Shape::new(1, 1, 1, 1), seed)
                },
            )
    }

    /// [`arb_case`] with the score modifiers too: a sliding window (each side −1 or 0 to
    /// `max_n`) half the time, a softcap from 0.5 to 20 a third of the time, ALiBi slopes of
    /// either shape, and dBias asked for half the time (where there is a bias).
    pub fn arb_case_with_mods(max_n: usize, blocks: bool) -> impl Strategy<Value = Case> {
        let side = prop_oneof![Just(-1i64), 0..=max_n as i64];
        (
            arb_case(max_n, blocks),
            prop::option::weighted(0.5, (side.clone(), side)),
            prop::option::weighted(0.33, 0.5f32..20.0),
            prop::sample::select(vec![
                AlibiKind::None,
                AlibiKind::PerHead,
                AlibiKind::PerBatchHead,
            ]),
            any::<bool>(),
        )
            .prop_map(|(case, window, softcap, alibi, bias_grad)| Case {
                window,
                softcap,
                alibi,
                bias_grad,
                ..case
            })
    }
}

#[cfg(test)]
mod check_tests {
    use super::*;

    fn report(normwise: f64, floor: f64) -> ErrorReport {
        ErrorReport { normwise, elementwise: 0.0, worst: 0, floor }
    }

    #[test]
    fn worst_ratio_is_the_largest_error_over_its_tolerance_and_nan_wins() {
        let check = Check {
            out: report(2e-6, 0.0),
            lse: report(5e-6, 0.0),
            grads: Some([report(1e-5, 0.0), report(3e-5, 1e-4), report(2e-5, 0.0)]),
            dbias: None,
        };
        // lse: 5e-6 / 1e-5 = 0.5; dk: 3e-5 / (1e-4 + 1e-4) = 0.15; dq 0.1, dv 0.2
        assert!((check.worst_ratio(1e-5, 1e-4) - 0.5).abs() < 1e-12);
        let forward_only = Check { grads: None, ..check.clone() };
        assert!((forward_only.worst_ratio(1e-6, 1e-4) - 5.0).abs() < 1e-12);
        let missing_dbias = Check { dbias: Some(report(f64::NAN, 0.0)), ..check.clone() };
        assert!(missing_dbias.worst_ratio(1e-5, 1e-4).is_nan());
        let nan = Check { out: report(f64::NAN, 0.0), ..check };
        assert!(nan.worst_ratio(1e-5, 1e-4).is_nan());
    }
}

/// What every traced stage must show: a traced run gives the untraced run's bits; it
/// visits exactly the tiles causal masking and the window do not hide, each once, in the
/// stage's loop order, calls a tile cut exactly when the key range cuts it; and the state its
/// last step of a query block leaves is that block's output.
pub mod trace_claims {
    use crate::error::Result;
    use crate::options::{Inputs, Options};
    use crate::shape::{KeyRange, Shape};
    use crate::stage::Forward;
    use crate::trace::{StepKind, Trace};

    use super::{Case, MaskKind};

    /// Which loop a stage runs outside.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Outer {
        /// Query blocks outside, key blocks inside (chunked attention, FlashAttention-2);
        /// each query block ends in a [`StepKind::Finish`] holding O_i.
        QueryBlocks,
        /// Key blocks outside, query blocks inside (FlashAttention-1); a query block's last
        /// tile leaves O_i.
        KeyBlocks,
    }

    type Plain = fn(&Inputs<'_>, &Options) -> Result<Forward>;
    type Traced = fn(&Inputs<'_>, &Options) -> Result<(Forward, Trace)>;

    fn cases() -> Vec<Case> {
        let blocks = |c: Case| Case { q_block: Some(4), k_block: Some(3), ..c };
        vec![
            blocks(Case::new(Shape::new(1, 2, 9, 5).with_n_k(13), 1)),
            blocks(Case { causal: true, ..Case::new(Shape::new(2, 2, 11, 4), 2) }),
            blocks(Case { causal: true, ..Case::new(Shape::new(1, 1, 6, 3).with_n_k(14), 3) }),
            blocks(Case { window: Some((3, 1)), ..Case::new(Shape::new(1, 2, 16, 4), 4) }),
            blocks(Case {
                mask: MaskKind::Full,
                softcap: Some(5.0),
                dropout: Some(0.2),
                ..Case::new(Shape::new(1, 4, 10, 2).with_kv_heads(2), 5)
            }),
            // rows with no key at all: the window keeps keys before the diagonal only
            blocks(Case {
                window: Some((2, -1)),
                causal: true,
                ..Case::new(Shape::new(1, 1, 12, 3).with_n_k(5), 6)
            }),
        ]
    }

    /// Runs every claim on the shared cases.
    pub fn hold(forward: Plain, traced: Traced, outer: Outer) {
        for case in cases() {
            let data = case.build();
            let inputs = data.inputs();
            let plain = forward(&inputs, &data.opts).unwrap();
            let (fwd, trace) = traced(&inputs, &data.opts).unwrap();
            let what = format!("{case:?}");
            let bits = |a: &ndarray::Array4<f32>| a.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&fwd.out), bits(&plain.out), "traced output differs: {what}");
            let lse = |f: &Forward| f.lse.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(lse(&fwd), lse(&plain), "traced log-sum-exp differs: {what}");
            let sh = case.shape;
            let window = data.opts.window;
            let keys = KeyRange::new(sh.n_q, sh.n_k, data.opts.causal, window);
            for b in 0..sh.batch {
                for h in 0..sh.heads {
                    one_head(&trace, &fwd, (b, h), &keys, outer, &what);
                }
            }
        }
    }

    fn one_head(
        trace: &Trace,
        fwd: &Forward,
        (b, h): (usize, usize),
        keys: &KeyRange,
        outer: Outer,
        what: &str,
    ) {
        let g = trace.grid;
        let (b_r, b_c) = g.blocks;
        let (t_r, t_c) = g.tiles();
        let steps: Vec<_> = trace.tile_steps(b, h).collect();
        let mut seen = vec![vec![0usize; t_c]; t_r];
        for s in &steps {
            let (i0, rows) = s.rows;
            let (j0, cols) = s.cols;
            assert_eq!((i0 % b_r, j0 % b_c), (0, 0), "a step off the grid: {what}");
            assert_eq!(rows, b_r.min(g.n_q - i0), "{what}");
            // a stage may stop a tile at the last key its query block sees
            let visible_end = keys.end(i0 + rows - 1).max(j0 + 1);
            assert!(cols <= b_c.min(g.n_k - j0), "{what}");
            assert!(j0 + cols >= (j0 + b_c).min(g.n_k).min(visible_end), "{what}");
            assert_eq!((s.m.len(), s.ell.len(), s.acc.len()), (rows, rows, rows * g.head_dim));
            let cut = keys.tile_cut((i0, i0 + rows), (j0, cols));
            assert_eq!(s.kind, if cut { StepKind::Cut } else { StepKind::Full }, "{what}");
            seen[i0 / b_r][j0 / b_c] += 1;
        }
        for (i, row) in seen.iter().enumerate() {
            for (j, &n) in row.iter().enumerate() {
                let (i0, j0) = (i * b_r, j * b_c);
                let tile = ((i0, (i0 + b_r).min(g.n_q)), (j0, b_c.min(g.n_k - j0)));
                let hidden = keys.tile_hidden(tile.0, tile.1);
                assert_eq!(n, usize::from(!hidden), "tile ({i}, {j}) visited {n} times: {what}");
            }
        }
        // loop order: outer block first
        let order: Vec<_> = steps
            .iter()
            .map(|s| match outer {
                Outer::QueryBlocks => (s.rows.0, s.cols.0),
                Outer::KeyBlocks => (s.cols.0, s.rows.0),
            })
            .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "steps out of loop order: {what}");
        // the state a query block ends with is its output
        for i0 in (0..g.n_q).step_by(b_r) {
            let rows = b_r.min(g.n_q - i0);
            let out = fwd.out.slice(ndarray::s![b, h, i0..i0 + rows, ..]);
            let out: Vec<u32> = out.iter().map(|x| x.to_bits()).collect();
            let last = match outer {
                Outer::QueryBlocks => trace
                    .steps
                    .iter()
                    .find(|s| (s.b, s.h, s.rows.0, s.kind) == (b, h, i0, StepKind::Finish)),
                Outer::KeyBlocks => steps.iter().rev().find(|s| s.rows.0 == i0).copied(),
            };
            match last {
                Some(s) => {
                    let acc: Vec<u32> = s.acc.iter().map(|x| x.to_bits()).collect();
                    assert_eq!(acc, out, "block {i0}'s last state is not its output: {what}");
                }
                // a block that saw no tile at all: every row of it is fully masked
                None => assert!(out.iter().all(|&x| x == 0), "{what}"),
            }
        }
    }
}

/// What every stage must show for packed variable-length batches and the KV cache
/// ([`crate::varlen`]): the packed call (forward and backward, dBias included) equals one
/// unpacked call whose mask is the block diagonal of the spans, against the float64
/// reference; the cached call, contiguous or paged, equals the reference over each row's
/// valid keys, whatever the slots beyond them hold; appending writes where it should.
pub mod varlen_claims {
    use ndarray::{Array2, Array4, Axis, s};

    use super::{Check, compare, compare_floored};
    use crate::options::{Inputs, Mask, Options, Window};
    use crate::reference::RefProblem;
    use crate::stage::Stage;
    use crate::varlen::{KvCache, SeqLens, append_kv, forward_cached, forward_cached_split};
    use crate::{AttnError, Forward, random};

    /// One packed problem: spans, heads, options, what it carries.
    struct Packed {
        q_lens: Vec<usize>,
        k_lens: Vec<usize>,
        heads: (usize, usize),
        d: usize,
        opts: Options,
        key_padding: bool,
        bias: Option<[bool; 2]>, // which of (n_q, n_k) the bias spans; the other axis 1
        alibi: bool,
    }

    fn packed_cases() -> Vec<(&'static str, Packed)> {
        let base = |q: &[usize], k: &[usize]| Packed {
            q_lens: q.to_vec(),
            k_lens: k.to_vec(),
            heads: (4, 2),
            d: 8,
            opts: Options::default().blocks(4, 3),
            key_padding: false,
            bias: None,
            alibi: false,
        };
        vec![
            (
                "self-attention, causal, an empty sequence",
                Packed {
                    opts: Options::default().blocks(4, 3).causal(true),
                    ..base(&[5, 0, 9, 3], &[5, 0, 9, 3])
                },
            ),
            (
                "cross attention, causal n_q > n_k, no keys for one",
                Packed {
                    opts: Options::default().blocks(3, 4).causal(true),
                    ..base(&[3, 7, 2, 4], &[6, 2, 0, 9])
                },
            ),
            (
                "window, softcap, ALiBi, a full bias and its gradient",
                Packed {
                    opts: Options {
                        window: Some(Window::new(2, 1)),
                        softcap: Some(5.0),
                        bias_grad: true,
                        ..Options::default().blocks(4, 4)
                    },
                    bias: Some([true, true]),
                    alibi: true,
                    ..base(&[6, 11, 1], &[6, 11, 1])
                },
            ),
            (
                // tasks enough that a stage's native packed backward takes them on few threads
                "eight sequences, GQA, causal n_q < n_k, d 7",
                Packed {
                    d: 7,
                    opts: Options::default().blocks(3, 2).causal(true),
                    ..base(&[7, 5, 8, 6, 1, 4, 8, 6], &[9, 5, 8, 7, 3, 4, 10, 6])
                },
            ),
            (
                "key padding, a per-key bias and its gradient, d 5",
                Packed {
                    d: 5,
                    heads: (3, 3),
                    opts: Options {
                        bias_grad: true,
                        ..Options::default().blocks(2, 5).causal(true)
                    },
                    key_padding: true,
                    bias: Some([false, true]),
                    ..base(&[4, 8, 7], &[9, 8, 3])
                },
            ),
        ]
    }

    /// Every claim a stage holds alone: packed forward and backward, cached (contiguous,
    /// paged, split) forward, appending and bad caches, within `(forward_tol, backward_tol)`.
    pub fn hold(stage: &dyn Stage, tols: (f64, f64)) {
        packed_matches_the_reference(stage, tols);
        packed_refuses_bad_spans(stage);
        cached_matches_the_reference(stage, tols.0);
        append_and_bad_caches(stage);
    }

    /// A packed forward and backward of `stage` against the reference of the unpacked
    /// equivalent, within `(forward_tol, backward_tol)`.
    pub fn packed_matches_the_reference(stage: &dyn Stage, tols: (f64, f64)) {
        for (seed, (what, case)) in packed_cases().into_iter().enumerate() {
            let seqs = SeqLens::from_lengths(&case.q_lens, &case.k_lens);
            let (tq, tk) = seqs.totals();
            let (h, kvh) = case.heads;
            let seed = 100 + seed as u64;
            let q = random::normal((1, h, tq, case.d), seed);
            let k = random::normal((1, kvh, tk, case.d), seed + 1);
            let v = random::normal((1, kvh, tk, case.d), seed + 2);
            let d_out = random::normal((1, h, tq, case.d), seed + 3);
            let pad = random::key_padding(1, tk, seed + 4);
            let bias = case.bias.map(|[bq, bk]| {
                random::bias(
                    (1, h, if bq { tq } else { 1 }, if bk { tk } else { 1 }),
                    0.0,
                    seed + 5,
                )
            });
            let slopes = Array2::from_shape_fn((1, h), |(_, i)| 0.3 / (i + 1) as f32);
            let mut inputs = Inputs::new(q.view(), k.view(), v.view());
            if case.key_padding {
                inputs = inputs.with_mask(Mask::KeyPadding(pad.view()));
            }
            if let Some(b) = &bias {
                inputs = inputs.with_bias(b.view());
            }
            if case.alibi {
                inputs = inputs.with_alibi(slopes.view());
            }
            let opts = &case.opts;
            let fwd = stage
                .forward_packed(&seqs, &inputs, opts)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            let grads = stage
                .backward_packed(&seqs, &inputs, opts, &fwd, d_out.view())
                .unwrap_or_else(|e| panic!("{what}: {e}"));

            let unpacked = seqs.unpacked(&inputs, opts);
            let ref_opts = Options { bias_grad: true, ..unpacked.opts.clone() };
            let reference = RefProblem::from_inputs(&unpacked.inputs(&inputs), &ref_opts).unwrap();
            let r = reference.forward();
            let (tf, tb) = tols;
            let name = format!("{} packed, {what}", stage.name());
            let d64 = d_out.mapv(f64::from);
            let rg = reference.backward(&d64);
            let m = reference.backward_magnitudes(&d64);
            let dbias = bias.as_ref().map(|b| {
                // the reference's dBias is over the full [1, h, total_q, total_k]: summed
                // over the axes the bias broadcasts
                let sum = |a: &Array4<f64>| {
                    let mut a = a.clone();
                    for axis in 2..4 {
                        if b.shape()[axis] == 1 {
                            a = a.sum_axis(Axis(axis)).insert_axis(Axis(axis));
                        }
                    }
                    a
                };
                let (r, m) = (sum(rg.dbias.as_ref().unwrap()), sum(m.dbias.as_ref().unwrap()));
                let got = grads.dbias.as_ref().unwrap_or_else(|| panic!("{name}: no dbias"));
                assert_eq!(got.dim(), b.dim(), "{name}: dbias in the bias's shape");
                compare_floored(got.view(), r.view(), m.view())
            });
            let check = Check {
                out: compare(fwd.out.view(), r.out.view()),
                lse: compare(fwd.lse.view(), r.lse.view()),
                grads: Some([
                    compare_floored(grads.dq.view(), rg.dq.view(), m.dq.view()),
                    compare_floored(grads.dk.view(), rg.dk.view(), m.dk.view()),
                    compare_floored(grads.dv.view(), rg.dv.view(), m.dv.view()),
                ]),
                dbias,
            };
            check.assert_within(tf, tb, &name);
        }
    }

    /// The `[batch, max_blocks]` block table that lays batch row `b`'s blocks over the pages
    /// `order[b * max_blocks..]` (a test's scattered pages).
    fn block_table(batch: usize, max_blocks: usize, order: &[usize]) -> Array2<i64> {
        Array2::from_shape_fn((batch, max_blocks), |(b, i)| order[b * max_blocks + i] as i64)
    }

    /// Dropout in a packed batch: the same weights dropped as `baseline` drops them (another
    /// stage), and a one-sequence packed call bit for bit the plain call.
    pub fn packed_dropout_agrees(stage: &dyn Stage, baseline: &dyn Stage) {
        let seqs = SeqLens::from_lengths(&[7, 2, 12], &[7, 2, 12]);
        let (t, _) = seqs.totals();
        let q = random::normal((1, 2, t, 8), 7);
        let k = random::normal((1, 2, t, 8), 8);
        let v = random::normal((1, 2, t, 8), 9);
        let d_out = random::normal((1, 2, t, 8), 10);
        let inputs = Inputs::new(q.view(), k.view(), v.view());
        let opts = Options::default().dropout(0.3, 42).causal(true).blocks(4, 4);
        let run = |st: &dyn Stage| {
            let f = st.forward_packed(&seqs, &inputs, &opts).unwrap();
            let g = st.backward_packed(&seqs, &inputs, &opts, &f, d_out.view()).unwrap();
            (f, g)
        };
        let ((fa, ga), (fb, gb)) = (run(stage), run(baseline));
        let close = |a: &Array4<f32>, b: &Array4<f32>, what: &str| {
            let e = compare(a.view(), b.mapv(f64::from).view());
            assert!(
                e.normwise < 1e-4,
                "{} against {} packed with dropout: {what} {:.3e}",
                stage.name(),
                baseline.name(),
                e.normwise
            );
        };
        close(&fa.out, &fb.out, "out");
        close(&ga.dq, &gb.dq, "dq");
        close(&ga.dv, &gb.dv, "dv");
        // the middle sequence's weights are not those of sequence 0's seed: its output differs
        // from the plain call of that sequence alone
        let one = SeqLens::from_lengths(&[t], &[t]);
        let packed_one = stage.forward_packed(&one, &inputs, &opts).unwrap();
        let plain = stage.forward(&inputs, &opts).unwrap();
        assert_eq!(
            packed_one.out,
            plain.out,
            "{}: one sequence packed is the plain call",
            stage.name()
        );
        assert_eq!(packed_one.lse, plain.lse);
    }

    /// Bad spans are refused, naming the argument.
    pub fn packed_refuses_bad_spans(stage: &dyn Stage) {
        let q = random::normal((1, 2, 10, 4), 1);
        let inputs = Inputs::new(q.view(), q.view(), q.view());
        let o = Options::default();
        let fwd = |cq: &[i64], ck: &[i64]| {
            SeqLens::new(cq, ck, 10, 10)
                .and_then(|s| stage.forward_packed(&s, &inputs, &o))
                .map(|_| ())
        };
        for (cq, ck, arg, words) in [
            (&[1i64, 10][..], &[0i64, 10][..], "cu_seqlens_q", "start at 0"),
            (&[0, 6, 4, 10], &[0, 4, 6, 10], "cu_seqlens_q", "must not decrease"),
            (&[0, 4, 10], &[0, 4, 9], "cu_seqlens_k", "must end there"),
            (&[0, 4, 10], &[0, 10], "cu_seqlens_k", "num_seqs + 1"),
        ] {
            match fwd(cq, ck) {
                Err(e @ AttnError::InvalidLengths { arg: a, .. }) => {
                    assert_eq!(a, arg, "{e}");
                    assert!(e.to_string().contains(words), "{e}");
                }
                other => panic!("{cq:?} {ck:?}: expected an error naming {arg}, got {other:?}"),
            }
        }
        let q2 = random::normal((2, 2, 5, 4), 1);
        let batched = Inputs::new(q2.view(), q2.view(), q2.view());
        let seqs = SeqLens::from_lengths(&[5], &[5]);
        let e = stage.forward_packed(&seqs, &batched, &o).unwrap_err();
        assert!(matches!(e, AttnError::ShapeMismatch { arg: "q", .. }), "{e}");
    }

    /// Decoding from contiguous and paged caches whose slots beyond each row's length hold
    /// NaN: equal to the reference over the valid keys, causal and the window aligned to
    /// each row's length, per-batch ALiBi and softcap.
    pub fn cached_matches_the_reference(stage: &dyn Stage, forward_tol: f64) {
        let (batch, h, kvh, n_max, d, n_q, page) = (3, 4, 2, 12, 8, 3, 4);
        let lens = [12usize, 5, 0];
        let q = random::normal((batch, h, n_q, d), 21);
        let mut k = random::normal((batch, kvh, n_max, d), 22);
        let mut v = random::normal((batch, kvh, n_max, d), 23);
        for (b, &l) in lens.iter().enumerate() {
            k.slice_mut(s![b, .., l.., ..]).fill(f32::NAN);
            v.slice_mut(s![b, .., l.., ..]).fill(f32::NAN);
        }
        let slopes = Array2::from_shape_fn((batch, h), |(b, i)| 0.1 * (b + i + 1) as f32);
        let pad = Array2::from_shape_fn((batch, n_max), |(b, j)| (b + j) % 3 != 0);
        let key_bias = random::bias((batch, 1, 1, n_max), 0.0, 24);
        for (what, opts, alibi) in [
            ("causal", Options::default().causal(true).blocks(2, 4), false),
            (
                "window (4, 0), softcap, ALiBi per batch row",
                Options {
                    window: Some(Window::new(4, 0)),
                    softcap: Some(3.0),
                    ..Options::default().blocks(3, 5)
                },
                true,
            ),
            ("key padding, a per-key bias", Options::default().blocks(2, 2), false),
        ] {
            let mut inputs = Inputs::new(q.view(), k.view(), v.view());
            if alibi {
                inputs = inputs.with_alibi(slopes.view());
            }
            if what.starts_with("key padding") {
                inputs = inputs.with_mask(Mask::KeyPadding(pad.view())).with_bias(key_bias.view());
            }
            let seqlens: Vec<i64> = lens.iter().map(|&l| l as i64).collect();
            let cache = KvCache::contiguous(&seqlens).unwrap();
            let got = forward_cached(&cache, &inputs, &opts, |i, o| stage.forward(i, o))
                .unwrap_or_else(|e| panic!("{what}: {e}"));

            // the same cache in scattered pages of a pool
            let (kp, vp, table) = paged_copy(&k, &v, &lens, page);
            let paged_inputs = Inputs { k: kp.view(), v: vp.view(), ..inputs };
            let paged = KvCache::paged(&seqlens, table.view()).unwrap();
            let got_paged =
                forward_cached(&paged, &paged_inputs, &opts, |i, o| stage.forward(i, o))
                    .unwrap_or_else(|e| panic!("{what}, paged: {e}"));

            // the valid keys gathered, the slots beyond them zero for the reference
            let unpacked = cache.unpacked(&inputs, &opts);
            let r = RefProblem::from_inputs(&unpacked.inputs(&inputs), &unpacked.opts)
                .unwrap()
                .forward();
            // split-KV: each row's keys in 1, 2, 3 and 20 parts (more parts than keys)
            let splits: Vec<_> = [1, 2, 3, 20]
                .into_iter()
                .map(|n| {
                    let f = forward_cached_split(&paged, &paged_inputs, &opts, n, |i, o| {
                        stage.forward(i, o)
                    })
                    .unwrap_or_else(|e| panic!("{what}, {n} splits: {e}"));
                    (format!("paged, {n} splits"), f)
                })
                .collect();
            let all = [("contiguous".to_string(), got), ("paged".to_string(), got_paged)];
            for (kind, f) in all.iter().chain(&splits) {
                let name = format!("{} cached ({kind}), {what}", stage.name());
                Check::forward(f, &r).assert_within(forward_tol, 0.0, &name);
            }
        }
    }

    /// A device's own decode call: `(cache, inputs, opts, splits)` → O and lse, `splits`
    /// None for the device's choice.
    pub type Decode<'r> =
        &'r dyn Fn(&KvCache<'_>, &Inputs<'_>, &Options, Option<usize>) -> crate::Result<Forward>;

    /// One cached problem for a dedicated decode kernel.
    struct DecodeCase {
        what: &'static str,
        batch: usize,
        heads: (usize, usize),
        n_q: usize,
        d: usize,
        lens: Vec<usize>,
        n_max: usize,
        page: Option<usize>,
        opts: Options,
        alibi: bool,
        key_padding_bias: bool,
        /// A full mask that hides every key from one query row.
        masked_row: bool,
    }

    /// A decode problem: `batch` rows of `lens` keys in caches of `n_max` slots, `heads`
    /// (query, key/value), `n_q` queries of head dimension `d`; causal, contiguous, nothing
    /// else unless the case says so.
    fn case(
        what: &'static str,
        (batch, heads, n_q, d): (usize, (usize, usize), usize, usize),
        lens: &[usize],
        n_max: usize,
    ) -> DecodeCase {
        DecodeCase {
            what,
            batch,
            heads,
            n_q,
            d,
            lens: lens.to_vec(),
            n_max,
            page: None,
            opts: Options::default().causal(true),
            alibi: false,
            key_padding_bias: false,
            masked_row: false,
        }
    }

    fn decode_cases() -> Vec<DecodeCase> {
        let window = |left, right, softcap| Options {
            window: Some(Window::new(left, right)),
            softcap,
            ..Options::default()
        };
        vec![
            case(
                "GQA 4:1, d 128, one query, an empty row",
                (3, (8, 2), 1, 128),
                &[1000, 333, 0],
                1000,
            ),
            DecodeCase {
                page: Some(16),
                opts: window(64, 0, Some(20.0)),
                alibi: true,
                ..case(
                    "window, softcap, ALiBi, 5 queries, d 72, pages of 16, a row shorter than n_q",
                    (2, (6, 3), 5, 72),
                    &[300, 3],
                    304,
                )
            },
            DecodeCase {
                page: Some(7),
                key_padding_bias: true,
                ..case(
                    "16 queries, one kv head, d 70, pages of 7, key padding and a per-key bias",
                    (2, (4, 1), 16, 70),
                    &[200, 150],
                    203,
                )
            },
            DecodeCase {
                opts: Options::default(),
                masked_row: true,
                ..case(
                    "d 256, MHA, not causal, a fully masked row",
                    (2, (2, 2), 2, 256),
                    &[130, 64],
                    130,
                )
            },
            DecodeCase {
                opts: window(500, 10, None),
                ..case(
                    "d 3, a window with keys after the diagonal",
                    (1, (2, 1), 3, 3),
                    &[2000],
                    2000,
                )
            },
            DecodeCase {
                page: Some(32),
                opts: window(100, 0, Some(15.0)),
                ..case(
                    "d 64, 8 queries of GQA 3:1 (24 rows), window, softcap, pages of 32",
                    (2, (6, 2), 8, 64),
                    &[500, 77],
                    512,
                )
            },
            DecodeCase {
                page: Some(128),
                ..case(
                    "GQA 4:1, d 128, pages of 128 (a GPU tile inside a page)",
                    (2, (8, 2), 1, 128),
                    &[700, 129],
                    768,
                )
            },
            DecodeCase {
                page: Some(96),
                ..case(
                    "GQA 2:1, d 64, 2 queries, pages of 96 (GPU tiles across pages and inside)",
                    (2, (4, 2), 2, 64),
                    &[600, 250],
                    672,
                )
            },
            case(
                "d 40, MHA, rows of 64, 1, 0 and 37 keys",
                (4, (4, 4), 1, 40),
                &[64, 1, 0, 37],
                64,
            ),
        ]
    }

    /// The caches `k`, `v` (`[batch, kv_heads, n_max, d]`) copied into scattered pages of
    /// `page` slots, NaN in every slot no valid key fills: (K pool, V pool, block table).
    fn paged_copy(
        k: &Array4<f32>,
        v: &Array4<f32>,
        lens: &[usize],
        page: usize,
    ) -> (Array4<f32>, Array4<f32>, Array2<i64>) {
        let (batch, kvh, n_max, d) = k.dim();
        let max_blocks = n_max.div_ceil(page);
        let num_pages = batch * max_blocks + 2;
        let order: Vec<usize> = (0..batch * max_blocks).map(|i| (i * 5 + 3) % num_pages).collect();
        let table = block_table(batch, max_blocks, &order);
        let mut kp = Array4::from_elem((num_pages, kvh, page, d), f32::NAN);
        let mut vp = kp.clone();
        for b in 0..batch {
            for pos in 0..lens[b] {
                let p = table[(b, pos / page)] as usize;
                kp.slice_mut(s![p, .., pos % page, ..]).assign(&k.slice(s![b, .., pos, ..]));
                vp.slice_mut(s![p, .., pos % page, ..]).assign(&v.slice(s![b, .., pos, ..]));
            }
        }
        (kp, vp, table)
    }

    /// A dedicated decode kernel `run` (named `name`) against the reference on cached and
    /// paged problems — GQA, 1 to 16 queries, odd head dimensions up to 256, every score
    /// modifier, empty and fully masked rows, NaN in every slot beyond the lengths — with
    /// 1, 3 and 64 splits and the device's own choice, within `tol`. `round` is what the
    /// kernel's element type does to Q, K and V (the identity for f32): the reference sees the
    /// rounded values. Then the refusals: a length above the capacity, a page outside the
    /// pool, dropout, NaN in a valid key.
    pub fn decode_matches_the_reference(
        name: &str,
        run: Decode<'_>,
        round: fn(f32) -> f32,
        tol: f64,
    ) {
        for (seed, c) in decode_cases().into_iter().enumerate() {
            let seed = 300 + 10 * seed as u64;
            let (h, kvh) = c.heads;
            let q = random::normal((c.batch, h, c.n_q, c.d), seed).mapv(round);
            let mut k = random::normal((c.batch, kvh, c.n_max, c.d), seed + 1).mapv(round);
            let mut v = random::normal((c.batch, kvh, c.n_max, c.d), seed + 2).mapv(round);
            for (b, &l) in c.lens.iter().enumerate() {
                k.slice_mut(s![b, .., l.., ..]).fill(f32::NAN);
                v.slice_mut(s![b, .., l.., ..]).fill(f32::NAN);
            }
            let slopes = Array2::from_shape_fn((c.batch, h), |(b, i)| 0.05 * (b + i + 1) as f32);
            let pad = Array2::from_shape_fn((c.batch, c.n_max), |(b, j)| (b + j) % 3 != 0);
            let key_bias = random::bias((c.batch, 1, 1, c.n_max), 0.0, seed + 3);
            let mut full = Array4::from_elem((c.batch, h, c.n_q, c.n_max), true);
            full.slice_mut(s![0, h - 1, c.n_q - 1, ..]).fill(false);
            let (kp, vp, table) = paged_copy(&k, &v, &c.lens, c.page.unwrap_or(c.n_max));
            let mut inputs = match c.page {
                Some(_) => Inputs::new(q.view(), kp.view(), vp.view()),
                None => Inputs::new(q.view(), k.view(), v.view()),
            };
            if c.alibi {
                inputs = inputs.with_alibi(slopes.view());
            }
            if c.key_padding_bias {
                inputs = inputs.with_mask(Mask::KeyPadding(pad.view())).with_bias(key_bias.view());
            }
            if c.masked_row {
                inputs = inputs.with_mask(Mask::Full(full.view()));
            }
            let seqlens: Vec<i64> = c.lens.iter().map(|&l| l as i64).collect();
            let cache = match c.page {
                Some(_) => KvCache::paged(&seqlens, table.view()).unwrap(),
                None => KvCache::contiguous(&seqlens).unwrap(),
            };
            let unpacked = cache.unpacked(&inputs, &c.opts);
            let r = RefProblem::from_inputs(&unpacked.inputs(&inputs), &unpacked.opts)
                .unwrap()
                .forward();
            for splits in [None, Some(1), Some(3), Some(64)] {
                let what = format!("{name}, {}, {splits:?} splits", c.what);
                let f =
                    run(&cache, &inputs, &c.opts, splits).unwrap_or_else(|e| panic!("{what}: {e}"));
                Check::forward(&f, &r).assert_within(tol, 0.0, &what);
            }
        }
        decode_refuses_bad_caches(name, run);
    }

    fn decode_refuses_bad_caches(name: &str, run: Decode<'_>) {
        let q = random::normal((2, 4, 1, 16), 1);
        let mut k = random::normal((2, 2, 8, 16), 2);
        let v = random::normal((2, 2, 8, 16), 3);
        let inputs = Inputs::new(q.view(), k.view(), v.view());
        let opts = Options::default();
        let refused = |cache: &KvCache<'_>, inputs: &Inputs<'_>, opts: &Options| {
            let what = format!("{name}: {:?} / {:?} accepted", cache.seqlens, opts.dropout);
            run(cache, inputs, opts, None).map(|_| ()).expect_err(&what)
        };
        let long = KvCache::contiguous(&[9, 1]).unwrap();
        let e = refused(&long, &inputs, &opts);
        assert!(matches!(e, AttnError::InvalidLengths { arg: "cache_seqlens", .. }), "{name}: {e}");
        let table = block_table(2, 2, &[0, 1, 2, 7]);
        let paged = KvCache::paged(&[8, 8], table.view()).unwrap();
        let pools =
            Inputs::new(q.view(), k.slice(s![.., .., ..4, ..]), v.slice(s![.., .., ..4, ..]));
        let e = refused(&paged, &pools, &opts);
        assert!(matches!(e, AttnError::InvalidLengths { arg: "block_table", .. }), "{name}: {e}");
        let cache = KvCache::contiguous(&[5, 8]).unwrap();
        let e = refused(&cache, &inputs, &Options::default().dropout(0.1, 1));
        assert!(matches!(e, AttnError::Unsupported { what: "dropout", .. }), "{name}: {e}");
        k[(1, 0, 3, 2)] = f32::NAN;
        let e = refused(&cache, &Inputs::new(q.view(), k.view(), v.view()), &opts);
        assert!(matches!(e, AttnError::NonFinite { arg: "k", .. }), "{name}: {e}");
        // beyond a row's length NaN is never read
        k[(1, 0, 3, 2)] = 0.0;
        k[(0, 1, 6, 0)] = f32::NAN;
        run(&cache, &Inputs::new(q.view(), k.view(), v.view()), &opts, Some(2))
            .unwrap_or_else(|e| panic!("{name}: NaN beyond the length refused: {e}"));
    }

    /// `append_kv` writes the new keys at each row's length (through the pages of a paged
    /// cache) and nothing when a row would overflow; bad lengths and tables are refused.
    pub fn append_and_bad_caches(stage: &dyn Stage) {
        let (batch, kvh, n_max, d) = (2, 2, 6, 4);
        let mut kc = Array4::<f32>::zeros((batch, kvh, n_max, d));
        let mut vc = kc.clone();
        let kn = random::normal((batch, kvh, 2, d), 5);
        let vn = random::normal((batch, kvh, 2, d), 6);
        let cache = KvCache::contiguous(&[3, 0]).unwrap();
        let lens = append_kv(&cache, kc.view_mut(), vc.view_mut(), kn.view(), vn.view()).unwrap();
        assert_eq!(lens, vec![5, 2]);
        assert_eq!(kc.slice(s![0, .., 3..5, ..]), kn.slice(s![0, .., .., ..]));
        assert_eq!(vc.slice(s![1, .., 0..2, ..]), vn.slice(s![1, .., .., ..]));
        assert_eq!(kc.slice(s![0, .., ..3, ..]).iter().filter(|&&x| x != 0.0).count(), 0);
        // a paged append lands in the table's pages
        let table = block_table(2, 3, &[4, 1, 0, 2, 5, 3]);
        let mut kp = Array4::<f32>::zeros((6, kvh, 2, d));
        let mut vp = kp.clone();
        let paged = KvCache::paged(&[1, 4], table.view()).unwrap();
        assert_eq!(
            append_kv(&paged, kp.view_mut(), vp.view_mut(), kn.view(), vn.view()).unwrap(),
            vec![3, 6]
        );
        assert_eq!(kp.slice(s![4, .., 1, ..]), kn.slice(s![0, .., 0, ..])); // row 0, position 1
        assert_eq!(kp.slice(s![1, .., 0, ..]), kn.slice(s![0, .., 1, ..])); // position 2
        assert_eq!(kp.slice(s![3, .., 0, ..]), kn.slice(s![1, .., 0, ..])); // row 1, position 4
        // overflow: nothing written
        let before = kc.clone();
        let full = KvCache::contiguous(&[5, 1]).unwrap();
        let e = append_kv(&full, kc.view_mut(), vc.view_mut(), kn.view(), vn.view()).unwrap_err();
        assert!(matches!(e, AttnError::InvalidLengths { arg: "cache_seqlens", .. }), "{e}");
        assert_eq!(kc, before);

        let q = random::normal((batch, 4, 1, d), 7);
        let run = |c: &KvCache<'_>, k: &Array4<f32>| {
            let inputs = Inputs::new(q.view(), k.view(), k.view());
            forward_cached(c, &inputs, &Options::default(), |i, o| stage.forward(i, o)).map(|_| ())
        };
        let long = KvCache::contiguous(&[7, 1]).unwrap();
        let e = run(&long, &kc).unwrap_err();
        assert!(matches!(e, AttnError::InvalidLengths { arg: "cache_seqlens", .. }), "{e}");
        assert!(KvCache::contiguous(&[-1, 1]).is_err());
        let outside = block_table(2, 3, &[0, 1, 9, 2, 3, 4]);
        let e = run(&KvCache::paged(&[6, 2], outside.view()).unwrap(), &kp).unwrap_err();
        assert!(matches!(e, AttnError::InvalidLengths { arg: "block_table", .. }), "{e}");
        assert!(e.to_string().contains("page 9"), "{e}");
        let e = forward_cached(
            &KvCache::contiguous(&[2, 2]).unwrap(),
            &Inputs::new(q.view(), kc.view(), kc.view()),
            &Options::default().dropout(0.1, 0),
            |i, o| stage.forward(i, o),
        )
        .unwrap_err();
        assert!(matches!(e, AttnError::Unsupported { what: "dropout", .. }), "{e}");
    }
}
