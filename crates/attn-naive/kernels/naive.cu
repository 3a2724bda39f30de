// Stage 1's own kernel: the softmax of whole rows of S. Prepended: contract.cuh, rows.cuh
// (attn-cuda); the products and the score modifiers are attn-cuda's products.cu.

// ANCHOR: softmax_rows
// Folds the scores x (any number, any of them -inf) into a thread's running max mt and its
// sum lt of exp(x - mt), rescaling the sum when the max grows.
template <int N>
__device__ __forceinline__ void fold_scores(const float (&x)[N], float& mt, float& lt) {
    float xm = x[0];
#pragma unroll
    for (int e = 1; e < N; e++) xm = fmaxf(xm, x[e]);
    if (xm > mt) {
        lt = mt == NEG_INF ? 0.0f : lt * expf(mt - xm);
        mt = xm;
    }
    if (mt == NEG_INF) return;  // every score so far removed
#pragma unroll
    for (int e = 0; e < N; e++) lt += expf(x[e] - mt);
}

// Stage 1's softmax: one block per row of the whole score matrix. Writes P = exp(S - lse)
// in place and lse = m + log(l); a row with every key removed gets P = 0 and lse = -inf.
// The row is read twice: once for its max and exp-sum together (each thread keeps a running
// max and rescales its sum when the max grows, then the block combines them), once to write P;
// four scores a load where the row length allows 16-byte loads.
extern "C" __global__ void softmax_rows(float* s, float* lse, int rows, int cols) {
    __shared__ float scratch[32];
    const i64 row_index = (i64)blockIdx.y * rows + blockIdx.x;
    float* row = s + row_index * cols;
    const bool by4 = cols % 4 == 0;  // rows start on 16 bytes, as the buffer does
    float mt = NEG_INF, lt = 0.0f;
    if (by4) {
        for (int c = threadIdx.x; c < cols / 4; c += blockDim.x) {
            const float4 v = reinterpret_cast<const float4*>(row)[c];
            fold_scores<4>({v.x, v.y, v.z, v.w}, mt, lt);
        }
    } else {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) fold_scores<1>({row[c]}, mt, lt);
    }
    const float m = block_max(mt, scratch);
    const float l = block_sum(mt == NEG_INF ? 0.0f : lt * expf(mt - m), scratch);
    const float L = m == NEG_INF ? NEG_INF : m + logf(l);
    auto p = [L](float x) { return L == NEG_INF ? 0.0f : expf(x - L); };
    if (by4) {
        for (int c = threadIdx.x; c < cols / 4; c += blockDim.x) {
            float4& v = reinterpret_cast<float4*>(row)[c];
            v = make_float4(p(v.x), p(v.y), p(v.z), p(v.w));
        }
    } else {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) row[c] = p(row[c]);
    }
    if (threadIdx.x == 0) lse[row_index] = L;
}
// ANCHOR_END: softmax_rows

