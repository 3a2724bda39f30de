// FlashAttention-2 as fused CUDA kernels, fp32. Forward version 1: shared-memory tiles,
// register tiling 4 x 4 per thread; version 2 (below): the same with 16-byte shared-memory
// reads. Tiles of BR = 64 query rows and BC = 64 keys; 256 threads as a
// 16 x 16 grid (ty, tx): thread (ty, tx) owns score rows ty + 16a and columns tx + 16b of a
// tile, and output rows ty + 16a, columns tx + 16b. The 16 threads of one ty are 16
// consecutive lanes of a warp, so a row's max and sum are reduced with 4 shuffles.
//
// Layouts: Q, O, dO, dQ [b, h, n_q, D]; K, V, dK, dV [b, kv_heads, n_k, D]; lse, Dvec
// [b, h, n_q]. Shared-memory rows are padded to D + 1 floats (odd stride: no bank conflicts
// when 16 threads read 16 different rows).

// Copies rows row0 .. row0 + ROWS of a [n, D] matrix into shared memory (zeros past n).
template <int D, int ROWS>
__device__ __forceinline__ void load_tile(float* dst, const float* src, int row0, int n) {
    for (int e = threadIdx.x; e < ROWS * D; e += NT) {
        int r = e / D, c = e % D;
        dst[r * (D + 1) + c] = row0 + r < n ? src[(i64)(row0 + r) * D + c] : 0.0f;
    }
}

// ---------------------------------------------------------------------------------------
// ANCHOR: forward
// Forward: one block per (query tile, batch*head). K_j, V_j stream through shared memory;
// the running max m, sum l and the output O stay in registers; O is divided by l once at
// the end and lse = m + log l is written once.
template <int D>
__device__ void flash_forward(const FlashArgs& a, const ScoreMods& mods, const Dropout& drop) {
    extern __shared__ float smem[];
    float* Qs = smem;                  // [BR][D + 1]
    float* KVs = Qs + BR * (D + 1);    // [BC][D + 1]: K_j, then V_j
    float* Ps = KVs + BC * (D + 1);    // [BR][BC + 1]
    constexpr int RD = D / 16;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    const auto [z, b, h, q, dout, k, v] = block_head<D>(a, blockIdx.y);
    const int i0 = blockIdx.x * BR;

    load_tile<D, BR>(Qs, q, i0, a.n_q);
    float m[4], l[4], o[4][RD];
    u32 key[4];
    start_rows<D>(drop, b, h, i0, m, l, o, key);  // m = -inf, l = 0, O = 0, dropout row keys
    // Causal: key tiles at or past key_end(last row) are hidden from the whole tile.
    const int last = min(i0 + BR, a.n_q) - 1;
    const int j_end = key_end(mods, last);

    for (int j0 = 0; j0 < j_end; j0 += BC) {
        __syncthreads();  // the previous V_j and P are no longer read
        load_tile<D, BC>(KVs, k, j0, a.n_k);
        __syncthreads();
        // S = Q_i K_j^T, 4 x 4 per thread
        float s[4][4] = {};
        for (int d = 0; d < D; d++) {
            float qv[4], kv[4];
            for (int r = 0; r < 4; r++) qv[r] = Qs[(ty + 16 * r) * (D + 1) + d];
            for (int c = 0; c < 4; c++) kv[c] = KVs[(tx + 16 * c) * (D + 1) + d];
            for (int r = 0; r < 4; r++)
                for (int c = 0; c < 4; c++) s[r][c] = fmaf(qv[r], kv[c], s[r][c]);
        }
        const bool plain = tile_plain(mods, i0, j0);
        for (int r = 0; r < 4; r++) {
            const int i = i0 + ty + 16 * r;
            float mx = NEG_INF;
            for (int c = 0; c < 4; c++) {
                s[r][c] = score(mods, plain, a.scale, b, h, i, j0 + tx + 16 * c, s[r][c]);
                mx = fmaxf(mx, s[r][c]);
            }
            // online softmax: new max, rescale what was accumulated, add this tile
            const float m_new = fmaxf(m[r], row_max16(mx));
            const float alpha = m[r] == NEG_INF ? 0.0f : expf(m[r] - m_new);
            float sum = 0.0f;
            for (int c = 0; c < 4; c++) {
                const int j = j0 + tx + 16 * c;
                float p = s[r][c] == NEG_INF ? 0.0f : expf(s[r][c] - m_new);
                sum += p;
                if (drop.enabled) p *= dropout_factor(drop, key[r], j);
                Ps[(ty + 16 * r) * (BC + 1) + tx + 16 * c] = p;
            }
            l[r] = alpha * l[r] + row_sum16(sum);
            m[r] = m_new;
            for (int c = 0; c < RD; c++) o[r][c] *= alpha;
        }
        __syncthreads();  // P complete, K_j no longer read
        load_tile<D, BC>(KVs, v, j0, a.n_k);
        __syncthreads();
        // O += P V_j
        for (int c2 = 0; c2 < BC; c2++) {
            float pv[4], vv[RD];
            for (int r = 0; r < 4; r++) pv[r] = Ps[(ty + 16 * r) * (BC + 1) + c2];
            for (int c = 0; c < RD; c++) vv[c] = KVs[c2 * (D + 1) + tx + 16 * c];
            for (int r = 0; r < 4; r++)
                for (int c = 0; c < RD; c++) o[r][c] = fmaf(pv[r], vv[c], o[r][c]);
        }
    }
    float* out = (float*)a.o + (i64)z * a.n_q * D;
    float* lse = (float*)a.lse + (i64)z * a.n_q;
    for (int r = 0; r < 4; r++) {
        const int i = i0 + ty + 16 * r;
        if (i >= a.n_q) continue;
        const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
        for (int c = 0; c < RD; c++) out[(i64)i * D + tx + 16 * c] = o[r][c] * inv;
        if (tx == 0) lse[i] = l[r] > 0.0f ? m[r] + logf(l[r]) : NEG_INF;
    }
}
// ANCHOR_END: forward

// ---------------------------------------------------------------------------------------
// ANCHOR: forward_v2
// Forward, version 2: the same algorithm as version 1 with 16-byte shared-memory reads.
// Rows of Q, K, V and P are padded to a multiple of 4 floats (D + 4), each thread reads 4
// consecutive values of a row at once, and a thread owns D/16 *consecutive* output columns
// (tx·D/16 ..), so that V and O move as float4 (float2 where D/16 is not a multiple of 4).
// Per 4 steps of the dot products a warp now issues 12 shared-memory wavefronts for 64 FMAs
// each thread, against 32 in version 1.
template <int D>
__device__ void flash_forward_v2(const FlashArgs& a, const ScoreMods& mods, const Dropout& drop) {
    extern __shared__ float4 smem4[];
    float* Qs = reinterpret_cast<float*>(smem4);  // [BR][D + 4]
    float* KVs = Qs + BR * ROW;                   // [BC][D + 4]: K_j, then V_j
    float* Ps = KVs + BC * ROW;                   // [BR][BC + 4]
    constexpr int CW = D / 16;                    // output columns per thread
    const auto [z, b, h, q, dout, k, v] = block_head<D>(a, blockIdx.y);
    const int i0 = blockIdx.x * BR;

    load_tile4<D>(Qs, q, i0, a.n_q);
    float m[4], l[4], o[4][CW];
    u32 key[4];
    start_rows<D>(drop, b, h, i0, m, l, o, key);  // m = -inf, l = 0, O = 0, dropout row keys
    const int last = min(i0 + BR, a.n_q) - 1;
    const int j_end = key_end(mods, last);

    for (int j0 = 0; j0 < j_end; j0 += BC) {
        __syncthreads();
        load_tile4<D>(KVs, k, j0, a.n_k);
        __syncthreads();
        float s[4][4];
        tile_scores<D>(Qs, KVs, s);
        online_softmax_step<D, false>(a, mods, drop, b, h, i0, j0, s, m, l, o, key, Ps);
        __syncthreads();
        load_tile4<D>(KVs, v, j0, a.n_k);
        __syncthreads();
        accumulate_pv<D, false>(Ps, KVs, o);  // O += P V_j
    }
    write_forward_rows<D, false, false>(a, z, i0, m, l, o);
}
// ANCHOR_END: forward_v2

// ---------------------------------------------------------------------------------------
// Backward (Algorithm 2 of the FlashAttention-2 paper, with dQ in its own pass).

// (D_i = rowsum(dO_i * O_i) comes from attention.cu's row_dot, shared with stages 1-3.)

// dK_j, dV_j: one block per (key tile, batch*head), looping over the query tiles that can
// see it; dK and dV accumulate in registers (keys ty + 16r, columns tx*CW ..). Written per
// query head into dk/dv (the host sums the heads of a GQA group afterwards).
template <int D, bool ATOMIC_DQ>
__device__ void flash_backward_kv(const FlashArgs& a, const ScoreMods& mods, const Dropout& drop) {
    extern __shared__ float4 smem4[];
    float* Ks = reinterpret_cast<float*>(smem4);
    float* Vs = Ks + BC * ROW;
    float* Qs = Vs + BC * ROW;
    float* dOs = Qs + BR * ROW;
    float* PT = dOs + BR * ROW;       // [BC][BR + 4]: (P Z)^T
    float* dST = PT + BC * TROW;      // [BC][BR + 4]: dS^T
    constexpr int CW = D / 16;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    const BlockHead hd = block_head<D>(a, blockIdx.y);
    const auto [z, b, h, q, dout, k, v] = hd;
    const int j0 = blockIdx.x * BC;

    load_tile4<D>(Ks, k, j0, a.n_k);
    load_tile4<D>(Vs, v, j0, a.n_k);
    float dk[4][CW] = {}, dv[4][CW] = {};
    // Causal: query i sees key j0 when j0 < key_end(i), i.e. i >= j0 + n_q - n_k.
    int i_start = 0;
    if (mods.causal) i_start = max(0, j0 + a.n_q - a.n_k) / BR * BR;
    for (int i0 = i_start; i0 < a.n_q; i0 += BR) {
        backward_step<D>(a, mods, drop, hd, i0, j0, Qs, dOs, Ks, Vs, PT, dST, dk, dv);
        if constexpr (ATOMIC_DQ) {
            // The paper's choice: dQ_i += tau dS K_j added into device memory from every key
            // tile's block (floating-point additions in arrival order: not reproducible).
            float* dQ = (float*)a.dq + (i64)z * a.n_q * D;
#pragma unroll
            for (int r = 0; r < 4; r++) {
                const int i = i0 + ty + 16 * r;
                float acc[CW];
                ds_times_k<D>(dST, Ks, r, acc);
                if (i < a.n_q)
#pragma unroll
                    for (int c = 0; c < CW; c++) atomicAdd(dQ + (i64)i * D + thread_col<D>(tx, c), a.scale * acc[c]);
            }
        }
    }
    store_dk_dv<D>(a, z, j0, dk, dv);  // per query head: [b, h, n_k, D]
}

// dQ_i: one block per (query tile, batch*head), looping over the key tiles it sees.
template <int D>
__device__ void flash_backward_q(const FlashArgs& a, const ScoreMods& mods, const Dropout& drop) {
    extern __shared__ float4 smem4[];
    float* Qs = reinterpret_cast<float*>(smem4);
    float* dOs = Qs + BR * ROW;
    float* Ks = dOs + BR * ROW;
    float* Vs = Ks + BC * ROW;
    float* dSt = Vs + BC * ROW;        // [BR][BC + 4]
    constexpr int CW = D / 16;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    const auto [z, b, h, q, dout, k, v] = block_head<D>(a, blockIdx.y);
    const int i0 = blockIdx.x * BR;

    load_tile4<D>(Qs, q, i0, a.n_q);
    load_tile4<D>(dOs, dout, i0, a.n_q);
    float dq[4][CW] = {};
    const int last = min(i0 + BR, a.n_q) - 1;
    const int j_end = key_end(mods, last);
    for (int j0 = 0; j0 < j_end; j0 += BC) {
        __syncthreads();
        load_tile4<D>(Ks, k, j0, a.n_k);
        load_tile4<D>(Vs, v, j0, a.n_k);
        __syncthreads();
        float p[4][4], ds[4][4];
        tile_p_ds<D>(a, mods, drop, b, h, z, i0, j0, Qs, dOs, Ks, Vs, p, ds);
#pragma unroll
        for (int r = 0; r < 4; r++)
#pragma unroll
            for (int c = 0; c < 4; c++) dSt[(ty + 16 * r) * TROW + tx + 16 * c] = ds[r][c];
        __syncthreads();
        // dQ_i += dS K_j: four keys at a time
#pragma unroll 2
        for (int cc = 0; cc < BC; cc += 4) {
            float4 dsv[4];
#pragma unroll
            for (int r = 0; r < 4; r++)
                dsv[r] = *reinterpret_cast<const float4*>(dSt + (ty + 16 * r) * TROW + cc);
#pragma unroll
            for (int u = 0; u < 4; u++) {
                float kv[CW];
                load_thread_cols<D>(kv, Ks + (cc + u) * ROW, tx);
#pragma unroll
                for (int r = 0; r < 4; r++) {
                    const float du = lane(dsv[r], u);
#pragma unroll
                    for (int c = 0; c < CW; c++) dq[r][c] = fmaf(du, kv[c], dq[r][c]);
                }
            }
        }
    }
    float* dQ = (float*)a.dq + (i64)z * a.n_q * D;
#pragma unroll
    for (int r = 0; r < 4; r++) {
        const int i = i0 + ty + 16 * r;
        if (i >= a.n_q) continue;
#pragma unroll
        for (int c = 0; c < CW; c++) dQ[(i64)i * D + thread_col<D>(tx, c)] = a.scale * dq[r][c];
    }
}

// ---------------------------------------------------------------------------------------
// ANCHOR: forward_v3
// Forward, version 3: version 2 with asynchronous tile loads. K_j and V_j go to separate
// buffers through cp.async (sm_80+), issued together at the top of each step: the block
// waits for K_j only, computes S while V_j is still arriving, and P reuses K_j's buffer.
// Exponentials in base 2 (scores pre-multiplied by log2 e: one ex2 instruction each).
// (Before sm_80 there is no cp.async: plain copies, and the waits do nothing; cp_async16 and
// the waits are in tiles.cuh.)
template <int D>
__device__ __forceinline__ void load_tile_async(float* dst, const float* src, int row0, int n) {
    constexpr int V4 = D / 4;
    for (int e = threadIdx.x; e < 64 * V4; e += NT) {
        const int r = e / V4, c = (e % V4) * 4;
        const bool ok = row0 + r < n;
        cp_async16(dst + r * (D + 4) + c, ok ? src + (i64)(row0 + r) * D + c : src, ok);
    }
}

// R: rows a thread (ty + 16r), so a block takes 16R query rows; 4 up to version 5, 8 in
// version 6 (below). P goes in K_j's buffer when it fits there (R = 4, D >= 64).
// PREFETCH (version 7): K_{j+1} is loaded into a second buffer while step j runs.
template <int D, bool SPREAD, int R, bool PREFETCH = false>
__device__ void flash_forward_v3(const FlashArgs& a, const ScoreMods& mods, const Dropout& drop) {
    constexpr int ROWS = 16 * R, CW = D / 16;
    constexpr bool P_IN_K = R == 4 && D >= 64;
    extern __shared__ float4 smem4[];
    float* Qs = reinterpret_cast<float*>(smem4);        // [ROWS][D + 4]
    float* Kb = Qs + ROWS * ROW;                        // [BC][D + 4], two with PREFETCH
    float* Vs = Kb + (PREFETCH ? 2 : 1) * BC * ROW;     // [BC][D + 4]
    float* Pb = Vs + BC * ROW;                          // [ROWS][BC + 4] unless P_IN_K
    const auto [z, b, h, q, dout, k, v] = block_head<D>(a, blockIdx.y);
    const int i0 = blockIdx.x * ROWS;

    load_tile4<D, ROWS>(Qs, q, i0, a.n_q);
    float m[R], l[R], o[R][CW];  // m in base-2 units: max of s * log2 e
    u32 key[R];
    start_rows<D, R>(drop, b, h, i0, m, l, o, key);  // m = -inf, l = 0, O = 0, dropout keys
    const int last = min(i0 + ROWS, a.n_q) - 1;
    const int j_end = key_end(mods, last);

    if (PREFETCH && j_end > 0) {
        load_tile_async<D>(Kb, k, 0, a.n_k);  // K_0
        cp_async_commit();
    }
    for (int j0 = 0; j0 < j_end; j0 += BC) {
        __syncthreads();  // P, V_j-1 and the other K buffer are no longer read
        float* Ks = PREFETCH && (j0 / BC) % 2 ? Kb + BC * ROW : Kb;
        float* Ps = P_IN_K ? Ks : Pb;
        if (!PREFETCH) {
            load_tile_async<D>(Ks, k, j0, a.n_k);
            cp_async_commit();
        }
        load_tile_async<D>(Vs, v, j0, a.n_k);
        cp_async_commit();
        if (PREFETCH) {
            float* next = Ks == Kb ? Kb + BC * ROW : Kb;
            if (j0 + BC < j_end) load_tile_async<D>(next, k, j0 + BC, a.n_k);  // K_j+1
            cp_async_commit();  // (an empty group after the last tile keeps the count)
            cp_async_wait<2>();  // K_j has arrived (V_j and K_j+1 may still be on their way)
        } else {
            cp_async_wait<1>();  // K_j has arrived (V_j may still be on its way)
        }
        __syncthreads();
        float s[R][4];
        tile_scores<D, R>(Qs, Ks, s);
        if (P_IN_K) __syncthreads();  // every thread is done with K_j before P overwrites it
        online_softmax_step<D, true, R>(a, mods, drop, b, h, i0, j0, s, m, l, o, key, Ps);
        if (PREFETCH) cp_async_wait<1>();  // V_j has arrived
        else cp_async_wait<0>();
        __syncthreads();  // and P is complete
        accumulate_pv<D, SPREAD, R>(Ps, Vs, o);
    }
    write_forward_rows<D, true, SPREAD, R>(a, z, i0, m, l, o);  // lse = ln 2 · m + ln l
}
// ANCHOR_END: forward_v3

// ANCHOR: forward_v4
// Forward, version 4: version 3's code, compiled for two resident blocks per SM
// (__launch_bounds__(NT, 2): at most 128 registers a thread). At D = 128 version 3 takes
// 172 registers, so 256 threads use 44 K of the SM's 64 K registers and only one block
// (8 warps) fits, although its 101 KiB of shared memory would allow two. Capped at 128
// registers it spills 32 bytes a thread (to L1) and two blocks, 16 warps, share the SM:
// twice the warps to hide shared-memory and exponential latencies. At D <= 64 version 3
// already fits in 128 registers, so the two are the same code there.
// ANCHOR_END: forward_v4

// ANCHOR: forward_v5
// Forward, version 5: version 4 with the output columns of a thread spread in float4 chunks
// 64 apart (thread_col in tiles.cuh). Since version 2 a thread owned D/16 consecutive
// columns; at D = 128 that is 8 floats, so the 16 lanes of a row read V_j 32 bytes apart
// and every read of V_j was a 4-way bank conflict. Nsight Compute put the shared-memory
// pipe at 84 % busy in version 4, the kernel's limit. Only D = 128 changes.
// ANCHOR_END: forward_v5

// ANCHOR: forward_v6
// Forward, version 6: version 5 with twice the rows a thread. A block takes 128 query rows
// (R = 8 rows a thread, ty + 16r) against the same 64-key tiles: each float4 of K_j read from
// shared memory now feeds 8 rows of scores instead of 4, each float4 of V_j 8 rows of O.
// Per 4 steps of the score product a warp issues 16 shared-memory wavefronts for 128 FMAs
// a thread (version 5: 12 for 64), and 24 for 256 in P V_j (version 5: 20 for 128). The
// price: 64 accumulators of O a thread at D = 128 and 170 KiB of shared memory, so one
// block of 8 warps per SM — the FMAs in flight come from each thread's longer rows instead.
// P has its own buffer (128 rows no longer fit in K_j's). The same code as version 3 with
// R = 8 (flash_forward_v3 above).
// ANCHOR_END: forward_v6

// ANCHOR: forward_v7
// Forward, version 7: version 6 with K_j+1 prefetched. Version 6 runs one block of 8 warps
// per SM, so while its threads wait for K_j at the top of a step (a global-memory latency,
// ~1 µs) the SM has nothing else to run. Here K has two buffers: at the top of step j the
// block issues V_j and K_j+1 together, and K_j, requested one step earlier, is already
// there. V_j still arrives during the score product, as in version 3. 33 KiB more shared
// memory at D = 128 (203 KiB in all, under the H100's 227 KiB a block).
// ANCHOR_END: forward_v7

#define FLASH_KERNELS(D)                                                                   \
    extern "C" __global__ void __launch_bounds__(NT)                                       \
        flash2_forward_v1_d##D(FlashArgs a, ScoreMods m, Dropout dr) {                     \
        flash_forward<D>(a, m, dr);                                                        \
    }                                                                                      \
    extern "C" __global__ void __launch_bounds__(NT)                                       \
        flash2_forward_v2_d##D(FlashArgs a, ScoreMods m, Dropout dr) {                     \
        flash_forward_v2<D>(a, m, dr);                                                     \
    }                                                                                      \
    extern "C" __global__ void __launch_bounds__(NT)                                       \
        flash2_forward_v3_d##D(FlashArgs a, ScoreMods m, Dropout dr) {                     \
        flash_forward_v3<D, false, 4>(a, m, dr);                                           \
    }                                                                                      \
    extern "C" __global__ void __launch_bounds__(NT, 2)                                    \
        flash2_forward_v4_d##D(FlashArgs a, ScoreMods m, Dropout dr) {                     \
        flash_forward_v3<D, false, 4>(a, m, dr);                                           \
    }                                                                                      \
    extern "C" __global__ void __launch_bounds__(NT, 2)                                    \
        flash2_forward_v5_d##D(FlashArgs a, ScoreMods m, Dropout dr) {                     \
        flash_forward_v3<D, true, 4>(a, m, dr);                                            \
    }                                                                                      \
    extern "C" __global__ void __launch_bounds__(NT)                                       \
        flash2_forward_v6_d##D(FlashArgs a, ScoreMods m, Dropout dr) {                     \
        flash_forward_v3<D, true, 8>(a, m, dr);                                            \
    }                                                                                      \
    extern "C" __global__ void __launch_bounds__(NT)                                       \
        flash2_forward_v7_d##D(FlashArgs a, ScoreMods m, Dropout dr) {                     \
        flash_forward_v3<D, true, 8, true>(a, m, dr);                                      \
    }                                                                                      \
    extern "C" __global__ void __launch_bounds__(NT)                                       \
        flash2_backward_kv_d##D(FlashArgs a, ScoreMods m, Dropout dr) {                    \
        flash_backward_kv<D, false>(a, m, dr);                                             \
    }                                                                                      \
    extern "C" __global__ void __launch_bounds__(NT)                                       \
        flash2_backward_kv_atomic_dq_d##D(FlashArgs a, ScoreMods m, Dropout dr) {          \
        flash_backward_kv<D, true>(a, m, dr);                                              \
    }                                                                                      \
    extern "C" __global__ void __launch_bounds__(NT)                                       \
        flash2_backward_q_d##D(FlashArgs a, ScoreMods m, Dropout dr) {                     \
        flash_backward_q<D>(a, m, dr);                                                     \
    }
FLASH_KERNELS(32)
FLASH_KERNELS(64)
FLASH_KERNELS(96)
FLASH_KERNELS(128)
