// Stage 1's own kernel: the softmax of whole rows of S. Prepended: contract.cuh, rows.cuh
// (attn-cuda); the products and the score modifiers are attn-cuda's products.cu.

// ANCHOR: softmax_rows
// Stage 1's softmax: one block per row of the whole score matrix. Writes P = exp(S - lse)
// in place and lse = m + log(l); a row with every key removed gets P = 0 and lse = -inf.
// The row is read twice: once for its max and exp-sum together (each thread keeps a running
// max and rescales its sum when the max grows, then the block combines them), once to write P.
extern "C" __global__ void softmax_rows(float* s, float* lse, int rows, int cols) {
    __shared__ float scratch[32];
    const i64 row_index = (i64)blockIdx.y * rows + blockIdx.x;
    float* row = s + row_index * cols;
    float mt = NEG_INF, lt = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float x = row[c];
        if (x > mt) {
            lt = (mt == NEG_INF ? 0.0f : lt * expf(mt - x)) + 1.0f;
            mt = x;
        } else if (x != NEG_INF) {
            lt += expf(x - mt);
        }
    }
    const float m = block_max(mt, scratch);
    const float l = block_sum(mt == NEG_INF ? 0.0f : lt * expf(mt - m), scratch);
    const float L = m == NEG_INF ? NEG_INF : m + logf(l);
    for (int c = threadIdx.x; c < cols; c += blockDim.x)
        row[c] = L == NEG_INF ? 0.0f : expf(row[c] - L);
    if (threadIdx.x == 0) lse[row_index] = L;
}
// ANCHOR_END: softmax_rows

