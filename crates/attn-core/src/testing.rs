//! Test cases every stage shares: a [`Case`] describes a configuration (shape, causal,
//! mask, bias, dropout, blocks), [`Case::build`] draws its tensors, and
//! [`check_against_reference`] runs a stage and compares everything it returns with the
//! float64 reference. Stage crates drive these from proptest with random configurations.

use ndarray::{Array2, Array4};

use crate::error::Result;
use crate::metrics::{ErrorReport, compare};
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
            BiasKind::Full => Some(random::bias(
                (sh.batch, sh.heads, sh.n_q, sh.n_k),
                0.0,
                s + 14,
            )),
            BiasKind::NegInf => Some(random::bias((1, sh.heads, sh.n_q, sh.n_k), 0.2, s + 15)),
            BiasKind::PerKey => Some(random::bias((sh.batch, 1, 1, sh.n_k), 0.0, s + 16)),
        };
        let opts = Options {
            scale: self.scale,
            causal: self.causal,
            dropout: self.dropout.map(|p| crate::Dropout::new(p, s ^ 0x5eed)),
            q_block: self.q_block,
            k_block: self.k_block,
            memory_limit: None,
        };
        CaseData {
            q,
            k,
            v,
            mask2,
            mask4,
            bias,
            d_out,
            opts,
        }
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
    pub d_out: Array4<f32>,
    pub opts: Options,
}

impl CaseData {
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
        inputs
    }
}

/// A stage's errors against the float64 reference, tensor by tensor.
#[derive(Clone, Debug)]
pub struct Check {
    pub out: ErrorReport,
    pub lse: ErrorReport,
    /// `None` when only the forward was checked.
    pub grads: Option<[ErrorReport; 3]>,
}

impl Check {
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
        if let Some(grads) = &self.grads {
            for (name, e) in ["dq", "dk", "dv"].iter().zip(grads) {
                assert!(
                    e.within(backward_tol, ef * backward_tol),
                    "{what}: {name} normwise {:.3e} elementwise {:.3e} (worst at flat index {}) vs tolerance {backward_tol:.0e}",
                    e.normwise,
                    e.elementwise,
                    e.worst
                );
            }
        }
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
        let r = reference.backward(&data.d_out.mapv(f64::from));
        Some([
            compare(g.dq.view(), r.dq.view()),
            compare(g.dk.view(), r.dk.view()),
            compare(g.dv.view(), r.dv.view()),
        ])
    } else {
        None
    };
    Ok(Check {
        out: compare(fwd.out.view(), ref_fwd.out.view()),
        lse: compare(fwd.lse.view(), ref_fwd.lse.view()),
        grads,
    })
}
