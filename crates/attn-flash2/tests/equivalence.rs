//! FlashAttention-2 against the float64 reference, and run to
//! run reproducibility.

use attn_core::testing::strategies::{arb_case_with_mods, config};
use attn_core::testing::{BiasKind, Case, MaskKind, check_against_reference, edge_cases};
use attn_core::{Options, Shape, Stage};
use attn_flash2::{Flash2Cpu, block_sizes};
use proptest::prelude::*;

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn flash2_matches_reference_on_random_configurations(case in arb_case_with_mods(50, true)) {
        check_against_reference(&Flash2Cpu, &case.build(), true).unwrap().assert_f32(&format!("{case:?}"));
    }
}

#[test]
fn default_blocks_are_clipped_to_the_sequences() {
    assert_eq!(block_sizes(&Shape::new(1, 1, 4096, 64), &Options::default()), (128, 256));
    assert_eq!(block_sizes(&Shape::new(1, 1, 10, 64).with_n_k(20), &Options::default()), (10, 20));
    assert_eq!(
        block_sizes(&Shape::new(1, 1, 100, 64), &Options::default().blocks(7, 300)),
        (7, 100)
    );
}

#[test]
fn flash2_matches_reference_with_odd_blocks_causal_cross_attention_gqa_and_dropout() {
    for (n_q, n_k, b_r, b_c) in
        [(17, 64, 5, 7), (64, 17, 1, 1), (1, 100, 3, 9), (100, 1, 11, 2), (33, 33, 64, 64)]
    {
        for kv_heads in [1, 2] {
            // kv_heads = 1 takes the two-pass backward, 2 (with batch 2) the one-pass one on
            // machines with up to two threads; both must agree with the reference.
            let case = Case {
                causal: true,
                dropout: Some(0.2),
                mask: MaskKind::KeyPadding,
                bias: BiasKind::NegInf,
                q_block: Some(b_r),
                k_block: Some(b_c),
                ..Case::new(Shape::new(2, 4, n_q, 32).with_n_k(n_k).with_kv_heads(kv_heads), 9)
            };
            let check = check_against_reference(&Flash2Cpu, &case.build(), true).unwrap();
            check.assert_f32(&format!("{n_q}x{n_k} blocks {b_r}x{b_c} kv_heads {kv_heads}"));
        }
    }
}

#[test]
fn both_backward_schedules_agree_with_the_reference() {
    // One (batch, key/value head) pair: the two-pass backward; sixteen: the one-pass one.
    for (batch, heads, kv_heads) in [(1, 4, 1), (2, 8, 8)] {
        let case = Case {
            causal: true,
            q_block: Some(16),
            k_block: Some(24),
            ..Case::new(Shape::new(batch, heads, 70, 16).with_n_k(90).with_kv_heads(kv_heads), 3)
        };
        check_against_reference(&Flash2Cpu, &case.build(), true).unwrap().assert_f32("schedule");
    }
}

#[test]
fn flash2_matches_reference_with_default_blocks_at_a_realistic_size() {
    let case = Case { causal: true, ..Case::new(Shape::new(1, 2, 700, 64).with_n_k(900), 5) };
    check_against_reference(&Flash2Cpu, &case.build(), true).unwrap().assert_f32("n 700x900");
}

#[test]
fn fully_masked_rows_give_zeros_minus_infinite_lse_and_zero_gradients() {
    edge_cases::fully_masked_rows(&Flash2Cpu, (4, 3));
}

#[test]
fn huge_logits_stay_finite() {
    edge_cases::huge_logits(&Flash2Cpu, (5, 6));
}

#[test]
fn parallel_results_are_bitwise_identical_run_to_run() {
    for kv_heads in [1, 4] {
        let case = Case {
            causal: true,
            mask: MaskKind::Full,
            dropout: Some(0.1),
            ..Case::new(Shape::new(2, 4, 600, 32).with_n_k(700).with_kv_heads(kv_heads), 8)
        };
        let data = case.build();
        let inputs = data.inputs();
        let runs: Vec<_> = (0..4)
            .map(|_| {
                let fwd = Flash2Cpu.forward(&inputs, &data.opts).unwrap();
                let g = Flash2Cpu.backward(&inputs, &data.opts, &fwd, data.d_out.view()).unwrap();
                (fwd.out, fwd.lse, g.dq, g.dk, g.dv)
            })
            .collect();
        for r in &runs[1..] {
            assert!(r == &runs[0], "kv_heads {kv_heads}: results differ between runs");
        }
    }
}
