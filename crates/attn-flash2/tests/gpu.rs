//! FlashAttention-2's fused CUDA kernels against the float64 reference and the CPU variant.
//! Where no CUDA device is present each test says so and passes (the NVRTC compile check
//! runs wherever libnvrtc loads).

use attn_core::testing::strategies::{arb_case, config};
use attn_core::testing::{
    BiasKind, Case, MaskKind, assert_matches_reference_and, check_against_stage, fused,
};
use attn_core::{Shape, Stage};
use attn_cuda::skip_without_device;
use attn_flash2::gpu::versions::{Track, VERSIONS, Version, versions};
use attn_flash2::gpu::{HEAD_DIMS, STAGE_HEAD_DIMS};
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
    let below_sm80 = attn_cuda::gpu().unwrap().compute_capability() < 80;
    for v in versions(Track::Fp32Forward) {
        let version = v.number;
        if version == 8 && below_sm80 {
            eprintln!("skipped version 8: no tf32 mma.sync before sm_80");
            continue;
        }
        // (the 3xTF32 versions at d = 256 too)
        for d in HEAD_DIMS.into_iter().chain(v.is_tf32().then_some(256)) {
            // with a mask, a bias and dropout; and without (version 8's other kernel), with
            // fewer queries than keys
            for (causal, mods) in [(false, true), (true, true), (false, false), (true, false)] {
                let (n_q, n_k) = if mods { (200, 150) } else { (150, 333) };
                let case = Case {
                    causal,
                    mask: if mods { MaskKind::KeyPadding } else { MaskKind::None },
                    bias: if mods { BiasKind::PerKey } else { BiasKind::None },
                    dropout: if mods { Some(0.1) } else { None },
                    ..Case::new(Shape::new(2, 4, n_q, d).with_n_k(n_k).with_kv_heads(2), 4)
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
                assert!(
                    err <= 1e-5,
                    "version {version} d {d} causal {causal} mods {mods}: {err:.2e}"
                );
            }
        }
    }
}

/// Every fp32 backward version, dQ by atomics and in the separate pass, against the float64
/// reference at every head dimension: with a full mask, a bias and dropout, and without
/// (3xTF32's other kernel); causal with more queries than keys (fully masked rows) and not.
#[test]
fn every_backward_version_matches_the_reference() {
    use attn_flash2::gpu::DqMode;
    if skip_without_device() {
        return;
    }
    let below_sm80 = attn_cuda::gpu().unwrap().compute_capability() < 80;
    for v in versions(Track::Fp32Backward) {
        let version = v.number;
        if v.is_tf32() && below_sm80 {
            eprintln!("skipped version {version}: no tf32 mma.sync before sm_80");
            continue;
        }
        for d in HEAD_DIMS.into_iter().chain(v.is_tf32().then_some(256)) {
            for (causal, mods) in [(false, true), (true, true), (false, false), (true, false)] {
                let (n_q, n_k) = if causal { (200, 150) } else { (150, 333) };
                let case = Case {
                    causal,
                    mask: if mods { MaskKind::Full } else { MaskKind::None },
                    bias: if mods { BiasKind::PerKey } else { BiasKind::None },
                    dropout: if mods { Some(0.1) } else { None },
                    ..Case::new(Shape::new(2, 4, n_q, d).with_n_k(n_k).with_kv_heads(2), 7)
                };
                let data = case.build();
                let inputs = data.inputs();
                let r = attn_core::reference::RefProblem::from_inputs(&inputs, &data.opts).unwrap();
                let d_out = data.d_out.mapv(f64::from);
                let (rg, m) = (r.backward(&d_out), r.backward_magnitudes(&d_out));
                for mode in [DqMode::Atomic, DqMode::SeparatePass] {
                    let opts = data.opts.clone().deterministic(mode == DqMode::SeparatePass);
                    let fwd = Flash2Cuda.forward(&inputs, &opts).unwrap();
                    let (g, _) = attn_flash2::gpu::backward_version_with_stats(
                        &inputs,
                        &opts,
                        &fwd,
                        data.d_out.view(),
                        version,
                    )
                    .unwrap();
                    for (name, got, want, mag) in [
                        ("dq", &g.dq, &rg.dq, &m.dq),
                        ("dk", &g.dk, &rg.dk, &m.dk),
                        ("dv", &g.dv, &rg.dv, &m.dv),
                    ] {
                        let e = attn_core::metrics::compare_floored(
                            got.view(),
                            want.view(),
                            mag.view(),
                        )
                        .normwise;
                        assert!(
                            e <= attn_core::tolerance::F32_BACKWARD,
                            "version {version} d {d} causal {causal} mods {mods} {mode:?} {name}: {e:.2e}"
                        );
                    }
                }
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
    for d in STAGE_HEAD_DIMS {
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
    fused::whole_contract_at_head_dims(&Flash2Cuda, MaskKind::KeyPadding, &STAGE_HEAD_DIMS);
}

#[test]
fn flash2_gpu_edge_cases() {
    if skip_without_device() {
        return;
    }
    fused::edge_cases_at(&Flash2Cuda, &Flash2Cpu, &STAGE_HEAD_DIMS);
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
fn flash2_gpu_refuses_head_dims_above_256_and_pads_the_rest() {
    fused::refuses_head_dims_above(&Flash2Cuda, 256);
    if skip_without_device() {
        return;
    }
    use attn_core::tolerance::{F32_BACKWARD, F32_FORWARD};
    fused::pads_every_head_dim(&Flash2Cuda, 256, (F32_FORWARD, F32_BACKWARD), |x| x);
}

/// Every registered kernel version compiles with NVRTC (no device needed: libnvrtc alone),
/// and its module holds the kernels the host launches: each version at sm_90, the shipped
/// ones also at sm_80 (and the CUDA-core ones at sm_75, which has no cp.async). Compiled on
/// every core at once.
#[test]
fn every_kernel_version_compiles_with_nvrtc() {
    if !attn_cuda::nvrtc_available() {
        eprintln!("skipped: libnvrtc not found");
        return;
    }
    let jobs: Vec<(&Version, &str, Vec<String>, Vec<String>)> = VERSIONS
        .iter()
        .flat_map(|v| {
            // (architecture, the tensor-core kernels' head dimension there)
            let archs: &[(&str, usize)] = match (v.ships(), v.track, v.number) {
                (false, ..) => &[("sm_90", 64)],
                (true, Track::Fp32Forward, 5 | 7) | (true, Track::Fp32Backward, 1) => {
                    &[("sm_75", 0), ("sm_90", 0)]
                }
                (true, Track::TcForward | Track::TcBackward, _) => {
                    &[("sm_80", 128), ("sm_90", 64), ("sm_90", 256)]
                }
                // the 3xTF32 kernels, and at d = 256
                (true, Track::Fp32Forward | Track::Fp32Backward, _) => {
                    &[("sm_80", 0), ("sm_90", 0), ("sm_90", 256)]
                }
            };
            archs.iter().map(move |&(arch, tc_d)| {
                let (defines, dims): (Vec<String>, Vec<usize>) = match v.track {
                    Track::Fp32Forward if v.is_tf32() => {
                        let d = if tc_d == 256 { 256 } else { 96 };
                        (vec![format!("-DTF32_D={d}")], vec![d])
                    }
                    // the backward at each of its tilings
                    Track::Fp32Backward if v.is_tf32() => {
                        let (d, kw, br) = match (arch, tc_d) {
                            (_, 256) => (256, 4, 16),
                            ("sm_80", _) => (96, 4, 32),
                            _ => (128, 8, 64),
                        };
                        let defines = [("TF32_D", d), ("TF32B_KW", kw), ("TF32B_BR", br)];
                        (defines.iter().map(|(k, x)| format!("-D{k}={x}")).collect(), vec![d])
                    }
                    Track::Fp32Forward | Track::Fp32Backward => (vec![], HEAD_DIMS.to_vec()),
                    _ => {
                        let bf16 = if arch == "sm_80" { 0 } else { 1 };
                        (vec![format!("-DTC_D={tc_d}"), format!("-DTC_BF16={bf16}")], vec![tc_d])
                    }
                };
                let mut entries: Vec<String> = dims
                    .iter()
                    .flat_map(|&d| {
                        [(false, false), (true, false), (false, true), (true, true)]
                            .map(|(mods, cut)| v.kernel_name_cut(d, mods, cut))
                    })
                    .collect();
                entries.sort();
                entries.dedup();
                if v.ships() && v.track == Track::TcForward {
                    entries.push(v.forward_kernel_name(tc_d, false, true, true));
                }
                if v.ships() && v.track == Track::TcBackward {
                    entries.extend(["tc_row_dot".into(), "tc_group_sum".into()]);
                }
                if v.track == Track::Fp32Backward && v.is_tf32() {
                    for part in ["_kv", "_kv_mods", "_kv_cut", "_q", "_q_mods", "_q_cut"] {
                        entries.push(format!("flash2_backward_v2{part}"));
                    }
                }
                (v, arch, defines, entries)
            })
        })
        .collect();
    std::thread::scope(|scope| {
        for (v, arch, defines, entries) in &jobs {
            scope.spawn(move || {
                let ptx = attn_cuda::compile_with(v.module(), &v.sources(), arch, defines)
                    .unwrap_or_else(|e| panic!("{v:?} at {arch}: {e}"))
                    .to_src();
                for e in entries {
                    assert!(ptx.contains(&format!(".entry {e}(")), "{arch} {}: no {e}", v.file);
                }
                if *arch == "sm_90" && v.number > 2 {
                    assert!(ptx.contains("cp.async"), "{}: sm_90 should use cp.async", v.file);
                }
            });
        }
    });
}

// ---------------------------------------------------------------------------------------
// Tensor cores (bf16 / fp16): against the float64 reference on the same rounded inputs.

use attn_flash2::tc::{self, HalfInputs, TcFloat, bf16, f16};

/// A case with Q, K, V rounded to `T`, and the float64 reference on those rounded values.
struct RoundedCase<T> {
    data: attn_core::testing::CaseData,
    q: ndarray::Array4<T>,
    k: ndarray::Array4<T>,
    v: ndarray::Array4<T>,
    reference: attn_core::reference::RefProblem,
}

impl<T: TcFloat> RoundedCase<T> {
    fn new(case: &Case) -> Self {
        let data = case.build();
        let (q, k, v) =
            (tc::round(data.q.view()), tc::round(data.k.view()), tc::round(data.v.view()));
        let (q32, k32, v32) = (tc::widen(q.view()), tc::widen(k.view()), tc::widen(v.view()));
        let rounded =
            attn_core::Inputs { q: q32.view(), k: k32.view(), v: v32.view(), ..data.inputs() };
        let reference =
            attn_core::reference::RefProblem::from_inputs(&rounded, &data.opts).unwrap();
        Self { data, q, k, v, reference }
    }

    /// The 16-bit call: the rounded tensors with the case's mask and bias.
    fn half(&self) -> HalfInputs<'_, T> {
        let i = self.data.inputs();
        HalfInputs {
            q: self.q.view(),
            k: self.k.view(),
            v: self.v.view(),
            mask: i.mask,
            bias: i.bias,
            alibi: i.alibi,
        }
    }
}

/// O and lse of the tensor-core forward (`version`) against the float64 reference computed
/// on the rounded inputs: (normwise error of O, largest |lse error| over rows that see a key).
fn tc_errors<T: TcFloat>(case: &Case, version: u32) -> (f64, f64) {
    let rc = RoundedCase::<T>::new(case);
    let (fwd, _) = tc::forward_version_with_stats(&rc.half(), &rc.data.opts, version).unwrap();
    let reference = rc.reference.forward();
    let out = tc::widen(fwd.out.view());
    let err = attn_core::metrics::compare(out.view(), reference.out.view()).normwise;
    let mut lse_err: f64 = 0.0;
    for (x, r) in fwd.lse.iter().zip(reference.lse.iter()) {
        if r.is_finite() {
            lse_err = lse_err.max((f64::from(*x) - r).abs());
        } else {
            assert!(*x == f32::NEG_INFINITY, "a row that sees no key has lse {x}, not -inf");
        }
    }
    (err, lse_err)
}

fn tc_cases(d: usize) -> Vec<Case> {
    let mut cases = Vec::new();
    for (i, (b, h, kvh, n_q, n_k)) in
        [(1, 2, 2, 64, 64), (2, 4, 2, 200, 150), (1, 4, 1, 37, 300), (2, 2, 2, 129, 65)]
            .into_iter()
            .enumerate()
    {
        for (j, (causal, mask, bias)) in [
            (false, MaskKind::None, BiasKind::None),
            (true, MaskKind::None, BiasKind::None),
            (false, MaskKind::KeyPadding, BiasKind::PerKey),
            (true, MaskKind::Full, BiasKind::None),
        ]
        .into_iter()
        .enumerate()
        {
            let shape = Shape::new(b, h, n_q, d).with_n_k(n_k).with_kv_heads(kvh);
            cases.push(Case { causal, mask, bias, ..Case::new(shape, (10 * i + j) as u64) });
        }
    }
    cases
}

/// The head dimensions version `number` of `track` is compiled for (only the shipped kernels
/// go above 128).
fn tc_head_dims(track: Track, number: u32) -> impl Iterator<Item = usize> {
    let ships = versions(track).any(|v| v.number == number && v.ships());
    tc::TC_HEAD_DIMS.into_iter().filter(move |&d| d <= 128 || ships)
}

/// The kernel versions to check: every one, or those listed in the environment variable
/// `var` (ATTN_TEST_TC_VERSIONS for the forward, ATTN_TEST_TC_BACKWARD_VERSIONS; e.g. `11,12`:
/// each kernel compiles for seconds on the GPU machine, whose minutes are counted).
fn tc_versions(var: &str, track: Track) -> Vec<u32> {
    match std::env::var(var) {
        Ok(list) => list.split(',').map(|v| v.trim().parse().expect("a version number")).collect(),
        Err(_) => versions(track).map(|v| v.number).collect(),
    }
}

/// Compiles the modules of `versions` for both types and both head dimensions on every core
/// at once (NVRTC takes seconds a module; the tests then find them ready).
fn prepare_in_parallel(track: Track, versions: &[u32]) {
    std::thread::scope(|scope| {
        for &v in versions {
            for d in tc_head_dims(track, v) {
                scope.spawn(move || tc::prepare::<bf16>(track, v, d).unwrap());
                scope.spawn(move || tc::prepare::<f16>(track, v, d).unwrap());
            }
        }
    });
}

#[test]
fn tensor_core_forward_matches_the_reference_on_rounded_inputs() {
    if skip_without_device() {
        return;
    }
    let fwd_versions = tc_versions("ATTN_TEST_TC_VERSIONS", Track::TcForward);
    prepare_in_parallel(Track::TcForward, &fwd_versions);
    for version in fwd_versions {
        for d in tc_head_dims(Track::TcForward, version) {
            for case in tc_cases(d) {
                for (dtype, (err, lse_err)) in [
                    ("bf16", tc_errors::<bf16>(&case, version)),
                    ("f16", tc_errors::<f16>(&case, version)),
                ] {
                    // bf16 keeps 8 bits of mantissa: P rounded to bf16 before P V costs ~2⁻⁹
                    // relative; fp16 keeps 11.
                    let bound = if dtype == "bf16" { 1e-2 } else { 2e-3 };
                    assert!(
                        err <= bound && lse_err <= 1e-2,
                        "v{version} {dtype} {case:?}: O error {err:.2e}, lse error {lse_err:.2e}"
                    );
                }
            }
        }
    }
}

/// dQ, dK, dV of the tensor-core backward (`version`, after the default forward) against the
/// float64 reference on the rounded inputs and rounded dO: the worst normwise error.
fn tc_backward_error<T: TcFloat>(case: &Case, version: u32) -> f64 {
    let rc = RoundedCase::<T>::new(case);
    let d_out = tc::round::<T, _>(rc.data.d_out.view());
    let fwd = tc::forward(&rc.half(), &rc.data.opts).unwrap();
    let (g, _) =
        tc::backward_version_with_stats(&rc.half(), &rc.data.opts, &fwd, d_out.view(), version)
            .unwrap();
    let rg = rc.reference.backward(&tc::widen(d_out.view()).mapv(f64::from));
    [(&g.dq, &rg.dq), (&g.dk, &rg.dk), (&g.dv, &rg.dv)]
        .into_iter()
        .map(|(x, r)| attn_core::metrics::compare(tc::widen(x.view()).view(), r.view()).normwise)
        .fold(0.0, f64::max)
}

#[test]
fn tensor_core_backward_matches_the_reference_on_rounded_inputs() {
    if skip_without_device() {
        return;
    }
    let bwd_versions = tc_versions("ATTN_TEST_TC_BACKWARD_VERSIONS", Track::TcBackward);
    prepare_in_parallel(Track::TcBackward, &bwd_versions);
    prepare_in_parallel(Track::TcForward, &[tc::forward_version()]);
    for version in bwd_versions {
        for d in tc_head_dims(Track::TcBackward, version) {
            for case in tc_cases(d) {
                for (dtype, err) in [
                    ("bf16", tc_backward_error::<bf16>(&case, version)),
                    ("f16", tc_backward_error::<f16>(&case, version)),
                ] {
                    // DESIGN.md: <= 2e-2 for 16-bit operands (dS is rounded before its products).
                    assert!(err <= 2e-2, "backward v{version} {dtype} {case:?}: error {err:.2e}");
                }
            }
        }
    }
}

#[test]
fn tensor_core_forward_gives_fully_masked_rows_zero_and_minus_infinity() {
    if skip_without_device() {
        return;
    }
    let shape = Shape::new(2, 2, 70, 64).with_n_k(90);
    let data = Case::new(shape, 7).build();
    let mut mask = ndarray::Array2::from_elem((2, 90), true);
    mask.row_mut(1).fill(false); // batch entry 1 sees no key at all
    let (q, k, v) = (
        tc::round::<bf16, _>(data.q.view()),
        tc::round::<bf16, _>(data.k.view()),
        tc::round::<bf16, _>(data.v.view()),
    );
    let half = HalfInputs::new(q.view(), k.view(), v.view())
        .with_mask(attn_core::Mask::KeyPadding(mask.view()));
    let fwd = tc::forward(&half, &data.opts).unwrap();
    let masked = fwd.out.slice(ndarray::s![1, .., .., ..]);
    assert_eq!(masked.iter().filter(|x| x.to_f32() != 0.0).count(), 0);
    assert!(fwd.lse.slice(ndarray::s![1, .., ..]).iter().all(|x| *x == f32::NEG_INFINITY));
    assert!(fwd.lse.slice(ndarray::s![0, .., ..]).iter().all(|x| x.is_finite()));
}

#[test]
fn tensor_core_forward_refuses_what_it_does_not_do() {
    // Validation comes before the device: these run everywhere.
    let case = Case { dropout: Some(0.1), ..Case::new(Shape::new(1, 2, 16, 64), 1) };
    let data = case.build();
    let q = tc::round::<bf16, _>(data.q.view());
    let half = HalfInputs::new(q.view(), q.view(), q.view());
    let err = tc::forward(&half, &data.opts).unwrap_err().to_string();
    assert!(err.contains("dropout") && err.contains("--dtype f32"), "{err}");

    let data = Case::new(Shape::new(1, 2, 16, 96), 1).build();
    let q = tc::round::<f16, _>(data.q.view());
    let half = HalfInputs::new(q.view(), q.view(), q.view());
    let err = tc::forward(&half, &data.opts).unwrap_err().to_string();
    assert!(err.contains("head_dim 96") && err.contains("64, 128, 256"), "{err}");

    let k = tc::round::<f16, _>(data.k.slice(ndarray::s![.., .., .., ..32]));
    let half = HalfInputs::new(q.view(), k.view(), k.view());
    let err = tc::forward(&half, &data.opts).unwrap_err().to_string();
    assert!(err.contains("k must be"), "{err}");

    // The values are checked on the 16-bit tensors themselves, as every stage checks its own.
    let data = Case::new(Shape::new(1, 2, 16, 64), 1).build();
    let mut q = tc::round::<bf16, _>(data.q.view());
    q[[0, 1, 3, 5]] = bf16::NAN;
    let half = HalfInputs::new(q.view(), q.view(), q.view());
    let err = tc::forward(&half, &data.opts).unwrap_err().to_string();
    assert!(err.contains("q holds NaN at index [0, 1, 3, 5]"), "{err}");

    // The backward checks dO against q before touching a device.
    let data = Case::new(Shape::new(1, 2, 16, 64), 1).build();
    let q = tc::round::<bf16, _>(data.q.view());
    let half = HalfInputs::new(q.view(), q.view(), q.view());
    let fwd = tc::HalfForward { out: q.clone(), lse: ndarray::Array3::zeros((1, 2, 16)) };
    let short = q.slice(ndarray::s![.., .., ..8, ..]);
    let err = tc::backward(&half, &data.opts, &fwd, short).unwrap_err().to_string();
    assert!(err.contains("d_out") && err.contains("[1, 2, 16, 64]"), "{err}");
}

static BF16_STAGE: attn_flash2::Flash2TensorCores<bf16> = attn_flash2::Flash2TensorCores::new();
static F16_STAGE: attn_flash2::Flash2TensorCores<f16> = attn_flash2::Flash2TensorCores::new();

/// The tensor cores as a `Stage` like every other (f32 arrays in and out, rounded on the
/// way): against the float64 reference on the rounded inputs, forward and backward, within
/// DESIGN.md's bf16 / fp16 bounds.
#[test]
fn tensor_core_stage_matches_the_reference_on_rounded_inputs() {
    if skip_without_device() {
        return;
    }
    use attn_core::testing::check_against_reference;
    use attn_core::tolerance::{HALF_BACKWARD, HALF_FORWARD};
    /// A stage and the rounding of its element type.
    type Rounding = (&'static dyn Stage, fn(f32) -> f32);
    let stages: [Rounding; 2] = [
        (&BF16_STAGE, |x| f32::from(bf16::from_f32(x))),
        (&F16_STAGE, |x| f32::from(f16::from_f32(x))),
    ];
    for (stage, round) in stages {
        assert_eq!((stage.name(), stage.device()), ("flash2", attn_core::Device::Cuda));
        for case in tc::TC_HEAD_DIMS.into_iter().flat_map(tc_cases) {
            let data = case.build().rounded(round);
            let check = check_against_reference(stage, &data, true).unwrap();
            check.assert_within(HALF_FORWARD, HALF_BACKWARD, &format!("{case:?}"));
        }
    }
}

#[test]
fn flash2cuda_takes_the_score_modifiers() {
    // the window, softcap, ALiBi, dBias
    if skip_without_device() {
        return;
    }
    use attn_core::tolerance::{F32_BACKWARD, F32_FORWARD};
    let tol = (F32_FORWARD, F32_BACKWARD);
    attn_core::testing::score_mods::check(&Flash2Cuda, &STAGE_HEAD_DIMS, tol, |x| x);
}

#[test]
fn tensor_core_stage_pads_every_head_dim_up_to_256() {
    if skip_without_device() {
        return;
    }
    use attn_core::tolerance::{HALF_BACKWARD, HALF_FORWARD};
    let tol = (HALF_FORWARD, HALF_BACKWARD);
    fused::pads_every_head_dim(&BF16_STAGE, 256, tol, |x| f32::from(bf16::from_f32(x)));
    fused::refuses_head_dims_above(&BF16_STAGE, 256);
}

/// The softcap without mask, bias or ALiBi runs the `_cap` forward, whose tiles inside every
/// row's key range are softcapped in fp16 pairs and leave P~ packed: rows long enough that
/// most tiles are whole, caps from strong (0.3) to beyond what fp16 carries (10⁴, the f32
/// kernel), scores large enough that tanh saturates, causal or not, both element types.
#[test]
fn the_softcap_kernel_matches_the_reference_on_whole_tiles() {
    if skip_without_device() {
        return;
    }
    use attn_core::testing::check_against_reference;
    use attn_core::tolerance::{HALF_BACKWARD, HALF_FORWARD};
    type Rounding = (&'static dyn Stage, fn(f32) -> f32);
    let stages: [Rounding; 2] = [
        (&BF16_STAGE, |x| f32::from(bf16::from_f32(x))),
        (&F16_STAGE, |x| f32::from(f16::from_f32(x))),
    ];
    let problems = [
        (false, 30.0, 300, 330, None),
        (true, 5.0, 257, 257, None),
        (false, 0.3, 200, 512, None),
        (true, 1e4, 260, 260, None),
        (false, 20.0, 130, 700, Some(4.0)),
    ];
    for (stage, round) in stages {
        for d in [64, 128] {
            for (i, &(causal, cap, n_q, n_k, scale)) in problems.iter().enumerate() {
                let shape = Shape::new(1, 2, n_q, d).with_n_k(n_k);
                let case =
                    Case { causal, softcap: Some(cap), scale, ..Case::new(shape, 50 + i as u64) };
                let data = case.build().rounded(round);
                let check = check_against_reference(stage, &data, true).unwrap();
                check.assert_within(HALF_FORWARD, HALF_BACKWARD, &format!("{case:?}"));
            }
        }
    }
}

#[test]
fn score_modifiers_on_the_tensor_cores_and_the_deterministic_dq_pass() {
    if skip_without_device() {
        return;
    }
    use attn_core::testing::{check_against_reference, score_mods};
    use attn_core::tolerance::{F32_BACKWARD, F32_FORWARD, HALF_BACKWARD, HALF_FORWARD};
    let tol = (HALF_FORWARD, HALF_BACKWARD);
    score_mods::check(&BF16_STAGE, &[64, 128, 256], tol, |x| f32::from(bf16::from_f32(x)));
    score_mods::check(&F16_STAGE, &[64, 128], tol, |x| f32::from(f16::from_f32(x)));
    // the dQ pass recomputes dS without adding it into dBias a second time
    for case in score_mods::cases(64) {
        let mut data = case.build();
        data.opts.deterministic = true;
        let check = check_against_reference(&Flash2Cuda, &data, true).unwrap();
        check.assert_within(F32_FORWARD, F32_BACKWARD, &format!("deterministic {case:?}"));
    }
}

#[test]
fn flash2_gpu_packed_batches_and_kv_caches_match_the_reference() {
    // each sequence (batch row) of a packed (cached) call launched as its own call
    if skip_without_device() {
        return;
    }
    use attn_core::tolerance::{F32_BACKWARD, F32_FORWARD};
    attn_core::testing::varlen_claims::hold(&attn_flash2::Flash2Cuda, (F32_FORWARD, F32_BACKWARD));
}

#[test]
fn flash2_gpu_decode_kernel_matches_the_reference() {
    // the dedicated decode kernel in f32, bf16 and fp16, whole and split-KV
    if skip_without_device() {
        return;
    }
    use attn_core::testing::varlen_claims::decode_matches_the_reference;
    use attn_core::tolerance::{F32_FORWARD, HALF_FORWARD};
    use attn_flash2::gpu::decode;
    use attn_flash2::tc::{self, bf16, f16};

    // the CUDA-core kernel where the tensor cores would run the call
    fn on_cuda_cores(
        cache: &attn_core::varlen::KvCache<'_>,
        i: &attn_core::Inputs<'_>,
        opts: &attn_core::Options,
        splits: Option<usize>,
    ) -> attn_core::Result<attn_core::Forward> {
        let gpu = attn_cuda::gpu()?;
        let (q, k, v) = (tc::round::<bf16, _>(i.q), tc::round(i.k), tc::round(i.v));
        let mut half = tc::HalfInputs::new(q.view(), k.view(), v.view());
        half.bias = i.bias;
        half.alibi = i.alibi;
        half.mask = i.mask.map(attn_core::Mask::shorten);
        let dev = decode::DeviceDecode::upload(gpu, cache, &half, opts)?.on_cuda_cores(gpu)?;
        assert!(!dev.uses_tensor_cores());
        let (out, lse) = dev.run(gpu, splits.unwrap_or_else(|| dev.default_splits(gpu)))?;
        let out: ndarray::Array4<bf16> = gpu.download_array(&out, i.q.dim())?;
        let (b, h, n, _) = i.q.dim();
        Ok(attn_core::Forward {
            out: tc::widen(out.view()),
            lse: gpu.download_array(&lse, (b, h, n))?,
            traffic: None,
        })
    }
    decode_matches_the_reference("decode f32", &decode::forward_cached, |x| x, F32_FORWARD);
    let to_bf16 = |x: f32| bf16::from_f32(x).to_f32();
    let to_f16 = |x: f32| f16::from_f32(x).to_f32();
    decode_matches_the_reference(
        "decode bf16",
        &decode::forward_cached_rounded::<bf16>,
        to_bf16,
        HALF_FORWARD,
    );
    decode_matches_the_reference(
        "decode f16",
        &decode::forward_cached_rounded::<f16>,
        to_f16,
        HALF_FORWARD,
    );
    decode_matches_the_reference("decode bf16 (cuda cores)", &on_cuda_cores, to_bf16, HALF_FORWARD);
}

#[test]
fn tensor_core_packed_batch_in_one_launch_equals_the_calls_per_sequence_and_the_reference() {
    // Sequences across tile boundaries (128-row blocks), one without keys, one without
    // queries, n_q ≠ n_k; GQA; head dims the kernels take and one they pad; forward and
    // backward.
    if skip_without_device() {
        return;
    }
    use attn_core::metrics::compare;
    use attn_core::reference::RefProblem;
    use attn_core::tolerance::{HALF_BACKWARD, HALF_FORWARD};
    use attn_core::varlen::{self, SeqLens};
    use attn_core::{Inputs, Mask, Options, Window, random};
    use attn_flash2::tc::{self, bf16, f16};

    fn run<T: tc::TcFloat>(d: usize, case: usize) {
        let (q_lens, k_lens): (&[usize], &[usize]) = match case {
            1 => (&[128, 257, 33], &[128, 257, 33]),
            _ => (&[300, 1, 0, 129, 64, 7], &[300, 40, 5, 129, 0, 200]),
        };
        let opts = match case {
            1 => Options {
                window: Some(Window::new(40, 3)),
                softcap: Some(20.0),
                ..Options::default()
            },
            _ => Options::default().causal(true),
        };
        let seqs = SeqLens::from_lengths(q_lens, k_lens);
        let (tq, tk) = seqs.totals();
        let seed = 40 + case as u64 + d as u64;
        // the 16-bit values, as f32, so the reference sees what the kernels read
        let rounded = |a: ndarray::Array4<f32>| tc::widen(tc::round::<T, _>(a.view()).view());
        let q = rounded(random::normal((1, 4, tq, d), seed));
        let k = rounded(random::normal((1, 2, tk, d), seed + 1));
        let v = rounded(random::normal((1, 2, tk, d), seed + 2));
        let pad = random::key_padding(1, tk, seed + 3);
        let bias = random::bias((1, 4, tq, tk), 0.0, seed + 4);
        let mut inputs = Inputs::new(q.view(), k.view(), v.view());
        if case == 0 {
            inputs = inputs.with_mask(Mask::KeyPadding(pad.view())).with_bias(bias.view());
        }
        let what = format!("{} d {d} case {case}", T::NAME);
        let (native, _) = tc::forward_packed_rounded::<T>(&seqs, &inputs, &opts)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let version = tc::forward_version();
        let per_sequence = varlen::forward_packed(&seqs, &inputs, &opts, |i, o| {
            tc::forward_rounded::<T>(i, o, version).map(|f| f.0)
        })
        .unwrap();
        // the same tiles of the same kernel: the same bits
        let same_bits = |a: &[f32], b: &[f32], name: &str| {
            let differ = a.iter().zip(b).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
            assert_eq!(differ, 0, "{what}: {name} differs in {differ} values");
        };
        same_bits(native.out.as_slice().unwrap(), per_sequence.out.as_slice().unwrap(), "O");
        same_bits(native.lse.as_slice().unwrap(), per_sequence.lse.as_slice().unwrap(), "lse");
        let unpacked = seqs.unpacked(&inputs, &opts);
        let r =
            RefProblem::from_inputs(&unpacked.inputs(&inputs), &unpacked.opts).unwrap().forward();
        let err = compare(native.out.view(), r.out.view()).normwise;
        assert!(err <= HALF_FORWARD, "{what}: normwise error {err:e}");
        let lse_err = compare(native.lse.view(), r.lse.view()).normwise;
        assert!(lse_err <= HALF_FORWARD, "{what}: lse error {lse_err:e}");

        // the backward in one launch: dK, dV bit for bit the per-sequence calls' (each key
        // tile owns its rows); dQ, added by atomics in any order, within rounding of them
        let d_out = rounded(random::normal((1, 4, tq, d), seed + 5));
        let (g, _) = tc::backward_packed_rounded::<T>(&seqs, &inputs, &opts, &native, d_out.view())
            .unwrap_or_else(|e| panic!("{what} backward: {e}"));
        let per_sequence_g = varlen::backward_packed(
            &seqs,
            &inputs,
            &opts,
            &native,
            d_out.view(),
            |i, o, f, d_o| {
                tc::backward_rounded::<T>(i, o, f, d_o, tc::backward_version()).map(|g| g.0)
            },
        )
        .unwrap();
        same_bits(g.dk.as_slice().unwrap(), per_sequence_g.dk.as_slice().unwrap(), "dK");
        same_bits(g.dv.as_slice().unwrap(), per_sequence_g.dv.as_slice().unwrap(), "dV");
        let dq_apart = compare(g.dq.view(), per_sequence_g.dq.mapv(f64::from).view()).normwise;
        assert!(dq_apart <= 1e-3, "{what}: dQ {dq_apart:e} from the per-sequence calls'");
        let rg = RefProblem::from_inputs(&unpacked.inputs(&inputs), &unpacked.opts)
            .unwrap()
            .backward(&d_out.mapv(f64::from));
        for (name, x, r) in [("dQ", &g.dq, &rg.dq), ("dK", &g.dk, &rg.dk), ("dV", &g.dv, &rg.dv)] {
            let err = compare(x.view(), r.view()).normwise;
            assert!(err <= HALF_BACKWARD, "{what}: {name} normwise error {err:e}");
        }
    }
    // case 0: key padding and a bias (the _mods kernels); 1: window and softcap (_cut, _cap);
    // 2: causal alone (the plain kernels)
    for d in [64, 128, 256, 72] {
        for case in 0..3 {
            run::<bf16>(d, case);
        }
    }
    run::<f16>(128, 0);
}

#[test]
fn tensor_core_packed_forward_refuses_bad_spans_and_dropout_before_the_device() {
    // runs everywhere: every check comes before the device is opened
    use attn_core::varlen::SeqLens;
    use attn_core::{AttnError, Inputs, Options, random};
    use attn_flash2::tc::{self, bf16};
    let (q, k) = (random::normal((1, 2, 10, 64), 1), random::normal((1, 2, 12, 64), 2));
    let inputs = Inputs::new(q.view(), k.view(), k.view());
    let short = SeqLens::from_lengths(&[4, 5], &[6, 6]); // 9 query rows of Q's 10
    let err = tc::forward_packed_rounded::<bf16>(&short, &inputs, &Options::default()).unwrap_err();
    assert!(matches!(err, AttnError::InvalidLengths { arg: "cu_seqlens_q", .. }), "{err}");
    let seqs = SeqLens::from_lengths(&[4, 6], &[6, 6]);
    let dropout = Options::default().dropout(0.1, 3);
    let err = tc::forward_packed_rounded::<bf16>(&seqs, &inputs, &dropout).unwrap_err();
    assert!(matches!(err, AttnError::Unsupported { what: "dropout", .. }), "{err}");
    let (q2, k2) = (random::normal((2, 2, 5, 64), 1), random::normal((2, 2, 6, 64), 2));
    let batched = Inputs::new(q2.view(), k2.view(), k2.view());
    let err = tc::forward_packed_rounded::<bf16>(
        &SeqLens::from_lengths(&[5], &[6]),
        &batched,
        &Options::default(),
    )
    .unwrap_err();
    assert!(matches!(err, AttnError::ShapeMismatch { arg: "q", .. }), "{err}");
}
