//! Chunked attention on the GPU against the float64 reference and the CPU variant, and its
//! device memory against naive attention's. Where no CUDA device is present each test says
//! so and passes.

use attn_chunked::{ChunkedCpu, ChunkedCuda};
use attn_core::testing::strategies::{arb_case, config};
use attn_core::testing::{
    BiasKind, Case, MaskKind, assert_matches_reference_and, check_against_reference, edge_cases,
};
use attn_core::{Inputs, Options, Shape};
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
    for (n_q, n_k, d, blocks) in
        [(300, 700, 64, (64, 128)), (700, 300, 128, (100, 37)), (513, 513, 32, (128, 256))]
    {
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
fn chunked_gpu_device_memory_is_linear_where_naive_is_quadratic() {
    if skip_without_device() {
        return;
    }
    let peak = |n: usize| {
        let shape = Shape::new(1, 8, n, 64);
        let (q, k, v) = attn_core::random::qkv(&shape, 2);
        let inputs = Inputs::new(q.view(), k.view(), v.view());
        let opts = Options::default().causal(true).blocks(256, 512);
        let chunked = attn_chunked::gpu::forward_with_stats(&inputs, &opts).unwrap().1.peak_bytes;
        let naive = attn_naive::gpu::forward_with_stats(&inputs, &opts).unwrap().1.peak_bytes;
        (chunked as f64, naive as f64)
    };
    let (c1, n1) = peak(2048);
    let (c2, n2) = peak(8192);
    eprintln!(
        "device peak n=2048: chunked {c1} B, naive {n1} B; n=8192: chunked {c2} B, naive {n2} B"
    );
    let (chunked_growth, naive_growth) = (c2 / c1, n2 / n1);
    assert!(chunked_growth < 4.5, "chunked grew ×{chunked_growth:.2} for ×4 n");
    assert!(naive_growth > 14.0, "naive grew ×{naive_growth:.2} for ×4 n");
    assert!(n2 > 10.0 * c2, "naive {n2} B vs chunked {c2} B at n = 8192");
}
