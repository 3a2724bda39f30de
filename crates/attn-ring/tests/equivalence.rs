//! The ring against the float64 reference and against FlashAttention-2 on the whole problem:
//! every rank count 1–8, causal (zigzag), GQA, cross attention, the masks, the bias and its
//! gradient, the score modifiers and dropout, forward and backward.

mod common;

use attn_core::testing::strategies::{arb_case_with_mods, config};
use attn_core::testing::{
    AlibiKind, Case, MaskKind, check_against_reference, check_against_stage, edge_cases,
};
use attn_core::{AttnError, Inputs, Options, Shape, Stage};
use attn_flash2::Flash2Cpu;
use attn_ring::{RingCpu, backward_with, forward_with};
use proptest::prelude::*;

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn the_ring_matches_the_reference_on_random_configurations(
        case in arb_case_with_mods(40, true),
        ranks in 1usize..=8,
    ) {
        check_against_reference(&RingCpu::new(ranks), &case.build(), true)
            .unwrap()
            .assert_f32(&format!("ranks {ranks} {case:?}"));
    }
}

#[test]
fn every_rank_count_from_one_to_eight_matches_causal_gqa_masks_and_the_backward() {
    common::every_rank_count_matches_the_reference(
        RingCpu::new,
        Shape::new(2, 4, 37, 16).with_kv_heads(2),
    );
}

#[test]
fn cross_attention_the_window_alibi_softcap_and_dropout_are_the_whole_problems() {
    for (n_q, n_k) in [(23, 61), (61, 23), (5, 40), (40, 3)] {
        for ranks in [2, 3, 5] {
            let case = Case {
                causal: true,
                window: Some((9, -1)),
                alibi: AlibiKind::PerBatchHead,
                softcap: Some(3.0),
                dropout: Some(0.2),
                q_block: Some(4),
                k_block: Some(3),
                ..Case::new(Shape::new(2, 6, n_q, 24).with_n_k(n_k).with_kv_heads(3), 7)
            };
            let data = case.build();
            let what = format!("{n_q}x{n_k} ranks {ranks}");
            check_against_reference(&RingCpu::new(ranks), &data, true).unwrap().assert_f32(&what);
            // dropout keeps the same weights as the single-device stage: equal to rounding
            check_against_stage(&RingCpu::new(ranks), &Flash2Cpu, &data)
                .unwrap()
                .assert_within(2e-5, 2e-4, &what);
        }
    }
}

#[test]
fn odd_head_dimensions_and_a_window_on_both_sides() {
    for (d, ranks) in [(3, 4), (40, 2), (70, 3), (72, 8)] {
        let case = Case {
            window: Some((5, 3)),
            mask: MaskKind::KeyPadding,
            ..Case::new(Shape::new(1, 2, 50, d).with_n_k(45), d as u64)
        };
        check_against_reference(&RingCpu::new(ranks), &case.build(), true)
            .unwrap()
            .assert_f32(&format!("d {d} ranks {ranks}"));
    }
}

#[test]
fn more_ranks_than_rows_leave_some_chunks_empty() {
    // 16 ranks make 32 chunks of 5 query and 3 key rows: most are empty
    let case = Case { causal: true, ..Case::new(Shape::new(1, 2, 5, 8).with_n_k(3), 2) };
    check_against_reference(&RingCpu::new(16), &case.build(), true).unwrap().assert_f32("empty");
}

#[test]
fn fully_masked_rows_huge_logits_and_the_same_dropout_as_flash2() {
    for ranks in [1, 3] {
        let ring = RingCpu::new(ranks);
        edge_cases::fully_masked_rows(&ring, (4, 3));
        edge_cases::huge_logits(&ring, (5, 6));
        edge_cases::same_dropout_as(&ring, &Flash2Cpu, (4, 4));
    }
}

#[test]
fn zigzag_gives_every_rank_the_same_causal_blocks_and_skips_the_hidden_ones() {
    // 4 ranks, 8 equal chunks: the visible (query chunk, key chunk) blocks are those with
    // key chunk <= query chunk, 36 of 64, 9 a rank (2R + 1)
    let (ranks, n, d, kv_heads) = (4, 64, 16, 2);
    let shape = Shape::new(1, 4, n, d).with_kv_heads(kv_heads);
    let (q, k, v) = attn_core::random::qkv(&shape, 3);
    let inputs = Inputs::new(q.view(), k.view(), v.view());
    let opts = Options::default().causal(true);
    let (fwd, stats) = forward_with(&Flash2Cpu, &inputs, &opts, ranks).unwrap();
    assert_eq!(stats.blocks, vec![2 * ranks + 1; ranks]);
    assert_eq!(stats.skipped, vec![4 * ranks - (2 * ranks + 1); ranks]);
    // each rank sends its two chunks of K and V on R − 1 times: 2 · (n / R) rows · d floats
    let kv_bytes = (2 * (n / ranks) * kv_heads * d * 4) as u64;
    assert_eq!(stats.bytes_sent, vec![(ranks as u64 - 1) * kv_bytes; ranks]);
    // the backward sends K, V R − 1 times and dK, dV R times (the last hop takes them home)
    let d_out = attn_core::random::normal(shape.q_dims(), 9);
    let (_, stats) = backward_with(&Flash2Cpu, &inputs, &opts, &fwd, d_out.view(), ranks).unwrap();
    assert_eq!(stats.blocks, vec![2 * ranks + 1; ranks]);
    assert_eq!(stats.bytes_sent, vec![(2 * ranks as u64 - 1) * kv_bytes; ranks]);
}

#[test]
fn bad_input_is_refused_before_any_rank_starts() {
    let shape = Shape::new(1, 2, 8, 4);
    let (mut q, k, v) = attn_core::random::qkv(&shape, 1);
    q[[0, 1, 5, 2]] = f32::NAN;
    let inputs = Inputs::new(q.view(), k.view(), v.view());
    // the whole tensor's index, as every stage names it
    let err = RingCpu::new(3).forward(&inputs, &Options::default()).unwrap_err();
    assert!(
        matches!(err, AttnError::NonFinite { arg: "q", ref index, .. } if index == &[0, 1, 5, 2]),
        "{err}"
    );
    let (q, ..) = attn_core::random::qkv(&shape, 1);
    let inputs = Inputs::new(q.view(), k.view(), v.view());
    let err = forward_with(&Flash2Cpu, &inputs, &Options::default(), 0).unwrap_err();
    assert!(matches!(err, AttnError::ZeroBlockSize { arg: "ranks" }), "{err}");
    let placed =
        Options::default().placed(attn_core::Placement { q_start: 0, k_start: 0, n_q: 8, n_k: 8 });
    let err = RingCpu::new(2).forward(&inputs, &placed).unwrap_err();
    assert!(matches!(err, AttnError::Unsupported { stage: "ring", .. }), "{err}");
}

#[test]
fn whole_problem_paths_refuse_a_placement() {
    use attn_core::varlen::SeqLens;
    let shape = Shape::new(1, 2, 8, 4);
    let (q, k, v) = attn_core::random::qkv(&shape, 1);
    let inputs = Inputs::new(q.view(), k.view(), v.view());
    let placed =
        Options::default().placed(attn_core::Placement { q_start: 2, k_start: 0, n_q: 12, n_k: 8 });
    let seqs = SeqLens::from_lengths(&[3, 5], &[4, 4]);
    let err = Flash2Cpu.forward_packed(&seqs, &inputs, &placed).unwrap_err();
    assert!(matches!(err, AttnError::Unsupported { stage: "a packed batch", .. }), "{err}");
    // a block that does not lie inside the whole problem
    let outside =
        Options::default().placed(attn_core::Placement { q_start: 5, k_start: 0, n_q: 12, n_k: 8 });
    let err = Flash2Cpu.forward(&inputs, &outside).unwrap_err();
    assert!(matches!(err, AttnError::InvalidLengths { arg: "placement", .. }), "{err}");
    // inside, it runs
    assert!(Flash2Cpu.forward(&inputs, &placed).is_ok());
}
