//! Stage 1 (naive) forward and backward at a few sizes. Throughput is reported in FLOPs
//! (criterion's "elements" are FLOPs here: `elem/s` reads as FLOP/s), counted as in the
//! FlashAttention-2 paper (attn_core::flops).
//!
//! cargo bench -p attn-benches --bench naive

use std::hint::black_box;

use attn::core::flops::{backward_flops, forward_flops};
use attn::{Inputs, Options, Shape, Stage};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

fn naive(c: &mut Criterion) {
    let stage = attn::naive::NaiveCpu;
    for causal in [false, true] {
        let mut group = c.benchmark_group(if causal { "naive/causal" } else { "naive/full" });
        group.sample_size(10);
        for n in [256usize, 512, 1024, 2048] {
            let shape = Shape::new(1, 8, n, 64);
            let (q, k, v) = attn::core::random::qkv(&shape, 0);
            let d_out = attn::core::random::normal(shape.q_dims(), 1);
            let inputs = Inputs::new(q.view(), k.view(), v.view());
            let opts = Options::default().causal(causal);

            group.throughput(Throughput::Elements(forward_flops(&shape, causal) as u64));
            group.bench_with_input(BenchmarkId::new("forward", n), &n, |b, _| {
                b.iter(|| black_box(stage.forward(&inputs, &opts).unwrap()))
            });

            let fwd = stage.forward(&inputs, &opts).unwrap();
            group.throughput(Throughput::Elements(backward_flops(&shape, causal) as u64));
            group.bench_with_input(BenchmarkId::new("backward", n), &n, |b, _| {
                b.iter(|| black_box(stage.backward(&inputs, &opts, &fwd, d_out.view()).unwrap()))
            });
        }
        group.finish();
    }
}

criterion_group!(benches, naive);
criterion_main!(benches);
