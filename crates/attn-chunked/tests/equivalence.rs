//! Chunked attention against the float64 reference, on random
//! configurations and chunk sizes that do not divide the lengths.

use attn_chunked::ChunkedCpu;
use attn_core::Shape;
use attn_core::testing::strategies::{arb_case_with_mods, config};
use attn_core::testing::{BiasKind, Case, MaskKind, check_against_reference, edge_cases};
use proptest::prelude::*;

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn chunked_matches_reference_on_random_configurations(case in arb_case_with_mods(50, true)) {
        check_against_reference(&ChunkedCpu, &case.build(), true).unwrap().assert_f32(&format!("{case:?}"));
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
fn fully_masked_rows_give_zeros_minus_infinite_lse_and_zero_gradients() {
    edge_cases::fully_masked_rows(&ChunkedCpu, (4, 3));
}

#[test]
fn huge_logits_stay_finite() {
    edge_cases::huge_logits(&ChunkedCpu, (5, 6));
}
