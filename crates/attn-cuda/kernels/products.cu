// The kernels the unfused GPU stages share: the batched matrix product and the element-wise
// steps of attention on a *window* of score rows i0 .. i0 + rows and columns j0 .. j0 + cols
// of all Z = batch * heads heads at once. Naive attention's window is the whole matrix;
// chunked attention launches them once per chunk. Window buffers are [Z, rows, cols],
// row-major. Prepended: contract.cuh.

// ---------------------------------------------------------------------------------------
// Batched matrix product C = alpha * A B + beta * C with any strides, so one kernel does
// Q Kᵀ, P V, Pᵀ dO, dS K, dSᵀ Q without copies. Matrix z of an operand starts at
//   base + (z / zh) * sb + ((z % zh) / div) * sh
// (z / zh is the batch entry, z % zh the head; div > 1 maps query heads to their shared
// key/value head for GQA).
struct Operand {
    u64 ptr;     // float*
    i64 rs, cs;  // row and column strides
    i64 sb, sh;  // batch and head strides
    i64 base;
    int div;
    int pad_;
};

__device__ __forceinline__ i64 matrix_offset(const Operand& o, int z, int zh) {
    return o.base + (i64)(z / zh) * o.sb + (i64)((z % zh) / o.div) * o.sh;
}

// ANCHOR: gemm
// A thread block of 256 threads computes a BM x BN tile of C, (BM/16) x (BN/16) values per
// thread (rows ty + 16a, columns tx + 16b), from 8-deep slices of A and B staged in shared
// memory. Three tile shapes, chosen by the host for the matrix's shape.
#define BK 8

template <int BM, int BN>
__device__ __forceinline__ void gemm_tile(int m, int n, int k, int zh, float alpha,
                                          const Operand& A, const Operand& B, float beta,
                                          const Operand& C) {
    constexpr int RM = BM / 16, RN = BN / 16;
    __shared__ float As[BK][BM + 4];
    __shared__ float Bs[BK][BN + 4];
    const int z = blockIdx.z;
    const int row0 = blockIdx.y * BM, col0 = blockIdx.x * BN;
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const float* a = (const float*)A.ptr + matrix_offset(A, z, zh);
    const float* b = (const float*)B.ptr + matrix_offset(B, z, zh);
    float* c = (float*)C.ptr + matrix_offset(C, z, zh);

    float acc[RM][RN] = {};
    for (int k0 = 0; k0 < k; k0 += BK) {
        // Stage A[row0.., k0..] and B[k0.., col0..]; consecutive threads walk the operand's
        // unit-stride axis so that their loads coalesce.
#pragma unroll
        for (int l = 0; l < BM * BK / 256; l++) {
            int e = tid + 256 * l, r, kk;
            if (A.cs == 1) { r = e / BK; kk = e % BK; } else { kk = e / BM; r = e % BM; }
            int gr = row0 + r, gk = k0 + kk;
            As[kk][r] = (gr < m && gk < k) ? a[gr * A.rs + gk * A.cs] : 0.0f;
        }
#pragma unroll
        for (int l = 0; l < BN * BK / 256; l++) {
            int e = tid + 256 * l, cc, kk;
            if (B.cs == 1) { kk = e / BN; cc = e % BN; } else { cc = e / BK; kk = e % BK; }
            int gc = col0 + cc, gk = k0 + kk;
            Bs[kk][cc] = (gk < k && gc < n) ? b[gk * B.rs + gc * B.cs] : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < BK; kk++) {
            float av[RM], bv[RN];
#pragma unroll
            for (int i = 0; i < RM; i++) av[i] = As[kk][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < RN; j++) bv[j] = Bs[kk][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < RM; i++)
#pragma unroll
                for (int j = 0; j < RN; j++) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < RM; i++) {
        int r = row0 + ty + 16 * i;
        if (r >= m) continue;
#pragma unroll
        for (int j = 0; j < RN; j++) {
            int cc = col0 + tx + 16 * j;
            if (cc >= n) continue;
            float* p = c + r * C.rs + cc * C.cs;
            *p = beta == 0.0f ? alpha * acc[i][j] : fmaf(alpha, acc[i][j], beta * *p);
        }
    }
}

#define GEMM(BM, BN)                                                                      \
    extern "C" __global__ void __launch_bounds__(256) gemm_##BM##x##BN(                   \
        int m, int n, int k, int zh, float alpha, Operand A, Operand B, float beta,       \
        Operand C) {                                                                      \
        gemm_tile<BM, BN>(m, n, k, zh, alpha, A, B, beta, C);                             \
    }
GEMM(128, 128)
GEMM(128, 64)
GEMM(64, 64)
// ANCHOR_END: gemm

// ---------------------------------------------------------------------------------------
// Bias, mask and causal masking on a window of scaled scores, in place.
extern "C" __global__ void modify_scores(float* s, ScoreMods mods, int i0, int j0, int rows,
                                         int cols) {
    const int z = blockIdx.z;
    const int b = z / mods.heads, h = z % mods.heads;
    for (int r = blockIdx.y; r < rows; r += gridDim.y) {
        float* row = s + ((i64)z * rows + r) * cols;
        for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += gridDim.x * blockDim.x)
            row[c] = modify_score(mods, b, h, i0 + r, j0 + c, row[c]);
    }
}

// Dropout on a window of weights, in place: 0 or 1 / (1 - p), by the contract's hash.
extern "C" __global__ void apply_dropout(float* p, Dropout d, int heads, int i0, int j0,
                                         int rows, int cols) {
    const int z = blockIdx.z;
    for (int r = blockIdx.y; r < rows; r += gridDim.y) {
        const u32 key = row_key(d, z / heads, z % heads, i0 + r);
        float* row = p + ((i64)z * rows + r) * cols;
        for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += gridDim.x * blockDim.x)
            row[c] *= dropout_factor(d, key, j0 + c);
    }
}

// ---------------------------------------------------------------------------------------
// Backward.

// D_i = rowsum(dO_i * O_i), one warp per row of [Z * n_q, d].
extern "C" __global__ void row_dot(const float* d_out, const float* out, float* D, i64 rows,
                                   int d) {
    row_dot_rows(d_out, out, D, rows, d, [](float x) { return x; });
}

// P = exp(S - lse) on a window of modified scores, in place; lse is [Z, n_q].
extern "C" __global__ void probs_from_lse(float* s, const float* lse, int i0, int rows,
                                          int cols, int n_q) {
    const int z = blockIdx.z;
    for (int r = blockIdx.y; r < rows; r += gridDim.y) {
        const float L = lse[(i64)z * n_q + i0 + r];
        float* row = s + ((i64)z * rows + r) * cols;
        for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += gridDim.x * blockDim.x)
            row[c] = L == NEG_INF ? 0.0f : expf(row[c] - L);
    }
}

// dS = P * (Z * dP - D) on a window, written over dP (Z: the dropout factor).
extern "C" __global__ void ds_from_dp(const float* p, float* dp, const float* D, Dropout d,
                                      int heads, int i0, int j0, int rows, int cols, int n_q) {
    const int z = blockIdx.z;
    for (int r = blockIdx.y; r < rows; r += gridDim.y) {
        const float Di = D[(i64)z * n_q + i0 + r];
        const u32 key = d.enabled ? row_key(d, z / heads, z % heads, i0 + r) : 0u;
        const i64 off = ((i64)z * rows + r) * cols;
        for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += gridDim.x * blockDim.x) {
            float g = dp[off + c];
            if (d.enabled) g *= dropout_factor(d, key, j0 + c);
            dp[off + c] = p[off + c] * (g - Di);
        }
    }
}

// The raw scores' gradient on a window of dS, in place (score_grad: added into dbias unless
// null, the softcap's slope applied); s: the window's raw scores scale * Q K^T, null without
// softcap.
extern "C" __global__ void score_grads(float* ds, const float* s, float* dbias, ScoreMods mods,
                                       int i0, int j0, int rows, int cols) {
    const int z = blockIdx.z;
    const int b = z / mods.heads, h = z % mods.heads;
    for (int r = blockIdx.y; r < rows; r += gridDim.y) {
        const i64 off = ((i64)z * rows + r) * cols;
        for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += gridDim.x * blockDim.x)
            ds[off + c] =
                score_grad(mods, dbias, b, h, i0 + r, j0 + c, s ? s[off + c] : 0.0f, ds[off + c]);
    }
}

// ---------------------------------------------------------------------------------------
// Sums the per-query-head dK or dV [b, h, n_k, D] of each GQA group into [b, kv_heads, n_k, D].
extern "C" __global__ void group_sum(const float* per_head, float* out, int heads, int kv_heads,
                                     i64 per_head_elems, i64 total) {
    group_sum_rows(per_head, heads, kv_heads, per_head_elems, total,
                   [=](i64 e, float sum) { out[e] = sum; });
}

