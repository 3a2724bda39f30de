//! Memory measured, not claimed: chunked attention's peak heap at n = 16 384 stays within the
//! bound derived from its chunk sizes, far below the n² matrix naive attention would hold.

use attn_chunked::{ChunkedCpu, backward_memory_bound, forward_memory_bound};
use attn_core::memory::{CountingAllocator, counting_enabled, measure_algorithm_peak};
use attn_core::{Inputs, Options, Shape, Stage};

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator;

#[test]
fn chunked_memory_is_bounded_by_the_chunks() {
    assert!(counting_enabled());
    // A pool of a fixed size, so that the bound is the same on every host.
    let threads = 2;
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    pool.install(|| chunked_and_naive_peaks(threads));
}

fn chunked_and_naive_peaks(threads: usize) {
    // Start rayon's pool before measuring.
    let warm = attn_core::random::normal((1, 1, 4, 4), 0);
    ChunkedCpu
        .forward(&Inputs::new(warm.view(), warm.view(), warm.view()), &Options::default())
        .unwrap();

    // Chunked at n = 16 384, b = 1, h = 1, d = 64, the seed's chunk sizes and smaller ones.
    let shape = Shape::new(1, 1, 16_384, 64);
    let (q, k, v) = attn_core::random::qkv(&shape, 1);
    let d_out = attn_core::random::normal(shape.q_dims(), 2);
    let inputs = Inputs::new(q.view(), k.view(), v.view());
    for (qc, kc, causal) in [(1024, 2048, false), (256, 512, true)] {
        let opts = Options::default().blocks(qc, kc).causal(causal);
        let (fwd, fwd_peak) =
            measure_algorithm_peak(|| ChunkedCpu.forward(&inputs, &opts).unwrap());
        let (_, bwd_peak) = measure_algorithm_peak(|| {
            ChunkedCpu.backward(&inputs, &opts, &fwd, d_out.view()).unwrap()
        });
        let fwd_bound = forward_memory_bound(&shape, qc, kc, threads) + (64 << 10);
        let bwd_bound = backward_memory_bound(&shape, qc, kc, threads) + (64 << 10);
        println!(
            "chunked {qc}x{kc}: forward peak {fwd_peak} (bound {fwd_bound}), backward {bwd_peak} (bound {bwd_bound})"
        );
        assert!(fwd_peak <= fwd_bound, "forward peak {fwd_peak} above {fwd_bound}");
        assert!(bwd_peak <= bwd_bound, "backward peak {bwd_peak} above {bwd_bound}");
        // At least one score chunk was really materialised.
        assert!(fwd_peak >= (qc * kc * 4) as u64);
        // And far below the n² matrix naive attention would need (1 GiB here).
        assert!(fwd_peak * 8 < shape.score_elems() * 4 && bwd_peak * 4 < shape.score_elems() * 4);
    }
}
