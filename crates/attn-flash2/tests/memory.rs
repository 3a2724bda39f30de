//! FlashAttention-2's memory, measured with the counting allocator: the outputs plus a few
//! tiles per thread, whatever n.

use attn_core::memory::{CountingAllocator, counting_enabled, measure_peak};
use attn_core::{Inputs, Options, Shape, Stage};
use attn_flash2::{Flash2Cpu, block_sizes};

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator;

/// The `gemm` crate's packing buffers, allocated per product: at most 512 KiB at our tile
/// sizes (measured), and one product runs per thread at a time.
const GEMM_SCRATCH: u64 = 1 << 20;

#[test]
fn flash2_peak_memory_is_the_outputs_plus_a_few_tiles_per_thread() {
    assert!(counting_enabled());
    let threads = rayon::current_num_threads() as u64;
    let warm = attn_core::random::normal((1, 1, 4, 4), 0);
    Flash2Cpu
        .forward(&Inputs::new(warm.view(), warm.view(), warm.view()), &Options::default())
        .unwrap();

    let mut peaks = Vec::new();
    for n in [4096usize, 16_384] {
        let shape = Shape::new(1, 1, n, 64);
        let (q, k, v) = attn_core::random::qkv(&shape, 1);
        let d_out = attn_core::random::normal(shape.q_dims(), 2);
        let inputs = Inputs::new(q.view(), k.view(), v.view());
        let opts = Options::default().causal(true);
        let (b_r, b_c) = block_sizes(&shape, &opts);
        let (fwd, fwd_peak) = measure_peak(|| Flash2Cpu.forward(&inputs, &opts).unwrap());
        let (_, bwd_peak) =
            measure_peak(|| Flash2Cpu.backward(&inputs, &opts, &fwd, d_out.view()).unwrap());
        // Forward: O and the log-sum-exp; per thread a score tile, the output accumulator and
        // three row vectors.
        let tiles = 4 * (b_r * b_c + b_r * 64 + 3 * b_r) as u64;
        let fwd_bound = 4 * (n * 65) as u64 + threads * (tiles + GEMM_SCRATCH) + (64 << 10);
        // Backward: dQ, dK, dV and D; per thread two score tiles.
        let bwd_bound = 4 * (3 * n * 64 + n) as u64
            + threads * (8 * (b_r * b_c) as u64 + GEMM_SCRATCH)
            + (64 << 10);
        println!(
            "n={n}: forward peak {fwd_peak} (bound {fwd_bound}), backward {bwd_peak} (bound {bwd_bound})"
        );
        assert!(fwd_peak <= fwd_bound, "n={n}: forward peak {fwd_peak} above {fwd_bound}");
        assert!(bwd_peak <= bwd_bound, "n={n}: backward peak {bwd_peak} above {bwd_bound}");
        peaks.push(fwd_peak as f64);
    }
    // Linear in n: 4× the sequence, at most 4× the memory (naive attention would take 16×).
    assert!(peaks[1] / peaks[0] <= 4.0, "peak ratio {}", peaks[1] / peaks[0]);
}
