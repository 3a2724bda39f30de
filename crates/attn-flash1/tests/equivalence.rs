//! FlashAttention-1 against the float64 reference.

use attn_core::testing::strategies::{arb_case_with_mods, config};
use attn_core::testing::{BiasKind, Case, MaskKind, check_against_reference, edge_cases};
use attn_core::{Options, Shape};
use attn_flash1::{Flash1Cpu, block_sizes};
use proptest::prelude::*;

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn flash1_matches_reference_on_random_configurations(case in arb_case_with_mods(50, true)) {
        check_against_reference(&Flash1Cpu, &case.build(), true).unwrap().assert_f32(&format!("{case:?}"));
    }
}

#[test]
fn block_sizes_follow_the_paper_from_the_sram_budget() {
    let shape = Shape::new(1, 1, 4096, 64);
    // M = 64 Ki floats: B_c = ⌈65536 / 256⌉ = 256, B_r = min(256, 64) = 64.
    assert_eq!(block_sizes(&shape, &Options::default()), (64, 256));
    assert_eq!(block_sizes(&shape, &Options::default().sram(8192)), (32, 32));
    assert_eq!(block_sizes(&shape, &Options::default().sram(8192).blocks(7, 300)), (7, 300));
    // Blocks never exceed the sequences.
    assert_eq!(block_sizes(&Shape::new(1, 1, 10, 64).with_n_k(20), &Options::default()), (10, 20));
}

#[test]
fn flash1_matches_reference_with_odd_blocks_causal_cross_attention_gqa_and_dropout() {
    for (n_q, n_k, b_r, b_c) in
        [(17, 64, 5, 7), (64, 17, 1, 1), (1, 100, 3, 9), (100, 1, 11, 2), (33, 33, 64, 64)]
    {
        let case = Case {
            causal: true,
            dropout: Some(0.2),
            mask: MaskKind::KeyPadding,
            bias: BiasKind::NegInf,
            q_block: Some(b_r),
            k_block: Some(b_c),
            ..Case::new(Shape::new(2, 4, n_q, 32).with_n_k(n_k).with_kv_heads(2), 9)
        };
        let check = check_against_reference(&Flash1Cpu, &case.build(), true).unwrap();
        check.assert_f32(&format!("{n_q}x{n_k} blocks {b_r}x{b_c}"));
    }
}

#[test]
fn flash1_matches_reference_with_the_paper_blocks_at_a_realistic_size() {
    let case = Case { causal: true, ..Case::new(Shape::new(1, 2, 700, 64).with_n_k(900), 5) };
    check_against_reference(&Flash1Cpu, &case.build(), true).unwrap().assert_f32("n 700x900");
}

#[test]
fn fully_masked_rows_give_zeros_minus_infinite_lse_and_zero_gradients() {
    edge_cases::fully_masked_rows(&Flash1Cpu, (4, 3));
}

#[test]
fn huge_logits_stay_finite() {
    edge_cases::huge_logits(&Flash1Cpu, (5, 6));
}
