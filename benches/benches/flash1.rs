//! Stage 3 (FlashAttention-1), with the blocks of the default SRAM budget (64 × 256 at
//! d = 64) and of a quarter of it: cargo bench -p attn-benches --bench flash1

use attn::Options;
use attn_benches::bench_stage;
use criterion::{Criterion, criterion_group, criterion_main};

fn flash1(c: &mut Criterion) {
    let causal = Options::default().causal(true);
    let variants = [("causal/M=64Ki", causal.clone()), ("causal/M=16Ki", causal.sram(16 * 1024))];
    bench_stage(c, &attn::flash1::Flash1Cpu, &attn_benches::LENGTHS, &variants);
}

criterion_group!(benches, flash1);
criterion_main!(benches);
