// The contract every stage keeps, in CUDA: the dropout hash and the score modifiers (softcap,
// bias, ALiBi, boolean mask, causal masking and the sliding window, bottom-right aligned).
// Bit for bit what attn-core computes on the CPU (crates/attn-core/src/dropout.rs and
// problem.rs), so GPU and CPU drop the same weights and hide the same keys. Prepended by NVRTC to every stage's kernels.

typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

// -inf without math.h (NVRTC has no system headers).
#define NEG_INF __int_as_float(0xff800000)

// Chris Wellons' lowbias32.
__device__ __forceinline__ u32 mix32(u32 x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

// Dropout: weight (b, h, i, j) is kept when its hash is at least `threshold`, and then
// multiplied by keep_scale = 1 / (1 - p). `enabled` = 0: no dropout. A call that is a block
// of a larger problem (a ring's block) hashes the whole problem's positions: its query i and
// key j are q_off + i and k_off + j there (0, 0 for a call of its own).
struct Dropout {
    u64 seed;
    u32 threshold;
    float keep_scale;
    int enabled;
    u32 q_off;
    u32 k_off;
    int pad_;
};

// The hash of query row i's position (b, h, q_off + i), shared by the row's weights.
__device__ __forceinline__ u32 row_key(const Dropout& d, u32 b, u32 h, u32 i) {
    u32 x = mix32((u32)d.seed ^ 0x9e3779b9u);
    x = mix32(x ^ (u32)(d.seed >> 32));
    x = mix32(x ^ b);
    x = mix32(x ^ h);
    return mix32(x ^ (i + d.q_off));
}

__device__ __forceinline__ u32 element_hash(u32 key, u32 j) {
    return mix32(mix32(key ^ j) + key);
}

__device__ __forceinline__ float dropout_factor(const Dropout& d, u32 key, u32 j) {
    return element_hash(key, j + d.k_off) >= d.threshold ? d.keep_scale : 0.0f;
}

// What modifies a score S[b, h, i, j] = scale * q_i . k_j, in the contract's order: the
// softcap c * tanh(S / c), an additive bias, ALiBi's -slope * |i + diagonal - j|, then a
// boolean mask, causal masking and the sliding window. The bias and mask broadcast to
// [batch, heads, n_q, n_k] (stride 0 on a broadcast axis, null pointer when absent); the
// slopes are [batch or 1, heads]. Kept at 128 bytes (problem.rs asserts it): a larger kernel
// parameter is addressed through a pointer, its fields reloaded in the kernels' loops.
struct ScoreMods {
    u64 bias;                 // const float*
    i64 bias_stride[4];       // b, h, i, j, in elements
    u64 mask;                 // const unsigned char*, 1 keeps
    i64 mask_stride[4];
    u64 alibi;                // const float* slopes, or null
    int alibi_stride_b;       // heads, or 0 for one slope per head
    int diag;                 // query 0's diagonal key: n_k - n_q, or a block's in a larger problem
    int causal;
    int n_q;
    int n_k;
    int heads;                // query heads: a flat head index z = b * heads + h
    int left;                 // keys kept before query i's diagonal key; -1: all
    int right;                // keys kept after it (causal: 0); -1: all
    float softcap;            // 0: none
    float inv_softcap;        // 1 / softcap
};
static_assert(sizeof(ScoreMods) == 128, "ScoreMods must stay within 128 bytes");

// Query 0's diagonal key: n_k - n_q (bottom-right aligned); in a block of a larger problem
// (a ring's block), the whole problem's diagonal seen from the block's corner. A kernel that
// changes n_q or n_k (a packed sequence, a cache row) sets diag with them.
__device__ __forceinline__ int diagonal(const ScoreMods& m) {
    return m.diag;
}

// ANCHOR: key_range
// Query i sees keys key_start(i) .. key_end(i) - 1 around its diagonal key i + diagonal(m):
// the window's sides and causal masking (right = 0), as attn-core's KeyRange. Both bounds
// grow with i, so a tile of rows i0 .. i1 sees at most key_start(i0) .. key_end(i1) - 1.
__device__ __forceinline__ int key_end(const ScoreMods& m, int i) {
    if (m.right < 0) return m.n_k;
    long long e = (long long)i + diagonal(m) + m.right + 1;
    return (int)(e < 0 ? 0 : (e > m.n_k ? m.n_k : e));
}

__device__ __forceinline__ int key_start(const ScoreMods& m, int i) {
    if (m.left < 0) return 0;
    long long s = (long long)i + diagonal(m) - m.left;
    return (int)(s < 0 ? 0 : (s > m.n_k ? m.n_k : s));
}

// The first query that sees key j (0 when every query does), and one past the last.
__device__ __forceinline__ int query_start(const ScoreMods& m, int j) {
    if (m.right < 0) return 0;
    long long i = (long long)j - diagonal(m) - m.right;
    return (int)(i < 0 ? 0 : (i > m.n_q ? m.n_q : i));
}

__device__ __forceinline__ int query_end(const ScoreMods& m, int j) {
    if (m.left < 0) return m.n_q;
    long long i = (long long)j - diagonal(m) + m.left + 1;
    return (int)(i < 0 ? 0 : (i > m.n_q ? m.n_q : i));
}
// ANCHOR_END: key_range

// ANCHOR: softcap
// tanh(y) = 1 - 2 / (e^(2y) + 1): the hardware exp and reciprocal, exact at both saturations
// (e^(2y) = inf gives 1, 0 gives -1), within about 1e-7 of tanh in between — a few
// instructions where tanhf costs tens.
__device__ __forceinline__ float tanh_exp(float y) {
    return 1.0f - __fdividef(2.0f, __expf(2.0f * y) + 1.0f);
}

// Logit soft-capping, c * tanh(s / c).
__device__ __forceinline__ float softcap_score(const ScoreMods& m, float s) {
    return m.softcap * tanh_exp(s * m.inv_softcap);
}

// tanh for the 16-bit kernels: one special-function instruction (tanh.approx.f32, sm_75 on),
// within about 2^-11 of tanh relative — below the rounding that bf16 or fp16 inputs already
// put into the scores. (A rational approximation on the FMA units, tried first, cost the
// forward as much as the rest of its softmax: notes/gpu.md.)
__device__ __forceinline__ float tanh_approx(float y) {
#if __CUDA_ARCH__ >= 750
    float t;
    asm("tanh.approx.f32 %0, %1;" : "=f"(t) : "f"(y));
    return t;
#else
    return tanh_exp(y);
#endif
}
// ANCHOR_END: softcap

// EXT = false: a kernel only for calls without softcap, ALiBi or window, whose scores are cut
// by the mask and causal masking alone (fewer registers where a kernel has none to spare).
template <bool EXT = true>
__device__ __forceinline__ float modify_score(const ScoreMods& m, int b, int h, int i, int j, float s) {
    if (EXT && m.softcap > 0.0f) s = softcap_score(m, s);
    if (m.bias) {
        const float* bias = (const float*)m.bias;
        s += bias[b * m.bias_stride[0] + h * m.bias_stride[1] + i * m.bias_stride[2] + j * m.bias_stride[3]];
    }
    if (EXT && m.alibi) {
        const float slope = ((const float*)m.alibi)[b * m.alibi_stride_b + h];
        const i64 off = (i64)i + diagonal(m) - j;
        s -= slope * (float)(off < 0 ? -off : off);
    }
    if (m.mask) {
        const unsigned char* mask = (const unsigned char*)m.mask;
        if (!mask[b * m.mask_stride[0] + h * m.mask_stride[1] + i * m.mask_stride[2] + j * m.mask_stride[3]])
            s = NEG_INF;
    }
    if (j >= key_end(m, i) || (EXT && j < key_start(m, i))) s = NEG_INF;
    return s;
}

// ANCHOR: score_grad
// The backward's side of modify_score, for ds, the gradient of a modified score: added into
// dBias (the bias's shape and strides, zeroed; null when not asked for) at the bias's
// position, every broadcast axis summed by the atomics (a removed score's ds is 0 and adds
// nothing); then carried back through the softcap, times its slope 1 - tanh^2(s / c), s =
// scale * q_i . k_j the raw score. A pass that recomputes dS a second time (a separate dQ
// pass) gets dbias = null.
__device__ __forceinline__ float score_grad(const ScoreMods& m, float* dbias, int b, int h,
                                            int i, int j, float s, float ds) {
    if (dbias && ds != 0.0f)
        atomicAdd(dbias + b * m.bias_stride[0] + h * m.bias_stride[1] + i * m.bias_stride[2] +
                      j * m.bias_stride[3],
                  ds);
    if (m.softcap > 0.0f) {
        const float t = tanh_exp(s * m.inv_softcap);
        ds *= 1.0f - t * t;
    }
    return ds;
}
// ANCHOR_END: score_grad

// ---------------------------------------------------------------------------------------
// Two small steps of every backward, for any element type.

// D_i = rowsum(dO_i * O_i) over the rows of [rows, d], one warp a row (blocks of whole
// warps); `widen` reads an element as f32 (the identity for f32, 16-bit floats widened).
template <class T, class Widen>
__device__ __forceinline__ void row_dot_rows(const T* d_out, const T* out, float* D, i64 rows,
                                             int d, Widen widen) {
    const i64 row = (i64)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;
    float acc = 0.0f;
    for (int c = threadIdx.x % 32; c < d; c += 32)
        acc += widen(d_out[row * d + c]) * widen(out[row * d + c]);
    for (int o = 16; o > 0; o /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (threadIdx.x % 32 == 0) D[row] = acc;
}

// Sums the per-query-head dK or dV [b, heads, n_k, D] of each GQA group into
// [b, kv_heads, n_k, D]; store(e, sum) writes element e of the result (f32, or rounded).
// Blocks (x, y): y walks the result's slices bk = b * kv_heads + kvh (per_head_elems
// elements each), x the elements of a slice; where a slice's group starts in per_head is
// found once a slice, not by two 64-bit divisions an element. The group is summed in head
// order, so the result is the same bit for bit however the grid is cut.
template <class Store>
__device__ __forceinline__ void group_sum_rows(const float* per_head, int heads, int kv_heads,
                                               i64 per_head_elems, i64 total, Store store) {
    const int group = heads / kv_heads;
    for (i64 bk = blockIdx.y; bk < total / per_head_elems; bk += gridDim.y) {
        const float* first = per_head + (bk / kv_heads * heads + bk % kv_heads * group) * per_head_elems;
        for (i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x; e < per_head_elems;
             e += (i64)gridDim.x * blockDim.x) {
            float acc = 0.0f;
            for (int g = 0; g < group; g++) acc += first[e + g * per_head_elems];
            store(bk * per_head_elems + e, acc);
        }
    }
}
