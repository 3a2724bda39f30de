//! FlashAttention-1's fused CUDA kernels (the paper's loop order) against the float64
//! reference and the CPU variant. Where no CUDA device is present each test says so and
//! passes (the NVRTC compile check runs wherever libnvrtc loads).

use attn_core::testing::strategies::{arb_case, config};
use attn_core::testing::{MaskKind, assert_matches_reference_and, fused};
use attn_cuda::skip_without_device;
use attn_flash1::{Flash1Cpu, Flash1Cuda};
use proptest::prelude::*;

proptest! {
    #![proptest_config(config(32))]

    #[test]
    fn flash1_gpu_matches_reference_and_cpu(
        case in arb_case(150, false).prop_map(|mut c| {
            c.shape.head_dim = attn_flash1::gpu::HEAD_DIMS[c.shape.head_dim % 5];
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
    fused::whole_contract_at_head_dims(&Flash1Cuda, MaskKind::Full, &attn_flash1::gpu::HEAD_DIMS);
}

#[test]
fn flash1_gpu_edge_cases() {
    if skip_without_device() {
        return;
    }
    fused::edge_cases_at(&Flash1Cuda, &Flash1Cpu, &attn_flash1::gpu::HEAD_DIMS);
}

#[test]
fn flash1_gpu_refuses_head_dims_above_256_and_pads_the_rest() {
    fused::refuses_head_dims_above(&Flash1Cuda, 256);
    if skip_without_device() {
        return;
    }
    use attn_core::tolerance::{F32_BACKWARD, F32_FORWARD};
    fused::pads_every_head_dim(&Flash1Cuda, 256, (F32_FORWARD, F32_BACKWARD), |x| x);
}

#[test]
fn kernels_compile_with_nvrtc_for_the_h100() {
    if !attn_cuda::nvrtc_available() {
        eprintln!("skipped: libnvrtc not found");
        return;
    }
    let sources = [attn_cuda::CONTRACT_HEADER, attn_cuda::TILES, attn_flash1::gpu::KERNELS];
    let ptx = attn_cuda::compile("flash1", &sources, "sm_90").unwrap().to_src();
    for d in attn_flash1::gpu::HEAD_DIMS {
        for k in ["forward", "backward"] {
            assert!(ptx.contains(&format!(".entry flash1_{k}_d{d}")), "no flash1_{k}_d{d}");
        }
    }
    assert!(ptx.contains(".entry flash1_lse"));
}

#[test]
fn flash1cuda_takes_the_score_modifiers() {
    // the window, softcap, ALiBi, dBias, forward and backward
    if skip_without_device() {
        return;
    }
    use attn_core::tolerance::{F32_BACKWARD, F32_FORWARD};
    let tol = (F32_FORWARD, F32_BACKWARD);
    attn_core::testing::score_mods::check(&Flash1Cuda, &[32, 64, 128, 256], tol, |x| x);
}

#[test]
fn flash1_gpu_packed_batches_and_kv_caches_match_the_reference() {
    // each sequence (batch row) of a packed (cached) call launched as its own call
    if skip_without_device() {
        return;
    }
    use attn_core::tolerance::{F32_BACKWARD, F32_FORWARD};
    attn_core::testing::varlen_claims::hold(&attn_flash1::Flash1Cuda, (F32_FORWARD, F32_BACKWARD));
}
