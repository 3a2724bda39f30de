// Stage 2's own kernels: a chunk's summaries, their merge into the running statistics, and
// the final normalisation. Prepended: contract.cuh, rows.cuh (attn-cuda); the products and
// the score modifiers are attn-cuda's products.cu.

// Stage 2's per-chunk softmax: the chunk's row max m_c, P~ = exp(S - m_c) in place and its
// row sum l_c (Rabe & Staats' summaries). Stats are [Z, rows].
extern "C" __global__ void chunk_softmax(float* s, float* m_out, float* l_out, int rows,
                                         int cols) {
    __shared__ float scratch[32];
    const i64 row_index = (i64)blockIdx.y * rows + blockIdx.x;
    float* row = s + row_index * cols;
    const float m = row_max(row, cols, scratch);
    float l = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float p = m == NEG_INF ? 0.0f : expf(row[c] - m);
        row[c] = p;
        l += p;
    }
    l = block_sum(l, scratch);
    if (threadIdx.x == 0) {
        m_out[row_index] = m;
        l_out[row_index] = l;
    }
}

// ANCHOR: merge_chunk
// Stage 2: fold a chunk's summaries (m_c, l_c, O_c = P~ V_c) into the running (m, l, O) of
// rows i0 .. i0 + rows:  m' = max(m, m_c),  l' = e^(m - m') l + e^(m_c - m') l_c,
// O' = e^(m - m') O + e^(m_c - m') O_c. One block per row; O is [Z, n_q, d].
extern "C" __global__ void merge_chunk(float* m, float* l, float* o, const float* m_c,
                                       const float* l_c, const float* o_c, int i0, int rows,
                                       int n_q, int d) {
    const int z = blockIdx.y, r = blockIdx.x;
    const i64 run = (i64)z * n_q + i0 + r, chunk = (i64)z * rows + r;
    const float m_old = m[run], mc = m_c[chunk];
    const float m_new = fmaxf(m_old, mc);
    if (m_new == NEG_INF) return;  // nothing visible yet
    const float a = m_old == NEG_INF ? 0.0f : expf(m_old - m_new);
    const float b = mc == NEG_INF ? 0.0f : expf(mc - m_new);
    for (int c = threadIdx.x; c < d; c += blockDim.x)
        o[run * d + c] = a * o[run * d + c] + b * o_c[chunk * d + c];
    __syncthreads();
    if (threadIdx.x == 0) {
        l[run] = a * l[run] + b * l_c[chunk];
        m[run] = m_new;
    }
}
// ANCHOR_END: merge_chunk

// Stage 2: O = O / l and lse = m + log l; rows that saw no key get O = 0, lse = -inf.
extern "C" __global__ void finish_rows(float* o, float* lse, const float* m, const float* l,
                                       int d) {
    const i64 row = (i64)blockIdx.y * gridDim.x + blockIdx.x;
    const float lr = l[row];
    const float inv = lr > 0.0f ? 1.0f / lr : 0.0f;
    for (int c = threadIdx.x; c < d; c += blockDim.x) o[row * d + c] *= inv;
    if (threadIdx.x == 0) lse[row] = lr > 0.0f ? m[row] + logf(lr) : NEG_INF;
}

