//! "HBM" traffic: the bytes a stage moves between its full arrays and its tiles.
//!
//! The FlashAttention papers measure an attention algorithm by its IO: how many bytes it
//! reads from and writes to the GPU's high-bandwidth memory (HBM), as opposed to the small
//! on-chip SRAM where tiles are computed. On the CPU the same two levels exist (main memory
//! and cache), and the CPU stages count the bytes their algorithm moves between the full
//! arrays ("HBM") and their tiles ("SRAM") exactly as the algorithm performs the loads and
//! stores, so the book can show the papers' IO complexity with real counts.

use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes read from and written to the full ("HBM") arrays.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub read: u64,
    pub written: u64,
}

impl Traffic {
    /// Reads and writes together.
    pub fn total(&self) -> u64 {
        self.read + self.written
    }

    /// Counts `elems` f32 values read.
    pub fn read_f32(&mut self, elems: usize) {
        self.read += 4 * elems as u64;
    }

    /// Counts `elems` f32 values written.
    pub fn write_f32(&mut self, elems: usize) {
        self.written += 4 * elems as u64;
    }

    /// Counts `bytes` read.
    pub fn read_bytes(&mut self, bytes: usize) {
        self.read += bytes as u64;
    }
}

impl std::ops::AddAssign for Traffic {
    fn add_assign(&mut self, rhs: Self) {
        self.read += rhs.read;
        self.written += rhs.written;
    }
}

impl std::iter::Sum for Traffic {
    fn sum<I: Iterator<Item = Self>>(iter: I) -> Self {
        iter.fold(Traffic::default(), |mut a, t| {
            a += t;
            a
        })
    }
}

/// A [`Traffic`] that parallel tasks add their own counts into.
#[derive(Debug, Default)]
pub struct TrafficCounter {
    read: AtomicU64,
    written: AtomicU64,
}

impl TrafficCounter {
    pub fn add(&self, t: Traffic) {
        self.read.fetch_add(t.read, Ordering::Relaxed);
        self.written.fetch_add(t.written, Ordering::Relaxed);
    }

    pub fn get(&self) -> Traffic {
        Traffic {
            read: self.read.load(Ordering::Relaxed),
            written: self.written.load(Ordering::Relaxed),
        }
    }
}

/// The IO complexity of standard attention (Dao et al. 2022, Theorem 2): Θ(Nd + N²) f32
/// elements, written with constant 1, in bytes. The plots scale it through a measured point.
pub fn standard_attention_io(n: f64, d: f64) -> f64 {
    4.0 * (n * d + n * n)
}

/// The IO complexity of FlashAttention (Dao et al. 2022, Theorem 2): Θ(N²d²/M) f32 elements
/// for an SRAM of M elements, written with constant 1, in bytes.
pub fn flash_attention_io(n: f64, d: f64, m: f64) -> f64 {
    4.0 * n * n * d * d / m
}
