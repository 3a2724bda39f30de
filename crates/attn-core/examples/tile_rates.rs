//! What one CPU thread spends on a FlashAttention-2 forward tile, piece by piece: the two tile
//! products through `simd::matmul` (the `gemm` crate) at the tile shapes the stage uses, beside
//! a large square product, and the online-softmax step of the same tile. The ratio of the
//! softmax's time to the products' bounds how close a forward can come to the matmul peak.
//!
//! `cargo run --release -p attn-core --example tile_rates [-- B_R B_C D]` (default 128 256 64)

use attn_core::simd;
use ndarray::{Array1, Array2};
use std::time::Instant;

/// GFLOP/s of `reps` products (m × k) · (k × n) on this thread, B given transposed when `bt`.
fn product_rate(m: usize, k: usize, n: usize, bt: bool, reps: usize) -> f64 {
    let a = Array2::<f32>::from_elem((m, k), 0.5);
    let b = Array2::<f32>::from_elem(if bt { (n, k) } else { (k, n) }, 0.25);
    let b = if bt { b.t() } else { b.view() };
    let mut c = Array2::<f32>::zeros((m, n));
    simd::matmul(1.0, &a, &b, 1.0, &mut c); // the packing buffers, once
    let t = Instant::now();
    for _ in 0..reps {
        simd::matmul(1.0, &a, &b, 1.0, &mut c);
    }
    2.0 * (m * k * n * reps) as f64 / t.elapsed().as_secs_f64() / 1e9
}

/// Microseconds of one `softmax_tile` on a b_r × b_c tile (the copy that restores the tile
/// between runs timed apart and taken off).
fn softmax_us(b_r: usize, b_c: usize, reps: usize) -> f64 {
    let s0 = Array2::from_shape_fn((b_r, b_c), |(i, j)| ((i * 7 + j * 13) % 17) as f32 * 0.1);
    let mut s = s0.clone();
    let (mut m, mut ell, mut alpha) =
        (Array1::from_elem(b_r, f32::NEG_INFINITY), Array1::zeros(b_r), Array1::zeros(b_r));
    let t = Instant::now();
    for _ in 0..reps {
        s.assign(&s0);
        simd::softmax_tile(s.view_mut(), m.view_mut(), ell.view_mut(), alpha.view_mut());
    }
    let with_copy = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..reps {
        s.assign(&s0);
    }
    (with_copy - t.elapsed().as_secs_f64()) / reps as f64 * 1e6
}

fn main() {
    let args: Vec<usize> =
        std::env::args().skip(1).map(|a| a.parse().expect("B_R B_C D")).collect();
    let (b_r, b_c, d) = match args[..] {
        [r, c, d] => (r, c, d),
        _ => (128, 256, 64),
    };
    let reps = (1 << 31) / (b_r * b_c * d);
    println!("one thread, element-wise path {:?}", simd::Path::current());
    println!(
        "1536³ product:               {:6.1} GFLOP/s",
        product_rate(1536, 1536, 1536, false, 3)
    );
    let qk = product_rate(b_r, d, b_c, true, reps);
    let pv = product_rate(b_r, b_c, d, false, reps);
    println!("S = Q_i K_jᵀ ({b_r}×{d}·{d}×{b_c}):  {qk:6.1} GFLOP/s");
    println!("O += P V_j ({b_r}×{b_c}·{b_c}×{d}):  {pv:6.1} GFLOP/s");
    let flops = 2.0 * (b_r * b_c * d) as f64;
    let products = flops / qk / 1e3 + flops / pv / 1e3;
    let soft = softmax_us(b_r, b_c, reps);
    println!("a tile: products {products:.2} µs, softmax {soft:.2} µs");
    println!(
        "bound on the forward's share of the products' rate: {:.0} %",
        100.0 * products / (products + soft)
    );
}
