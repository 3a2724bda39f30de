//! FlashAttention-1's fused CUDA kernels (the paper's loop order) against the float64
//! reference and the CPU variant. Where no CUDA device is present each test says so and
//! passes (the NVRTC compile check runs wherever libnvrtc loads).

use attn_core::testing::strategies::{arb_case, config};
use attn_core::testing::{
    BiasKind, Case, MaskKind, assert_matches_reference_and, check_against_reference, edge_cases,
};
use attn_core::{AttnError, Inputs, Options, Shape, Stage};
use attn_cuda::skip_without_device;
use attn_flash1::{Flash1Cpu, Flash1Cuda};
use proptest::prelude::*;

proptest! {
    #![proptest_config(config(32))]

    #[test]
    fn flash1_gpu_matches_reference_and_cpu(
        case in arb_case(150, false).prop_map(|mut c| {
            c.shape.head_dim = attn_flash1::gpu::HEAD_DIMS[c.shape.head_dim % 4];
            c
        })
    ) {
        if skip_without_device() {
            return Ok(());
        }
        let data = case.build();
        assert_matches_reference_and(&Flash1Cuda, &Flash1Cpu, &data, &format!("{case:?}"));
    }
}

#[test]
fn flash1_gpu_every_head_dim_with_gqa_cross_attention_masks_and_dropout() {
    if skip_without_device() {
        return;
    }
    for (d, (n_q, n_k)) in [(32, (300, 700)), (64, (700, 300)), (96, (129, 513)), (128, (513, 129))]
    {
        let case = Case {
            causal: true,
            mask: MaskKind::Full,
            bias: BiasKind::NegInf,
            dropout: Some(0.15),
            ..Case::new(Shape::new(2, 4, n_q, d).with_n_k(n_k).with_kv_heads(2), 3)
        };
        check_against_reference(&Flash1Cuda, &case.build(), true)
            .unwrap()
            .assert_f32(&format!("{case:?}"));
    }
}

#[test]
fn flash1_gpu_edge_cases() {
    if skip_without_device() {
        return;
    }
    for d in [32, 128] {
        edge_cases::fully_masked_rows_at(&Flash1Cuda, (1, 1), d);
        edge_cases::huge_logits_at(&Flash1Cuda, (1, 1), d);
        edge_cases::same_dropout_as_at(&Flash1Cuda, &Flash1Cpu, (7, 5), d);
    }
    let case = Case { causal: true, ..Case::new(Shape::new(1, 2, 70, 32).with_n_k(40), 5) };
    check_against_reference(&Flash1Cuda, &case.build(), true)
        .unwrap()
        .assert_f32("n_q > n_k causal");
}

#[test]
fn flash1_gpu_refuses_other_head_dims_clearly() {
    let shape = Shape::new(1, 1, 16, 48);
    let (q, k, v) = attn_core::random::qkv(&shape, 1);
    let inputs = Inputs::new(q.view(), k.view(), v.view());
    match Flash1Cuda.forward(&inputs, &Options::default()) {
        Err(AttnError::UnsupportedHeadDim { head_dim: 48, .. }) => {}
        Err(AttnError::NoCudaDevice { reason }) => eprintln!("skipped: no CUDA device ({reason})"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn kernels_compile_with_nvrtc_for_the_h100() {
    if !attn_cuda::nvrtc_available() {
        eprintln!("skipped: libnvrtc not found");
        return;
    }
    let sources = [attn_cuda::CONTRACT_HEADER, attn_naive::gpu::TILES, attn_flash1::gpu::KERNELS];
    let ptx = attn_cuda::compile("flash1", &sources, "sm_90").unwrap().to_src();
    for d in attn_flash1::gpu::HEAD_DIMS {
        for k in ["forward", "backward"] {
            assert!(ptx.contains(&format!(".entry flash1_{k}_d{d}")), "no flash1_{k}_d{d}");
        }
    }
    assert!(ptx.contains(".entry flash1_lse"));
}
