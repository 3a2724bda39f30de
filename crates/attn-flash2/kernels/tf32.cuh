// The 3xTF32 arithmetic of the f32 kernels on the tensor cores (flash2_tf32.cu, the forward;
// flash2_tf32_backward.cu, the backward): an f32 split into two tf32 parts and the product
// of split operands as three m16n8k8 mma. Prepended after mma.cuh.
//
// The tensor cores take tf32 operands — an f32 with 10 mantissa bits instead of 23, so one
// tf32 product keeps ~3 decimal digits (the contract's tf32 tolerance, 1e-3). 3xTF32 keeps
// f32's: each operand is split into x = big + small, both tf32 (big = x cut to tf32, small
// = the rest, cut too), and a product is
//     A B ≈ A_big B_big + A_big B_small + A_small B_big,
// three mma instructions; the dropped A_small B_small is ~2^-20 of the product. This is what
// PyTorch's memory-efficient backend runs for f32 on sm_80 and later (CUTLASS's "fast f32"),
// and why it outruns any kernel on the CUDA cores' f32 FMAs.
//
// The fragments of m16n8k8 tf32 (lane = 4g + t):
//   A (16 x 8, 4 registers): a0 = A[g][t], a1 = A[g+8][t], a2 = A[g][t+4], a3 = A[g+8][t+4]
//   B (8 x 8, 2 registers):  b0 = B[t][g], b1 = B[t+4][g]
//   C (16 x 8, 4 floats):    c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1]

// ANCHOR: tf32_split
// x = big + small, both tf32: big is x with its low 13 mantissa bits cleared (one AND; no
// cvt.rna.tf32, which sm_90 runs as five integer instructions), the rest x - big is exact
// in f32, and small is that rest cut to tf32 the same way. What is lost is below 2^-20 |x|.
__device__ __forceinline__ void split_tf32(float x, u32& big, u32& small) {
    big = __float_as_uint(x) & 0xffffe000u;
    small = __float_as_uint(x - __uint_as_float(big)) & 0xffffe000u;
}
// C += A B, tf32 operands, f32 accumulators.
__device__ __forceinline__ void mma_tf32(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// C += A B in 3xTF32: the two small terms first, then the big one.
__device__ __forceinline__ void mma_3xtf32(float* c, const u32* a_big, const u32* a_small,
                                           const u32* b_big, const u32* b_small) {
    mma_tf32(c, a_small, b_big[0], b_big[1]);
    mma_tf32(c, a_big, b_small[0], b_small[1]);
    mma_tf32(c, a_big, b_big[0], b_big[1]);
}
// ANCHOR_END: tf32_split

// Four f32 values as ldmatrix delivers them (32-bit words) split into big and small parts.
__device__ __forceinline__ void split4(const u32* x, u32* big, u32* small) {
#pragma unroll
    for (int i = 0; i < 4; i++) split_tf32(__uint_as_float(x[i]), big[i], small[i]);
}
// An accumulator fragment (C layout: keys or queries 2t, 2t + 1 of rows g, g + 8) as the A
// fragment of the next product over those columns, split: the k index is renumbered within
// each 8-column block (logical t is column 2t, logical t + 4 is column 2t + 1), so that the
// values stay in the lane; the B fragment of that product then reads rows 2t and 2t + 1.
__device__ __forceinline__ void c_as_a(const float* c, u32* big, u32* small) {
    split_tf32(c[0], big[0], small[0]);
    split_tf32(c[2], big[1], small[1]);
    split_tf32(c[1], big[2], small[2]);
    split_tf32(c[3], big[3], small[3]);
}
