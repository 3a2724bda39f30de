//! Chunked attention against the float64 reference and against naive attention, on random
//! configurations and chunk sizes that do not divide the lengths.

use attn_chunked::ChunkedCpu;
use attn_core::testing::strategies::{arb_case, config};
use attn_core::testing::{BiasKind, Case, MaskKind, check_against_reference, check_against_stage};
use attn_core::{Shape, Stage};
use attn_naive::NaiveCpu;
use ndarray::{Array4, s};
use proptest::prelude::*;

/// The chunked stage's results against naive attention's on the same inputs.
fn assert_matches_naive(case: &Case) {
    let check = check_against_stage(&ChunkedCpu, &NaiveCpu, &case.build()).unwrap();
    check.assert_within(2e-5, 2e-4, &format!("{case:?} against naive"));
}

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn chunked_matches_reference_on_random_configurations(case in arb_case(50, true)) {
        check_against_reference(&ChunkedCpu, &case.build(), true).unwrap().assert_f32(&format!("{case:?}"));
    }

    #[test]
    fn chunked_matches_naive_on_random_configurations(case in arb_case(50, true)) {
        assert_matches_naive(&case);
    }
}

#[test]
fn chunked_matches_reference_with_chunk_size_one() {
    for causal in [false, true] {
        let case = Case {
            causal,
            mask: MaskKind::KeyPadding,
            q_block: Some(1),
            k_block: Some(1),
            ..Case::new(Shape::new(1, 2, 13, 8).with_n_k(9), 3)
        };
        check_against_reference(&ChunkedCpu, &case.build(), true)
            .unwrap()
            .assert_f32("chunks of 1");
    }
}

#[test]
fn chunked_matches_reference_with_chunks_larger_than_the_sequence() {
    let case = Case {
        causal: true,
        bias: BiasKind::NegInf,
        q_block: Some(1000),
        k_block: Some(5000),
        ..Case::new(Shape::new(2, 2, 21, 16).with_n_k(34), 4)
    };
    check_against_reference(&ChunkedCpu, &case.build(), true).unwrap().assert_f32("chunks > n");
}

#[test]
fn chunked_matches_reference_with_default_chunks_at_a_realistic_size() {
    // n = 2500 with the defaults (1024 / 2048): a short last chunk of each kind.
    let case = Case { causal: true, ..Case::new(Shape::new(1, 1, 2500, 64), 5) };
    check_against_reference(&ChunkedCpu, &case.build(), true)
        .unwrap()
        .assert_f32("n = 2500 default chunks");
}

#[test]
fn chunked_matches_reference_with_causal_cross_attention_gqa_and_dropout() {
    for (n_q, n_k) in [(17, 64), (64, 17), (1, 100), (100, 1)] {
        let case = Case {
            causal: true,
            dropout: Some(0.2),
            mask: MaskKind::Full,
            q_block: Some(7),
            k_block: Some(12),
            ..Case::new(Shape::new(2, 4, n_q, 32).with_n_k(n_k).with_kv_heads(2), 9)
        };
        check_against_reference(&ChunkedCpu, &case.build(), true)
            .unwrap()
            .assert_f32(&format!("{n_q}x{n_k}"));
    }
}

#[test]
fn fully_masked_rows_and_chunks_give_zeros_minus_infinite_lse_and_zero_gradients() {
    // Row 2 of batch 1 loses every key; rows 5.. lose the first key chunk only (so some of
    // their chunk summaries are empty, but the row is not).
    let case = Case {
        q_block: Some(4),
        k_block: Some(3),
        ..Case::new(Shape::new(2, 2, 9, 8).with_n_k(7), 21)
    };
    let mut data = case.build();
    let mut mask = Array4::from_elem((2, 1, 9, 7), true);
    mask.slice_mut(s![1, 0, 2, ..]).fill(false);
    mask.slice_mut(s![.., 0, 5.., ..3]).fill(false);
    data.mask4 = Some(mask);
    let inputs = data.inputs();
    let fwd = ChunkedCpu.forward(&inputs, &data.opts).unwrap();
    let grads = ChunkedCpu.backward(&inputs, &data.opts, &fwd, data.d_out.view()).unwrap();
    for h in 0..2 {
        assert_eq!(fwd.lse[[1, h, 2]], f32::NEG_INFINITY);
        assert!(fwd.out.slice(s![1, h, 2, ..]).iter().all(|&x| x == 0.0));
        assert!(grads.dq.slice(s![1, h, 2, ..]).iter().all(|&x| x == 0.0));
    }
    for t in [&fwd.out, &grads.dq, &grads.dk, &grads.dv] {
        assert!(t.iter().all(|x| x.is_finite()));
    }
    check_against_reference(&ChunkedCpu, &data, true).unwrap().assert_f32("fully masked rows");
}

#[test]
fn huge_logits_stay_finite() {
    let case = Case {
        scale: Some(1e4 / 16.0),
        causal: true,
        q_block: Some(5),
        k_block: Some(6),
        ..Case::new(Shape::new(1, 2, 32, 16), 3)
    };
    let data = case.build();
    let inputs = data.inputs();
    let fwd = ChunkedCpu.forward(&inputs, &data.opts).unwrap();
    let grads = ChunkedCpu.backward(&inputs, &data.opts, &fwd, data.d_out.view()).unwrap();
    for t in [&fwd.out, &grads.dq, &grads.dk, &grads.dv] {
        assert!(t.iter().all(|x| x.is_finite()));
    }
    let check = check_against_reference(&ChunkedCpu, &data, false).unwrap();
    check.assert_f32("logits 1e4");
}

#[test]
fn dropout_drops_the_same_weights_as_naive() {
    let case = Case {
        dropout: Some(0.5),
        q_block: Some(3),
        k_block: Some(5),
        ..Case::new(Shape::new(2, 2, 20, 8).with_n_k(30), 4)
    };
    assert_matches_naive(&case);
}
