//! The counting allocator's two tallies: a library's scratch counts in the heap, not in the
//! algorithm's bytes.

use attn_core::memory::{CountingAllocator, library_scratch, measure_algorithm_peak, measure_peak};

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator;

#[test]
fn library_scratch_counts_in_the_heap_but_not_in_the_algorithms_bytes() {
    let work = || {
        let ours = std::hint::black_box(vec![1u8; 100_000]);
        let theirs = library_scratch(|| std::hint::black_box(vec![2u8; 300_000]).len());
        ours.len() + theirs
    };
    let (n, heap) = measure_peak(work);
    let (_, algorithm) = measure_algorithm_peak(work);
    assert_eq!(n, 400_000);
    assert!((400_000..400_000 + 4096).contains(&heap), "heap peak {heap}");
    assert!((100_000..100_000 + 4096).contains(&algorithm), "algorithm peak {algorithm}");
}
