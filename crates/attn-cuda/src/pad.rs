//! Every head dimension on kernels built for a few: Q, K and V padded with zero columns up to
//! the next size a kernel is built for, the results cut back.
//!
//! Zero columns change no score (q·k sums them as zeros) and no output column that is kept
//! (P·V's extra columns are zeros, cut off); dO gets zero columns too, so D = rowsum(dO∘O)
//! and dP = dO Vᵀ are unchanged, and the gradients' extra columns are cut off. The scale stays
//! 1/√d of the caller's d.

use attn_core::{AttnError, Forward, Grads, Inputs, Mask, Options, Problem, Result};
use ndarray::{Array4, ArrayView4, s};

/// The head dimension a call of head dimension `d` runs at: the smallest of `dims` (sorted)
/// that is at least `d`; beyond the largest, an error that names the range.
pub fn padded_head_dim(stage: &'static str, d: usize, dims: &[usize]) -> Result<usize> {
    dims.iter().copied().find(|&k| k >= d).ok_or_else(|| AttnError::UnsupportedHeadDim {
        stage,
        head_dim: d,
        supported: format!(
            "1 to {} (zero-padded to {dims:?}); use the CPU stages above that",
            dims.last().copied().unwrap_or(0)
        ),
    })
}

/// `a` with its last axis zero-padded to `to` columns.
fn pad(a: ArrayView4<'_, f32>, to: usize) -> Array4<f32> {
    let (b, h, n, d) = a.dim();
    let mut p = Array4::zeros((b, h, n, to));
    p.slice_mut(s![.., .., .., ..d]).assign(&a);
    p
}

/// `inputs` with the padded Q, K, V (ndarray's views are invariant in their lifetime: the
/// mask, bias and slopes are reborrowed to the padded arrays').
fn padded_inputs<'a>(inputs: &'a Inputs<'_>, qkv: &'a [Array4<f32>; 3]) -> Inputs<'a> {
    let mask = inputs.mask.map(|m| match m {
        Mask::KeyPadding(a) => Mask::KeyPadding(a.reborrow()),
        Mask::Full(a) => Mask::Full(a.reborrow()),
    });
    Inputs {
        q: qkv[0].view(),
        k: qkv[1].view(),
        v: qkv[2].view(),
        mask,
        bias: inputs.bias.map(|b| b.reborrow()),
        alibi: inputs.alibi.map(|a| a.reborrow()),
    }
}

/// The first `d` columns of `a`.
fn cut(a: Array4<f32>, d: usize) -> Array4<f32> {
    if a.dim().3 == d { a } else { a.slice(s![.., .., .., ..d]).to_owned() }
}

/// The call's options with the scale made explicit (1/√d of the caller's d).
fn explicit_scale(opts: &Options, d: usize) -> Options {
    Options { scale: Some(opts.scale.unwrap_or(1.0 / (d as f32).sqrt())), ..opts.clone() }
}

/// Runs `forward` at head dimension `to`: the inputs validated as given, then padded; the
/// output cut back. With `to` equal to the inputs' head dimension, `forward` runs on them as
/// they are.
pub fn forward_padded<S>(
    inputs: &Inputs<'_>,
    opts: &Options,
    to: usize,
    forward: impl FnOnce(&Inputs<'_>, &Options) -> Result<(Forward, S)>,
) -> Result<(Forward, S)> {
    let d = inputs.q.dim().3;
    if d == to {
        return forward(inputs, opts);
    }
    Problem::new(inputs, opts)?;
    let qkv = [pad(inputs.q, to), pad(inputs.k, to), pad(inputs.v, to)];
    let padded = padded_inputs(inputs, &qkv);
    let (fwd, stats) = forward(&padded, &explicit_scale(opts, d))?;
    Ok((Forward { out: cut(fwd.out, d), ..fwd }, stats))
}

/// [`forward_padded`] for a backward: the inputs, the forward's output and dO padded, the
/// gradients cut back.
pub fn backward_padded<S>(
    inputs: &Inputs<'_>,
    opts: &Options,
    (fwd, d_out): (&Forward, ArrayView4<'_, f32>),
    to: usize,
    backward: impl FnOnce(&Inputs<'_>, &Options, &Forward, ArrayView4<'_, f32>) -> Result<(Grads, S)>,
) -> Result<(Grads, S)> {
    let d = inputs.q.dim().3;
    if d == to {
        return backward(inputs, opts, fwd, d_out);
    }
    Problem::for_backward(inputs, opts, fwd, d_out)?;
    let qkv = [pad(inputs.q, to), pad(inputs.k, to), pad(inputs.v, to)];
    let padded = padded_inputs(inputs, &qkv);
    let saved =
        Forward { out: pad(fwd.out.view(), to), lse: fwd.lse.clone(), traffic: fwd.traffic };
    let d_out = pad(d_out, to);
    let (g, stats) = backward(&padded, &explicit_scale(opts, d), &saved, d_out.view())?;
    Ok((Grads { dq: cut(g.dq, d), dk: cut(g.dk, d), dv: cut(g.dv, d), ..g }, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use attn_core::Stage;
    use attn_core::testing::{BiasKind, Case, MaskKind, check_against_reference};

    /// The float64 reference behind the padding, as the GPU stages run their kernels (the
    /// inner calls see the padded head dimension): it must still give the reference's answer
    /// at the caller's head dimension.
    struct PaddedReference(&'static [usize]);

    fn to32<D: ndarray::Dimension>(a: ndarray::Array<f64, D>) -> ndarray::Array<f32, D> {
        a.mapv(|x| x as f32)
    }

    impl Stage for PaddedReference {
        fn name(&self) -> &'static str {
            "padded reference"
        }
        fn device(&self) -> attn_core::Device {
            attn_core::Device::Cpu
        }
        fn forward(&self, i: &Inputs<'_>, o: &Options) -> Result<Forward> {
            let to = padded_head_dim("padded", i.q.dim().3, self.0)?;
            let (fwd, ()) = forward_padded(i, o, to, |i, o| {
                assert_eq!(i.q.dim().3, to);
                let r = attn_core::reference::forward(i, o)?;
                Ok((Forward { out: to32(r.out), lse: to32(r.lse), traffic: None }, ()))
            })?;
            Ok(fwd)
        }
        fn backward(
            &self,
            i: &Inputs<'_>,
            o: &Options,
            fwd: &Forward,
            d_out: ArrayView4<'_, f32>,
        ) -> Result<Grads> {
            let to = padded_head_dim("padded", i.q.dim().3, self.0)?;
            let (g, ()) = backward_padded(i, o, (fwd, d_out), to, |i, o, f, d| {
                assert_eq!((i.q.dim().3, f.out.dim().3, d.dim().3), (to, to, to));
                let g = attn_core::reference::backward(i, o, d)?;
                let grads = Grads {
                    dq: to32(g.dq),
                    dk: to32(g.dk),
                    dv: to32(g.dv),
                    dbias: None,
                    traffic: None,
                };
                Ok((grads, ()))
            })?;
            Ok(g)
        }
    }

    #[test]
    fn padding_the_head_dimension_changes_no_result() {
        static DIMS: [usize; 4] = [32, 64, 96, 128];
        let stage = PaddedReference(&DIMS);
        for (d, seed) in [(1, 1), (5, 2), (33, 3), (80, 4), (127, 5)] {
            let case = Case {
                causal: true,
                mask: MaskKind::KeyPadding,
                bias: BiasKind::PerKey,
                window: Some((9, -1)),
                ..Case::new(attn_core::Shape::new(2, 4, 17, d).with_n_k(23).with_kv_heads(2), seed)
            };
            let check = check_against_reference(&stage, &case.build(), true).unwrap();
            check.assert_f32(&format!("head dimension {d}"));
        }
        // a custom scale is kept as given
        let case = Case { scale: Some(0.3), ..Case::new(attn_core::Shape::new(1, 2, 9, 20), 6) };
        check_against_reference(&stage, &case.build(), true).unwrap().assert_f32("scale 0.3");
    }
    #[test]
    fn beyond_the_largest_kernel_the_error_names_the_range() {
        let e = padded_head_dim("flash2 (cuda)", 129, &[32, 64, 96, 128]).unwrap_err();
        assert!(e.to_string().contains("1 to 128"), "{e}");
        assert_eq!(padded_head_dim("x", 64, &[64, 128]).unwrap(), 64);
        assert_eq!(padded_head_dim("x", 65, &[64, 128]).unwrap(), 128);
    }
}
