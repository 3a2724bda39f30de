//! HBM traffic against the paper's analysis (Dao et al., 2022, Theorem 2): Θ(N²d²/M) for
//! FlashAttention (standard attention's Θ(Nd + N²) is naive's own test, the comparison the
//! facade's). The counts are asserted, not printed.

use attn_core::testing::traffic_of;
use attn_core::{Options, Shape};
use attn_flash1::{Flash1Cpu, block_sizes, forward_traffic_model};

#[test]
fn flash1_forward_traffic_is_exactly_the_papers_loads_and_stores() {
    for (shape, sram) in [
        (Shape::new(1, 2, 512, 64), 65_536),
        (Shape::new(2, 1, 300, 32).with_n_k(450), 10_000),
        (Shape::new(1, 1, 1024, 64), 16_384),
    ] {
        let opts = Options::default().sram(sram);
        let (fwd, _) = traffic_of(&Flash1Cpu, shape, &opts);
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
            let (f, b) = traffic_of(&Flash1Cpu, shape, &Options::default().sram(m));
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
fn doubling_n_quadruples_flash1_traffic() {
    let opts = Options::default().sram(32_768);
    let (f1, _) = traffic_of(&Flash1Cpu, Shape::new(1, 1, 1024, 64), &opts);
    let (f2, _) = traffic_of(&Flash1Cpu, Shape::new(1, 1, 2048, 64), &opts);
    let ratio = f2.total() as f64 / f1.total() as f64;
    assert!((3.8..=4.0).contains(&ratio), "flash1 N ratio {ratio}");
}
