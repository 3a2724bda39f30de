//! The naive stage's memory, measured with the counting allocator: it grows as n².

use attn_core::memory::{CountingAllocator, counting_enabled, measure_peak};
use attn_core::{Inputs, Options, Shape, Stage};
use attn_naive::{NaiveCpu, backward_workspace_bytes, forward_workspace_bytes};

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator;

#[test]
fn naive_peak_memory_is_the_score_matrices_and_grows_as_n_squared() {
    assert!(counting_enabled());
    // Start rayon's thread pool first, so its own allocations are not counted below.
    let warm = attn_core::random::normal((1, 1, 4, 4), 0);
    NaiveCpu
        .forward(&Inputs::new(warm.view(), warm.view(), warm.view()), &Options::default())
        .unwrap();
    let mut peaks = Vec::new();
    for n in [512usize, 1024, 2048] {
        let shape = Shape::new(1, 4, n, 32);
        let (q, k, v) = attn_core::random::qkv(&shape, 1);
        let d_out = attn_core::random::normal(shape.q_dims(), 2);
        let inputs = Inputs::new(q.view(), k.view(), v.view());
        let opts = Options::default().causal(true);
        let (fwd, fwd_peak) = measure_peak(|| NaiveCpu.forward(&inputs, &opts).unwrap());
        let (_, bwd_peak) =
            measure_peak(|| NaiveCpu.backward(&inputs, &opts, &fwd, d_out.view()).unwrap());
        let io = (q.len() * 4) as u64; // the output (or one gradient) is the size of Q
        let scores = forward_workspace_bytes(&shape);
        assert!(fwd_peak >= scores, "n={n}: forward peak {fwd_peak} below S/P {scores}");
        assert!(fwd_peak <= scores + 2 * io + (1 << 20), "n={n}: forward peak {fwd_peak}");
        let bwd = backward_workspace_bytes(&shape);
        assert!(bwd_peak >= bwd, "n={n}: backward peak {bwd_peak} below P+dP {bwd}");
        assert!(bwd_peak <= bwd + 4 * io + (1 << 20), "n={n}: backward peak {bwd_peak}");
        peaks.push(fwd_peak as f64);
    }
    // Doubling n multiplies the peak by about four.
    for w in peaks.windows(2) {
        let ratio = w[1] / w[0];
        assert!((3.5..4.5).contains(&ratio), "peak ratio {ratio}");
    }
}
