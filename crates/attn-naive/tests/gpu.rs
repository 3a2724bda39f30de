//! Naive attention on the GPU against the float64 reference and the CPU variant. Where no
//! CUDA device is present each test says so and passes.

use attn_core::testing::strategies::{arb_case, config};
use attn_core::testing::{
    BiasKind, Case, MaskKind, assert_matches_reference_and, check_against_reference,
    check_against_stage, edge_cases,
};
use attn_core::{AttnError, Options, Shape, Stage};
use attn_cuda::skip_without_device;
use attn_naive::{NaiveCpu, NaiveCuda};
use proptest::prelude::*;

proptest! {
    #![proptest_config(config(48))]

    #[test]
    fn naive_gpu_matches_reference_and_cpu(case in arb_case(70, false)) {
        if skip_without_device() {
            return Ok(());
        }
        let data = case.build();
        assert_matches_reference_and(&NaiveCuda, &NaiveCpu, &data, &format!("{case:?}"));
    }
}

#[test]
fn naive_gpu_at_realistic_sizes_with_gqa_cross_attention_and_masks() {
    if skip_without_device() {
        return;
    }
    let shapes = [
        (300, 700, 64),
        (700, 300, 128),
        (513, 513, 32),
        (200, 200, 96),
        (150, 90, 256),
        (90, 150, 1),
    ];
    for (n_q, n_k, d) in shapes {
        let case = Case {
            causal: true,
            mask: MaskKind::KeyPadding,
            bias: BiasKind::PerKey,
            dropout: Some(0.1),
            ..Case::new(Shape::new(2, 4, n_q, d).with_n_k(n_k).with_kv_heads(2), 3)
        };
        let data = case.build();
        check_against_reference(&NaiveCuda, &data, true).unwrap().assert_f32(&format!("{case:?}"));
    }
}

#[test]
fn naive_gpu_large_tiles_match_the_cpu() {
    // Many heads, long rows, GQA: cuBLAS's batched calls split per group member where it is
    // open, our kernel's 128×128 and 128×64 tiles where it is not (attn-cuda's gpu tests
    // compare the two directly).
    if skip_without_device() {
        return;
    }
    let case = Case {
        causal: true,
        bias: BiasKind::PerKey,
        dropout: Some(0.1),
        ..Case::new(Shape::new(2, 32, 1100, 64).with_n_k(1000).with_kv_heads(8), 12)
    };
    check_against_stage(&NaiveCuda, &NaiveCpu, &case.build()).unwrap().assert_within(
        2e-5,
        2e-4,
        "large tiles",
    );
}

#[test]
fn naive_gpu_edge_cases() {
    if skip_without_device() {
        return;
    }
    edge_cases::fully_masked_rows(&NaiveCuda, (1, 1));
    edge_cases::huge_logits(&NaiveCuda, (1, 1));
    edge_cases::same_dropout_as(&NaiveCuda, &NaiveCpu, (1, 1));
}

#[test]
fn kernels_compile_with_nvrtc_for_the_h100() {
    // Needs only libnvrtc (no device): on a machine with the CUDA toolkit or the
    // nvidia-cuda-nvrtc wheel on LD_LIBRARY_PATH this checks the kernels' source — attn-cuda's
    // products and window steps, and this stage's softmax.
    if !attn_cuda::nvrtc_available() {
        eprintln!("skipped: libnvrtc not found");
        return;
    }
    for arch in ["sm_80", "sm_90"] {
        let products = [attn_cuda::CONTRACT_HEADER, attn_cuda::PRODUCTS];
        let ptx = attn_cuda::compile("products", &products, arch).unwrap().to_src();
        for kernel in [
            "gemm_128x128",
            "gemm_128x64",
            "gemm_64x64",
            "modify_scores",
            "apply_dropout",
            "row_dot",
            "probs_from_lse",
            "ds_from_dp",
            "group_sum",
        ] {
            assert!(ptx.contains(&format!(".entry {kernel}(")), "{arch}: no kernel {kernel}");
        }
        let ptx = attn_cuda::compile("naive", &attn_naive::gpu::SOURCES, arch).unwrap().to_src();
        assert!(ptx.contains(".entry softmax_rows("), "{arch}: no softmax_rows");
    }
}

#[test]
fn naive_gpu_refuses_what_would_not_fit_before_allocating() {
    let case = Case::new(Shape::new(1, 2, 64, 16), 1);
    let data = case.build();
    let opts = Options { memory_limit: Some(1000), ..data.opts.clone() };
    match NaiveCuda.forward(&data.inputs(), &opts) {
        Err(AttnError::WorkspaceTooLarge { needed_bytes, .. }) => {
            assert_eq!(needed_bytes, 4 * 2 * 64 * 64);
        }
        // Without a device the stage must say so, not panic.
        Err(AttnError::NoCudaDevice { reason }) => {
            assert!(!reason.is_empty());
            eprintln!("skipped: no CUDA device ({reason})");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn naivecuda_takes_the_score_modifiers() {
    // the window, softcap, ALiBi, dBias, forward and backward
    if skip_without_device() {
        return;
    }
    use attn_core::tolerance::{F32_BACKWARD, F32_FORWARD};
    let tol = (F32_FORWARD, F32_BACKWARD);
    attn_core::testing::score_mods::check(&NaiveCuda, &[24, 64, 128], tol, |x| x);
}

#[test]
fn naive_gpu_packed_batches_and_kv_caches_match_the_reference() {
    // each sequence (batch row) of a packed (cached) call launched as its own call
    if skip_without_device() {
        return;
    }
    use attn_core::tolerance::{F32_BACKWARD, F32_FORWARD};
    attn_core::testing::varlen_claims::hold(&attn_naive::NaiveCuda, (F32_FORWARD, F32_BACKWARD));
}
