// Ladder step 2 of the fp32 forward (parent: step 1): 16-byte shared-memory reads.
//
// Layouts: Q, O, dO, dQ [b, h, n_q, D]; K, V, dK, dV [b, kv_heads, n_k, D]; lse, Dvec
// [b, h, n_q]. 256 threads as a 16 x 16 grid (ty, tx): thread (ty, tx) owns score rows
// ty + 16a and columns tx + 16b of a tile. The 16 threads of one ty are 16 consecutive lanes
// of a warp, so a row's max and sum are reduced with 4 shuffles. Prepended: contract.cuh and
// tiles.cuh (attn-cuda).
// It gained nothing at d = 64: shared-memory bandwidth was not the limit yet.
// What it measured, with machine and date: the book's chapter "FlashAttention on the GPU" and
// notes/gpu.md.

// ---------------------------------------------------------------------------------------
// ANCHOR: forward_v2
// Forward, version 2: the same algorithm as version 1 with 16-byte shared-memory reads.
// Rows of Q, K, V and P are padded to a multiple of 4 floats (D + 4), each thread reads 4
// consecutive values of a row at once, and a thread owns D/16 *consecutive* output columns
// (tx·D/16 ..), so that V and O move as float4 (float2 where D/16 is not a multiple of 4).
// Per 4 steps of the dot products a warp now issues 12 shared-memory wavefronts for 64 FMAs
// each thread, against 32 in version 1.
template <int D>
__device__ void flash_forward_v2(const FlashArgs& a, const ScoreMods& mods, const Dropout& drop) {
    extern __shared__ float4 smem4[];
    float* Qs = reinterpret_cast<float*>(smem4);  // [BR][D + 4]
    float* KVs = Qs + BR * ROW;                   // [BC][D + 4]: K_j, then V_j
    float* Ps = KVs + BC * ROW;                   // [BR][BC + 4]
    constexpr int CW = D / 16;                    // output columns per thread
    const auto [z, b, h, q, dout, k, v] = block_head<D>(a, blockIdx.y);
    const int i0 = blockIdx.x * BR;

    load_tile4<D>(Qs, q, i0, a.n_q);
    float m[4], l[4], o[4][CW];
    u32 key[4];
    start_rows<D>(drop, b, h, i0, m, l, o, key);  // m = -inf, l = 0, O = 0, dropout row keys
    const int last = min(i0 + BR, a.n_q) - 1;
    const int j_end = key_end(mods, last);

    for (int j0 = 0; j0 < j_end; j0 += BC) {
        __syncthreads();
        load_tile4<D>(KVs, k, j0, a.n_k);
        __syncthreads();
        float s[4][4];
        tile_scores<D>(Qs, KVs, s);
        online_softmax_step<D, false>(a, mods, drop, b, h, i0, j0, s, m, l, o, key, Ps);
        __syncthreads();
        load_tile4<D>(KVs, v, j0, a.n_k);
        __syncthreads();
        accumulate_pv<D, false>(Ps, KVs, o);  // O += P V_j
    }
    write_forward_rows<D, false, false>(a, z, i0, m, l, o);
}
// ANCHOR_END: forward_v2


#define FP32_LADDER_KERNELS(D)                                                             \
    extern "C" __global__ void __launch_bounds__(NT)                                       \
        flash2_forward_v2_d##D(FlashArgs a, ScoreMods m, Dropout dr) {                     \
        flash_forward_v2<D>(a, m, dr);                                                        \
    }
FP32_LADDER_KERNELS(32)
FP32_LADDER_KERNELS(64)
FP32_LADDER_KERNELS(96)
FP32_LADDER_KERNELS(128)
