//! Stage 2 (chunked, Rabe & Staats), with the seed's chunk sizes (1024 / 2048) and smaller
//! ones: cargo bench -p attn-benches --bench chunked

use attn::Options;
use attn_benches::bench_stage;
use criterion::{Criterion, criterion_group, criterion_main};

fn chunked(c: &mut Criterion) {
    let causal = Options::default().causal(true);
    let variants =
        [("causal/1024x2048", causal.clone()), ("causal/128x256", causal.blocks(128, 256))];
    bench_stage(c, &attn::chunked::ChunkedCpu, &attn_benches::LENGTHS, &variants);
}

criterion_group!(benches, chunked);
criterion_main!(benches);
