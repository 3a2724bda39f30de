// Block-wide reductions for the kernels that give one thread block to one row of scores
// (naive attention's softmax, chunked attention's chunk summaries). Prepended after
// contract.cuh.

// The max and the sum of x over the block's threads (a multiple of 32, at most 1024).
__device__ float block_max(float x, float* scratch) {
    for (int o = 16; o > 0; o /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = x;
    __syncthreads();
    x = scratch[0];
    for (int w = 1; w < blockDim.x / 32; w++) x = fmaxf(x, scratch[w]);
    __syncthreads();
    return x;
}

// The largest of a row's `cols` scores, the block's threads striding over it (−inf for a row
// whose every key is removed).
__device__ float row_max(const float* row, int cols, float* scratch) {
    float m = NEG_INF;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) m = fmaxf(m, row[c]);
    return block_max(m, scratch);
}

__device__ float block_sum(float x, float* scratch) {
    for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
    if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = x;
    __syncthreads();
    x = 0.0f;
    for (int w = 0; w < blockDim.x / 32; w++) x += scratch[w];
    __syncthreads();
    return x;
}

