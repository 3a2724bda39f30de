//! HBM traffic against the paper's analysis (Dao et al., 2022, Theorem 2): Θ(N²d²/M) for
//! FlashAttention, Θ(Nd + N²) for standard attention. The counts are asserted, not printed.

use attn_core::{Inputs, Options, Shape, Stage, Traffic};
use attn_flash1::{Flash1Cpu, block_sizes, forward_traffic_model};
use attn_naive::NaiveCpu;

fn traffic(stage: &dyn Stage, shape: Shape, opts: &Options) -> (Traffic, Traffic) {
    let (q, k, v) = attn_core::random::qkv(&shape, 1);
    let d_out = attn_core::random::normal(shape.q_dims(), 2);
    let inputs = Inputs::new(q.view(), k.view(), v.view());
    let fwd = stage.forward(&inputs, opts).unwrap();
    let grads = stage.backward(&inputs, opts, &fwd, d_out.view()).unwrap();
    (fwd.traffic.unwrap(), grads.traffic.unwrap())
}

#[test]
fn flash1_forward_traffic_is_exactly_the_papers_loads_and_stores() {
    for (shape, sram) in [
        (Shape::new(1, 2, 512, 64), 65_536),
        (Shape::new(2, 1, 300, 32).with_n_k(450), 10_000),
        (Shape::new(1, 1, 1024, 64), 16_384),
    ] {
        let opts = Options::default().sram(sram);
        let (fwd, _) = traffic(&Flash1Cpu, shape, &opts);
        assert_eq!(
            fwd.total(),
            forward_traffic_model(&shape, block_sizes(&shape, &opts)),
            "{shape}"
        );
    }
}

#[test]
fn halving_the_sram_roughly_doubles_flash1_traffic() {
    // N = 2048, d = 64: M = 64 Ki, 32 Ki, 16 Ki floats give B_c = 256, 128, 64 (B_r = 64).
    let shape = Shape::new(1, 1, 2048, 64);
    let totals: Vec<(u64, u64)> = [65_536usize, 32_768, 16_384]
        .iter()
        .map(|&m| {
            let (f, b) = traffic(&Flash1Cpu, shape, &Options::default().sram(m));
            (f.total(), b.total())
        })
        .collect();
    for w in totals.windows(2) {
        let fwd_ratio = w[1].0 as f64 / w[0].0 as f64;
        let bwd_ratio = w[1].1 as f64 / w[0].1 as f64;
        // Θ(N²d²/M): ×2, less the N·d terms that do not depend on M.
        assert!((1.85..=2.0).contains(&fwd_ratio), "forward ratio {fwd_ratio}");
        assert!((1.85..=2.0).contains(&bwd_ratio), "backward ratio {bwd_ratio}");
    }
}

#[test]
fn doubling_n_quadruples_flash1_traffic_and_naive_traffic_is_independent_of_m() {
    let opts = Options::default().sram(32_768);
    let (f1, _) = traffic(&Flash1Cpu, Shape::new(1, 1, 1024, 64), &opts);
    let (f2, _) = traffic(&Flash1Cpu, Shape::new(1, 1, 2048, 64), &opts);
    let ratio = f2.total() as f64 / f1.total() as f64;
    assert!((3.8..=4.0).contains(&ratio), "flash1 N ratio {ratio}");

    let shape = Shape::new(1, 1, 1024, 64);
    let (n1, _) = traffic(&NaiveCpu, shape, &Options::default().sram(65_536));
    let (n2, _) = traffic(&NaiveCpu, shape, &Options::default().sram(4096));
    assert_eq!(n1, n2);
    // Θ(Nd + N²): S written, read, P written, read — 4·N² floats dominate.
    let n = 1024u64;
    let expected = 4 * (4 * n * n + 4 * n * 64 + n);
    assert_eq!(n1.total(), expected);
    let (n4, _) = traffic(&NaiveCpu, Shape::new(1, 1, 2048, 64), &Options::default());
    let ratio = n4.total() as f64 / n1.total() as f64;
    assert!((3.8..=4.0).contains(&ratio), "naive N ratio {ratio}");
}

#[test]
fn flash1_moves_far_less_than_naive_when_the_sram_holds_many_keys() {
    // N = 2048, d = 64, M = 64 Ki floats: each of the N/B_c = 4N·d/M outer steps moves Q_i,
    // O_i in and O_i out, 3·N·d floats: 12·N²d²/M ≈ 0.75 N², against naive attention's 4 N².
    let shape = Shape::new(1, 1, 2048, 64);
    let (flash, flash_b) = traffic(&Flash1Cpu, shape, &Options::default());
    let (naive, naive_b) = traffic(&NaiveCpu, shape, &Options::default());
    let ratio = naive.total() as f64 / flash.total() as f64;
    assert!(ratio > 4.5, "naive/flash1 forward traffic {ratio}");
    let ratio_b = naive_b.total() as f64 / flash_b.total() as f64;
    assert!(ratio_b > 4.5, "naive/flash1 backward traffic {ratio_b}");
    // But with a tiny SRAM (B_c = 4), FlashAttention-1 moves more than naive attention.
    let (tiny, _) = traffic(&Flash1Cpu, shape, &Options::default().sram(1024));
    assert!(tiny.total() > naive.total());
}
