//! Stage 4 (FlashAttention-2), full and causal, default blocks (128 × 256):
//! cargo bench -p attn-benches --bench flash2

use attn::Options;
use attn_benches::bench_stage;
use criterion::{Criterion, criterion_group, criterion_main};

fn flash2(c: &mut Criterion) {
    let variants = [("full", Options::default()), ("causal", Options::default().causal(true))];
    bench_stage(c, &attn::flash2::Flash2Cpu, &attn_benches::LENGTHS, &variants);
}

criterion_group!(benches, flash2);
criterion_main!(benches);
