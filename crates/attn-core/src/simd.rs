//! The CPU kernels the tiled stages share (chunked attention, FlashAttention-1 and -2), as
//! attn-cuda holds what their GPU variants share: tile products and the exponential, which
//! decide their speed on a CPU.
//!
//! - [`matmul`]: tile products through the `gemm` crate, which picks AVX2/FMA or AVX-512
//!   micro-kernels at run time (faster than ndarray's matrixmultiply on attention tiles:
//!   notes/cpu.md).
//! - [`softmax_tile`]: row max, `exp` and row sum of a score tile in two passes, with an
//!   `exp` written as a polynomial the compiler vectorises. It is compiled three times — for
//!   the x86-64 baseline, with AVX2 + FMA, and with AVX-512 — and the widest copy the CPU has
//!   is chosen at run time ([`Path`]), so the binary runs on any x86-64 machine and uses the
//!   whole vector width of recent ones. The three copies are one source: the same
//!   `#[inline(always)]` body, vectorised by the compiler for each target.

use ndarray::{
    ArrayBase, ArrayView1, ArrayView2, ArrayViewMut1, ArrayViewMut2, Data, DataMut, Ix2,
};

/// `c ← beta·c + alpha·a·b` for row- or column-strided views (any strides, including the
/// transposed views `x.t()`).
///
/// # Panics
/// When the shapes do not chain: a programming error, not an input error.
pub fn matmul<A, B, C>(
    alpha: f32,
    a: &ArrayBase<A, Ix2>,
    b: &ArrayBase<B, Ix2>,
    beta: f32,
    c: &mut ArrayBase<C, Ix2>,
) where
    A: Data<Elem = f32>,
    B: Data<Elem = f32>,
    C: DataMut<Elem = f32>,
{
    let (m, k) = a.dim();
    let (k2, n) = b.dim();
    assert!(k == k2 && c.dim() == (m, n), "matmul: {:?} × {:?} → {:?}", a.dim(), b.dim(), c.dim());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        *c *= beta;
        return;
    }
    let (a_rs, a_cs) = (a.strides()[0], a.strides()[1]);
    let (b_rs, b_cs) = (b.strides()[0], b.strides()[1]);
    let (c_rs, c_cs) = (c.strides()[0], c.strides()[1]);
    // The packing buffers gemm allocates are sized for the host's vector width and caches:
    // the library's scratch, not the algorithm's memory (attn_core::memory).
    // SAFETY: the pointers and strides come from live ndarray views whose shapes were checked
    // above to be (m, k) · (k, n) → (m, n); `c` is borrowed mutably, so nothing else aliases it.
    crate::memory::library_scratch(|| unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            c_cs,
            c_rs,
            beta != 0.0,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            beta,
            alpha,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    })
}

// ANCHOR: exp
/// `a·b + c`, fused into one instruction on the FMA path (`FMA = true`, compiled only with
/// FMA enabled), two on the baseline path, where `mul_add` would be a slow library call.
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// `exp(x)` for the softmax, as the compiler can vectorise it: x = n·ln 2 + r with
/// |r| ≤ ln 2 / 2 (ln 2 split in two for an exact reduction), exp(r) by Cephes' minimax
/// polynomial (about 1 ulp), 2ⁿ built in the float's exponent bits with integer operations.
/// Inputs below −87.3 (including −∞, a masked score) give exactly 0. The softmax only feeds
/// it x ≤ 0 (a score minus its row's max or log-sum-exp), so large positive inputs, which
/// would overflow the exponent field, are not clamped.
#[inline(always)]
pub fn exp_impl<const FMA: bool>(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2²³: adding it rounds to an integer n ...
    const ROUND_BITS: u32 = 0x4b40_0000; // ... which then sits in the low bits: bits = ROUND_BITS + n
    const MIN: f32 = -87.336_55; // ln of the smallest normal float
    let xc = x.max(MIN);
    let t = madd::<FMA>(xc, LOG2_E, ROUND);
    let n = t - ROUND;
    let r = madd::<FMA>(n, -LN2_LO, madd::<FMA>(n, -LN2_HI, xc));
    let mut p = 1.987_569_1e-4;
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
        p = madd::<FMA>(p, r, c);
    }
    let e_r = madd::<FMA>(p, r * r, r + 1.0);
    // 2ⁿ: n + 127 in the exponent field, with integer operations only (they vectorise)
    let two_n = f32::from_bits(t.to_bits().wrapping_add(127u32.wrapping_sub(ROUND_BITS)) << 23);
    if x < MIN { 0.0 } else { e_r * two_n }
}

/// [`exp_impl`] on the baseline path.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    exp_impl::<false>(x)
}
// ANCHOR_END: exp

const LANES: usize = 16;

/// The largest element of `row` (−∞ for an empty or all −∞ row), in `LANES` independent
/// lanes so that it vectorises.
#[inline(always)]
fn row_max(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            // a compare-and-select, not f32::max: scores are never NaN (inputs are checked),
            // and the select is one instruction where max's NaN rules cost three
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    let mut m = acc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for &x in tail {
        m = m.max(x);
    }
    m
}

/// `row ← exp(row − shift)` and its sum.
#[inline(always)]
fn exp_shift_sum<const FMA: bool>(row: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            c[l] = exp_impl::<FMA>(c[l] - shift);
            acc[l] += c[l];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for x in chunks.into_remainder() {
        *x = exp_impl::<FMA>(*x - shift);
        sum += *x;
    }
    sum
}

// ANCHOR: softmax_tile
/// The online-softmax step of one tile, row by row: with the running max `m` and sum `ell`
/// of each row, m_new = max(m, rowmax(S)); S ← exp(S − m_new); ell ← e^(m − m_new)·ell +
/// rowsum(S); m ← m_new. Returns nothing but leaves the rescale factor e^(m − m_new) of each
/// row in `alpha` (the caller rescales the output accumulator by it). Rows that have seen no
/// key yet (m_new = −∞) stay all zero with alpha = 1.
#[inline(always)]
fn softmax_tile_impl<const FMA: bool>(
    mut s: ArrayViewMut2<'_, f32>,
    mut m: ArrayViewMut1<'_, f32>,
    mut ell: ArrayViewMut1<'_, f32>,
    mut alpha: ArrayViewMut1<'_, f32>,
) {
    for (r, mut row) in s.rows_mut().into_iter().enumerate() {
        let row = row.as_slice_mut().expect("score tiles are row-major");
        let m_new = m[r].max(row_max(row));
        if m_new == f32::NEG_INFINITY {
            row.fill(0.0);
            alpha[r] = 1.0;
            continue;
        }
        alpha[r] = exp_impl::<FMA>(m[r] - m_new);
        ell[r] = alpha[r] * ell[r] + exp_shift_sum::<FMA>(row, m_new);
        m[r] = m_new;
    }
}
// ANCHOR_END: softmax_tile

/// A compiled copy of the element-wise kernels: the widest the CPU has runs unless a test
/// asks for another ([`with_path`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Path {
    /// The x86-64 baseline (SSE2), or any other architecture.
    Scalar,
    /// AVX2 + FMA: 8 floats a vector.
    Avx2,
    /// AVX-512 (F, VL) + FMA: 16 floats a vector.
    Avx512,
}

impl Path {
    /// Whether this CPU can run the path.
    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma");
            match self {
                Path::Scalar => true,
                Path::Avx2 => avx2,
                Path::Avx512 => {
                    avx2 && std::arch::is_x86_feature_detected!("avx512f")
                        && std::arch::is_x86_feature_detected!("avx512vl")
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Path::Scalar
        }
    }

    /// The paths this CPU can run, narrowest first.
    pub fn available_paths() -> Vec<Path> {
        [Path::Scalar, Path::Avx2, Path::Avx512].into_iter().filter(|p| p.available()).collect()
    }

    /// The path the kernels take on this thread now: the widest available, or what
    /// [`with_path`] asked for.
    pub fn current() -> Path {
        FORCED.with(|f| f.get()).unwrap_or_else(|| *BEST.get_or_init(best_path))
    }
}

fn best_path() -> Path {
    // ATTN_SIMD=scalar|avx2 caps the path for a whole process (to time or test a narrower one).
    let cap = match std::env::var("ATTN_SIMD").as_deref() {
        Ok("scalar") => Path::Scalar,
        Ok("avx2") => Path::Avx2,
        _ => Path::Avx512,
    };
    Path::available_paths().into_iter().filter(|&p| p <= cap).max().unwrap_or(Path::Scalar)
}

static BEST: std::sync::OnceLock<Path> = std::sync::OnceLock::new();

thread_local! {
    static FORCED: std::cell::Cell<Option<Path>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with the element-wise kernels of this thread on `path` (for tests that compare
/// the paths; other threads, rayon's among them, keep the best path).
///
/// # Panics
/// When the CPU cannot run `path`.
pub fn with_path<R>(path: Path, f: impl FnOnce() -> R) -> R {
    assert!(path.available(), "this CPU cannot run the {path:?} path");
    let before = FORCED.with(|c| c.replace(Some(path)));
    let r = f();
    FORCED.with(|c| c.set(before));
    r
}

/// Defines `pub fn $name` that runs `$imp` on [`Path::current`]: compiled with AVX-512, with
/// AVX2 + FMA, or for the x86-64 baseline (the body is the same `#[inline(always)]`
/// function, so the compiler vectorises it once for each).
macro_rules! dispatch {
    ($(#[$doc:meta])* $name:ident => $imp:ident ($($arg:ident : $ty:ty),*)) => {
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                fn avx512($($arg: $ty),*) {
                    $imp::<true>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) {
                    $imp::<true>($($arg),*)
                }
                match Path::current() {
                    // SAFETY: Path::current only returns a path the CPU supports.
                    Path::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    Path::Avx2 => return unsafe { avx2($($arg),*) },
                    Path::Scalar => {}
                }
            }
            $imp::<false>($($arg),*)
        }
    };
}

dispatch!(
    /// [`softmax_tile_impl`] on the best path this CPU has.
    softmax_tile => softmax_tile_impl(
        s: ArrayViewMut2<'_, f32>,
        m: ArrayViewMut1<'_, f32>,
        ell: ArrayViewMut1<'_, f32>,
        alpha: ArrayViewMut1<'_, f32>
    )
);

/// A tile's summaries, row by row: m̃ = rowmax(S), S ← exp(S − m̃), ℓ̃ = rowsum(S) — Rabe and
/// Staats' chunk summaries, FlashAttention-1's line 10. A row with no visible key (m̃ = −∞)
/// becomes zeros with ℓ̃ = 0.
#[inline(always)]
fn tile_summaries_impl<const FMA: bool>(
    mut s: ArrayViewMut2<'_, f32>,
    mut m_tilde: ArrayViewMut1<'_, f32>,
    mut ell_tilde: ArrayViewMut1<'_, f32>,
) {
    for (r, mut row) in s.rows_mut().into_iter().enumerate() {
        let row = row.as_slice_mut().expect("score tiles are row-major");
        let m = row_max(row);
        m_tilde[r] = m;
        if m == f32::NEG_INFINITY {
            row.fill(0.0);
            ell_tilde[r] = 0.0;
        } else {
            ell_tilde[r] = exp_shift_sum::<FMA>(row, m);
        }
    }
}

dispatch!(
    /// [`tile_summaries_impl`] on the best path this CPU has.
    tile_summaries => tile_summaries_impl(
        s: ArrayViewMut2<'_, f32>,
        m_tilde: ArrayViewMut1<'_, f32>,
        ell_tilde: ArrayViewMut1<'_, f32>
    )
);

/// `P ← exp(S − lse)` row by row: the backward's recomputation of the weights from the
/// saved log-sum-exp (a row with lse = −∞ saw no key and gets zeros).
#[inline(always)]
fn probs_from_lse_impl<const FMA: bool>(mut s: ArrayViewMut2<'_, f32>, lse: ArrayView1<'_, f32>) {
    for (mut row, &l) in s.rows_mut().into_iter().zip(&lse) {
        let row = row.as_slice_mut().expect("score tiles are row-major");
        if l == f32::NEG_INFINITY {
            row.fill(0.0);
        } else {
            row.iter_mut().for_each(|x| *x = exp_impl::<FMA>(*x - l));
        }
    }
}

dispatch!(
    /// [`probs_from_lse_impl`] on the best path this CPU has.
    probs_from_lse => probs_from_lse_impl(s: ArrayViewMut2<'_, f32>, lse: ArrayView1<'_, f32>)
);

/// `dS ← P ∘ (dP − D)` in place of dP, row by row.
#[inline(always)]
fn ds_from_dp_impl<const FMA: bool>(
    mut dp: ArrayViewMut2<'_, f32>,
    p: ArrayView2<'_, f32>,
    d: ArrayView1<'_, f32>,
) {
    for ((mut ds_row, p_row), &d_i) in dp.rows_mut().into_iter().zip(p.rows()).zip(&d) {
        let ds_row = ds_row.as_slice_mut().expect("tiles are row-major");
        let p_row = p_row.to_slice().expect("tiles are row-major");
        ds_row.iter_mut().zip(p_row).for_each(|(ds, &p)| *ds = p * (*ds - d_i));
    }
}

dispatch!(
    /// [`ds_from_dp_impl`] on the best path this CPU has.
    ds_from_dp => ds_from_dp_impl(dp: ArrayViewMut2<'_, f32>, p: ArrayView2<'_, f32>, d: ArrayView1<'_, f32>)
);

/// `S ← scale · Q Kᵀ` for a few query rows against a block of keys (decoding: the rows of a
/// GQA group), Q `[rows, d]` and K `[cols, d]` row-major; and the largest squared row norm of
/// K into `k_norm2` (infinite or NaN when K is not finite: the value check's verdict, from
/// the same loads). Query rows four at a time, eight values a step, so every load of K feeds
/// four multiply-adds.
#[inline(always)]
fn scores_impl<const FMA: bool>(
    scale: f32,
    q: ArrayView2<'_, f32>,
    k: ArrayView2<'_, f32>,
    mut s: ArrayViewMut2<'_, f32>,
    k_norm2: &mut f32,
) {
    assert!(
        rows_contiguous(&q) && rows_contiguous(&k),
        "decode_scores: Q_g and K_j need contiguous rows"
    );
    #[cfg(target_arch = "x86_64")]
    if FMA {
        // SAFETY: FMA = true is compiled only inside the dispatch's AVX2 + FMA (or AVX-512)
        // functions, which run only where the CPU has them; the rows were checked above.
        return unsafe { scores_x86(scale, q, k, &mut s, k_norm2) };
    }
    let fma = madd::<FMA>;
    let sum8 = |x: [f32; 8]| ((x[0] + x[4]) + (x[1] + x[5])) + ((x[2] + x[6]) + (x[3] + x[7]));
    let key = |j: usize| k.row(j).to_slice().expect("key rows are contiguous").as_chunks::<8>();
    let query = |r: usize| q.row(r).to_slice().expect("Q_g is row-major").as_chunks::<8>();
    // the keys' norms (a NaN is kept: f32::max would drop it)
    for j in 0..k.nrows() {
        let (k8, kt) = key(j);
        let mut nn = [0.0f32; 8];
        for x in k8 {
            for i in 0..8 {
                nn[i] = fma(x[i], x[i], nn[i]);
            }
        }
        let norm = kt.iter().fold(sum8(nn), |acc, &x| fma(x, x, acc));
        if norm.is_nan() || norm > *k_norm2 {
            *k_norm2 = norm;
        }
    }
    // the scores, four query rows at a time (the last block repeats its last row)
    let rows = q.nrows();
    for r in (0..rows).step_by(4) {
        let qs = [0, 1, 2, 3].map(|rr| query((r + rr).min(rows - 1)));
        for j in 0..k.nrows() {
            let (k8, kt) = key(j);
            let dots = dot4::<FMA>(qs.map(|q| q.0), k8);
            for (rr, (dot, qr)) in dots.into_iter().zip(qs).enumerate().take(rows - r) {
                let tail = qr.1.iter().zip(kt).fold(dot, |acc, (&x, &y)| fma(x, y, acc));
                s[(r + rr, j)] = scale * tail;
            }
        }
    }
}

/// Whether each row of `x` is contiguous (the decode kernels read rows through pointers).
fn rows_contiguous(x: &ArrayView2<'_, f32>) -> bool {
    x.ncols() <= 1 || x.strides()[1] == 1
}

/// Four dot products of eight-value chunks against one key (the portable path).
#[inline(always)]
fn dot4<const FMA: bool>(q: [&[[f32; 8]]; 4], k: &[[f32; 8]]) -> [f32; 4] {
    let sum8 = |x: [f32; 8]| ((x[0] + x[4]) + (x[1] + x[5])) + ((x[2] + x[6]) + (x[3] + x[7]));
    let mut a = [[0.0f32; 8]; 4];
    for (c, y) in k.iter().enumerate() {
        for (acc, qr) in a.iter_mut().zip(&q) {
            for i in 0..8 {
                acc[i] = madd::<FMA>(qr[c][i], y[i], acc[i]);
            }
        }
    }
    a.map(sum8)
}

dispatch!(
    /// [`scores_impl`] on the best path this CPU has.
    decode_scores => scores_impl(
        scale: f32,
        q: ArrayView2<'_, f32>,
        k: ArrayView2<'_, f32>,
        s: ArrayViewMut2<'_, f32>,
        k_norm2: &mut f32
    )
);

/// `Õ ← Õ + P V` for a few rows of weights against a block of values (decoding), P `[rows,
/// cols]`, V `[cols, d]` with contiguous rows, Õ `[rows, d]` row-major: eight columns of four
/// rows stay in registers over the whole block, so every load of V feeds four multiply-adds.
#[inline(always)]
fn add_pv_impl<const FMA: bool>(
    p: ArrayView2<'_, f32>,
    v: ArrayView2<'_, f32>,
    mut acc: ArrayViewMut2<'_, f32>,
) {
    let fma = madd::<FMA>;
    let (rows, d) = acc.dim();
    let full = d / 8 * 8;
    let o = acc.as_slice_mut().expect("Õ is row-major");
    assert!(
        rows_contiguous(&p) && rows_contiguous(&v),
        "decode_add_pv: P and V need contiguous rows"
    );
    #[cfg(target_arch = "x86_64")]
    if FMA {
        // SAFETY: as in scores_impl; the rows were checked above and Õ is row-major.
        return unsafe { add_pv_x86(p, v, o, d) };
    }
    let value = |j: usize| v.row(j).to_slice().expect("value rows are contiguous");
    // four rows of weights at a time (the last block repeats its last row, written once)
    for r in (0..rows).step_by(4) {
        let n = (rows - r).min(4);
        let w = [0, 1, 2, 3].map(|rr| p.row((r + rr).min(rows - 1)).to_slice().expect("row-major"));
        for c in (0..full).step_by(8) {
            let mut a = [[0.0f32; 8]; 4];
            for (rr, x) in a.iter_mut().enumerate().take(n) {
                x.copy_from_slice(&o[(r + rr) * d + c..(r + rr) * d + c + 8]);
            }
            for j in 0..v.nrows() {
                let v8: &[f32; 8] = value(j)[c..c + 8].try_into().expect("eight values");
                for (x, wr) in a.iter_mut().zip(&w) {
                    for i in 0..8 {
                        x[i] = fma(wr[j], v8[i], x[i]);
                    }
                }
            }
            for (rr, x) in a.iter().enumerate().take(n) {
                o[(r + rr) * d + c..(r + rr) * d + c + 8].copy_from_slice(x);
            }
        }
        for (rr, wr) in w.iter().enumerate().take(n) {
            for c in full..d {
                let x = (0..v.nrows()).fold(o[(r + rr) * d + c], |x, j| fma(wr[j], value(j)[c], x));
                o[(r + rr) * d + c] = x;
            }
        }
    }
}

dispatch!(
    /// [`add_pv_impl`] on the best path this CPU has.
    decode_add_pv => add_pv_impl(p: ArrayView2<'_, f32>, v: ArrayView2<'_, f32>, acc: ArrayViewMut2<'_, f32>)
);

/// [`scores_impl`] on x86-64 with AVX2 and FMA: four query rows against two keys at a time,
/// eight 256-bit accumulators, so a chunk's two key loads and four query loads feed eight
/// multiply-adds (and, in the first block of rows, the keys' norms two more); the eight dot
/// products are reduced together by a tree of horizontal adds.
///
/// # Safety
/// Only inside functions compiled with AVX2 and FMA, on a CPU that has them; the rows of `q`
/// and `k` must be contiguous (checked by the caller).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn scores_x86(
    scale: f32,
    q: ArrayView2<'_, f32>,
    k: ArrayView2<'_, f32>,
    s: &mut ArrayViewMut2<'_, f32>,
    k_norm2: &mut f32,
) {
    use std::arch::x86_64::*;
    let ((rows, d), cols) = (q.dim(), k.nrows());
    let (chunks, tail) = (d / 8, d / 8 * 8);
    let key = |j: usize| k.row(j).as_ptr();
    let query = |r: usize| q.row(r).as_ptr();
    // SAFETY (whole body): every pointer is a row of `q` or `k` read at offsets below d.
    unsafe {
        for r in (0..rows).step_by(4) {
            let qs = [0, 1, 2, 3].map(|rr| query((r + rr).min(rows - 1)));
            let norms = r == 0;
            for j in (0..cols).step_by(2) {
                // an odd last key is paired with itself
                let ks = [key(j), key((j + 1).min(cols - 1))];
                prefetch_row(k, j + AHEAD, d);
                prefetch_row(k, j + 1 + AHEAD, d);
                let mut a = [_mm256_setzero_ps(); 8]; // a[2·rr + key]
                let mut nn = [_mm256_setzero_ps(); 2];
                for c in 0..chunks {
                    let y = ks.map(|p| _mm256_loadu_ps(p.add(8 * c)));
                    if norms {
                        nn[0] = _mm256_fmadd_ps(y[0], y[0], nn[0]);
                        nn[1] = _mm256_fmadd_ps(y[1], y[1], nn[1]);
                    }
                    for (rr, qp) in qs.iter().enumerate() {
                        let x = _mm256_loadu_ps(qp.add(8 * c));
                        a[2 * rr] = _mm256_fmadd_ps(x, y[0], a[2 * rr]);
                        a[2 * rr + 1] = _mm256_fmadd_ps(x, y[1], a[2 * rr + 1]);
                    }
                }
                let mut dots = [0.0f32; 8];
                _mm256_storeu_ps(dots.as_mut_ptr(), sum_each(a));
                for (rr, qp) in qs.iter().enumerate().take(rows - r) {
                    for (kk, kp) in ks.iter().enumerate().take(cols - j) {
                        let dot = (tail..d).fold(dots[2 * rr + kk], |acc, c| {
                            (*qp.add(c)).mul_add(*kp.add(c), acc)
                        });
                        s[(r + rr, j + kk)] = scale * dot;
                    }
                }
                if norms {
                    let mut n = [0.0f32; 8];
                    let pair = _mm256_hadd_ps(_mm256_hadd_ps(nn[0], nn[1]), _mm256_setzero_ps());
                    _mm256_storeu_ps(n.as_mut_ptr(), pair);
                    for (kk, kp) in ks.iter().enumerate().take(cols - j) {
                        // lanes 0, 1 hold the low halves' sums of key 0, 1; lanes 4, 5 the high
                        let norm = (tail..d).fold(n[kk] + n[4 + kk], |acc, c| {
                            (*kp.add(c)).mul_add(*kp.add(c), acc)
                        });
                        // a NaN is kept (f32::max would drop it)
                        if norm.is_nan() || norm > *k_norm2 {
                            *k_norm2 = norm;
                        }
                    }
                }
            }
        }
    }
}

/// How many rows ahead of the one being read the decode kernels ask for K and V: the hardware
/// prefetcher alone leaves these one-pass streams waiting on memory.
#[cfg(target_arch = "x86_64")]
const AHEAD: usize = 8;

/// Asks the caches for row `j` of `x` (d values), when `x` has it.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_row(x: ArrayView2<'_, f32>, j: usize, d: usize) {
    use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
    if j < x.nrows() {
        let row = x.row(j).as_ptr();
        for c in (0..d).step_by(16) {
            // SAFETY: a prefetch is only a hint (it never faults); the address is inside row j.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(row.add(c) as *const i8) };
        }
    }
}

/// The eight sums of eight 256-bit vectors' lanes, in one vector: lane i is the sum of v[i].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn sum_each(v: [std::arch::x86_64::__m256; 8]) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // SAFETY: only register operations, under the caller's AVX guarantee.
    unsafe {
        // per 128-bit half: [v0, v1, v2, v3] partial sums, then the two halves added
        let lo = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
        let hi = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
        _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31))
    }
}

/// [`add_pv_impl`] on x86-64 with AVX2 and FMA: V is streamed row by row, two keys at a time,
/// each key's weights for four rows held in registers, so every chunk of Õ is loaded once,
/// takes eight multiply-adds and is stored once, and V is read once, in order.
///
/// # Safety
/// As [`scores_x86`]; the rows of `p` and `v` contiguous, Õ row-major `[rows, d]`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn add_pv_x86(p: ArrayView2<'_, f32>, v: ArrayView2<'_, f32>, o: &mut [f32], d: usize) {
    let rows = p.nrows();
    let base = o.as_mut_ptr();
    // SAFETY: the row pointers are rows of `p` and of `o` (rows · d values).
    unsafe {
        let weights = |r: usize| p.row(r).as_ptr();
        let out = |r: usize| base.add(r * d);
        let mut r = 0;
        while r + 4 <= rows {
            pv_rows::<4>(
                [0, 1, 2, 3].map(|i| weights(r + i)),
                [0, 1, 2, 3].map(|i| out(r + i)),
                v,
                d,
            );
            r += 4;
        }
        match rows - r {
            3 => {
                pv_rows::<3>([0, 1, 2].map(|i| weights(r + i)), [0, 1, 2].map(|i| out(r + i)), v, d)
            }
            2 => pv_rows::<2>([0, 1].map(|i| weights(r + i)), [0, 1].map(|i| out(r + i)), v, d),
            1 => pv_rows::<1>([weights(r)], [out(r)], v, d),
            _ => {}
        }
    }
}

/// `Õ_r ← Õ_r + Σ_j P_rj V_j` for N rows (N ≤ 4), keys in pairs.
///
/// # Safety
/// As [`add_pv_x86`]: `w[i]` points at a row of P (`v.nrows()` weights), `out[i]` at a row
/// of Õ (d values).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn pv_rows<const N: usize>(
    w: [*const f32; N],
    out: [*mut f32; N],
    v: ArrayView2<'_, f32>,
    d: usize,
) {
    use std::arch::x86_64::*;
    let cols = v.nrows();
    let full = d / 8 * 8;
    // SAFETY: reads of rows of V below d, of P below cols; reads and writes of Õ's rows below d.
    unsafe {
        for j in (0..cols).step_by(2) {
            // an odd last key is paired with itself at weight 0
            let pair = j + 1 < cols;
            let (v0, v1) = (v.row(j).as_ptr(), v.row(if pair { j + 1 } else { j }).as_ptr());
            prefetch_row(v, j + AHEAD, d);
            prefetch_row(v, j + 1 + AHEAD, d);
            let w0 = w.map(|x| *x.add(j));
            let w1 = w.map(|x| if pair { *x.add(j + 1) } else { 0.0 });
            let (b0, b1) = (w0.map(|x| _mm256_set1_ps(x)), w1.map(|x| _mm256_set1_ps(x)));
            for c in (0..full).step_by(8) {
                let (y0, y1) = (_mm256_loadu_ps(v0.add(c)), _mm256_loadu_ps(v1.add(c)));
                for i in 0..N {
                    let x = _mm256_fmadd_ps(b0[i], y0, _mm256_loadu_ps(out[i].add(c)));
                    _mm256_storeu_ps(out[i].add(c), _mm256_fmadd_ps(b1[i], y1, x));
                }
            }
            for c in full..d {
                for i in 0..N {
                    let x = w0[i].mul_add(*v0.add(c), *out[i].add(c));
                    *out[i].add(c) = w1[i].mul_add(*v1.add(c), x);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array1, Array2};

    fn worst_relative_error(f: impl Fn(f32) -> f32) -> f64 {
        (0..=200_000)
            .map(|i| {
                let x = -87.0 * i as f32 / 200_000.0;
                let (got, want) = (f(x) as f64, (x as f64).exp());
                (got - want).abs() / want
            })
            .fold(0.0, f64::max)
    }

    #[test]
    fn exp_is_accurate_to_a_few_ulps_on_the_softmax_range() {
        let worst = worst_relative_error(exp);
        assert!(worst < 4e-7, "relative error {worst:e}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_fma_exp_is_as_accurate() {
        #[target_feature(enable = "avx2,fma")]
        fn check() -> f64 {
            worst_relative_error(exp_impl::<true>)
        }
        if !std::arch::is_x86_feature_detected!("fma")
            || !std::arch::is_x86_feature_detected!("avx2")
        {
            eprintln!("skipped: this CPU has no AVX2/FMA");
            return;
        }
        // SAFETY: the CPU has just been checked to support AVX2 and FMA.
        let worst = unsafe { check() };
        assert!(worst < 4e-7, "relative error {worst:e}");
        assert_eq!(exp_impl::<true>(f32::NEG_INFINITY), 0.0);
    }

    /// A score tile, its rows' running max and sum, a tile of dP, and the rows' lse.
    type TileCase = (Array2<f32>, Array1<f32>, Array1<f32>, Array2<f32>, Array1<f32>);

    /// A score tile with −∞ entries and a fully masked row, its running statistics, and the
    /// other operands of the element-wise kernels.
    fn tile_case() -> TileCase {
        let (rows, cols) = (9, 77); // not a multiple of any vector width
        let mut s = Array2::from_shape_fn((rows, cols), |(i, j)| {
            ((i * 31 + j * 17) % 23) as f32 * 0.37 - 4.0
        });
        s.row_mut(3).fill(f32::NEG_INFINITY);
        s[[5, 10]] = f32::NEG_INFINITY;
        let m = Array1::from_shape_fn(rows, |i| if i % 2 == 0 { f32::NEG_INFINITY } else { 2.5 });
        let ell = Array1::from_shape_fn(rows, |i| i as f32 * 0.5);
        let dp =
            Array2::from_shape_fn((rows, cols), |(i, j)| ((i + 3 * j) % 11) as f32 * 0.1 - 0.5);
        let lse = Array1::from_shape_fn(rows, |i| {
            if i == 3 { f32::NEG_INFINITY } else { 4.0 + i as f32 * 0.1 }
        });
        (s, m, ell, dp, lse)
    }

    /// Every kernel on `path`: the softmax step's tile, m, ℓ, alpha; P from the lse; dS.
    fn run_on(path: Path) -> Vec<Vec<f32>> {
        with_path(path, || {
            let (mut s, mut m, mut ell, dp, lse) = tile_case();
            let mut alpha = Array1::zeros(m.len());
            softmax_tile(s.view_mut(), m.view_mut(), ell.view_mut(), alpha.view_mut());
            let (mut p, ..) = tile_case();
            probs_from_lse(p.view_mut(), lse.view());
            let mut ds = dp.clone();
            ds_from_dp(ds.view_mut(), p.view(), lse.mapv(|l| l.max(0.0) * 0.1).view());
            let (mut t, ..) = tile_case();
            let (mut mt, mut lt) = (Array1::zeros(t.nrows()), Array1::zeros(t.nrows()));
            tile_summaries(t.view_mut(), mt.view_mut(), lt.view_mut());
            assert_eq!(lt[3], 0.0, "a fully masked row sums to 0");
            [
                s.into_raw_vec_and_offset().0,
                m.to_vec(),
                ell.to_vec(),
                alpha.to_vec(),
                p.into_raw_vec_and_offset().0,
                ds.into_raw_vec_and_offset().0,
            ]
            .to_vec()
        })
    }

    #[test]
    fn every_simd_path_gives_the_scalar_paths_numbers() {
        let scalar = run_on(Path::Scalar);
        // the float64 softmax of the tile, for the scalar path itself
        let (s, m0, ..) = tile_case();
        for (r, row) in s.rows().into_iter().enumerate() {
            let m_new = row.iter().copied().fold(m0[r], f32::max);
            for (j, &x) in row.iter().enumerate() {
                let want =
                    if m_new == f32::NEG_INFINITY { 0.0 } else { (x as f64 - m_new as f64).exp() };
                let got = scalar[0][r * row.len() + j] as f64;
                assert!(
                    (got - want).abs() <= 1e-6 * want.max(1e-30) + 1e-38,
                    "row {r} col {j}: {got} vs {want}"
                );
            }
        }
        let paths = Path::available_paths();
        println!("paths on this CPU: {paths:?}");
        for &path in &paths {
            let got = run_on(path);
            for (k, (g, w)) in got.iter().zip(&scalar).enumerate() {
                for (i, (&a, &b)) in g.iter().zip(w).enumerate() {
                    // FMA rounds once where the baseline rounds twice: a few ulps apart
                    let close =
                        a == b || (a - b).abs() <= 4.0 * f32::EPSILON * b.abs().max(a.abs());
                    assert!(close, "{path:?}, output {k}, element {i}: {a} vs {b}");
                }
            }
        }
        // The AVX-512 copy is the AVX2 copy at twice the width: the same operations in the
        // same order, so the same bits.
        if Path::Avx512.available() {
            assert_eq!(run_on(Path::Avx512), run_on(Path::Avx2));
        } else {
            eprintln!("skipped the AVX-512 comparison: this CPU has no AVX-512");
        }
    }

    #[test]
    fn matmul_matches_ndarray_for_transposed_and_strided_views() {
        let a = Array2::from_shape_fn((7, 5), |(i, j)| (i * 5 + j) as f32 * 0.1 - 1.0);
        let b = Array2::from_shape_fn((9, 5), |(i, j)| (i + 2 * j) as f32 * 0.05);
        let mut c = Array2::from_elem((7, 9), 1.0f32);
        matmul(2.0, &a.view(), &b.t(), 0.5, &mut c.view_mut());
        let want = a.dot(&b.t()) * 2.0 + 0.5;
        assert!(c.iter().zip(&want).all(|(x, y)| (x - y).abs() < 1e-5));
    }

    #[test]
    fn decode_kernels_match_a_plain_product_on_every_path() {
        // rows 1 to 8 (the four-row blocks and every remainder), odd and even key counts, head
        // dims with and without a tail
        for path in Path::available_paths() {
            for (rows, cols, d) in
                [(1, 3, 8), (4, 17, 128), (6, 9, 13), (5, 256, 72), (7, 4, 7), (8, 1, 24)]
            {
                let q = crate::random::normal((1, 1, rows, d), 1)
                    .into_shape_with_order((rows, d))
                    .unwrap();
                let k = crate::random::normal((1, 1, cols, d), 2)
                    .into_shape_with_order((cols, d))
                    .unwrap();
                let mut s = Array2::zeros((rows, cols));
                let mut norm2 = 0.0f32;
                with_path(path, || {
                    decode_scores(0.5, q.view(), k.view(), s.view_mut(), &mut norm2)
                });
                let want_norm = k.rows().into_iter().map(|r| r.dot(&r)).fold(0.0f32, f32::max);
                assert!(
                    (norm2 - want_norm).abs() <= 1e-4 * want_norm,
                    "{path:?}: norm {norm2} vs {want_norm}"
                );
                for r in 0..rows {
                    for j in 0..cols {
                        let want = 0.5 * q.row(r).dot(&k.row(j));
                        assert!(
                            (s[(r, j)] - want).abs() < 1e-4,
                            "{path:?} ({rows}, {cols}, {d}) S[{r}, {j}]"
                        );
                    }
                }
                let mut acc = Array2::from_elem((rows, d), 1.0f32);
                with_path(path, || decode_add_pv(s.view(), k.view(), acc.view_mut()));
                let want = s.dot(&k) + 1.0;
                let worst = (&acc - &want).iter().fold(0.0f32, |m, x| m.max(x.abs()));
                assert!(worst < 1e-3, "{path:?} ({rows}, {cols}, {d}): P V off by {worst}");
            }
            // a key that is not finite makes the norm not finite
            let q = Array2::<f32>::ones((4, 16));
            let mut k = Array2::<f32>::ones((2, 16));
            k[(1, 3)] = f32::NAN;
            let (mut s, mut norm2) = (Array2::zeros((4, 2)), 0.0f32);
            with_path(path, || decode_scores(1.0, q.view(), k.view(), s.view_mut(), &mut norm2));
            assert!(norm2.is_nan(), "{path:?}: a NaN key gave the norm {norm2}");
        }
    }

    #[test]
    fn softmax_tile_keeps_running_statistics() {
        // Two tiles of one row, [1, 2] then [3, −∞]: m = 3, ℓ = e^-2 + e^-1 + 1.
        let (mut m, mut ell, mut alpha) =
            (Array1::from_elem(1, f32::NEG_INFINITY), Array1::zeros(1), Array1::zeros(1));
        let mut s = Array2::from_shape_vec((1, 2), vec![1.0f32, 2.0]).unwrap();
        softmax_tile(s.view_mut(), m.view_mut(), ell.view_mut(), alpha.view_mut());
        let mut s2 = Array2::from_shape_vec((1, 2), vec![3.0f32, f32::NEG_INFINITY]).unwrap();
        softmax_tile(s2.view_mut(), m.view_mut(), ell.view_mut(), alpha.view_mut());
        assert_eq!(m[0], 3.0);
        assert!((ell[0] - ((-2f32).exp() + (-1f32).exp() + 1.0)).abs() < 1e-6);
        assert!((alpha[0] - (-1f32).exp()).abs() < 1e-7);
        assert_eq!(s2[[0, 1]], 0.0);
    }
}
