// Ladder step 1 of the fp32 forward (parent: stage 3's fused kernel, attn-flash1): the
// FlashAttention-2 loop order on the GPU. What: one block per (query tile, batch·head) — the
// parallelism over query tiles that the paper adds — with Q_i in shared memory, K_j and V_j
// streaming through, the running max m, sum l and the output O in registers, O divided by l
// once at the end and lse = m + log l written once. Register tiling 4 x 4 per thread;
// shared-memory rows padded to D + 1 floats (odd stride: no bank conflicts when 16 threads
// read 16 different rows).
// Layouts: Q, O, dO, dQ [b, h, n_q, D]; K, V, dK, dV [b, kv_heads, n_k, D]; lse, Dvec
// [b, h, n_q]. 256 threads as a 16 x 16 grid (ty, tx): thread (ty, tx) owns score rows
// ty + 16a and columns tx + 16b of a tile. The 16 threads of one ty are 16 consecutive lanes
// of a warp, so a row's max and sum are reduced with 4 shuffles. Prepended: contract.cuh and
// tiles.cuh (attn-cuda).
// What it measured, with machine and date: the book's chapter "FlashAttention on the GPU" and
// notes/gpu.md.

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


#define FP32_LADDER_KERNELS(D)                                                             \
    extern "C" __global__ void __launch_bounds__(NT)                                       \
        flash2_forward_v1_d##D(FlashArgs a, ScoreMods m, Dropout dr) {                     \
        flash_forward<D>(a, m, dr);                                                        \
    }
FP32_LADDER_KERNELS(32)
FP32_LADDER_KERNELS(64)
FP32_LADDER_KERNELS(96)
FP32_LADDER_KERNELS(128)
