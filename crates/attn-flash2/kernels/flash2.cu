// FlashAttention-2 on the CUDA cores, fp32, as the stage runs it: the backward (dK, dV over
// key tiles, dQ by atomics or, deterministic, in a pass of its own over query tiles) on every
// GPU, and the forward on GPUs before sm_80 (from sm_80 on the forward runs on the tensor
// cores, flash2_tf32.cu). Tiles of 64 query rows (128 in the forward at d = 128) and 64 keys.
// Layouts: Q, O, dO, dQ [b, h, n_q, D]; K, V, dK, dV [b, kv_heads, n_k, D]; lse, Dvec
// [b, h, n_q]. 256 threads as a 16 x 16 grid (ty, tx): thread (ty, tx) owns score rows
// ty + 16a and columns tx + 16b of a tile. The 16 threads of one ty are 16 consecutive lanes
// of a warp, so a row's max and sum are reduced with 4 shuffles. Prepended: contract.cuh and
// tiles.cuh (attn-cuda).

// ---------------------------------------------------------------------------------------
// Backward (Algorithm 2 of the FlashAttention-2 paper, with dQ in its own pass).

// (D_i = rowsum(dO_i * O_i) comes from attn-cuda's row_dot, shared with stages 1-3.)

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
    // Causal (or a window's right side): rows before query_start(j0) cannot see key j0.
    const int i_start = query_start(mods, j0) / BR * BR;
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
        accumulate_tile_product<D>(dSt, Ks, dq);  // dQ_i += dS K_j
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
// Forward, versions 3, 5 and 7 (one body, three configurations; the ladder's registry, in
// src/gpu/versions.rs, says what each changed). Version 3: asynchronous tile loads. K_j and V_j go to separate
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


// Version 5: version 3 with output columns spread in float4 chunks 64 apart (no bank
// conflicts at d = 128) and at most 128 registers a thread, so that two blocks share a SM.
// Version 7: 128 query rows a block (8 a thread: each float4 of K_j or V_j read feeds twice
// the FMAs) and K_j+1 prefetched into a second buffer — the faster of the two at d = 128.
#define FLASH_KERNELS(D)                                                                   \
    extern "C" __global__ void __launch_bounds__(NT, 2)                                    \
        flash2_forward_v5_d##D(FlashArgs a, ScoreMods m, Dropout dr) {                     \
        flash_forward_v3<D, true, 4>(a, m, dr);                                            \
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
        flash_backward_q<D>(without_dbias(a), m, dr); /* the key pass adds dBias */        \
    }
FLASH_KERNELS(32)
FLASH_KERNELS(64)
FLASH_KERNELS(96)
FLASH_KERNELS(128)
