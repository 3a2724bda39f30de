//! Memory accounting: the counting allocator for peak-heap measurements, the machine's
//! available memory, and byte formatting.
//!
//! The allocator keeps two tallies. The *heap* is every byte live in the process (what the
//! plots and `attn table` report). The *algorithm's* bytes leave out the scratch a library
//! allocates for itself inside [`library_scratch`]: the `gemm` crate sizes its packing
//! buffers by the host's vector width and cache sizes, so a bound on them would be a bound
//! on the host, not on the attention algorithm. The memory tests bound the algorithm's bytes
//! ([`measure_algorithm_peak`]).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static ALGO_CURRENT: AtomicUsize = AtomicUsize::new(0);
static ALGO_PEAK: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    // Whether this thread is inside `library_scratch` (const-initialised, no destructor:
    // safe to read from the allocator at any point of a thread's life).
    static IN_SCRATCH: Cell<bool> = const { Cell::new(false) };
}

fn in_scratch() -> bool {
    IN_SCRATCH.try_with(Cell::get).unwrap_or(false)
}

/// Runs `f`, a call into a library whose own workspace is not part of the algorithm (the
/// `gemm` crate's packing buffers): what it allocates counts in the heap but not in the
/// algorithm's bytes. Nests; costs one thread-local write each way.
pub fn library_scratch<R>(f: impl FnOnce() -> R) -> R {
    let outer = in_scratch();
    IN_SCRATCH.with(|c| c.set(true));
    let r = f();
    IN_SCRATCH.with(|c| c.set(outer));
    r
}

/// A global allocator that counts the bytes live on the heap and their peak.
///
/// A measuring binary or test installs it once:
///
/// ```ignore
/// #[global_allocator]
/// static ALLOC: attn_core::memory::CountingAllocator = attn_core::memory::CountingAllocator;
/// ```
///
/// and then wraps the work in [`measure_peak`]. Without it installed, the counters stay at
/// zero and [`counting_enabled`] says so.
#[derive(Debug, Clone, Copy, Default)]
pub struct CountingAllocator;

// SAFETY: every call is forwarded to `System` unchanged; the counters are only statistics.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            add(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            add(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) };
        sub(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            sub(layout.size());
            add(new_size);
        }
        new
    }
}

fn add(bytes: usize) {
    let now = CURRENT.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(now, Ordering::Relaxed);
    if !in_scratch() {
        let now = ALGO_CURRENT.fetch_add(bytes, Ordering::Relaxed) + bytes;
        ALGO_PEAK.fetch_max(now, Ordering::Relaxed);
    }
}

fn sub(bytes: usize) {
    CURRENT.fetch_sub(bytes, Ordering::Relaxed);
    if !in_scratch() {
        // Saturating: a library's scratch freed outside its scope (a thread-local buffer
        // dropped when its thread ends) was never added here.
        let _ = ALGO_CURRENT
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| Some(c.saturating_sub(bytes)));
    }
}

/// Bytes live on the heap now (0 unless [`CountingAllocator`] is installed).
pub fn current_bytes() -> usize {
    CURRENT.load(Ordering::Relaxed)
}

/// Whether a [`CountingAllocator`] is the global allocator of this process.
pub fn counting_enabled() -> bool {
    let probe = std::hint::black_box(vec![0u8; 64]);
    let seen = current_bytes() >= 64;
    drop(std::hint::black_box(probe));
    seen
}

/// Runs `f` and returns its result with the peak heap bytes it added above what was live
/// when it started (the inputs already allocated are not counted).
///
/// Measurements are process-wide: run them one at a time (tests that measure memory should
/// live in their own test binary or hold a lock).
pub fn measure_peak<R>(f: impl FnOnce() -> R) -> (R, u64) {
    peak_of(&CURRENT, &PEAK, f)
}

/// `f`'s result and the peak of the tally `(current, peak)` above its value at the start.
fn peak_of<R>(current: &AtomicUsize, peak: &AtomicUsize, f: impl FnOnce() -> R) -> (R, u64) {
    let base = current.load(Ordering::Relaxed);
    peak.store(base, Ordering::Relaxed);
    let r = f();
    (r, peak.load(Ordering::Relaxed).saturating_sub(base) as u64)
}

/// [`measure_peak`] of the algorithm's bytes: the heap without the scratch that libraries
/// allocate inside [`library_scratch`].
pub fn measure_algorithm_peak<R>(f: impl FnOnce() -> R) -> (R, u64) {
    peak_of(&ALGO_CURRENT, &ALGO_PEAK, f)
}

/// Zeros whose pages have all been written, for an accumulator that tile products add into.
///
/// `Array::zeros` maps a large allocation lazily. If the first touch of a page is a read — a
/// product `C ← A·B + C` reads C before it writes it — the kernel maps its shared zero page,
/// and the first write must then swap in a page of its own and flush the old mapping from
/// every thread's TLB: an interrupt to every core, once per 4 KiB. Writing the zeros first,
/// in parallel, faults each page once with nothing to flush. Costs one parallel pass of writes.
pub fn zeros_written<Sh, D>(shape: Sh) -> ndarray::Array<f32, D>
where
    Sh: ndarray::ShapeBuilder<Dim = D>,
    D: ndarray::Dimension,
{
    use rayon::prelude::*;
    let mut a = ndarray::Array::<f32, D>::zeros(shape);
    if let Some(flat) = a.as_slice_mut() {
        flat.par_chunks_mut(1 << 14).for_each(|c| c.fill(0.0));
    }
    a
}

/// A running peak measurement: bytes added above what was live at [`PeakMeter::start`].
///
/// Unlike [`measure_peak`] it can be read several times, so one forward-then-backward run
/// gives the forward's peak and the peak of both:
///
/// ```ignore
/// let meter = PeakMeter::start();
/// let fwd = stage.forward(..)?;
/// let forward_peak = meter.peak();
/// let grads = stage.backward(.., &fwd, ..)?;
/// let both_peak = meter.peak();
/// ```
#[derive(Debug)]
pub struct PeakMeter {
    base: usize,
}

impl PeakMeter {
    /// Starts measuring from the bytes live now (one meter at a time per process).
    pub fn start() -> Self {
        let base = current_bytes();
        PEAK.store(base, Ordering::Relaxed);
        Self { base }
    }

    /// The peak bytes above the start so far.
    pub fn peak(&self) -> u64 {
        PEAK.load(Ordering::Relaxed).saturating_sub(self.base) as u64
    }
}

/// The least-squares slope of log y against log x: the exponent of a power law, 2 for memory
/// that grows as n², 1 for memory that grows as n (how the plots, their test and the
/// notebooks read a growth rate off measured points).
pub fn log_log_slope(points: &[(f64, f64)]) -> f64 {
    let logs: Vec<(f64, f64)> = points.iter().map(|&(x, y)| (x.ln(), y.ln())).collect();
    let k = logs.len() as f64;
    let (mx, my) = logs.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + x / k, b + y / k));
    let sxy: f64 = logs.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    let sxx: f64 = logs.iter().map(|(x, _)| (x - mx) * (x - mx)).sum();
    sxy / sxx
}

/// The machine's available memory in bytes (`MemAvailable` in /proc/meminfo), if known.
pub fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The default workspace limit: the available memory, or 8 GiB where it cannot be read.
/// The environment variable `ATTN_MEMORY_LIMIT` (bytes, or with a `K`/`M`/`G` suffix)
/// overrides it.
pub fn default_memory_limit() -> u64 {
    if let Some(bytes) = std::env::var("ATTN_MEMORY_LIMIT").ok().and_then(|s| parse_bytes(&s)) {
        return bytes;
    }
    available_memory().unwrap_or(8 << 30)
}

/// Parses `"123"`, `"64K"`, `"512M"`, `"16G"` (binary multiples; a trailing `iB`/`B` is allowed).
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let s = s.strip_suffix("iB").or_else(|| s.strip_suffix('B')).unwrap_or(s);
    let (num, mult) = match s.chars().last()? {
        'K' | 'k' => (&s[..s.len() - 1], 1u64 << 10),
        'M' | 'm' => (&s[..s.len() - 1], 1 << 20),
        'G' | 'g' => (&s[..s.len() - 1], 1 << 30),
        'T' | 't' => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    let value: f64 = num.trim().parse().ok()?;
    (value.is_finite() && value >= 0.0).then_some((value * mult as f64) as u64)
}

/// `1536` → `"1.5 KiB"`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

#[cfg(test)]
mod tests {

    #[test]
    fn zeros_written_is_zeros_of_the_shape() {
        let a = super::zeros_written((3, 2, 70_001));
        assert_eq!(a.dim(), (3, 2, 70_001));
        assert_eq!(a.iter().filter(|&&x| x != 0.0).count(), 0);
    }

    #[test]
    fn log_log_slope_reads_the_exponent() {
        let squares: Vec<(f64, f64)> = [1.0, 2.0, 4.0, 8.0].map(|x| (x, 3.0 * x * x)).to_vec();
        assert!((super::log_log_slope(&squares) - 2.0).abs() < 1e-12);
        let linear: Vec<(f64, f64)> = [1.0, 2.0, 4.0].map(|x| (x, 5.0 * x)).to_vec();
        assert!((super::log_log_slope(&linear) - 1.0).abs() < 1e-12);
    }
    use super::*;

    #[test]
    fn parses_byte_sizes() {
        assert_eq!(parse_bytes("123"), Some(123));
        assert_eq!(parse_bytes("64K"), Some(65_536));
        assert_eq!(parse_bytes("1.5GiB"), Some(3 << 29));
        assert_eq!(parse_bytes("2g"), Some(2 << 30));
        assert_eq!(parse_bytes("lots"), None);
        assert_eq!(parse_bytes("-1"), None);
    }

    #[test]
    fn formats_byte_sizes() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(128 << 30), "128.0 GiB");
    }
}
