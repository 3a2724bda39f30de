//! Stage 1 (naive): cargo bench -p attn-benches --bench naive

use attn::Options;
use attn_benches::bench_stage;
use criterion::{Criterion, criterion_group, criterion_main};

fn naive(c: &mut Criterion) {
    let variants = [("full", Options::default()), ("causal", Options::default().causal(true))];
    bench_stage(c, &attn::naive::NaiveCpu, &attn_benches::LENGTHS, &variants);
}

criterion_group!(benches, naive);
criterion_main!(benches);
