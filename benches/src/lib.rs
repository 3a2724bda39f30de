//! The benches' shared harness: one stage, forward and backward, at several sequence lengths
//! and option sets, throughput in FLOPs counted as in the FlashAttention-2 paper
//! (`attn::core::flops`). Criterion's "elements" are FLOPs here: `elem/s` reads FLOP/s.

use std::hint::black_box;

use attn::core::flops::{backward_flops, forward_flops};
use attn::{Inputs, Options, Shape, Stage};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};

/// The sequence lengths every stage is benched at (b = 1, h = 8, d = 64).
pub const LENGTHS: [usize; 3] = [512, 2048, 8192];

/// Benchmarks `stage` at b = 1, h = 8, d = 64 for every `n` in `lengths` and every named
/// option set in `variants` (group `stage/variant`, ids `forward/n` and `backward/n`).
pub fn bench_stage(
    c: &mut Criterion,
    stage: &dyn Stage,
    lengths: &[usize],
    variants: &[(&str, Options)],
) {
    for (variant, opts) in variants {
        let mut group = c.benchmark_group(format!("{}/{variant}", stage.name()));
        // Ten samples of one iteration each at the large sizes (seconds per call): flat
        // sampling, a short warm-up, and criterion stretches the 3 s target as it needs.
        group.sample_size(10).sampling_mode(SamplingMode::Flat);
        group.warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
        for &n in lengths {
            let shape = Shape::new(1, 8, n, 64);
            let (q, k, v) = attn::core::random::qkv(&shape, 0);
            let d_out = attn::core::random::normal(shape.q_dims(), 1);
            let inputs = Inputs::new(q.view(), k.view(), v.view());

            group.throughput(Throughput::Elements(forward_flops(&shape, opts.causal) as u64));
            group.bench_with_input(BenchmarkId::new("forward", n), &n, |b, _| {
                b.iter(|| black_box(stage.forward(&inputs, opts).unwrap()))
            });

            let fwd = stage.forward(&inputs, opts).unwrap();
            group.throughput(Throughput::Elements(backward_flops(&shape, opts.causal) as u64));
            group.bench_with_input(BenchmarkId::new("backward", n), &n, |b, _| {
                b.iter(|| black_box(stage.backward(&inputs, opts, &fwd, d_out.view()).unwrap()))
            });
        }
        group.finish();
    }
}
