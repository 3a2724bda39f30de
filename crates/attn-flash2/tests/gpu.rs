//! FlashAttention-2's fused CUDA kernels against the float64 reference and the CPU variant.
//! Where no CUDA device is present each test says so and passes (the NVRTC compile check
//! runs wherever libnvrtc loads).

use attn_core::testing::strategies::{arb_case, config};
use attn_core::testing::{
    BiasKind, Case, MaskKind, assert_matches_reference_and, check_against_stage, fused,
};
use attn_core::{Shape, Stage};
use attn_cuda::skip_without_device;
use attn_flash2::{Flash2Cpu, Flash2Cuda};
use proptest::prelude::*;

proptest! {
    #![proptest_config(config(48))]

    #[test]
    fn flash2_gpu_matches_reference_and_cpu(
        case in arb_case(150, false).prop_map(|mut c| {
            c.shape.head_dim = attn_flash2::gpu::HEAD_DIMS[c.shape.head_dim % 4];
            c
        })
    ) {
        if skip_without_device() {
            return Ok(());
        }
        let data = case.build();
        assert_matches_reference_and(&Flash2Cuda, &Flash2Cpu, &data, &format!("{case:?}"));
    }
}

#[test]
fn every_forward_version_matches_the_reference() {
    if skip_without_device() {
        return;
    }
    for version in attn_flash2::gpu::FORWARD_VERSIONS {
        for d in attn_flash2::gpu::HEAD_DIMS {
            for causal in [false, true] {
                let case = Case {
                    causal,
                    mask: MaskKind::KeyPadding,
                    bias: BiasKind::PerKey,
                    dropout: Some(0.1),
                    ..Case::new(Shape::new(2, 4, 200, d).with_n_k(150).with_kv_heads(2), 4)
                };
                let data = case.build();
                let inputs = data.inputs();
                let (fwd, _) =
                    attn_flash2::gpu::forward_version_with_stats(&inputs, &data.opts, version)
                        .unwrap();
                let reference = attn_core::reference::RefProblem::from_inputs(&inputs, &data.opts)
                    .unwrap()
                    .forward();
                let err =
                    attn_core::metrics::compare(fwd.out.view(), reference.out.view()).normwise;
                assert!(err <= 1e-5, "version {version} d {d} causal {causal}: {err:.2e}");
            }
        }
    }
}

/// The stage's default backward adds dQ by atomics; `Options::deterministic` selects the
/// separate dQ pass, checked here against the float64 reference at every head dimension.
#[test]
fn deterministic_dq_pass_matches_the_reference() {
    if skip_without_device() {
        return;
    }
    for d in attn_flash2::gpu::HEAD_DIMS {
        let case = Case {
            causal: true,
            mask: MaskKind::KeyPadding,
            dropout: Some(0.1),
            ..Case::new(Shape::new(2, 4, 300, d).with_n_k(200).with_kv_heads(2), 6)
        };
        let data = case.build();
        let inputs = data.inputs();
        let opts = data.opts.clone().deterministic(true);
        let fwd = Flash2Cuda.forward(&inputs, &opts).unwrap();
        let g = Flash2Cuda.backward(&inputs, &opts, &fwd, data.d_out.view()).unwrap();
        let r = attn_core::reference::RefProblem::from_inputs(&inputs, &data.opts).unwrap();
        let d_out = data.d_out.mapv(f64::from);
        let (rg, m) = (r.backward(&d_out), r.backward_magnitudes(&d_out));
        for (got, want, mag) in
            [(&g.dq, &rg.dq, &m.dq), (&g.dk, &rg.dk, &m.dk), (&g.dv, &rg.dv, &m.dv)]
        {
            let e =
                attn_core::metrics::compare_floored(got.view(), want.view(), mag.view()).normwise;
            assert!(e <= 1e-4, "d {d}: {e:.2e}");
        }
    }
}

#[test]
fn flash2_gpu_every_head_dim_with_gqa_cross_attention_masks_and_dropout() {
    if skip_without_device() {
        return;
    }
    fused::whole_contract_at_head_dims(
        &Flash2Cuda,
        MaskKind::KeyPadding,
        &attn_flash2::gpu::HEAD_DIMS,
    );
}

#[test]
fn flash2_gpu_edge_cases() {
    if skip_without_device() {
        return;
    }
    fused::edge_cases_at(&Flash2Cuda, &Flash2Cpu, &attn_flash2::gpu::HEAD_DIMS);
}

#[test]
fn flash2_gpu_is_bitwise_reproducible_when_asked() {
    if skip_without_device() {
        return;
    }
    let case = Case {
        causal: true,
        dropout: Some(0.1),
        ..Case::new(Shape::new(2, 8, 333, 64).with_kv_heads(2), 7)
    };
    let data = case.build();
    let inputs = data.inputs();
    let opts = data.opts.clone().deterministic(true);
    let runs: Vec<_> = (0..3)
        .map(|_| {
            let f = Flash2Cuda.forward(&inputs, &opts).unwrap();
            let g = Flash2Cuda.backward(&inputs, &opts, &f, data.d_out.view()).unwrap();
            (f.out, g.dq, g.dk, g.dv)
        })
        .collect();
    for r in &runs[1..] {
        assert!(r.0 == runs[0].0 && r.1 == runs[0].1 && r.2 == runs[0].2 && r.3 == runs[0].3);
    }
}

#[test]
fn flash2_gpu_at_a_realistic_size_matches_the_cpu() {
    if skip_without_device() {
        return;
    }
    let case = Case { causal: true, ..Case::new(Shape::new(1, 8, 2048, 64), 9) };
    check_against_stage(&Flash2Cuda, &Flash2Cpu, &case.build())
        .unwrap()
        .assert_within(2e-5, 2e-4, "n = 2048");
}

#[test]
fn flash2_gpu_refuses_other_head_dims_clearly() {
    fused::refuses_other_head_dims(&Flash2Cuda);
}

#[test]
fn kernels_compile_with_nvrtc_for_the_h100() {
    if !attn_cuda::nvrtc_available() {
        eprintln!("skipped: libnvrtc not found");
        return;
    }
    let sources = [attn_cuda::CONTRACT_HEADER, attn_naive::gpu::TILES, attn_flash2::gpu::KERNELS];
    // sm_75 has no cp.async: the kernels must still compile there (plain copies).
    attn_cuda::compile("flash2", &sources, "sm_75").unwrap();
    let ptx = attn_cuda::compile("flash2", &sources, "sm_90").unwrap().to_src();
    assert!(ptx.contains("cp.async"), "sm_90 should use cp.async");
    for d in attn_flash2::gpu::HEAD_DIMS {
        for k in [
            "forward_v1",
            "forward_v2",
            "forward_v3",
            "forward_v4",
            "forward_v5",
            "forward_v6",
            "forward_v7",
            "backward_kv",
            "backward_q",
        ] {
            assert!(ptx.contains(&format!(".entry flash2_{k}_d{d}")), "no flash2_{k}_d{d}");
        }
    }
}
