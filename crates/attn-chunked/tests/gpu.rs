//! Chunked attention on the GPU against the float64 reference and the CPU variant. Where no CUDA device is present each test says
//! so and passes.

use attn_chunked::{ChunkedCpu, ChunkedCuda};
use attn_core::Shape;
use attn_core::testing::strategies::{arb_case, config};
use attn_core::testing::{
    BiasKind, Case, MaskKind, assert_matches_reference_and, check_against_reference, edge_cases,
};
use attn_cuda::skip_without_device;
use proptest::prelude::*;

proptest! {
    #![proptest_config(config(48))]

    #[test]
    fn chunked_gpu_matches_reference_and_cpu(case in arb_case(70, true)) {
        if skip_without_device() {
            return Ok(());
        }
        let data = case.build();
        assert_matches_reference_and(&ChunkedCuda, &ChunkedCpu, &data, &format!("{case:?}"));
    }
}

#[test]
fn chunked_gpu_with_many_chunks_gqa_cross_attention_and_masks() {
    if skip_without_device() {
        return;
    }
    for (n_q, n_k, d, blocks) in [
        (300, 700, 64, (64, 128)),
        (700, 300, 128, (100, 37)),
        (513, 513, 32, (128, 256)),
        (150, 90, 256, (64, 50)),
        (90, 150, 1, (40, 64)),
    ] {
        let case = Case {
            causal: true,
            mask: MaskKind::Full,
            bias: BiasKind::NegInf,
            dropout: Some(0.2),
            q_block: Some(blocks.0),
            k_block: Some(blocks.1),
            ..Case::new(Shape::new(2, 4, n_q, d).with_n_k(n_k).with_kv_heads(1), 8)
        };
        check_against_reference(&ChunkedCuda, &case.build(), true)
            .unwrap()
            .assert_f32(&format!("{case:?}"));
    }
}

#[test]
fn chunked_gpu_edge_cases() {
    if skip_without_device() {
        return;
    }
    for blocks in [(1, 1), (2, 3), (7, 4)] {
        edge_cases::fully_masked_rows(&ChunkedCuda, blocks);
        edge_cases::huge_logits(&ChunkedCuda, blocks);
        edge_cases::same_dropout_as(&ChunkedCuda, &ChunkedCpu, blocks);
    }
}

#[test]
fn kernels_compile_with_nvrtc_for_the_h100() {
    // Needs only libnvrtc (no device).
    if !attn_cuda::nvrtc_available() {
        eprintln!("skipped: libnvrtc not found");
        return;
    }
    for arch in ["sm_80", "sm_90"] {
        let sources = attn_chunked::gpu::SOURCES;
        let ptx = attn_cuda::compile("chunked", &sources, arch).unwrap().to_src();
        for kernel in ["chunk_softmax", "merge_chunk", "finish_rows"] {
            assert!(ptx.contains(&format!(".entry {kernel}(")), "{arch}: no kernel {kernel}");
        }
    }
}

#[test]
fn chunkedcuda_takes_the_score_modifiers() {
    // the window, softcap, ALiBi, dBias, forward and backward
    if skip_without_device() {
        return;
    }
    use attn_core::tolerance::{F32_BACKWARD, F32_FORWARD};
    let tol = (F32_FORWARD, F32_BACKWARD);
    attn_core::testing::score_mods::check(&ChunkedCuda, &[24, 64, 128], tol, |x| x);
}

#[test]
fn chunked_gpu_packed_batches_and_kv_caches_match_the_reference() {
    // each sequence (batch row) of a packed (cached) call launched as its own call
    if skip_without_device() {
        return;
    }
    use attn_core::tolerance::{F32_BACKWARD, F32_FORWARD};
    attn_core::testing::varlen_claims::hold(
        &attn_chunked::ChunkedCuda,
        (F32_FORWARD, F32_BACKWARD),
    );
}
