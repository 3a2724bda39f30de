//! cuBLAS for the unfused stages' products, where the library is installed.
//!
//! [`crate::Kernels::gemm`] takes operands with any strides and a head-to-KV-head map
//! ([`Operand`]); cuBLAS's `cublasSgemmStridedBatched` takes column-major matrices, one
//! stride per batch entry. [`plan`] turns the first into calls of the second — row-major C by
//! computing Cᵀ = Bᵀ Aᵀ, a GQA-shared operand by one call per member of the group — or says
//! it cannot (strides no call can express), and the product runs on our own kernel instead.
//!
//! cuBLAS runs in fp32 with TF32 off (`CUBLAS_DEFAULT_MATH`, the contract's f32 row) and with
//! no workspace, so the device memory a stage allocates is all in its counted buffers, the
//! same on both backends.
//! `ATTN_GEMM=own` keeps every product on our own kernel (for comparisons); `ATTN_GEMM=cublas`
//! makes a missing libcublas an error instead of a silent fallback.

use std::sync::{Mutex, OnceLock};

use attn_core::{AttnError, Result};
use cudarc::cublas::{CudaBlas, sys};

use crate::{Gpu, Operand};

/// Which code runs the unfused stages' products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmBackend {
    /// `cublasSgemmStridedBatched`, fp32, TF32 off.
    Cublas,
    /// attn-cuda's `gemm_batched` (kernels/products.cu).
    Own,
}

impl GemmBackend {
    pub fn name(self) -> &'static str {
        match self {
            GemmBackend::Cublas => "cublas",
            GemmBackend::Own => "own",
        }
    }
}

/// One column-major `cublasSgemmStridedBatched` call: `C = alpha·op(A)·op(B) + beta·C` for
/// `batch` matrices; pointers are device addresses of the first matrix, strides in elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StridedCall {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: i64,
    pub n: i64,
    pub k: i64,
    pub a: Strided,
    pub b: Strided,
    pub c: Strided,
    pub batch: i64,
}

/// One operand of a [`StridedCall`]: address, leading dimension, batch stride.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Strided {
    pub ptr: u64,
    pub ld: i64,
    pub stride: i64,
}

/// How a `rows × cols` matrix whose element (i, j) lies at `si·i + sj·j` is handed to cuBLAS:
/// `Some((transpose, ld))` where it is column-major (`N`) or the transpose of a column-major
/// matrix (`T`), `None` where it is neither.
fn col_major(rows: i64, cols: i64, si: i64, sj: i64) -> Option<(bool, i64)> {
    // N: unit row stride, column stride at least the row count (one column: any)
    if (si == 1 || rows <= 1) && (cols <= 1 || sj >= rows.max(1)) {
        return Some((false, if cols <= 1 { rows.max(1) } else { sj }));
    }
    // T: the transpose is column-major: unit column stride, row stride at least cols
    if (sj == 1 || cols <= 1) && (rows <= 1 || si >= cols.max(1)) {
        return Some((true, if rows <= 1 { cols.max(1) } else { si }));
    }
    None
}

/// The per-batch-entry stride of an operand whose matrix `z` starts at
/// `base + (z / zh)·sb + (z % zh)·sh` (div = 1), where one stride describes all `z` entries.
fn batch_stride(o: &Operand, z: usize, zh: usize) -> Option<i64> {
    if z <= zh || o.sb == zh as i64 * o.sh {
        Some(o.sh)
    } else if zh == 1 {
        Some(o.sb)
    } else {
        None
    }
}

/// The cuBLAS calls that compute [`crate::Kernels::gemm`]'s product, or `None` where the
/// operands' strides fit no strided-batched call.
pub fn plan(
    (z, zh): (usize, usize),
    (m, n, k): (usize, usize, usize),
    a: Operand,
    b: Operand,
    c: Operand,
) -> Option<Vec<StridedCall>> {
    if m == 0 || n == 0 || z == 0 {
        return Some(Vec::new());
    }
    // A column-major C: Cᵀ = Bᵀ Aᵀ is row-major.
    if c.cs != 1 && c.rs == 1 {
        return plan((z, zh), (n, m, k), b.t(), a.t(), c.t());
    }
    // GQA: z counts query heads and an operand shared by `g` of them (div = g) is not one
    // stride apart; split into one call per member of the group, z counting KV heads.
    let g = a.div.max(b.div).max(c.div) as usize;
    if g > 1 {
        let ok = |o: &Operand| o.div == 1 || o.div as usize == g;
        if !(ok(&a) && ok(&b) && c.div == 1 && zh % g == 0 && z % zh == 0) {
            return None;
        }
        let mut calls = Vec::new();
        for member in 0..g {
            let pick = |o: Operand| {
                if o.div > 1 { Operand { div: 1, ..o } } else { o.member(member, g) }
            };
            calls.extend(plan((z / g, zh / g), (m, n, k), pick(a), pick(b), pick(c))?);
        }
        return Some(calls);
    }
    let (m, n, k) = (m as i64, n as i64, k as i64);
    // Row-major C (m × n) is column-major Cᵀ (n × m) with ld = rs: Cᵀ = Bᵀ (n × k) · Aᵀ (k × m).
    let (c_transposed, ldc) = col_major(n, m, c.cs, c.rs)?;
    if c_transposed {
        return None; // cuBLAS writes C column-major only
    }
    let (trans_b, ldb) = col_major(n, k, b.cs, b.rs)?; // Bᵀ(i, j) = B(j, i)
    let (trans_a, lda) = col_major(k, m, a.cs, a.rs)?; // Aᵀ(i, j) = A(j, i)
    let addr = |o: &Operand| o.ptr + 4 * o.base as u64;
    let strided =
        |o: &Operand, ld: i64| Some(Strided { ptr: addr(o), ld, stride: batch_stride(o, z, zh)? });
    Some(vec![StridedCall {
        trans_a: trans_b,
        trans_b: trans_a,
        m: n,
        n: m,
        k,
        a: strided(&b, ldb)?,
        b: strided(&a, lda)?,
        c: strided(&c, ldc)?,
        batch: z as i64,
    }])
}

/// The process's cuBLAS handle, on the device's stream; `None` where libcublas is missing
/// or `ATTN_GEMM=own`.
#[derive(Debug)]
pub struct Blas {
    handle: Mutex<CudaBlas>,
}

static BLAS: OnceLock<std::result::Result<Option<Blas>, String>> = OnceLock::new();

/// The backend `ATTN_GEMM` asks for (`cublas`, `own`), or `None` (cuBLAS where installed).
fn requested() -> std::result::Result<Option<GemmBackend>, String> {
    match std::env::var("ATTN_GEMM").ok().as_deref() {
        None | Some("") => Ok(None),
        Some("cublas") => Ok(Some(GemmBackend::Cublas)),
        Some("own") => Ok(Some(GemmBackend::Own)),
        Some(other) => Err(format!("ATTN_GEMM={other}: use `cublas` or `own`")),
    }
}

/// Which backend [`crate::Kernels::new`] gives the products in this process.
pub fn backend(gpu: &Gpu) -> Result<GemmBackend> {
    Ok(if Blas::get(gpu)?.is_some() { GemmBackend::Cublas } else { GemmBackend::Own })
}

impl Blas {
    /// The handle every product of this process shares, opened on first use.
    pub fn get(gpu: &Gpu) -> Result<Option<&'static Blas>> {
        let opened = BLAS.get_or_init(|| {
            let want = requested()?;
            if want == Some(GemmBackend::Own) {
                return Ok(None);
            }
            // SAFETY: only tries to load the shared library.
            if !unsafe { sys::is_culib_present() } {
                return match want {
                    Some(_) => Err("ATTN_GEMM=cublas, but libcublas is not installed (or not on LD_LIBRARY_PATH)".into()),
                    None => Ok(None),
                };
            }
            let open = || -> std::result::Result<CudaBlas, String> {
                let blas = CudaBlas::new(gpu.stream().clone()).map_err(|e| e.to_string())?;
                // SAFETY: the handle is live; a null workspace of 0 bytes makes cuBLAS pick
                // only algorithms that need none.
                unsafe {
                    let h = *blas.handle();
                    sys::cublasSetMathMode(h, sys::cublasMath_t::CUBLAS_DEFAULT_MATH)
                        .result()
                        .and_then(|()| sys::cublasSetWorkspace_v2(h, std::ptr::null_mut(), 0).result())
                }
                .map_err(|e| e.to_string())?;
                Ok(blas)
            };
            match (open(), want) {
                (Ok(blas), _) => Ok(Some(Blas { handle: Mutex::new(blas) })),
                // a library that loads but will not open: our own kernel, unless asked for it
                (Err(_), None) => Ok(None),
                (Err(e), Some(_)) => Err(format!("ATTN_GEMM=cublas, but cuBLAS failed to open: {e}")),
            }
        });
        opened
            .as_ref()
            .map(Option::as_ref)
            .map_err(|e| AttnError::Cuda { context: "opening cuBLAS".into(), message: e.clone() })
    }

    /// Runs `calls` in order on the device's stream.
    pub fn run(&self, gpu: &Gpu, calls: &[StridedCall], alpha: f32, beta: f32) -> Result<()> {
        let blas = self.handle.lock().unwrap_or_else(|p| p.into_inner());
        gpu.bind().map_err(crate::cuda_err("binding the context"))?;
        let op = |t: bool| {
            if t {
                sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        for c in calls {
            // SAFETY: `plan` built the call from operands the caller guarantees address live
            // buffers large enough for the product (as for the kernel it replaces); alpha and
            // beta are host values, the handle's default pointer mode.
            unsafe {
                sys::cublasSgemmStridedBatched_64(
                    *blas.handle(),
                    op(c.trans_a),
                    op(c.trans_b),
                    c.m,
                    c.n,
                    c.k,
                    &alpha,
                    c.a.ptr as *const f32,
                    c.a.ld,
                    c.a.stride,
                    c.b.ptr as *const f32,
                    c.b.ld,
                    c.b.stride,
                    &beta,
                    c.c.ptr as *mut f32,
                    c.c.ld,
                    c.c.stride,
                    c.batch,
                )
            }
            .result()
            .map_err(|e| AttnError::Cuda {
                context: "cublasSgemmStridedBatched".into(),
                message: e.to_string(),
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Operand semantics, on the host: element (r, c) of matrix z, as an index into `mem`
    /// (the operand's `ptr` is a byte offset into it).
    fn at(o: &Operand, z: usize, zh: usize, r: usize, c: usize) -> usize {
        let off = o.base
            + (z / zh) as i64 * o.sb
            + ((z % zh) / o.div as usize) as i64 * o.sh
            + r as i64 * o.rs
            + c as i64 * o.cs;
        o.ptr as usize / 4 + off as usize
    }

    /// What the kernel computes: C = alpha·A B + beta·C by the operands' semantics.
    fn by_operands(
        mem: &mut [f64],
        (z, zh): (usize, usize),
        (m, n, k): (usize, usize, usize),
        (a, b, c): (Operand, Operand, Operand),
        (alpha, beta): (f64, f64),
    ) {
        for zz in 0..z {
            for i in 0..m {
                for j in 0..n {
                    let s: f64 =
                        (0..k).map(|l| mem[at(&a, zz, zh, i, l)] * mem[at(&b, zz, zh, l, j)]).sum();
                    let ci = at(&c, zz, zh, i, j);
                    mem[ci] = alpha * s + beta * mem[ci];
                }
            }
        }
    }

    /// What cuBLAS computes for the planned calls (column-major, strided batched).
    fn by_calls(mem: &mut [f64], calls: &[StridedCall], (alpha, beta): (f64, f64)) {
        for c in calls {
            // element (i, j) of op(X) for a column-major stored X with leading dimension ld
            let el = |s: &Strided, t: bool, z: i64, i: i64, j: i64| {
                let (r, col) = if t { (j, i) } else { (i, j) };
                (s.ptr as i64 / 4 + z * s.stride + r + col * s.ld) as usize
            };
            for z in 0..c.batch {
                for i in 0..c.m {
                    for j in 0..c.n {
                        let s: f64 = (0..c.k)
                            .map(|l| {
                                mem[el(&c.a, c.trans_a, z, i, l)]
                                    * mem[el(&c.b, c.trans_b, z, l, j)]
                            })
                            .sum();
                        let ci = el(&c.c, false, z, i, j);
                        mem[ci] = alpha * s + beta * mem[ci];
                    }
                }
            }
        }
    }

    fn check(zs: (usize, usize), mnk: (usize, usize, usize), ops: (Operand, Operand, Operand)) {
        let mut want: Vec<f64> = (0..40_000).map(|i| ((i * 7919) % 23) as f64 - 11.0).collect();
        let mut got = want.clone();
        let calls = plan(zs, mnk, ops.0, ops.1, ops.2).expect("a strided-batched plan");
        by_operands(&mut want, zs, mnk, ops, (0.5, 1.0));
        by_calls(&mut got, &calls, (0.5, 1.0));
        assert_eq!(want, got, "{zs:?} {mnk:?} {calls:?}");
    }

    // Regions of `mem` for the operands (byte offsets), far enough apart not to overlap.
    const A: u64 = 0;
    const B: u64 = 4 * 10_000;
    const C: u64 = 4 * 20_000;

    #[test]
    fn the_plans_compute_every_product_the_stages_launch() {
        let (batch, heads, kv, nq, nk, d) = (2, 4, 2, 7, 9, 3);
        let (z, group) = (batch * heads, heads / kv);
        let q = Operand::rows(A, heads, nq, d, 2);
        let kk = Operand::rows(B, kv, nk, d, 1);
        let s = Operand::rows(C, heads, 5, 6, 0);
        // S = Q Kᵀ (GQA), rows 2.. of Q and keys 1.. of K
        check((z, heads), (5, 6, d), (q, kk.shared_by(group).t(), s));
        // O = P V
        let o = Operand::rows(C, heads, 5, d, 0);
        check((z, heads), (5, d, 6), (Operand::rows(A, heads, 5, 6, 0), kk.shared_by(group), o));
        // dV += Pᵀ dO, summed over a group member's launch (z counts KV heads)
        let p = Operand::rows(A, heads, 5, 6, 0);
        let dout = Operand::rows(B, heads, nq, d, 2);
        let dv = Operand::rows(C, kv, nk, d, 1);
        let zk = batch * kv;
        for g in 0..group {
            check((zk, kv), (6, d, 5), (p.member(g, group).t(), dout.member(g, group), dv));
        }
        // a column-major C
        check((z, heads), (5, 6, d), (q, kk.shared_by(group).t(), s.t()));
        // head dimension 1: both strides of a row are 1
        let q1 = Operand::rows(A, heads, nq, 1, 0);
        let k1 = Operand::rows(B, kv, nk, 1, 0);
        check(
            (z, heads),
            (nq, nk, 1),
            (q1, k1.shared_by(group).t(), Operand::rows(C, heads, nq, nk, 0)),
        );
        // one query row
        check(
            (z, heads),
            (1, nk, d),
            (q, kk.shared_by(group).t(), Operand::rows(C, heads, 1, nk, 0)),
        );
    }

    #[test]
    fn strides_no_call_can_express_are_refused() {
        let mut odd = Operand::rows(A, 4, 5, 6, 0);
        odd.cs = 2; // neither stride is 1
        assert!(
            plan(
                (4, 4),
                (5, 6, 6),
                odd,
                Operand::rows(B, 4, 6, 6, 0),
                Operand::rows(C, 4, 5, 6, 0)
            )
            .is_none()
        );
        // heads not one head stride apart in a batch of two
        let mut gapped = Operand::rows(A, 4, 5, 6, 0);
        gapped.sb += 1;
        let b = Operand::rows(B, 4, 6, 6, 0);
        assert!(plan((8, 4), (5, 6, 6), gapped, b, Operand::rows(C, 4, 5, 6, 0)).is_none());
        assert!(plan((4, 4), (5, 6, 6), gapped, b, Operand::rows(C, 4, 5, 6, 0)).is_some());
    }
}
