//! attn-cuda's batched products on the device, cuBLAS and our own kernel, against a float64
//! product on the host, for the operand layouts the unfused stages launch: a window of
//! rows, a transposed operand, a key/value head shared by a GQA group, one launch per group
//! member, accumulation into C, head dimension 1. Where no CUDA device is present each test
//! says so and passes.

use attn_cuda::{DeviceBuffer, GemmBackend, Kernels, Operand, gpu, skip_without_device};

/// A `[batch, heads, rows, cols]` tensor of small integers-over-8 (exact in f32).
fn tensor(dims: [usize; 4], seed: usize) -> Vec<f32> {
    let len: usize = dims.iter().product();
    (0..len).map(|i| (((i * 7919 + seed * 104_729) % 29) as f32 - 14.0) / 8.0).collect()
}

/// Element (r, c) of head `h`, batch `b` of a row-major `[batch, heads, rows, cols]` tensor.
fn el(
    t: &[f32],
    (heads, rows, cols): (usize, usize, usize),
    b: usize,
    h: usize,
    r: usize,
    c: usize,
) -> f64 {
    f64::from(t[((b * heads + h) * rows + r) * cols + c])
}

/// The worst |got − want| / Σ|a·b| over the product, the error of f32 accumulation relative
/// to its scale.
fn worst(got: &[f32], want: &[(f64, f64)]) -> f64 {
    got.iter()
        .zip(want)
        .map(|(&g, &(w, scale))| (f64::from(g) - w).abs() / scale.max(1e-30))
        .fold(0.0, f64::max)
}

const BOUND: f64 = 3e-6;

/// Runs one product into C with the given kernels.
type Product<'a> = dyn Fn(&Kernels, &DeviceBuffer<f32>) -> attn_core::Result<()> + 'a;

/// The product on both backends (cuBLAS where it is open, and our own kernel), each from the
/// same initial C: each backend's result.
fn both(c0: &[f32], run: &Product<'_>) -> Vec<(GemmBackend, Vec<f32>)> {
    let g = gpu().unwrap();
    let default = Kernels::new(g).unwrap();
    if std::env::var("ATTN_GEMM").as_deref() == Ok("cublas") {
        assert_eq!(default.backend(), GemmBackend::Cublas, "ATTN_GEMM=cublas");
    }
    if default.backend() == GemmBackend::Own {
        eprintln!(
            "skipped: cuBLAS is not open (libcublas missing or ATTN_GEMM=own); only our kernel is tested"
        );
    }
    let mut out = Vec::new();
    for k in [default, Kernels::own_products(g).unwrap()] {
        let c = g.upload(c0).unwrap();
        run(&k, &c).unwrap();
        out.push((k.backend(), g.download(&c).unwrap()));
    }
    out
}

#[test]
fn scores_of_a_window_with_a_shared_kv_head() {
    if skip_without_device() {
        return;
    }
    let g = gpu().unwrap();
    for (batch, heads, kv, nq, nk, d) in
        [(2, 8, 2, 300, 257, 64), (1, 4, 4, 70, 90, 1), (3, 6, 3, 129, 64, 96)]
    {
        let (i0, rows, j0, cols) = (nq / 3, nq - nq / 3, 5, nk - 5);
        let group = heads / kv;
        let (q, kk) = (tensor([batch, heads, nq, d], 1), tensor([batch, kv, nk, d], 2));
        let (qb, kb) = (g.upload(&q).unwrap(), g.upload(&kk).unwrap());
        let c0 = tensor([batch, heads, rows, cols], 3);
        let mut want = Vec::new();
        for b in 0..batch {
            for h in 0..heads {
                for i in 0..rows {
                    for j in 0..cols {
                        let terms: Vec<f64> = (0..d)
                            .map(|l| {
                                el(&q, (heads, nq, d), b, h, i0 + i, l)
                                    * el(&kk, (kv, nk, d), b, h / group, j0 + j, l)
                            })
                            .collect();
                        let dot: f64 = terms.iter().sum();
                        let c = el(&c0, (heads, rows, cols), b, h, i, j);
                        let scale =
                            0.5 * terms.iter().map(|t| t.abs()).sum::<f64>() + 0.25 * c.abs();
                        want.push((0.5 * dot + 0.25 * c, scale));
                    }
                }
            }
        }
        let run = |k: &Kernels, c: &DeviceBuffer<f32>| {
            let a = Operand::rows(g.ptr(&qb), heads, nq, d, i0);
            let bt = Operand::rows(g.ptr(&kb), kv, nk, d, j0).shared_by(group).t();
            let co = Operand::rows(g.ptr(c), heads, rows, cols, 0);
            let z = (batch * heads, heads);
            k.gemm(z, (rows, cols, d), 0.5, a, bt, 0.25, co)
        };
        for (backend, got) in both(&c0, &run) {
            let w = worst(&got, &want);
            assert!(
                w <= BOUND,
                "{backend:?} S = Q Kᵀ b{batch} h{heads}/{kv} {nq}x{nk} d{d}: {w:.2e}"
            );
        }
    }
}

#[test]
fn value_gradients_summed_over_group_members() {
    // dV += Pᵀ dO, one launch per GQA group member, z counting key/value heads.
    if skip_without_device() {
        return;
    }
    let g = gpu().unwrap();
    let (batch, heads, kv, rows, cols, nq, nk, d) = (2, 8, 2, 200, 150, 260, 300, 64);
    let (i0, j0, group) = (40, 100, heads / kv);
    let (p, d_out) = (tensor([batch, heads, rows, cols], 4), tensor([batch, heads, nq, d], 5));
    let (pb, db) = (g.upload(&p).unwrap(), g.upload(&d_out).unwrap());
    let c0 = tensor([batch, kv, nk, d], 6);
    let mut want = Vec::new();
    for b in 0..batch {
        for h in 0..kv {
            for j in 0..nk {
                for l in 0..d {
                    let c = el(&c0, (kv, nk, d), b, h, j, l);
                    if j < j0 || j >= j0 + cols {
                        want.push((c, c.abs()));
                        continue;
                    }
                    let terms: Vec<f64> = (0..group)
                        .flat_map(|m| (0..rows).map(move |i| (m, i)))
                        .map(|(m, i)| {
                            el(&p, (heads, rows, cols), b, h * group + m, i, j - j0)
                                * el(&d_out, (heads, nq, d), b, h * group + m, i0 + i, l)
                        })
                        .collect();
                    let sum: f64 = terms.iter().sum();
                    want.push((sum + c, terms.iter().map(|t| t.abs()).sum::<f64>() + c.abs()));
                }
            }
        }
    }
    let run = |k: &Kernels, c: &DeviceBuffer<f32>| {
        let p_w = Operand::rows(g.ptr(&pb), heads, rows, cols, 0);
        let do_c = Operand::rows(g.ptr(&db), heads, nq, d, i0);
        let dv = Operand::rows(g.ptr(c), kv, nk, d, j0);
        for m in 0..group {
            let (pt, dm) = (p_w.member(m, group).t(), do_c.member(m, group));
            let z = (batch * kv, kv);
            k.gemm(z, (cols, d, rows), 1.0, pt, dm, 1.0, dv)?;
        }
        Ok(())
    };
    for (backend, got) in both(&c0, &run) {
        let w = worst(&got, &want);
        assert!(w <= BOUND, "{backend:?} dV += Pᵀ dO: {w:.2e}");
    }
}
