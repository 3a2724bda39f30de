// FlashAttention-2 for f32 inputs on the tensor cores, by 3xTF32 (fp32 forward, version 8).
// Prepended: contract.cuh (ScoreMods, Dropout, key_end), tiles.cuh (FlashArgs, block_head,
// tile_plain, score, cp.async waits), mma.cuh (copies and ldmatrix at precomputed
// addresses, the online-softmax step) and tf32.cuh (the split and the three mma); compiled
// for one head dimension (TF32_D).
//
// The loop is the tensor-core forward's (flash2_tc_forward.cu): a block owns 128 query
// rows, 8 warps of 16; K_j and V_j (64 keys, f32, rows padded to d + 4) stream through
// shared memory by cp.async into two buffers each; m, l and O stay in the accumulators;
// every address is computed once. What differs is the instruction, m16n8k8 tf32 (its
// fragments in tf32.cuh). Q_i's A and K_j's B fragments come by ldmatrix, which hands lane
// 4g + t the 32-bit word t of row g of an 8 x 4 f32 block — a tf32 fragment as it stands.
// P~ is in S's accumulators (C layout: keys 2t, 2t+1 of a row), not in A's (keys t, t+4);
// instead of moving it between lanes, the k index of P~ V_j is renumbered (c_as_a): within
// each 8-key block logical key t is key 2t and logical key t + 4 is key 2t + 1. The sum
// over keys does not care about their order, so V_j's B fragment only has to read the same
// keys: b0 = V[2t][g], b1 = V[2t + 1][g], two 32-bit shared loads.

#define TF_BR 128  // query rows a block: 8 warps x 16
#define TF_BC 64   // keys a tile
#define TF_NT 256  // threads a block

// ANCHOR: tf32_forward
// QR query rows a block (16 a warp), KB keys a tile.
template <int D, bool MODS, int QR = TF_BR, int KB = TF_BC>
__device__ void tf32_forward(const FlashArgs& a, const ScoreMods& mods, const Dropout& drop) {
    constexpr int THREADS = 2 * QR;          // threads a block
    constexpr int S = D + 4;                 // row stride (floats)
    constexpr unsigned KVB = KB * S * 4;  // bytes of one K or V buffer
    extern __shared__ float4 smem_tf[];
    const unsigned Qa = (unsigned)__cvta_generic_to_shared(smem_tf);  // [QR][S]
    const unsigned Ka = Qa + QR * S * 4;                            // [2][KB][S]
    const unsigned Va = Ka + 2 * KVB;                                  // [2][KB][S]
    const BlockHead hd = block_head<D>(a, blockIdx.y);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
    const int mr = lane % 8, mi = lane / 8;  // ldmatrix: the lane gives row mr of matrix mi
    // The lane's addresses at the first block: Q_i's A fragment (rows 16 warp + .., + 8 kk
    // columns), K_j's B fragments of keys 0 .. 15 (+ 8 nb keys, + 8 kk columns), V_j's B
    // fragment of keys 2t, 2t + 1, column g (+ 8 kb keys, + 8 c columns).
    const unsigned q_at = Qa + ((16 * warp + mr + 8 * (mi % 2)) * S + 4 * (mi / 2)) * 4;
    const unsigned k_at = Ka + ((mr + 8 * (mi / 2)) * S + 4 * (mi % 2)) * 4;
    const float* v_at = reinterpret_cast<const float*>(smem_tf) + (QR + 2 * KB) * S + 2 * t * S + g;
    const int i0 = (mods.causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x) * QR;
    const int rows[2] = {i0 + 16 * warp + g, i0 + 16 * warp + g + 8};
    const u32 key[2] = {drop.enabled ? row_key(drop, hd.b, hd.h, rows[0]) : 0u,
                        drop.enabled ? row_key(drop, hd.b, hd.h, rows[1]) : 0u};
    const int j_end = key_end(mods, min(i0 + QR, a.n_q) - 1);
    // the first key tile a row of the block sees (the window's left side), on the grid
    const int j_begin = min(key_start(mods, i0), j_end) / KB * KB;

    if (j_begin < j_end) {
        load_rows_at<D, KB, THREADS>(Ka, hd.k, j_begin, a.n_k);
        load_rows_at<D, KB, THREADS>(Va, hd.v, j_begin, a.n_k);
    }
    load_rows_at<D, QR, THREADS>(Qa, hd.q, i0, a.n_q);
    cp_async_commit();
    float o[D / 8][4];
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};
#pragma unroll
    for (int c = 0; c < D / 8; c++) o[c][0] = o[c][1] = o[c][2] = o[c][3] = 0.0f;

    for (int j0 = j_begin, step = 0; j0 < j_end; j0 += KB, step++) {
        const unsigned buf = (step % 2) * KVB;  // this tile's buffers; KVB - buf: the next's
        cp_async_wait<0>();  // this thread's copies of K_j, V_j (and at step 0, Q_i)
        __syncthreads();     // everyone's copies; every warp done with tile j - 1
        if (j0 + KB < j_end) {
            load_rows_at<D, KB, THREADS>(Ka + KVB - buf, hd.k, j0 + KB, a.n_k);
            load_rows_at<D, KB, THREADS>(Va + KVB - buf, hd.v, j0 + KB, a.n_k);
            cp_async_commit();
        }

        float s[KB / 8][4];  // S = Q_i K_j^T
#pragma unroll
        for (int nb = 0; nb < KB / 8; nb++) s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 8; kk++) {
            u32 q[4], qb[4], qs[4];
            ldsm_x4_at(q, q_at + 32 * kk);
            split4(q, qb, qs);
#pragma unroll
            for (int nb = 0; nb < KB / 8; nb += 2) {
                u32 k[4], kb[4], ks[4];
                ldsm_x4_at(k, k_at + buf + (8 * nb * S + 8 * kk) * 4);
                split4(k, kb, ks);
                mma_3xtf32(s[nb], qb, qs, kb, ks);
                mma_3xtf32(s[nb + 1], qb, qs, kb + 2, ks + 2);
            }
        }
        // the online softmax and dropout (mma.cuh; S's accumulators have the layout of
        // the 16-bit kernels')
        tc_softmax_step<D, 2, KB, MODS, true>(a, mods, hd.b, hd.h, i0, j0, rows, s, m, l, o,
                                                &drop, key);

#pragma unroll
        for (int kb = 0; kb < KB / 8; kb++) {  // O_i += P~ V_j, 8 keys a step
            u32 pb[4], ps[4];  // P~'s A fragment, logical keys t, t + 4 = keys 2t, 2t + 1
            c_as_a(s[kb], pb, ps);
#pragma unroll
            for (int c = 0; c < D / 8; c++) {
                const float* at = v_at + buf / 4 + 8 * kb * S + 8 * c;
                u32 vb[2], vs[2];
                split_tf32(at[0], vb[0], vs[0]);  // V[8kb + 2t][8c + g]
                split_tf32(at[S], vb[1], vs[1]);  // V[8kb + 2t + 1][8c + g]
                mma_3xtf32(o[c], pb, ps, vb, vs);
            }
        }
    }
    cp_async_wait<0>();  // (Q_i's copy, when the block saw no key)

    // O = O / l (l summed over the row's 4 lanes); lse = ln 2 · m + ln l; a row that saw no
    // key gets O = 0, lse = -inf.
    float* out = (float*)a.o + (i64)hd.z * a.n_q * D;
    float* lse = (float*)a.lse + (i64)hd.z * a.n_q;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
        if (rows[r] >= a.n_q) continue;
        const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
#pragma unroll
        for (int c = 0; c < D / 8; c++)
            *reinterpret_cast<float2*>(out + (i64)rows[r] * D + 8 * c + 2 * t) =
                make_float2(o[c][2 * r] * inv, o[c][2 * r + 1] * inv);
        if (t == 0) lse[rows[r]] = l[r] > 0.0f ? m[r] * 0.6931471805599453f + logf(l[r]) : NEG_INF;
    }
}
// ANCHOR_END: tf32_forward

#ifndef TF32_D
#error "compile with -DTF32_D=32|64|96|128|256"
#endif
// Two kernels, as on the 16-bit tensor cores: without mask or bias, and with them (_mods); at
// d <= 64 at most 128 registers, so that two blocks (16 warps) share a SM. At d = 256, 64 rows
// a block and 32 keys a tile: Q_i and two buffers each of K_j and V_j in f32 would not fit
// the shared memory at the larger tiles.
#define TF32_FWD_BR (TF32_D > 128 ? 64 : TF_BR)
#define TF32_FWD_BC (TF32_D > 128 ? 32 : TF_BC)
#define TF32_BOUNDS __launch_bounds__(2 * TF32_FWD_BR, TF32_D <= 64 ? 2 : 1)
extern "C" __global__ void TF32_BOUNDS flash2_forward_v8(FlashArgs a, ScoreMods m, Dropout dr) {
    tf32_forward<TF32_D, false, TF32_FWD_BR, TF32_FWD_BC>(a, m, dr);
}
extern "C" __global__ void TF32_BOUNDS flash2_forward_v8_mods(FlashArgs a, ScoreMods m,
                                                               Dropout dr) {
    tf32_forward<TF32_D, true, TF32_FWD_BR, TF32_FWD_BC>(a, m, dr);
}
