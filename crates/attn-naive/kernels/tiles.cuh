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
};

// Whether every score of the tile (rows i0.., keys j0..) is plain scale * q.k: no bias, no
// mask, no key past n_k and no causal limit inside it.
__device__ __forceinline__ bool tile_plain(const ScoreMods& m, int i0, int j0) {
    return !m.bias && !m.mask && j0 + BC <= m.n_k && (!m.causal || j0 + BC <= key_end(m, i0));
}

// The score of (i, j) from its dot product.
__device__ __forceinline__ float score(const ScoreMods& m, bool plain, float scale, int b, int h,
                                       int i, int j, float dot) {
    if (plain) return scale * dot;
    if (j >= m.n_k || i >= m.n_q) return NEG_INF;
    return modify_score(m, b, h, i, j, scale * dot);
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

template <int D>
__device__ __forceinline__ void load_tile4(float* dst, const float* src, int row0, int n) {
    constexpr int V4 = D / 4;
    for (int e = threadIdx.x; e < 64 * V4; e += NT) {
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

// Loads CW consecutive floats (float4s, or float2s when CW is not a multiple of 4).
template <int CW>
__device__ __forceinline__ void load_cols(float* dst, const float* src) {
    if constexpr (CW % 4 == 0) {
#pragma unroll
        for (int c = 0; c < CW; c += 4) {
            float4 x = *reinterpret_cast<const float4*>(src + c);
            dst[c] = x.x; dst[c + 1] = x.y; dst[c + 2] = x.z; dst[c + 3] = x.w;
        }
    } else {
#pragma unroll
        for (int c = 0; c < CW; c += 2) {
            float2 x = *reinterpret_cast<const float2*>(src + c);
            dst[c] = x.x; dst[c + 1] = x.y;
        }
    }
}

__device__ __forceinline__ float lane(const float4& x, int u) {
    return u == 0 ? x.x : u == 1 ? x.y : u == 2 ? x.z : x.w;
}

// Recomputes, for the tile (rows i0.., keys j0..) held in shared memory, P (undropped) and
// dS = P * (Z * dP - D) into the thread's registers (rows ty + 16r, keys tx + 16c);
// dP = dO V^T.
template <int D>
__device__ __forceinline__ void tile_p_ds(const FlashArgs& a, const ScoreMods& mods,
                                          const Dropout& drop, int b, int h, int z, int i0,
                                          int j0, const float* Qs, const float* dOs,
                                          const float* Ks, const float* Vs, float p[4][4],
                                          float ds[4][4]) {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    float s[4][4] = {}, dp[4][4] = {};
#pragma unroll 2
    for (int d = 0; d < D; d += 4) {
        float4 qv[4], dov[4], kv[4], vv[4];
#pragma unroll
        for (int r = 0; r < 4; r++) {
            qv[r] = *reinterpret_cast<const float4*>(Qs + (ty + 16 * r) * ROW + d);
            dov[r] = *reinterpret_cast<const float4*>(dOs + (ty + 16 * r) * ROW + d);
        }
#pragma unroll
        for (int c = 0; c < 4; c++) {
            kv[c] = *reinterpret_cast<const float4*>(Ks + (tx + 16 * c) * ROW + d);
            vv[c] = *reinterpret_cast<const float4*>(Vs + (tx + 16 * c) * ROW + d);
        }
#pragma unroll
        for (int r = 0; r < 4; r++)
#pragma unroll
            for (int c = 0; c < 4; c++) {
                s[r][c] = fmaf(qv[r].x, kv[c].x, s[r][c]);
                s[r][c] = fmaf(qv[r].y, kv[c].y, s[r][c]);
                s[r][c] = fmaf(qv[r].z, kv[c].z, s[r][c]);
                s[r][c] = fmaf(qv[r].w, kv[c].w, s[r][c]);
                dp[r][c] = fmaf(dov[r].x, vv[c].x, dp[r][c]);
                dp[r][c] = fmaf(dov[r].y, vv[c].y, dp[r][c]);
                dp[r][c] = fmaf(dov[r].z, vv[c].z, dp[r][c]);
                dp[r][c] = fmaf(dov[r].w, vv[c].w, dp[r][c]);
            }
    }
    const bool plain = tile_plain(mods, i0, j0);
    const float* lse = (const float*)a.lse + (i64)z * a.n_q;
    const float* dvec = (const float*)a.dvec + (i64)z * a.n_q;
#pragma unroll
    for (int r = 0; r < 4; r++) {
        const int i = i0 + ty + 16 * r;
        const float L = i < a.n_q ? lse[i] : NEG_INF;
        const float Di = i < a.n_q ? dvec[i] : 0.0f;
        const u32 key = drop.enabled ? row_key(drop.seed, b, h, i) : 0u;
#pragma unroll
        for (int c = 0; c < 4; c++) {
            const int j = j0 + tx + 16 * c;
            const float sc = score(mods, plain, a.scale, b, h, i, j, s[r][c]);
            const float pr = (L == NEG_INF || sc == NEG_INF) ? 0.0f : expf(sc - L);
            float g = dp[r][c];
            if (drop.enabled) g *= dropout_factor(drop, key, j);
            p[r][c] = pr;
            ds[r][c] = pr * (g - Di);
        }
    }
}

