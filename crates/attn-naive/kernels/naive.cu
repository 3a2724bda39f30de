// Stage 1's own kernel: the softmax of whole rows of S. Prepended: contract.cuh, rows.cuh
// (attn-cuda); the products and the score modifiers are attn-cuda's products.cu.

// ANCHOR: softmax_rows
// Stage 1's softmax: one block per row of the whole score matrix. Writes P = exp(S - lse)
// in place and lse = m + log(l); a row with every key removed gets P = 0 and lse = -inf.
extern "C" __global__ void softmax_rows(float* s, float* lse, int rows, int cols) {
    __shared__ float scratch[32];
    const i64 row_index = (i64)blockIdx.y * rows + blockIdx.x;
    float* row = s + row_index * cols;
    const float m = row_max(row, cols, scratch);
    float l = 0.0f;
    if (m != NEG_INF)
        for (int c = threadIdx.x; c < cols; c += blockDim.x) l += expf(row[c] - m);
    l = block_sum(l, scratch);
    const float L = m == NEG_INF ? NEG_INF : m + logf(l);
    for (int c = threadIdx.x; c < cols; c += blockDim.x)
        row[c] = L == NEG_INF ? 0.0f : expf(row[c] - L);
    if (threadIdx.x == 0) lse[row_index] = L;
}
// ANCHOR_END: softmax_rows

