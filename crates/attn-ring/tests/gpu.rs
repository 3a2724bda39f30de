//! The ring with every block on the GPU ([`RingCuda`]) against the float64 reference and
//! against FlashAttention-2 on the GPU over the whole problem: each block runs a placed
//! kernel, so causal masking, the window, ALiBi and dropout must be the whole problem's.
//! Where no CUDA device is present each test says so and passes.

mod common;

use attn_core::testing::{
    AlibiKind, BiasKind, Case, MaskKind, check_against_reference, check_against_stage, edge_cases,
};
use attn_core::{Inputs, Options, Shape};
use attn_cuda::skip_without_device;
use attn_flash2::Flash2Cuda;
use attn_ring::{RingCpu, RingCuda, backward_with, forward_with};

#[test]
fn every_rank_count_from_one_to_eight_matches_on_the_gpu() {
    if skip_without_device() {
        return;
    }
    common::every_rank_count_matches_the_reference(
        RingCuda::new,
        Shape::new(2, 4, 83, 64).with_kv_heads(2),
    );
}

#[test]
fn cross_attention_and_the_score_modifiers_are_the_whole_problems_on_the_gpu() {
    if skip_without_device() {
        return;
    }
    for (n_q, n_k) in [(70, 190), (190, 70), (9, 130)] {
        for ranks in [2, 3, 5] {
            let case = Case {
                causal: true,
                window: Some((40, -1)),
                alibi: AlibiKind::PerBatchHead,
                softcap: Some(3.0),
                dropout: Some(0.2),
                ..Case::new(Shape::new(2, 6, n_q, 64).with_n_k(n_k).with_kv_heads(3), 7)
            };
            let data = case.build();
            let what = format!("{n_q}x{n_k} ranks {ranks}");
            check_against_reference(&RingCuda::new(ranks), &data, true).unwrap().assert_f32(&what);
            // the same dropout weights as the single-kernel GPU stage and as the CPU ring
            check_against_stage(&RingCuda::new(ranks), &Flash2Cuda, &data)
                .unwrap()
                .assert_within(2e-5, 2e-4, &what);
            check_against_stage(&RingCuda::new(ranks), &RingCpu::new(ranks), &data)
                .unwrap()
                .assert_within(2e-5, 2e-4, &what);
        }
    }
}

#[test]
fn odd_head_dimensions_and_a_window_on_both_sides_on_the_gpu() {
    if skip_without_device() {
        return;
    }
    for (d, ranks) in [(3, 4), (40, 2), (70, 3), (128, 8)] {
        let case = Case {
            window: Some((25, 13)),
            mask: MaskKind::KeyPadding,
            bias: BiasKind::PerKey,
            bias_grad: true,
            ..Case::new(Shape::new(1, 2, 150, d).with_n_k(135), d as u64)
        };
        check_against_reference(&RingCuda::new(ranks), &case.build(), true)
            .unwrap()
            .assert_f32(&format!("d {d} ranks {ranks}"));
    }
}

#[test]
fn fully_masked_rows_and_huge_logits_on_the_gpu() {
    if skip_without_device() {
        return;
    }
    for ranks in [1, 3] {
        let ring = RingCuda::new(ranks);
        edge_cases::fully_masked_rows(&ring, (64, 64));
        edge_cases::huge_logits(&ring, (64, 64));
        edge_cases::same_dropout_as(&ring, &Flash2Cuda, (64, 64));
    }
}

#[test]
fn the_gpu_ring_skips_the_blocks_causal_masking_hides() {
    if skip_without_device() {
        return;
    }
    let (ranks, n) = (4, 512);
    let shape = Shape::new(1, 4, n, 64).with_kv_heads(2);
    let (q, k, v) = attn_core::random::qkv(&shape, 3);
    let inputs = Inputs::new(q.view(), k.view(), v.view());
    let opts = Options::default().causal(true);
    let (fwd, stats) = forward_with(&Flash2Cuda, &inputs, &opts, ranks).unwrap();
    assert_eq!(stats.blocks, vec![2 * ranks + 1; ranks]);
    let d_out = attn_core::random::normal(shape.q_dims(), 9);
    let (_, stats) = backward_with(&Flash2Cuda, &inputs, &opts, &fwd, d_out.view(), ranks).unwrap();
    assert_eq!(stats.blocks, vec![2 * ranks + 1; ranks]);
}
