use attn_flash2::kernels::{matmul, softmax_tile};
use ndarray::{Array1, Array2};
use std::time::Instant;
fn main() {
    let (br, bc, d) = (64, 256, 64);
    let q = Array2::<f32>::from_shape_fn((br, d), |(i, j)| ((i * 7 + j) % 13) as f32 * 0.1);
    let k = Array2::<f32>::from_shape_fn((bc, d), |(i, j)| ((i * 3 + j) % 11) as f32 * 0.1);
    let mut s = Array2::<f32>::zeros((br, bc));
    let mut acc = Array2::<f32>::zeros((br, d));
    let iters = 20000;
    let t = Instant::now();
    for _ in 0..iters {
        matmul(0.125, &q.view(), &k.t(), 0.0, &mut s.view_mut());
    }
    let e = t.elapsed().as_secs_f64();
    println!("QK^T gemm: {:.1} GFLOP/s", 2.0 * (br * bc * d) as f64 * iters as f64 / e / 1e9);
    let t = Instant::now();
    for _ in 0..iters {
        matmul(1.0, &s.view(), &k.view(), 1.0, &mut acc.view_mut());
    }
    let e = t.elapsed().as_secs_f64();
    println!("PV gemm: {:.1} GFLOP/s", 2.0 * (br * bc * d) as f64 * iters as f64 / e / 1e9);
    let t = Instant::now();
    for _ in 0..iters {
        ndarray::linalg::general_mat_mul(0.125, &q, &k.t(), 0.0, &mut s);
    }
    let e = t.elapsed().as_secs_f64();
    println!(
        "QK^T matrixmultiply: {:.1} GFLOP/s",
        2.0 * (br * bc * d) as f64 * iters as f64 / e / 1e9
    );
    let (mut m, mut l, mut a) =
        (Array1::<f32>::zeros(br), Array1::<f32>::zeros(br), Array1::<f32>::zeros(br));
    let t = Instant::now();
    for _ in 0..iters {
        m.fill(f32::NEG_INFINITY);
        l.fill(0.0);
        softmax_tile(s.view_mut(), m.view_mut(), l.view_mut(), a.view_mut());
        s.mapv_inplace(|x| x * 0.5 + 0.1);
    }
    let e = t.elapsed().as_secs_f64();
    println!("softmax_tile (+mapv): {:.2} ns/elem", e / (iters * br * bc) as f64 * 1e9);
    let t = Instant::now();
    for _ in 0..iters {
        s.mapv_inplace(|x| x * 0.5 + 0.1);
    }
    let e = t.elapsed().as_secs_f64();
    println!("mapv alone: {:.2} ns/elem", e / (iters * br * bc) as f64 * 1e9);
    println!("flops per tile {} ; exp per tile {}", 4 * br * bc * d, br * bc);
}
