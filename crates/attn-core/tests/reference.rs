//! The float64 reference is what every stage is judged by, so it is checked from first
//! principles: hand-computed cases, the causal alignment rule, and its gradients against
//! central finite differences.

use attn_core::reference::RefProblem;
use attn_core::testing::{AlibiKind, BiasKind, Case, MaskKind};
use attn_core::{Dropout, DropoutParams, Inputs, Options, Shape};
use ndarray::{Array2, Array4, s};

fn reference(case: &Case) -> (RefProblem, Array4<f64>) {
    let data = case.build();
    let p = RefProblem::from_inputs(&data.inputs(), &data.opts).unwrap();
    (p, data.d_out.mapv(f64::from))
}

#[test]
fn zero_queries_average_the_values_and_lse_is_log_n() {
    let shape = Shape::new(1, 1, 3, 4).with_n_k(5);
    let q = Array4::<f32>::zeros(shape.q_dims());
    let (_, k, v) = attn_core::random::qkv(&shape, 1);
    let r = attn_core::reference::forward(
        &Inputs::new(q.view(), k.view(), v.view()),
        &Options::default(),
    )
    .unwrap();
    let mean = v.slice(s![0, 0, .., ..]).mean_axis(ndarray::Axis(0)).unwrap();
    for i in 0..3 {
        for c in 0..4 {
            assert!((r.out[[0, 0, i, c]] - mean[c] as f64).abs() < 1e-6);
        }
        assert!((r.lse[[0, 0, i]] - 5f64.ln()).abs() < 1e-12);
    }
}

#[test]
fn causal_is_bottom_right_aligned_for_fewer_queries_than_keys() {
    // n_q = 2, n_k = 4: query 0 sees keys 0..=2, query 1 sees keys 0..=3.
    let shape = Shape::new(1, 1, 2, 3).with_n_k(4);
    let q = Array4::<f32>::zeros(shape.q_dims());
    let (_, k, v) = attn_core::random::qkv(&shape, 2);
    let opts = Options::default().causal(true);
    let r =
        attn_core::reference::forward(&Inputs::new(q.view(), k.view(), v.view()), &opts).unwrap();
    for (i, seen) in [(0, 3usize), (1, 4)] {
        let mean = v.slice(s![0, 0, ..seen, ..]).mean_axis(ndarray::Axis(0)).unwrap();
        for c in 0..3 {
            assert!((r.out[[0, 0, i, c]] - mean[c] as f64).abs() < 1e-6, "row {i}");
        }
        assert!((r.lse[[0, 0, i]] - (seen as f64).ln()).abs() < 1e-12);
    }
}

#[test]
fn causal_with_more_queries_than_keys_leaves_leading_rows_empty() {
    // n_q = 4, n_k = 2: queries 0 and 1 see nothing (zeros, lse −∞), query 2 sees key 0.
    let shape = Shape::new(1, 1, 4, 3).with_n_k(2);
    let (q, k, v) = attn_core::random::qkv(&shape, 3);
    let opts = Options::default().causal(true);
    let inputs = Inputs::new(q.view(), k.view(), v.view());
    let r = attn_core::reference::forward(&inputs, &opts).unwrap();
    for i in 0..2 {
        assert_eq!(r.lse[[0, 0, i]], f64::NEG_INFINITY);
        assert!(r.out.slice(s![0, 0, i, ..]).iter().all(|&x| x == 0.0));
    }
    for c in 0..3 {
        assert!((r.out[[0, 0, 2, c]] - v[[0, 0, 0, c]] as f64).abs() < 1e-7);
    }
    let d_out = attn_core::random::normal(shape.q_dims(), 4);
    let g = attn_core::reference::backward(&inputs, &opts, d_out.view()).unwrap();
    assert!(g.dq.slice(s![0, 0, ..2, ..]).iter().all(|&x| x == 0.0));
}

/// Central differences of loss = sum(out ∘ dO) against the analytic reference gradients.
fn finite_difference_check(case: &Case) {
    let (p, d_out) = reference(case);
    let grads = p.backward(&d_out);
    let eps = 1e-5;
    let mut worst = 0.0f64;
    let mut scale = 0.0f64;
    let tensors = if p.bias.is_some() { 4 } else { 3 };
    for which in 0..tensors {
        let (analytic, len) = match which {
            0 => (&grads.dq, p.q.len()),
            1 => (&grads.dk, p.k.len()),
            2 => (&grads.dv, p.v.len()),
            _ => (grads.dbias.as_ref().unwrap(), grads.dbias.as_ref().unwrap().len()),
        };
        for flat in 0..len {
            let bump = |delta: f64| {
                let mut p2 = p.clone();
                let t = match which {
                    0 => &mut p2.q,
                    1 => &mut p2.k,
                    2 => &mut p2.v,
                    _ => p2.bias.as_mut().unwrap(),
                };
                let x = &mut t.as_slice_mut().unwrap()[flat];
                if x.is_infinite() {
                    return 0.0; // a −∞ bias entry is a mask: no gradient to check
                }
                *x += delta;
                p2.loss(&d_out)
            };
            let numeric = (bump(eps) - bump(-eps)) / (2.0 * eps);
            let a = analytic.as_slice().unwrap()[flat];
            worst = worst.max((numeric - a).abs());
            scale = scale.max(a.abs());
        }
    }
    assert!(scale > 0.0, "all gradients are zero: the check would be empty");
    assert!(
        worst <= 1e-7 * scale.max(1.0),
        "{case:?}: finite differences differ by {worst:e} (largest gradient {scale:e})"
    );
}

#[test]
fn reference_gradients_match_finite_differences() {
    let base = Shape::new(2, 2, 3, 4).with_n_k(5);
    let cases = [
        Case::new(base, 1),
        Case { causal: true, ..Case::new(base, 2) },
        Case { causal: true, ..Case::new(Shape::new(1, 2, 5, 3).with_n_k(3), 3) },
        Case { mask: MaskKind::KeyPadding, bias: BiasKind::Full, ..Case::new(base, 4) },
        Case {
            mask: MaskKind::Full,
            bias: BiasKind::NegInf,
            ..Case::new(base.with_kv_heads(1), 5)
        },
        Case { dropout: Some(0.3), bias: BiasKind::PerKey, ..Case::new(base, 6) },
        Case {
            scale: Some(0.7),
            mask: MaskKind::Broadcast,
            causal: true,
            ..Case::new(base.with_kv_heads(1), 7)
        },
    ];
    for case in &cases {
        finite_difference_check(case);
    }
}

#[test]
fn score_modifier_gradients_match_finite_differences() {
    let base = Shape::new(2, 2, 5, 4).with_n_k(6);
    let cases = [
        // softcap's derivative 1 − tanh² flows into dQ and dK; small caps bend the most
        Case { softcap: Some(0.8), scale: Some(1.5), ..Case::new(base, 11) },
        Case { softcap: Some(2.0), bias: BiasKind::Full, causal: true, ..Case::new(base, 12) },
        // dBias summed over each broadcast shape
        Case { bias: BiasKind::Full, ..Case::new(base.with_kv_heads(1), 13) },
        Case { bias: BiasKind::PerKey, dropout: Some(0.3), ..Case::new(base, 14) },
        Case { bias: BiasKind::NegInf, mask: MaskKind::Full, ..Case::new(base, 15) },
        // ALiBi and the window move no gradient of their own, but change P
        Case { alibi: AlibiKind::PerBatchHead, window: Some((2, 1)), ..Case::new(base, 16) },
        Case {
            alibi: AlibiKind::PerHead,
            window: Some((1, -1)),
            causal: true,
            softcap: Some(1.0),
            bias: BiasKind::PerKey,
            ..Case::new(Shape::new(1, 2, 6, 3).with_n_k(4), 17)
        },
    ];
    for case in &cases {
        finite_difference_check(case);
    }
}

/// The reference forward of `case` with `edit` applied to its options.
fn forward_of(case: &Case, edit: impl Fn(Options) -> Options) -> attn_core::reference::RefForward {
    let data = case.build();
    attn_core::reference::forward(&data.inputs(), &edit(data.opts.clone())).unwrap()
}

#[test]
fn a_window_of_nothing_either_side_copies_the_diagonal_value() {
    // n_q = 3, n_k = 5: the diagonal of query i is key i + 2; window (0, 0) keeps that key only.
    let case = Case::new(Shape::new(1, 1, 3, 4).with_n_k(5), 21);
    let r = forward_of(&case, |o| o.window(0, 0));
    let v = case.build().v;
    for i in 0..3 {
        for c in 0..4 {
            assert_eq!(r.out[[0, 0, i, c]], v[[0, 0, i + 2, c]] as f64);
        }
    }
    // Unbounded both sides is no window at all; (−1, 0) is causal masking.
    let plain = forward_of(&case, |o| o);
    assert_eq!(forward_of(&case, |o| o.window(-1, -1)).out, plain.out);
    assert_eq!(
        forward_of(&case, |o| o.window(-1, 0)).out,
        forward_of(&case, |o| o.causal(true)).out
    );
}

#[test]
fn softcap_bounds_the_scores_and_a_large_cap_changes_nothing() {
    let case = Case { scale: Some(40.0), ..Case::new(Shape::new(1, 2, 4, 8).with_n_k(7), 22) };
    let data = case.build();
    let p = RefProblem::from_inputs(&data.inputs(), &data.opts.clone().softcap(3.0)).unwrap();
    for i in 0..4 {
        for j in 0..7 {
            let s = p.score(0, 1, i, j);
            assert!(s.abs() <= 3.0, "score {s} escapes the cap");
            assert!((s - 3.0 * (p.raw_score(0, 1, i, j) / 3.0).tanh()).abs() < 1e-12);
        }
    }
    let plain = forward_of(&case, |o| o);
    let capped = forward_of(&case, |o| o.softcap(1e9));
    let diff = (&plain.out - &capped.out).mapv(f64::abs).fold(0.0f64, |m, &x| m.max(x));
    assert!(diff < 1e-9, "a cap far above every score changed the output by {diff:e}");
}

#[test]
fn alibi_is_the_bias_it_stands_for() {
    // slope · |i + n_k − n_q − j| subtracted, per head: the same as that bias written out.
    let shape = Shape::new(2, 3, 4, 5).with_n_k(6);
    let case = Case { alibi: AlibiKind::PerBatchHead, ..Case::new(shape, 23) };
    let data = case.build();
    let slopes: Array2<f32> = data.alibi.clone().unwrap();
    let bias = Array4::from_shape_fn(shape.score_dims(), |(b, h, i, j)| {
        -slopes[[b, h]] * (i as f32 + 2.0 - j as f32).abs()
    });
    let with_alibi = attn_core::reference::forward(&data.inputs(), &data.opts).unwrap();
    let as_bias = attn_core::reference::forward(
        &Inputs { alibi: None, ..data.inputs() }.with_bias(bias.view()),
        &data.opts,
    )
    .unwrap();
    let diff = (&with_alibi.out - &as_bias.out).mapv(f64::abs).fold(0.0f64, |m, &x| m.max(x));
    assert!(diff < 1e-6, "ALiBi and its bias differ by {diff:e}");
}

#[test]
fn dropout_keeps_the_expected_fraction() {
    for p in [0.1f32, 0.5] {
        let d = DropoutParams::new(Dropout::new(p, 42)).unwrap();
        let (b, h, n) = (2, 4, 256);
        let total = (b * h * n * n) as f64;
        let mut kept = 0usize;
        let mut kept_even_j = 0usize;
        for bi in 0..b {
            for hi in 0..h {
                for i in 0..n {
                    for j in 0..n {
                        if d.keep(bi, hi, i, j) {
                            kept += 1;
                            kept_even_j += (j % 2 == 0) as usize;
                        }
                    }
                }
            }
        }
        let q = 1.0 - p as f64;
        let sigma = (total * q * (1.0 - q)).sqrt();
        assert!((kept as f64 - total * q).abs() < 5.0 * sigma, "p={p}: kept {kept} of {total}");
        // Neighbouring keys must not be correlated: half the kept weights sit at even j.
        let half = kept as f64 / 2.0;
        assert!(
            (kept_even_j as f64 - half).abs() < 5.0 * (half / 2.0).sqrt(),
            "p={p}: even-j {kept_even_j} of {kept}"
        );
    }
}

#[test]
fn dropout_depends_on_every_coordinate_and_the_seed() {
    let d = DropoutParams::new(Dropout::new(0.5, 7)).unwrap();
    let e = DropoutParams::new(Dropout::new(0.5, 8)).unwrap();
    let row = |d: &DropoutParams, b, h, i| (0..512).map(|j| d.keep(b, h, i, j)).collect::<Vec<_>>();
    let base = row(&d, 0, 0, 0);
    for other in [row(&d, 1, 0, 0), row(&d, 0, 1, 0), row(&d, 0, 0, 1), row(&e, 0, 0, 0)] {
        let agree = base.iter().zip(&other).filter(|(a, b)| a == b).count();
        // Independent fair coins agree on 256 ± 11 of 512.
        assert!((200..312).contains(&agree), "rows agree on {agree} of 512");
    }
}
