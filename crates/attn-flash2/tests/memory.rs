//! FlashAttention-2's memory, counted with the counting allocator: the outputs plus a few
//! tiles per worker thread, whatever n — independent of the host. The workers are a pool of
//! a fixed size, and the `gemm` crate's packing buffers (sized by the host's vector width and
//! caches) are the library's scratch, left out of the algorithm's bytes.

use attn_core::memory::{CountingAllocator, counting_enabled, measure_algorithm_peak};
use attn_core::{Inputs, Options, Shape, Stage};
use attn_flash2::{Flash2Cpu, block_sizes};

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator;

const WORKERS: usize = 2;
/// Allocations besides the tiles: the task lists, ndarray's views and the like.
const SLACK: u64 = 64 << 10;

#[test]
fn flash2_peak_memory_is_the_outputs_plus_a_few_tiles_per_thread() {
    assert!(counting_enabled());
    let pool = rayon::ThreadPoolBuilder::new().num_threads(WORKERS).build().unwrap();
    pool.install(|| {
        let warm = attn_core::random::normal((1, 1, 4, 4), 0);
        Flash2Cpu
            .forward(&Inputs::new(warm.view(), warm.view(), warm.view()), &Options::default())
            .unwrap();

        let mut peaks = Vec::new();
        for n in [4096usize, 16_384] {
            let d = 64;
            let shape = Shape::new(1, 1, n, d);
            let (q, k, v) = attn_core::random::qkv(&shape, 1);
            let d_out = attn_core::random::normal(shape.q_dims(), 2);
            let inputs = Inputs::new(q.view(), k.view(), v.view());
            let opts = Options::default().causal(true);
            let (b_r, b_c) = block_sizes(&shape, &opts);
            let (fwd, fwd_peak) =
                measure_algorithm_peak(|| Flash2Cpu.forward(&inputs, &opts).unwrap());
            let (_, bwd_peak) = measure_algorithm_peak(|| {
                Flash2Cpu.backward(&inputs, &opts, &fwd, d_out.view()).unwrap()
            });
            let workers = WORKERS as u64;
            // Forward: O and the log-sum-exp; per worker a score tile S_ij, the output
            // accumulator Õ_i and three row vectors (m_i, ℓ_i, the rescale factors).
            let tile = 4 * (b_r * b_c + b_r * d + 3 * b_r) as u64;
            let fwd_bound = 4 * (n * (d + 1)) as u64 + workers * tile + SLACK;
            // Backward: dQ, dK, dV and D; per worker two score tiles (P_ij and dP_ij).
            let bwd_bound =
                4 * (3 * n * d + n) as u64 + workers * 8 * (b_r * b_c) as u64 + SLACK;
            println!(
                "n={n}: forward {fwd_peak} B (bound {fwd_bound}), backward {bwd_peak} B (bound {bwd_bound})"
            );
            assert!(fwd_peak <= fwd_bound, "n={n}: forward peak {fwd_peak} above {fwd_bound}");
            assert!(bwd_peak <= bwd_bound, "n={n}: backward peak {bwd_peak} above {bwd_bound}");
            // The outputs themselves are allocated: a bound that could not fail is no bound.
            assert!(fwd_peak >= 4 * (n * (d + 1)) as u64, "n={n}: forward peak {fwd_peak}");
            assert!(bwd_peak >= 4 * (3 * n * d) as u64, "n={n}: backward peak {bwd_peak}");
            peaks.push(fwd_peak as f64);
        }
        // Linear in n: 4× the sequence, at most 4× the memory (naive attention would take 16×).
        assert!(peaks[1] / peaks[0] <= 4.0, "peak ratio {}", peaks[1] / peaks[0]);
    });
}
