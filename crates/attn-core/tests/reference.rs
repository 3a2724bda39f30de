//! The float64 reference is what every stage is judged by, so it is checked from first
//! principles: hand-computed cases, the causal alignment rule, and its gradients against
//! central finite differences.

use attn_core::reference::RefProblem;
use attn_core::testing::{BiasKind, Case, MaskKind};
use attn_core::{Dropout, DropoutParams, Inputs, Options, Shape};
use ndarray::{Array4, s};

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
    for which in 0..3 {
        let (analytic, len) = match which {
            0 => (&grads.dq, p.q.len()),
            1 => (&grads.dk, p.k.len()),
            _ => (&grads.dv, p.v.len()),
        };
        for flat in 0..len {
            let bump = |delta: f64| {
                let mut p2 = p.clone();
                let t = match which {
                    0 => &mut p2.q,
                    1 => &mut p2.k,
                    _ => &mut p2.v,
                };
                t.as_slice_mut().unwrap()[flat] += delta;
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
