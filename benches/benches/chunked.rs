//! Stage 2 (chunked, Rabe & Staats) forward and backward at a few sizes, with the seed's
//! chunk sizes (1024 / 2048) and smaller ones. Throughput in FLOPs (`elem/s` reads FLOP/s).
//!
//! cargo bench -p attn-benches --bench chunked

use std::hint::black_box;

use attn::core::flops::{backward_flops, forward_flops};
use attn::{Inputs, Options, Shape, Stage};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

fn chunked(c: &mut Criterion) {
    let stage = attn::chunked::ChunkedCpu;
    for (q_chunk, k_chunk) in [(1024, 2048), (128, 256)] {
        let mut group = c.benchmark_group(format!("chunked/causal/{q_chunk}x{k_chunk}"));
        group.sample_size(10);
        for n in [512usize, 1024, 2048, 4096] {
            let shape = Shape::new(1, 8, n, 64);
            let (q, k, v) = attn::core::random::qkv(&shape, 0);
            let d_out = attn::core::random::normal(shape.q_dims(), 1);
            let inputs = Inputs::new(q.view(), k.view(), v.view());
            let opts = Options::default().causal(true).blocks(q_chunk, k_chunk);

            group.throughput(Throughput::Elements(forward_flops(&shape, true) as u64));
            group.bench_with_input(BenchmarkId::new("forward", n), &n, |b, _| {
                b.iter(|| black_box(stage.forward(&inputs, &opts).unwrap()))
            });

            let fwd = stage.forward(&inputs, &opts).unwrap();
            group.throughput(Throughput::Elements(backward_flops(&shape, true) as u64));
            group.bench_with_input(BenchmarkId::new("backward", n), &n, |b, _| {
                b.iter(|| black_box(stage.backward(&inputs, &opts, &fwd, d_out.view()).unwrap()))
            });
        }
        group.finish();
    }
}

criterion_group!(benches, chunked);
criterion_main!(benches);
