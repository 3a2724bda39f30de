// What the tensor-core kernels share — FlashAttention-2's in bf16 / fp16 and in f32 by 3xTF32;
// prepended after contract.cuh and tiles.cuh: the bare exp2, the two-float atomic addition of
// the backwards' dQ, the copies and fragment reads at precomputed addresses, the
// online-softmax step on mma accumulators.

// 2^x by the hardware's approximation alone (MUFU.EX2), results below 2^-126 flushed to zero.
// exp2f compiles to that plus a test and two predicated multiplies that keep those tiny
// results as denormals: three instructions more per score, for values far below a bf16
// P~'s last bit beside the row's max (2^0).
__device__ __forceinline__ float ex2_ftz(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// ANCHOR: pack2
// Two floats rounded to one register of two bf16 (or fp16) values, lo in the low half.
template <bool BF16>
__device__ __forceinline__ u32 pack2(float lo, float hi) {
    u32 r;
    if (BF16) asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    else asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
// ANCHOR_END: pack2

// Pairs of fp16 in one register (the first in the low half), for the softcapped forward's
// tiles (sm_80 on; packed by pack2<false>): widening, and mul, add, tanh, max, fma and 2^x on
// both halves at once — one special-function instruction for two scores.
__device__ __forceinline__ float2 widen_f16x2(u32 h) {
    float2 r;
    asm("{\n\t.reg .b16 lo, hi;\n\tmov.b32 {lo, hi}, %2;\n\tcvt.f32.f16 %0, lo;\n\t"
        "cvt.f32.f16 %1, hi;\n\t}"
        : "=f"(r.x), "=f"(r.y)
        : "r"(h));
    return r;
}
__device__ __forceinline__ float round_f16(float x) { return widen_f16x2(pack2<false>(x, x)).x; }
__device__ __forceinline__ u32 mul_f16x2(u32 a, u32 b) {
    u32 c;
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(c) : "r"(a), "r"(b));
    return c;
}
__device__ __forceinline__ u32 add_f16x2(u32 a, u32 b) {
    u32 c;
    asm("add.rn.f16x2 %0, %1, %2;" : "=r"(c) : "r"(a), "r"(b));
    return c;
}
__device__ __forceinline__ u32 tanh_f16x2(u32 h) {
    u32 t;
    asm("tanh.approx.f16x2 %0, %1;" : "=r"(t) : "r"(h));
    return t;
}
__device__ __forceinline__ u32 max_f16x2(u32 a, u32 b) {
    u32 c;
    asm("max.f16x2 %0, %1, %2;" : "=r"(c) : "r"(a), "r"(b));
    return c;
}
__device__ __forceinline__ u32 fma_f16x2(u32 a, u32 b, u32 c) {
    u32 d;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}
__device__ __forceinline__ u32 ex2_f16x2(u32 h) {
    u32 y;
    asm("ex2.approx.f16x2 %0, %1;" : "=r"(y) : "r"(h));
    return y;
}

// N accumulator fragments (4 floats each) set to zero.
template <int N>
__device__ __forceinline__ void zero_frags(float (*x)[4]) {
#pragma unroll
    for (int i = 0; i < N; i++) x[i][0] = x[i][1] = x[i][2] = x[i][3] = 0.0f;
}

// Two adjacent floats added to device memory: one vector reduction on sm_90
// (red.global.add.v2.f32), two scalar ones before.
__device__ __forceinline__ void red_add2(float* p, float x, float y) {
#if __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(p), "f"(x), "f"(y) : "memory");
#else
    atomicAdd(p, x);
    atomicAdd(p + 1, y);
#endif
}

// A warp's share of dQ_i += scale · dS K_j, added into dQ's f32 accumulator (rows of D
// floats) two floats an atomic, since every key tile adds to the same rows: its accumulators
// (C layout, DC columns from qc) of query rows i and i + 8, the lane's columns 2t, 2t + 1.
template <int D, int DC>
__device__ __forceinline__ void add_dq_rows(float* dq, const float (*dqa)[4], int i, int n_q,
                                            int qc, int t, float scale) {
#pragma unroll
    for (int r = 0; r < 2; r++) {
        if (i + 8 * r >= n_q) continue;
        float* row = dq + (i64)(i + 8 * r) * D + qc + 2 * t;
#pragma unroll
        for (int c = 0; c < DC / 8; c++)
            red_add2(row + 8 * c, scale * dqa[c][2 * r], scale * dqa[c][2 * r + 1]);
    }
}

// A backward's score of query i and key j in base 2 (times log2 e), from its accumulator
// `acc` = q_i . k_j: plain on a plain tile; in the kernels without mask, bias or ALiBi
// (MODS = false) cut to the row's key range (causal masking, the window); else with every
// modifier (modify_score).
template <bool MODS>
__device__ __forceinline__ float backward_score2(const ScoreMods& mods, bool plain, float scale,
                                                 int b, int h, int i, int j, float acc) {
    constexpr float LOG2E = 1.4426950408889634f;
    if (plain) return acc * (scale * LOG2E);
    if (!MODS) return j < key_end(mods, i) && j >= key_start(mods, i) ? acc * (scale * LOG2E) : NEG_INF;
    return score(mods, false, scale, b, h, i, j, acc) * LOG2E;
}

// The softcap twins' score in a backward (`_cut`): (c log2 e) tanh((scale / c) acc) in base
// 2 where the query sees the key (`seen`), else -inf, and in `slope` dS's factor 1 - tanh^2
// from the same tanh. APPROX: tanh_approx (the 16-bit kernels), else tanh_exp (f32-exact).
template <bool APPROX>
__device__ __forceinline__ float capped_score2(float cap2, float inner, float acc, bool seen,
                                               float& slope) {
    const float th = APPROX ? tanh_approx(inner * acc) : tanh_exp(inner * acc);
    slope = 1.0f - th * th;
    return seen ? cap2 * th : NEG_INF;
}

// ANCHOR: load_rows_at
// Rows row0 .. row0 + ROWS - 1 of a [n][D] tensor of T (16- or 32-bit) into shared memory at
// dst, rows padded by 16 bytes (D + 8 16-bit values, D + 4 floats: the 8 rows an ldmatrix
// reads then start in 8 different bank groups); rows past n are zeros. THREADS threads, each
// copying 16 bytes a step by cp.async, the steps unrolled: when a step of the block covers
// whole rows (THREADS a multiple of the chunks a row) a thread keeps one column, and its
// copies sit at fixed offsets from one global pointer and one shared address.
template <int D, int ROWS, int THREADS, class T>
__device__ __forceinline__ void load_rows_at(unsigned dst, const T* src, int row0, int n) {
    constexpr int TB = sizeof(T), E = 16 / TB, C = D / E;  // bytes a value, a chunk, a row
    constexpr int SB = (D + E) * TB;                       // bytes a padded row
    static_assert(ROWS * C % THREADS == 0, "whole steps");
    if constexpr (THREADS % C == 0) {
        constexpr int RS = THREADS / C;  // rows a step
        const int r = threadIdx.x / C, c = (threadIdx.x % C) * E;  // the thread's row, column
        const T* g = src + (i64)(row0 + r) * D + c;
        dst += (r * (D + E) + c) * TB;
#pragma unroll
        for (int p = 0; p < ROWS / RS; p++) {
            const bool ok = row0 + r + p * RS < n;
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst + p * RS * SB),
                         "l"(ok ? g + p * RS * D : src), "r"(ok ? 16 : 0));
        }
    } else {  // (D = 96 in f32: 24 chunks a row)
#pragma unroll
        for (int p = 0; p < ROWS * C / THREADS; p++) {
            const int e = threadIdx.x + p * THREADS, r = e / C, c = (e % C) * E;
            const bool ok = row0 + r < n;
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(
                             dst + r * SB + c * TB),
                         "l"(ok ? src + (i64)(row0 + r) * D + c : src), "r"(ok ? 16 : 0));
        }
    }
}
// ANCHOR_END: load_rows_at

// What a backward's key pass (a block per key tile of BK keys from j0, QR query rows a step,
// THREADS threads) does with its query tiles: which see its keys (from the first tile that
// sees key j0 to the last row that sees its last key: causal masking and the window), the
// loads of K_j and V_j and of each tile's Q_i and dO_i into two buffers, and the lse and D
// of row i0 + threadIdx.x, read one tile ahead and put into shared memory when the tile
// starts — lse in base-2 units, and a row that saw no key (lse = -inf) gets +inf, so that
// 2^(s - lse) is 0 without a test.
template <int QR, int D, int BK, int THREADS>
struct KeyPassRows {
    const float *lse, *dvec;  // of the block's head
    int n_q;
    int first, end;  // the query tiles first, first + QR, ... below end see the block's keys
    float next_l = NEG_INF, next_d = 0.0f;
    __device__ static int first_tile(const ScoreMods& mods, int j0) {
        return query_start(mods, j0) / QR * QR;
    }
    __device__ static int rows_end(const FlashArgs& a, const ScoreMods& mods, int j0) {
        return query_end(mods, min(j0 + BK, a.n_k) - 1);
    }
    // K_j and V_j, the first tile's Q_i and dO_i (into the first buffers) and its lse and
    // D: one commit.
    template <class T>
    __device__ void load_first(unsigned Ka, unsigned Va, unsigned Qa, unsigned Oa, const T* k,
                               const T* v, const T* q, const T* d_out, int j0, int n_k) {
        fetch(first);
        load_rows_at<D, BK, THREADS>(Ka, k, j0, n_k);
        load_rows_at<D, BK, THREADS>(Va, v, j0, n_k);
        if (first < end) {
            load_rows_at<D, QR, THREADS>(Qa, q, first, n_q);
            load_rows_at<D, QR, THREADS>(Oa, d_out, first, n_q);
        }
        cp_async_commit();
    }
    // The next tile's Q_i and dO_i (after tile i0) into the other buffers, when it sees keys.
    template <class T>
    __device__ void prefetch(unsigned Qa, unsigned Oa, const T* q, const T* d_out, int i0) {
        if (i0 + QR < end) {
            load_rows_at<D, QR, THREADS>(Qa, q, i0 + QR, n_q);
            load_rows_at<D, QR, THREADS>(Oa, d_out, i0 + QR, n_q);
            cp_async_commit();
        }
    }
    __device__ void fetch(int i0) {
        const int i = i0 + threadIdx.x;
        const bool ok = threadIdx.x < QR && i < n_q;
        next_l = ok ? lse[i] : NEG_INF;
        next_d = ok ? dvec[i] : 0.0f;
    }
    // Tile i0's rows into Ls, Ds; then the next tile's fetch.
    __device__ void store_and_fetch(float* Ls, float* Ds, int i0) {
        if (threadIdx.x < QR) {
            Ls[threadIdx.x] = next_l == NEG_INF ? -NEG_INF : next_l * 1.4426950408889634f;
            Ds[threadIdx.x] = next_d;
        }
        if (i0 + QR < n_q) fetch(i0 + QR);
    }
};

// ldmatrix at a 32-bit shared-memory address: four 8 x 8 matrices of 16-bit values (or 8 x 4
// of 32-bit ones), lanes 8i .. 8i + 7 giving the rows of matrix i; lane 4g + t receives the
// 32-bit word t of row g of each.
__device__ __forceinline__ void ldsm_x4_at(u32* r, unsigned a) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
__device__ __forceinline__ void ldsm_x4_trans_at(u32* r, unsigned a) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

// ANCHOR: tc_softmax
// The online softmax on the accumulators of S (the warp's 16 rows x 64 keys of tile j0; the
// lane's rows are rows[0], rows[1]): scale, bias and masks (score), the new running max m
// (base-2 units), O and the lane's part of l rescaled, and s replaced by P~ = 2^(s - m).
// FAST >= 1 (version 5): on a plain tile (no mask, bias or causal edge: every score finite)
// one multiply by scale · log2 e and no -inf tests; and O is rescaled only when some row of
// the warp saw its max grow (alpha != 1) — after the first tiles a row's max rarely moves,
// and the D/2 multiplies a lane spends on it are as many instructions as the tile's mma.
// FAST = 2 (version 8): on a plain tile the max is taken of the raw dot products (times
// |scale| log2 e after the shuffles) and scale · log2 e folds into P~ = 2^(s · scale log2 e
// - m), one FMA; the exponential is ex2_ftz. Per score: max, FMA, exp2, add — 4
// instructions, not 8.
// MODS = false (the kernels without mask, bias or ALiBi): a tile that is not plain is cut
// only by the rows' key ranges (causal masking, the window, the keys' end), two comparisons,
// and softcapped when the problem has a softcap; with CUT = false too (a kernel only for
// calls without window or softcap), only by causal masking and the keys' end, one
// comparison — two registers fewer, which the tensor-core forward at d = 128 needs (with MODS,
// CUT = false is a kernel for masks and bias without the window, softcap or ALiBi). DROP (the
// f32 kernel, flash2_tf32.cu): s becomes P~ times the dropout factor (zero or 1 / (1 - p),
// the CPU's hash of row key[r] and key j), while l sums P~ itself.
// CAP (the 16-bit forward's kernel for the softcap without mask, bias or ALiBi): a tile that
// every row of the warp sees whole is softcapped in pairs of fp16 — tanh, the max, the
// exponent c log2 e tanh - m (one fma) and 2^x, each one instruction for two scores — with
// m rounded to fp16 so that the exponents, l and lse agree. The exponent carries fp16's
// rounding (2^-11 of |x - m|; P is rounded to 16 bits for P V after it anyway). The scale
// (scale / c) is an fp16 multiply too, and the tile's part of l an fp16 sum, widened once a
// row. Every tile of a CAP kernel leaves P~ packed for P V in the element type (BF16 or
// fp16): the pair of keys (2t, 2t + 1) of row g in register 0 of each 8-key block, of row
// g + 8 in register 2 — in fp16, 2^x's result itself.
template <int D, int FAST = 0, int KB = 64, bool MODS = true, bool DROP = false, bool CUT = true,
          bool CAP = false, bool BF16 = false>
__device__ __forceinline__ void tc_softmax_step(const FlashArgs& a, const ScoreMods& mods, int b,
                                                int h, int i0, int j0, const int* rows,
                                                float (*s)[4], float* m, float* l, float (*o)[4],
                                                const Dropout* drop = nullptr,
                                                const u32* key = nullptr) {
    constexpr float LOG2E = 1.4426950408889634f;
    const int t = threadIdx.x % 4;
    const bool plain = tile_plain(mods, i0, j0, KB);
    const bool fold = FAST >= 2 && plain;
    const float scale2 = a.scale * LOG2E, cap2 = mods.softcap * LOG2E;
    bool capped = false;  // s holds tanh of a whole softcapped tile (set below)
    float mx[2] = {NEG_INF, NEG_INF};
    if (fold) {  // the max of s (of -s if scale < 0: then the max of scale · s is at its min)
        if (a.scale > 0.0f) {
#pragma unroll
            for (int nb = 0; nb < KB / 8; nb++)
#pragma unroll
                for (int e = 0; e < 4; e++) mx[e / 2] = fmaxf(mx[e / 2], s[nb][e]);
        } else {
#pragma unroll
            for (int nb = 0; nb < KB / 8; nb++)
#pragma unroll
                for (int e = 0; e < 4; e++) mx[e / 2] = fmaxf(mx[e / 2], -s[nb][e]);
        }
    } else if (FAST && plain) {
#pragma unroll
        for (int nb = 0; nb < KB / 8; nb++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                s[nb][e] *= scale2;
                mx[e / 2] = fmaxf(mx[e / 2], s[nb][e]);
            }
    } else if (!MODS) {  // no mask, bias or ALiBi: the key range cuts, and the softcap
        // (CUT = false: only the causal diagonal and the keys' end, one comparison)
        const int lo[2] = {CUT ? key_start(mods, rows[0]) : 0, CUT ? key_start(mods, rows[1]) : 0};
        const int lim[2] = {key_end(mods, rows[0]), key_end(mods, rows[1])};
        // the softcap c tanh(scale s / c), in base 2: (c log2 e) tanh((scale / c) s); f32-exact
        // in the f32 kernel (DROP), one instruction a pair of scores in the 16-bit ones
        const bool cap = CUT && mods.softcap > 0.0f;
        const float inner = a.scale * mods.inv_softcap;
        // CAP: a tile inside every row's band; s[nb][e] holds the pair (e, e + 1)'s tanh,
        // packed, until the exponent; the max is of tanh, times c log2 e after (c > 0)
        capped = CAP && cap &&
                 __all_sync(0xffffffffu, j0 >= lo[0] && j0 >= lo[1] && j0 + KB <= lim[0] &&
                                             j0 + KB <= lim[1]);
        if (capped) {
            // scale / c times the score in fp16 (the host runs this kernel only where a score
            // beyond fp16's range, rounded to ±inf, is one whose tanh rounds to ±1 anyway)
            const u32 inner2 = pack2<false>(inner, inner);
            u32 hm[2] = {0xFC00FC00u, 0xFC00FC00u};  // (-inf, -inf)
#pragma unroll
            for (int nb = 0; nb < KB / 8; nb++)
#pragma unroll
                for (int e = 0; e < 4; e += 2) {  // (e, e + 1): two keys of one row
                    const u32 th =
                        tanh_f16x2(mul_f16x2(pack2<false>(s[nb][e], s[nb][e + 1]), inner2));
                    s[nb][e] = __uint_as_float(th);
                    hm[e / 2] = max_f16x2(hm[e / 2], th);
                }
#pragma unroll
            for (int r = 0; r < 2; r++) {
                const float2 x = widen_f16x2(hm[r]);
                mx[r] = fmaxf(x.x, x.y);
            }
        } else {
#pragma unroll
            for (int nb = 0; nb < KB / 8; nb++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int j = j0 + 8 * nb + 2 * t + (e & 1);
                    const float x = !cap ? s[nb][e] * scale2
                                    : DROP ? softcap_score(mods, s[nb][e] * a.scale) * LOG2E
                                           : cap2 * tanh_approx(inner * s[nb][e]);
                    s[nb][e] = j < lim[e / 2] && (!CUT || j >= lo[e / 2]) ? x : NEG_INF;
                    mx[e / 2] = fmaxf(mx[e / 2], s[nb][e]);
                }
        }
    } else {
#pragma unroll
        for (int nb = 0; nb < KB / 8; nb++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int j = j0 + 8 * nb + 2 * t + (e & 1);
                s[nb][e] = score<CUT>(mods, plain, a.scale, b, h, rows[e / 2], j, s[nb][e]) * LOG2E;
                mx[e / 2] = fmaxf(mx[e / 2], s[nb][e]);
            }
    }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        // the row's max over its 4 lanes
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
        if (fold) mx[r] *= fabsf(scale2);
        if (capped) mx[r] *= cap2;
        float m_new = fmaxf(m[r], mx[r]);
        if (capped) m_new = round_f16(m_new);
        alpha[r] = m[r] == NEG_INF ? 0.0f : exp2f(m[r] - m_new);
        m[r] = m_new;
        l[r] *= alpha[r];
    }
    if (!FAST || __any_sync(0xffffffffu, alpha[0] != 1.0f || alpha[1] != 1.0f)) {
#pragma unroll
        for (int c = 0; c < D / 8; c++) {
            o[c][0] *= alpha[0];
            o[c][1] *= alpha[0];
            o[c][2] *= alpha[1];
            o[c][3] *= alpha[1];
        }
    }
    // ANCHOR: softcap_pairs
    if (capped) {  // P~ = 2^(c log2 e tanh - m), by pairs, left packed for P V (CAP's layout)
        const u32 c2 = pack2<false>(cap2, cap2);
        const u32 neg_m[2] = {pack2<false>(-m[0], -m[0]), pack2<false>(-m[1], -m[1])};
        u32 lt[2] = {0u, 0u};  // the tile's part of l, in fp16 pairs: at most 8 a half
#pragma unroll
        for (int nb = 0; nb < KB / 8; nb++)
#pragma unroll
            for (int e = 0; e < 4; e += 2) {
                const u32 p = ex2_f16x2(fma_f16x2(__float_as_uint(s[nb][e]), c2, neg_m[e / 2]));
                lt[e / 2] = add_f16x2(lt[e / 2], p);
                if (BF16) {
                    const float2 w = widen_f16x2(p);
                    s[nb][e] = __uint_as_float(pack2<true>(w.x, w.y));
                } else {
                    s[nb][e] = __uint_as_float(p);
                }
            }
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const float2 w = widen_f16x2(lt[r]);
            l[r] += w.x + w.y;
        }
        return;
    }
    // ANCHOR_END: softcap_pairs
#pragma unroll
    for (int nb = 0; nb < KB / 8; nb++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const float p = fold                     ? ex2_ftz(fmaf(s[nb][e], scale2, -m[e / 2]))
                            : (FAST && plain)     ? exp2f(s[nb][e] - m[e / 2])
                            : s[nb][e] == NEG_INF ? 0.0f
                                                  : exp2f(s[nb][e] - m[e / 2]);
            l[e / 2] += p;
            if (DROP && drop->enabled)  // l sums P~; O gets P~ times the dropout factor
                s[nb][e] = p * dropout_factor(*drop, key[e / 2], j0 + 8 * nb + 2 * t + (e & 1));
            else
                s[nb][e] = p;
        }
    if (CAP) {  // the layout the capped tiles leave: each row's pair in registers 0 and 2
#pragma unroll
        for (int nb = 0; nb < KB / 8; nb++) {
            s[nb][0] = __uint_as_float(pack2<BF16>(s[nb][0], s[nb][1]));
            s[nb][2] = __uint_as_float(pack2<BF16>(s[nb][2], s[nb][3]));
        }
    }
}

// ANCHOR_END: tc_softmax
