//! The stages against each other: every tiled CPU stage gives naive attention's answer on
//! random configurations and drops the same weights; FlashAttention-1 moves far less HBM
//! traffic than naive attention; on the GPU, chunked attention's device memory grows as n
//! where naive attention's grows as n². (Each stage's own crate tests it against the float64
//! reference; what compares two stages lives here, so that no stage depends on another.)

use attn::core::testing::strategies::{arb_case_with_mods, config};
use attn::core::testing::traffic_of;
use attn::core::testing::{check_against_stage, edge_cases};
use attn::{Inputs, Options, Shape, Stage};
use attn::{chunked::ChunkedCpu, flash1::Flash1Cpu, flash2::Flash2Cpu, naive::NaiveCpu};
use proptest::prelude::*;

fn tiled_cpu_stages() -> [&'static dyn Stage; 3] {
    [&ChunkedCpu, &Flash1Cpu, &Flash2Cpu]
}

proptest! {
    #![proptest_config(config(96))]

    #[test]
    fn tiled_cpu_stages_match_naive_on_random_configurations(case in arb_case_with_mods(50, true)) {
        let data = case.build();
        for stage in tiled_cpu_stages() {
            let check = check_against_stage(stage, &NaiveCpu, &data).unwrap();
            check.assert_within(2e-5, 2e-4, &format!("{} {case:?} against naive", stage.name()));
        }
    }
}

#[test]
fn tiled_cpu_stages_drop_the_same_weights_as_naive() {
    for (stage, blocks) in tiled_cpu_stages().into_iter().zip([(3, 5), (3, 5), (3, 5)]) {
        edge_cases::same_dropout_as(stage, &NaiveCpu, blocks);
    }
}

#[test]
fn flash1_moves_far_less_than_naive_when_the_sram_holds_many_keys() {
    // N = 2048, d = 64, M = 64 Ki floats: each of the N/B_c = 4N·d/M outer steps moves Q_i,
    // O_i in and O_i out, 3·N·d floats: 12·N²d²/M ≈ 0.75 N², against naive attention's 4 N².
    let shape = Shape::new(1, 1, 2048, 64);
    let (flash, flash_b) = traffic_of(&Flash1Cpu, shape, &Options::default());
    let (naive, naive_b) = traffic_of(&NaiveCpu, shape, &Options::default());
    let ratio = naive.total() as f64 / flash.total() as f64;
    assert!(ratio > 4.5, "naive/flash1 forward traffic {ratio}");
    let ratio_b = naive_b.total() as f64 / flash_b.total() as f64;
    assert!(ratio_b > 4.5, "naive/flash1 backward traffic {ratio_b}");
    // But with a tiny SRAM (B_c = 4), FlashAttention-1 moves more than naive attention.
    let (tiny, _) = traffic_of(&Flash1Cpu, shape, &Options::default().sram(1024));
    assert!(tiny.total() > naive.total());
}

#[test]
fn chunked_gpu_device_memory_is_linear_where_naive_is_quadratic() {
    if attn::cuda::skip_without_device() {
        return;
    }
    let peak = |n: usize| {
        let shape = Shape::new(1, 8, n, 64);
        let (q, k, v) = attn::core::random::qkv(&shape, 2);
        let inputs = Inputs::new(q.view(), k.view(), v.view());
        let opts = Options::default().causal(true).blocks(256, 512);
        let chunked = attn::chunked::gpu::forward_with_stats(&inputs, &opts).unwrap().1.peak_bytes;
        let naive = attn::naive::gpu::forward_with_stats(&inputs, &opts).unwrap().1.peak_bytes;
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

#[test]
fn cpu_stages_take_every_score_modifier_at_gpu_tile_sizes() {
    use attn::core::testing::score_mods;
    use attn::core::tolerance::{F32_BACKWARD, F32_FORWARD};
    for stage in attn::cpu_stages() {
        score_mods::check(stage, &[8], (F32_FORWARD, F32_BACKWARD), |x| x);
    }
}

/// A call that is a block of a larger problem (a ring's block, [`attn::core::Placement`]):
/// every stage, on the CPU and on the GPU, masks causally, cuts the window, measures ALiBi and
/// hashes dropout at the whole problem's positions, forward and backward, as the float64
/// reference does on the same block — with the block's rows partly hidden, wholly hidden
/// (above the whole problem's diagonal) and all visible.
#[test]
fn every_stage_computes_a_placed_block_as_the_reference_does() {
    use attn::core::testing::{AlibiKind, BiasKind, Case, MaskKind, check_against_reference};
    use attn::core::tolerance::{HALF_BACKWARD, HALF_FORWARD};
    use attn::core::{Placement, Stage};
    // (case, placement of its 13 x 17 block in the whole problem, dropout)
    let shape = Shape::new(2, 4, 13, 64).with_n_k(17).with_kv_heads(2);
    let placed = |q_start, k_start, n_q, n_k| Placement { q_start, k_start, n_q, n_k };
    let cases = [
        // query 0's diagonal key 1: causal cuts the block's right part; every modifier on
        (
            Case {
                causal: true,
                alibi: AlibiKind::PerBatchHead,
                softcap: Some(2.5),
                mask: MaskKind::Full,
                bias: BiasKind::Full,
                bias_grad: true,
                dropout: Some(0.2),
                ..Case::new(shape, 3)
            },
            placed(20, 12, 40, 33),
        ),
        // a window on both sides around diagonal 7, key padding
        (
            Case {
                window: Some((3, 5)),
                mask: MaskKind::KeyPadding,
                alibi: AlibiKind::PerHead,
                ..Case::new(shape, 4)
            },
            placed(0, 20, 13, 40),
        ),
        // diagonal -3: causal hides the first three rows from every key of the block
        (
            Case { causal: true, bias: BiasKind::PerKey, bias_grad: true, ..Case::new(shape, 5) },
            placed(20, 25, 40, 42),
        ),
    ];
    let f32_stages: Vec<&'static dyn Stage> = attn::cpu_stages()
        .into_iter()
        .chain(if attn::cuda::available() { attn::gpu_stages() } else { Vec::new() })
        .filter(|s| s.name() != attn::ring::cpu::NAME)
        .collect();
    if !attn::cuda::available() {
        eprintln!("skipped: the GPU stages' half of this test (no CUDA device)");
    }
    for (case, placement) in &cases {
        let mut data = case.build();
        data.opts = data.opts.clone().placed(*placement);
        for stage in &f32_stages {
            let what = format!("{} on {:?}, {placement:?}, {case:?}", stage.name(), stage.device());
            check_against_reference(*stage, &data, true).unwrap().assert_f32(&what);
        }
    }
    if attn::cuda::available() {
        // the tensor cores (bf16), on the inputs rounded to bf16; they take no dropout
        static BF16: attn::flash2::Flash2TensorCores<half::bf16> =
            attn::flash2::Flash2TensorCores::new();
        let round: fn(f32) -> f32 = |x| f32::from(half::bf16::from_f32(x));
        for (case, placement) in &cases {
            let case = Case { dropout: None, ..case.clone() };
            let mut data = case.build().rounded(round);
            data.opts = data.opts.clone().placed(*placement);
            let check = check_against_reference(&BF16, &data, true).unwrap();
            check.assert_within(
                HALF_FORWARD,
                HALF_BACKWARD,
                &format!("bf16 {placement:?} {case:?}"),
            );
        }
    }
}
