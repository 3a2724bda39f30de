//! Naive attention against the float64 reference on random configurations.

use attn_core::testing::strategies::{arb_case_with_mods, config};
use attn_core::testing::{BiasKind, Case, Check, MaskKind, check_against_reference};
use attn_core::{Inputs, Options, Shape, Stage};
use attn_naive::NaiveCpu;
use ndarray::{Array4, s};
use proptest::prelude::*;

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn naive_matches_reference_on_random_configurations(case in arb_case_with_mods(40, false)) {
        let check = check_against_reference(&NaiveCpu, &case.build(), true).unwrap();
        check.assert_f32(&format!("{case:?}"));
    }
}

#[test]
fn naive_matches_reference_with_causal_cross_attention_and_gqa() {
    for (n_q, n_k) in [(17, 64), (64, 17), (1, 100), (100, 1)] {
        let case = Case {
            causal: true,
            mask: MaskKind::KeyPadding,
            bias: BiasKind::NegInf,
            ..Case::new(Shape::new(2, 4, n_q, 32).with_n_k(n_k).with_kv_heads(2), 9)
        };
        check_against_reference(&NaiveCpu, &case.build(), true)
            .unwrap()
            .assert_f32(&format!("{case:?}"));
    }
}

#[test]
fn naive_matches_reference_at_a_realistic_size() {
    let case = Case { causal: true, ..Case::new(Shape::new(1, 2, 384, 64), 5) };
    check_against_reference(&NaiveCpu, &case.build(), true).unwrap().assert_f32("n = 384 causal");
}

#[test]
fn fully_masked_rows_give_zeros_minus_infinite_lse_and_zero_gradients() {
    // Mask out every key of query rows 0 and 3 of batch 1, and one row by a −∞ bias.
    let shape = Shape::new(2, 2, 6, 8).with_n_k(5);
    let case = Case::new(shape, 21);
    let mut data = case.build();
    let mut mask = Array4::from_elem((2, 1, 6, 5), true);
    mask.slice_mut(s![1, 0, 0, ..]).fill(false);
    mask.slice_mut(s![1, 0, 3, ..]).fill(false);
    let mut bias = Array4::<f32>::zeros((1, 2, 6, 5));
    bias.slice_mut(s![0, 1, 4, ..]).fill(f32::NEG_INFINITY);
    data.mask4 = Some(mask);
    data.bias = Some(bias);
    let inputs = data.inputs();
    let fwd = NaiveCpu.forward(&inputs, &data.opts).unwrap();
    let grads = NaiveCpu.backward(&inputs, &data.opts, &fwd, data.d_out.view()).unwrap();
    let empty = [(1, 0, 0), (1, 1, 0), (1, 0, 3), (1, 1, 3), (0, 1, 4), (1, 1, 4)];
    for &(b, h, i) in &empty {
        assert_eq!(fwd.lse[[b, h, i]], f32::NEG_INFINITY, "lse of row {b},{h},{i}");
        assert!(fwd.out.slice(s![b, h, i, ..]).iter().all(|&x| x == 0.0));
        assert!(grads.dq.slice(s![b, h, i, ..]).iter().all(|&x| x == 0.0));
    }
    for t in [&fwd.out, &grads.dq, &grads.dk, &grads.dv] {
        assert!(t.iter().all(|x| x.is_finite()));
    }
    check_against_reference(&NaiveCpu, &data, true).unwrap().assert_f32("fully masked rows");
}

#[test]
fn huge_logits_stay_finite_and_accurate() {
    // Scores of ±1e4: exp would overflow without the row max subtracted. The forward stays
    // within the f32 tolerance. Of the backward only dV = Pᵀ dO is well conditioned here:
    // f32 rounds a score of 1e4 by ~1e-3, and dQ, dK (of near-one-hot rows, nearly zero)
    // inherit that, so for them we ask finiteness, not accuracy.
    let shape = Shape::new(1, 2, 32, 16);
    for scale in [1e4f32, -1e4] {
        let case = Case { scale: Some(scale / 16.0), causal: true, ..Case::new(shape, 3) };
        let data = case.build();
        let inputs = data.inputs();
        let fwd = NaiveCpu.forward(&inputs, &data.opts).unwrap();
        let grads = NaiveCpu.backward(&inputs, &data.opts, &fwd, data.d_out.view()).unwrap();
        for t in [&fwd.out, &grads.dq, &grads.dk, &grads.dv] {
            assert!(t.iter().all(|x| x.is_finite()));
        }
        assert!(fwd.lse.iter().all(|x| x.is_finite()));
        let check = check_against_reference(&NaiveCpu, &data, true).unwrap();
        Check { grads: None, ..check.clone() }.assert_f32("logits 1e4");
        let dv = &check.grads.as_ref().unwrap()[2];
        assert!(dv.normwise <= 1e-4, "dv normwise {:e}", dv.normwise);
    }
}

#[test]
fn dropout_zero_equals_no_dropout_exactly() {
    let case = Case {
        causal: true,
        bias: BiasKind::Full,
        ..Case::new(Shape::new(2, 2, 20, 8).with_n_k(30), 4)
    };
    let plain = case.build();
    let mut with_p0 = plain.clone();
    with_p0.opts = with_p0.opts.dropout(0.0, 99);
    let a = NaiveCpu.forward(&plain.inputs(), &plain.opts).unwrap();
    let b = NaiveCpu.forward(&with_p0.inputs(), &with_p0.opts).unwrap();
    assert_eq!(a.out, b.out);
    assert_eq!(a.lse, b.lse);
    let ga = NaiveCpu.backward(&plain.inputs(), &plain.opts, &a, plain.d_out.view()).unwrap();
    let gb = NaiveCpu.backward(&with_p0.inputs(), &with_p0.opts, &b, plain.d_out.view()).unwrap();
    assert_eq!((ga.dq, ga.dk, ga.dv), (gb.dq, gb.dk, gb.dv));
}

#[test]
fn dropout_keeps_the_expected_fraction_of_weights() {
    // With Q = 0 every weight is 1/n_k, and with V = 1 each output is the kept fraction of
    // its row times 1/(1 − p).
    let shape = Shape::new(2, 4, 64, 4).with_n_k(512);
    let q = Array4::<f32>::zeros(shape.q_dims());
    let k = attn_core::random::normal(shape.kv_dims(), 1);
    let v = Array4::<f32>::ones(shape.kv_dims());
    for p in [0.1f32, 0.5] {
        let opts = Options::default().dropout(p, 1234);
        let fwd = NaiveCpu.forward(&Inputs::new(q.view(), k.view(), v.view()), &opts).unwrap();
        let kept: f64 = fwd
            .out
            .slice(s![.., .., .., 0])
            .iter()
            .map(|&o| o as f64 * (1.0 - p as f64))
            .sum::<f64>()
            * 512.0;
        let total = shape.score_elems() as f64;
        let keep = 1.0 - p as f64;
        let sigma = (total * keep * (1.0 - keep)).sqrt();
        assert!((kept - total * keep).abs() < 5.0 * sigma, "p = {p}: kept {kept:.0} of {total}");
    }
}
