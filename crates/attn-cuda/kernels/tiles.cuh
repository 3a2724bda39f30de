// Building blocks of the fused attention kernels (FlashAttention-1 and -2 on the GPU),
// prepended after contract.cuh: the argument struct, tile loads, the score of a tile
// element, row reductions across the 16 lanes of a row, and the backward's recomputation
// of P and dS for one tile pair.

#define BR 64
#define BC 64
#define NT 256

struct FlashArgs {
    u64 q, k, v, o, lse, d_out, dvec, dq, dk, dv;  // float*
    int n_q, n_k, heads, kv_heads;
    float scale;
    int pad_;
    u64 dbias;  // float*: the backward adds dS into it when dBias is asked for (score_grad)
};

// The same arguments without dBias, for a pass that must not add it a second time.
__device__ __forceinline__ FlashArgs without_dbias(FlashArgs a) {
    a.dbias = 0;
    return a;
}

// The (batch, head) a block works on — z = b * heads + h, from the grid — and where the
// rows of its head start: Q and dO per query head, K and V per key/value head (with
// grouped-query attention, query head h reads key/value head h / (heads / kv_heads)).
struct BlockHead {
    int z, b, h;
    const float *q, *d_out, *k, *v;
};

template <int D>
__device__ __forceinline__ BlockHead block_head(const FlashArgs& a, int z) {
    const int b = z / a.heads, h = z % a.heads;
    const i64 kv = ((i64)b * a.kv_heads + h / (a.heads / a.kv_heads)) * a.n_k * D;
    return {z, b, h, (const float*)a.q + (i64)z * a.n_q * D,
            (const float*)a.d_out + (i64)z * a.n_q * D, (const float*)a.k + kv,
            (const float*)a.v + kv};
}

// Whether every score of the tile (rows i0 .. i0 + rows - 1, keys j0 .. j0 + keys - 1) is
// plain scale * q.k: no softcap, bias, ALiBi or mask, no key past n_k, no causal or window
// limit inside it. `rows` defaults to the tallest tile of any kernel (flash2_tf32.cu's 128):
// a shorter tile is only judged more strictly.
__device__ __forceinline__ bool tile_plain(const ScoreMods& m, int i0, int j0, int keys = BC,
                                           int rows = 128) {
    return !m.bias && !m.mask && !m.alibi && m.softcap == 0.0f && j0 + keys <= m.n_k &&
           j0 + keys <= key_end(m, i0) && j0 >= key_start(m, min(i0 + rows, m.n_q) - 1);
}

// The score of (i, j) from its dot product (EXT: as modify_score).
template <bool EXT = true>
__device__ __forceinline__ float score(const ScoreMods& m, bool plain, float scale, int b, int h,
                                       int i, int j, float dot) {
    if (plain) return scale * dot;
    if (j >= m.n_k || i >= m.n_q) return NEG_INF;
    return modify_score<EXT>(m, b, h, i, j, scale * dot);
}

// 16 bytes from global to shared memory without passing through registers (cp.async, sm_80+;
// valid = false fills zeros), and the group commit / wait around it. Before sm_80: a plain
// copy, and the waits do nothing.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
#if __CUDA_ARCH__ >= 800
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    const int bytes = valid ? 16 : 0;  // 0: fill with zeros
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(bytes));
#else
    *reinterpret_cast<uint4*>(dst) =
        valid ? *reinterpret_cast<const uint4*>(src) : make_uint4(0u, 0u, 0u, 0u);
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Reduction over the 16 lanes of one row.
__device__ __forceinline__ float row_max16(float x) {
    for (int o = 8; o > 0; o /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}
__device__ __forceinline__ float row_sum16(float x) {
    for (int o = 8; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

template <int D, int ROWS = 64>
__device__ __forceinline__ void load_tile4(float* dst, const float* src, int row0, int n) {
    constexpr int V4 = D / 4;
    for (int e = threadIdx.x; e < ROWS * V4; e += NT) {
        int r = e / V4, c = (e % V4) * 4;
        float4 x = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (row0 + r < n) x = *reinterpret_cast<const float4*>(src + (i64)(row0 + r) * D + c);
        *reinterpret_cast<float4*>(dst + r * (D + 4) + c) = x;
    }
}

// The backward kernels read shared memory as the forward's version 2 does: rows padded to
// D + 4 floats, 16-byte reads, a thread owning D/16 consecutive gradient columns.
#define ROW (D + 4)
#define TROW (BC + 4)

// The thread's CW = D/16 columns of a row (of O, V, dO, Q, K, dK, dV, dQ). Consecutive
// columns (tx*CW ..) let a thread read them as float4s, but at CW = 8 (D = 128) the 16 lanes
// of a row then read 32 bytes apart: four lanes on the same banks, a 4-way bank conflict
// on every read. SPREAD: float4 chunks 64 columns apart (tx*4 + 64k + e), so 16 lanes read
// 256 consecutive bytes, conflict-free. The two agree when CW is 4 or not a multiple of 4
// (D = 32, 64, 96).
template <int D, bool SPREAD>
__host__ __device__ constexpr bool spread_cols() { return SPREAD && (D / 16) % 4 == 0 && D / 16 > 4; }

template <int D, bool SPREAD = true>
__device__ __forceinline__ int thread_col(int tx, int c) {
    if constexpr (spread_cols<D, SPREAD>()) return (c / 4) * 64 + tx * 4 + c % 4;
    else return tx * (D / 16) + c;
}

// Loads the thread's columns of one shared-memory row: float4s where CW is a multiple of 4
// (each 4 consecutive columns), float2s otherwise.
template <int D, bool SPREAD = true>
__device__ __forceinline__ void load_thread_cols(float* dst, const float* row, int tx) {
    constexpr int CW = D / 16;
    if constexpr (CW % 4 == 0) {
#pragma unroll
        for (int c = 0; c < CW; c += 4) {
            float4 x = *reinterpret_cast<const float4*>(row + thread_col<D, SPREAD>(tx, c));
            dst[c] = x.x; dst[c + 1] = x.y; dst[c + 2] = x.z; dst[c + 3] = x.w;
        }
    } else {
#pragma unroll
        for (int c = 0; c < CW; c += 2) {
            float2 x = *reinterpret_cast<const float2*>(row + tx * CW + c);
            dst[c] = x.x; dst[c + 1] = x.y;
        }
    }
}

__device__ __forceinline__ float lane(const float4& x, int u) {
    return u == 0 ? x.x : u == 1 ? x.y : u == 2 ? x.z : x.w;
}

// The running statistics of the thread's rows before the first key tile: m = -inf, l = 0,
// O = 0, and each row's dropout key (R rows a thread: ty + 16r).
template <int D, int R = 4>
__device__ __forceinline__ void start_rows(const Dropout& drop, int b, int h, int i0, float* m,
                                           float* l, float (*o)[D / 16], u32* key) {
    const int ty = threadIdx.x / 16;
#pragma unroll
    for (int r = 0; r < R; r++) {
        m[r] = NEG_INF;
        l[r] = 0.0f;
#pragma unroll
        for (int c = 0; c < D / 16; c++) o[r][c] = 0.0f;
        key[r] = drop.enabled ? row_key(drop, b, h, i0 + ty + 16 * r) : 0u;
    }
}

// S = Q_i K_j^T for the thread's R x 4 scores (4 x 4 unless said): rows ty + 16r of Qs,
// keys tx + 16c of Ks.
template <int D, int R = 4>
__device__ __forceinline__ void tile_scores(const float* Qs, const float* Ks, float (*s)[4]) {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int c = 0; c < 4; c++) s[r][c] = 0.0f;
#pragma unroll 4
    for (int d = 0; d < D; d += 4) {
        float4 qv[R], kv[4];
#pragma unroll
        for (int r = 0; r < R; r++) qv[r] = *reinterpret_cast<const float4*>(Qs + (ty + 16 * r) * ROW + d);
#pragma unroll
        for (int c = 0; c < 4; c++) kv[c] = *reinterpret_cast<const float4*>(Ks + (tx + 16 * c) * ROW + d);
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int c = 0; c < 4; c++) {
                s[r][c] = fmaf(qv[r].x, kv[c].x, s[r][c]);
                s[r][c] = fmaf(qv[r].y, kv[c].y, s[r][c]);
                s[r][c] = fmaf(qv[r].z, kv[c].z, s[r][c]);
                s[r][c] = fmaf(qv[r].w, kv[c].w, s[r][c]);
            }
    }
}

// P (undropped) and dS = P * (Z * dP - D) of the tile (rows i0.., keys j0..) from its
// products S = Q_i K_j^T and dP = dO_i V_j^T, in the thread's registers (rows ty + 16r, keys
// tx + 16c). dS is the raw scores' gradient (score_grad: through the softcap, and added into
// dBias when mods asks for it).
template <int D>
__device__ __forceinline__ void p_ds_from_products(const FlashArgs& a, const ScoreMods& mods,
                                                   const Dropout& drop, int b, int h, int z,
                                                   int i0, int j0, const float s[4][4],
                                                   const float dp[4][4], float p[4][4],
                                                   float ds[4][4]) {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    const bool plain = tile_plain(mods, i0, j0);
    const float* lse = (const float*)a.lse + (i64)z * a.n_q;
    const float* dvec = (const float*)a.dvec + (i64)z * a.n_q;
#pragma unroll
    for (int r = 0; r < 4; r++) {
        const int i = i0 + ty + 16 * r;
        const float L = i < a.n_q ? lse[i] : NEG_INF;
        const float Di = i < a.n_q ? dvec[i] : 0.0f;
        const u32 key = drop.enabled ? row_key(drop, b, h, i) : 0u;
#pragma unroll
        for (int c = 0; c < 4; c++) {
            const int j = j0 + tx + 16 * c;
            const float sc = score(mods, plain, a.scale, b, h, i, j, s[r][c]);
            const float pr = (L == NEG_INF || sc == NEG_INF) ? 0.0f : expf(sc - L);
            float g = dp[r][c];
            if (drop.enabled) g *= dropout_factor(drop, key, j);
            p[r][c] = pr;
            ds[r][c] = pr * (g - Di);
            if (!plain)
                ds[r][c] = score_grad(mods, (float*)a.dbias, b, h, i, j, a.scale * s[r][c], ds[r][c]);
        }
    }
}

// Recomputes P and dS (as above) for the tile held in shared memory: S = Q_i K_j^T and
// dP = dO_i V_j^T first.
template <int D>
__device__ __forceinline__ void tile_p_ds(const FlashArgs& a, const ScoreMods& mods,
                                          const Dropout& drop, int b, int h, int z, int i0,
                                          int j0, const float* Qs, const float* dOs,
                                          const float* Ks, const float* Vs, float p[4][4],
                                          float ds[4][4]) {
    float s[4][4], dp[4][4];
    tile_scores<D>(Qs, Ks, s);   // S = Q_i K_j^T
    tile_scores<D>(dOs, Vs, dp); // dP = dO_i V_j^T
    p_ds_from_products<D>(a, mods, drop, b, h, z, i0, j0, s, dp, p, ds);
}


// ---------------------------------------------------------------------------------------
// The steps the fused kernels share (16-byte shared-memory reads, rows padded to D + 4).

// acc[r][.] += P[ty + 16r][.] V_j[., tx*CW ..] over the tile's BC keys, 4 keys at a time
// (P rows padded to BC + 4, read as broadcast float4s).
template <int D, bool SPREAD = true, int R = 4>
__device__ __forceinline__ void accumulate_pv(const float* Ps, const float* Vs, float (*acc)[D / 16]) {
    constexpr int CW = D / 16;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll 2
    for (int c2 = 0; c2 < BC; c2 += 4) {
        float4 pv[R];
#pragma unroll
        for (int r = 0; r < R; r++) pv[r] = *reinterpret_cast<const float4*>(Ps + (ty + 16 * r) * TROW + c2);
#pragma unroll
        for (int u = 0; u < 4; u++) {
            float vv[CW];
            load_thread_cols<D, SPREAD>(vv, Vs + (c2 + u) * ROW, tx);
#pragma unroll
            for (int r = 0; r < R; r++) {
                const float p = lane(pv[r], u);
#pragma unroll
                for (int c = 0; c < CW; c++) acc[r][c] = fmaf(p, vv[c], acc[r][c]);
            }
        }
    }
}

// FlashAttention-2's online-softmax step on the thread's scores of tile (i0.., j0..): the
// scores are modified (bias, masks, causal), the running max m and sum l updated, O
// rescaled, and P~ = exp(S - m) (times the dropout factors) written to Ps. BASE2: scores
// and m in units of log2 e, exponentials by exp2 (one instruction); else natural units.
template <int D, bool BASE2, int R = 4>
__device__ __forceinline__ void online_softmax_step(const FlashArgs& a, const ScoreMods& mods,
                                                    const Dropout& drop, int b, int h, int i0,
                                                    int j0, float (*s)[4], float* m,
                                                    float* l, float (*o)[D / 16],
                                                    const u32* key, float* Ps) {
    constexpr float LOG2E = 1.4426950408889634f;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    const bool plain = tile_plain(mods, i0, j0);
#pragma unroll
    for (int r = 0; r < R; r++) {
        const int i = i0 + ty + 16 * r;
        float mx = NEG_INF;
#pragma unroll
        for (int c = 0; c < 4; c++) {
            s[r][c] = score(mods, plain, a.scale, b, h, i, j0 + tx + 16 * c, s[r][c]);
            if (BASE2) s[r][c] *= LOG2E;
            mx = fmaxf(mx, s[r][c]);
        }
        const float m_new = fmaxf(m[r], row_max16(mx));
        const float alpha =
            m[r] == NEG_INF ? 0.0f : (BASE2 ? exp2f(m[r] - m_new) : expf(m[r] - m_new));
        float sum = 0.0f;
#pragma unroll
        for (int c = 0; c < 4; c++) {
            float p = s[r][c] == NEG_INF ? 0.0f
                                         : (BASE2 ? exp2f(s[r][c] - m_new) : expf(s[r][c] - m_new));
            sum += p;
            if (drop.enabled) p *= dropout_factor(drop, key[r], j0 + tx + 16 * c);
            Ps[(ty + 16 * r) * TROW + tx + 16 * c] = p;
        }
        l[r] = alpha * l[r] + row_sum16(sum);
        m[r] = m_new;
#pragma unroll
        for (int c = 0; c < D / 16; c++) o[r][c] *= alpha;
    }
}

// The end of a forward: O = O / l and lse = m + ln l (m in units of log2 e when BASE2) for
// the thread's rows; a row that saw no key gets O = 0, lse = -inf.
template <int D, bool BASE2, bool SPREAD = true, int R = 4>
__device__ __forceinline__ void write_forward_rows(const FlashArgs& a, int z, int i0,
                                                   const float* m, const float* l,
                                                   const float (*o)[D / 16]) {
    constexpr int CW = D / 16;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    float* out = (float*)a.o + (i64)z * a.n_q * D;
    float* lse = (float*)a.lse + (i64)z * a.n_q;
#pragma unroll
    for (int r = 0; r < R; r++) {
        const int i = i0 + ty + 16 * r;
        if (i >= a.n_q) continue;
        const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
#pragma unroll
        for (int c = 0; c < CW; c++) out[(i64)i * D + thread_col<D, SPREAD>(tx, c)] = o[r][c] * inv;
        const float mr = BASE2 ? m[r] * 0.6931471805599453f : m[r];
        if (tx == 0) lse[i] = l[r] > 0.0f ? mr + logf(l[r]) : NEG_INF;
    }
}

// Writes the thread's 4 x 4 values x (rows ty + 16r, keys tx + 16c) transposed into a
// [BC][BR + 4] tile.
__device__ __forceinline__ void store_transposed(const float x[4][4], float* T) {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int r = 0; r < 4; r++)
#pragma unroll
        for (int c = 0; c < 4; c++) T[(tx + 16 * c) * TROW + ty + 16 * r] = x[r][c];
}

// P o Z: the thread's P of tile (i0.., j0..) times the dropout's factors, in place.
__device__ __forceinline__ void apply_dropout(const Dropout& drop, int b, int h, int i0, int j0,
                                              float p[4][4]) {
    if (!drop.enabled) return;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int r = 0; r < 4; r++) {
        const u32 key = row_key(drop, b, h, i0 + ty + 16 * r);
#pragma unroll
        for (int c = 0; c < 4; c++) p[r][c] *= dropout_factor(drop, key, j0 + tx + 16 * c);
    }
}

// Writes the thread's (P o Z)^T and dS^T of tile (i0.., j0..) into [BC][BR + 4] tiles.
__device__ __forceinline__ void store_pz_ds_transposed(const Dropout& drop, int b, int h, int i0,
                                                       int j0, const float p[4][4],
                                                       const float ds[4][4], float* PT,
                                                       float* dST) {
    float pz[4][4];
#pragma unroll
    for (int r = 0; r < 4; r++)
#pragma unroll
        for (int c = 0; c < 4; c++) pz[r][c] = p[r][c];
    apply_dropout(drop, b, h, i0, j0, pz);
    store_transposed(pz, PT);
    store_transposed(ds, dST);
}

// acc[r][.] += A[ty + 16r][.] X[., tx*CW ..]: the thread's rows of a 64 x 64 tile A in
// shared memory (rows padded to BC + 4; BR = BC) times the 64 rows of X, four at a time —
// dV_j += (P Z)^T dO_i and dK_j += dS^T Q_i, or dQ_i += dS K_j.
template <int D>
__device__ __forceinline__ void accumulate_tile_product(const float* A, const float* X,
                                                        float acc[4][D / 16]) {
    constexpr int CW = D / 16;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll 2
    for (int rr = 0; rr < BR; rr += 4) {
        float4 t[4];
#pragma unroll
        for (int r = 0; r < 4; r++) t[r] = *reinterpret_cast<const float4*>(A + (ty + 16 * r) * TROW + rr);
#pragma unroll
        for (int u = 0; u < 4; u++) {
            float xv[CW];
            load_thread_cols<D>(xv, X + (rr + u) * ROW, tx);
#pragma unroll
            for (int r = 0; r < 4; r++) {
                const float tu = lane(t[r], u);
#pragma unroll
                for (int c = 0; c < CW; c++) acc[r][c] = fmaf(tu, xv[c], acc[r][c]);
            }
        }
    }
}

// dV_j += (P Z)^T dO_i and dK_j += dS^T Q_i (unscaled) for the thread's keys ty + 16r and
// columns tx*CW ...
template <int D>
__device__ __forceinline__ void accumulate_dk_dv(const float* PT, const float* dST,
                                                 const float* dOs, const float* Qs,
                                                 float dk[4][D / 16], float dv[4][D / 16]) {
    accumulate_tile_product<D>(PT, dOs, dv);
    accumulate_tile_product<D>(dST, Qs, dk);
}

// One (query tile i0, key tile j0) step of a backward that holds K_j, V_j and accumulates
// dK_j, dV_j (FlashAttention-1's Algorithm 4, FlashAttention-2's key-tile kernel): Q_i and
// dO_i into shared memory, P and dS recomputed, (P Z)^T and dS^T stored, then
// dV_j += (P Z)^T dO_i and dK_j += dS^T Q_i. dS^T stays in dST for the caller's dQ.
template <int D>
__device__ __forceinline__ void backward_step(const FlashArgs& a, const ScoreMods& mods,
                                              const Dropout& drop, const BlockHead& hd, int i0,
                                              int j0, float* Qs, float* dOs, const float* Ks,
                                              const float* Vs, float* PT, float* dST,
                                              float (*dk)[D / 16], float (*dv)[D / 16]) {
    __syncthreads();  // the previous step's tiles are no longer read
    load_tile4<D>(Qs, hd.q, i0, a.n_q);
    load_tile4<D>(dOs, hd.d_out, i0, a.n_q);
    __syncthreads();
    float p[4][4], ds[4][4];
    tile_p_ds<D>(a, mods, drop, hd.b, hd.h, hd.z, i0, j0, Qs, dOs, Ks, Vs, p, ds);
    store_pz_ds_transposed(drop, hd.b, hd.h, i0, j0, p, ds, PT, dST);
    __syncthreads();
    accumulate_dk_dv<D>(PT, dST, dOs, Qs, dk, dv);  // dV_j += (P Z)^T dO_i, dK_j += dS^T Q_i
}

// acc = dS[ty + 16r][.] K_j[., tx*CW ..] over the tile's keys (dS^T as stored above), for
// the dQ of query row ty + 16r.
template <int D>
__device__ __forceinline__ void ds_times_k(const float* dST, const float* Ks, int r, float acc[D / 16]) {
    constexpr int CW = D / 16;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int c = 0; c < CW; c++) acc[c] = 0.0f;
    for (int cc = 0; cc < BC; cc++) {
        const float d_s = dST[cc * TROW + ty + 16 * r];
        float kv[CW];
        load_thread_cols<D>(kv, Ks + cc * ROW, tx);
#pragma unroll
        for (int c = 0; c < CW; c++) acc[c] = fmaf(d_s, kv[c], acc[c]);
    }
}

// Writes the thread's dK_j (times the scale) and dV_j rows into per-query-head [.., n_k, D].
template <int D>
__device__ __forceinline__ void store_dk_dv(const FlashArgs& a, int z, int j0,
                                            const float dk[4][D / 16], const float dv[4][D / 16]) {
    constexpr int CW = D / 16;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    float* dK = (float*)a.dk + (i64)z * a.n_k * D;
    float* dV = (float*)a.dv + (i64)z * a.n_k * D;
#pragma unroll
    for (int r = 0; r < 4; r++) {
        const int j = j0 + ty + 16 * r;
        if (j >= a.n_k) continue;
#pragma unroll
        for (int c = 0; c < CW; c++) {
            dK[(i64)j * D + thread_col<D>(tx, c)] = a.scale * dk[r][c];
            dV[(i64)j * D + thread_col<D>(tx, c)] = dv[r][c];
        }
    }
}
