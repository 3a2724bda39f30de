// FlashAttention-2's forward on the tensor cores, as the stage runs it (version 14 of the
// ladder, ladder/README.md): a block of 128 query rows over 4 warps (32 rows a warp, two
// 16-row m-tiles; at d = 256 one m-tile, 64 rows a block, whose O alone fills half the
// registers), 64-key tiles of K_j and V_j double-buffered in shared memory by cp.async,
// one barrier a tile, S = Q_i K_j^T and O_i += P~ V_j by mma.sync with P~ kept in registers,
// the online softmax on the accumulators (tc_softmax_step, mma.cuh). Two kernels: one for
// calls without mask or bias, where a score is cut only on the causal diagonal and at the
// keys' end (one comparison), and one (_mods) for the rest; each has a twin (_cut) that also
// takes the sliding window, the softcap and ALiBi, built apart because those registers
// would cost the plain calls' kernels their speed at d = 128; and the softcap without mask,
// bias or ALiBi has one of its own (_cap), whose tiles inside the band are softcapped in
// pairs of fp16 (tc_softmax_step's CAP). With a causal mask the blocks
// with the most tiles are launched first. Prepended: contract.cuh, tiles.cuh, mma.cuh
// (attn-cuda) and tc.cuh; compiled for one type and head dimension (TC_BF16, TC_D).

// ANCHOR: tc_forward
// Every address is computed once: a thread's copies are an unrolled list at fixed offsets
// from one global pointer and one shared address, and a lane's ldmatrix addresses are three
// 32-bit numbers set before the loop (Q_i's, K_j's and V_j's first block); every fragment
// read is that number plus a constant, plus the buffer's offset (load_rows_at, ldsm_x4_at in
// mma.cuh). The compiler cannot see the trip count of a strided copy loop, and would
// re-derive rows, columns and 64-bit addresses for every 16 bytes.

template <int D, bool BF16, bool MODS, int KB, bool CUT = true, int MT = 2, bool CAP = false>
__device__ void tc_forward_v14(const FlashArgs& a, const ScoreMods& mods, int tile) {
    constexpr int S = D + 8, QR = MT * TC_BR;  // row stride (values); query rows a block
    constexpr unsigned KVB = KB * S * 2;      // bytes of one K or V buffer
    extern __shared__ uint4 smem_tc[];
    const unsigned Qa = (unsigned)__cvta_generic_to_shared(smem_tc);  // [QR][S]
    const unsigned Ka = Qa + QR * S * 2;                               // [2][KB][S]
    const unsigned Va = Ka + 2 * KVB;                                  // [2][KB][S]
    const TcHead hd = tc_head<D>(a);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4;
    const int mr = lane % 8, mi = lane / 8;  // ldmatrix: the lane gives row mr of matrix mi
    // The lane's ldmatrix addresses at the first block (frag_a, frag_b2, frag_b2_trans):
    // Q_i's rows 16 warp .. (+ 64 mt for m-tile mt, + 16 kk columns), K_j's keys 0 .. 15
    // (+ 8 nb keys, + 16 kk columns), V_j's keys 0 .. 15 (+ 16 kk keys, + 8 c columns).
    const unsigned q_at = Qa + ((16 * warp + mr + 8 * (mi % 2)) * S + 8 * (mi / 2)) * 2;
    const unsigned k_at = Ka + ((8 * (mi / 2) + mr) * S + 8 * (mi % 2)) * 2;
    const unsigned v_at = Va + ((8 * (mi % 2) + mr) * S + 8 * (mi / 2)) * 2;
    const int i0 = tile * QR;
    int rows[MT][2];  // m-tile mt of the warp: rows i0 + 64 mt + 16 warp + g (and + 8)
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
        rows[mt][0] = i0 + 64 * mt + 16 * warp + g;
        rows[mt][1] = rows[mt][0] + 8;
    }
    const int j_end = key_end(mods, min(i0 + QR, a.n_q) - 1);
    // the first key tile a row of the block sees (the window's left side), on the grid
    const int j_begin = min(key_start(mods, i0), j_end) / KB * KB;

    if (j_begin < j_end) {
        load_rows_at<D, KB, TC_NT>(Ka, hd.k, j_begin, a.n_k);
        load_rows_at<D, KB, TC_NT>(Va, hd.v, j_begin, a.n_k);
    }
    load_rows_at<D, QR, TC_NT>(Qa, hd.q, i0, a.n_q);
    cp_async_commit();
    float o[MT][D / 8][4];
    float m[MT][2], l[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
        m[mt][0] = m[mt][1] = NEG_INF;
        l[mt][0] = l[mt][1] = 0.0f;
        zero_frags<D / 8>(o[mt]);
    }

    for (int j0 = j_begin, step = 0; j0 < j_end; j0 += KB, step++) {
        const unsigned buf = (step % 2) * KVB;  // this tile's buffers; KVB - buf: the next's
        cp_async_wait<0>();  // this thread's copies of K_j, V_j (and at step 0, Q_i)
        __syncthreads();     // everyone's copies; every warp done with tile j - 1
        if (j0 + KB < j_end) {
            load_rows_at<D, KB, TC_NT>(Ka + KVB - buf, hd.k, j0 + KB, a.n_k);
            load_rows_at<D, KB, TC_NT>(Va + KVB - buf, hd.v, j0 + KB, a.n_k);
            cp_async_commit();
        }

        float s[MT][KB / 8][4];  // S = Q_i K_j^T
#pragma unroll
        for (int mt = 0; mt < MT; mt++) zero_frags<KB / 8>(s[mt]);
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            u32 qf[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; mt++) ldsm_x4_at(qf[mt], q_at + (64 * mt * S + 16 * kk) * 2);
#pragma unroll
            for (int nb = 0; nb < KB / 8; nb += 2) {
                u32 kb[4];
                ldsm_x4_at(kb, k_at + buf + (8 * nb * S + 16 * kk) * 2);
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    mma16816<BF16>(s[mt][nb], qf[mt], kb[0], kb[1]);
                    mma16816<BF16>(s[mt][nb + 1], qf[mt], kb[2], kb[3]);
                }
            }
        }
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
            tc_softmax_step<D, 2, KB, MODS, false, CUT, CAP, BF16>(
                a, mods, hd.b, hd.h, i0 + 64 * mt, j0, rows[mt], s[mt], m[mt], l[mt], o[mt]);

#pragma unroll
        for (int kk = 0; kk < KB / 16; kk++) {  // O_i += P~ V_j
            u32 pa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                if (CAP) p_fragment_packed(s[mt], kk, pa[mt]);  // packed by the softmax step
                else p_fragment<BF16>(s[mt], kk, pa[mt]);
            }
#pragma unroll
            for (int c = 0; c < D / 8; c += 2) {
                u32 vb[4];
                ldsm_x4_trans_at(vb, v_at + buf + (16 * kk * S + 8 * c) * 2);
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    mma16816<BF16>(o[mt][c], pa[mt], vb[0], vb[1]);
                    mma16816<BF16>(o[mt][c + 1], pa[mt], vb[2], vb[3]);
                }
            }
        }
    }
    cp_async_wait<0>();  // (Q_i's copy, when the block saw no key)
#pragma unroll
    for (int mt = 0; mt < MT; mt++) tc_write_rows<D, BF16>(a, hd.z, rows[mt], m[mt], l[mt], o[mt]);
}
// ANCHOR_END: tc_forward

// The query tile of a block of the grid: with a causal mask the blocks with the most tiles
// are launched first.
__device__ __forceinline__ int grid_tile(const ScoreMods& m) {
    return m.causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
}

// A packed batch in one launch (tc.cuh's varlen_view): block x takes item x of the work list,
// a (sequence, query tile).
template <int D, bool BF16, bool MODS, int KB, bool CUT, int MT, bool CAP>
__device__ void tc_forward_varlen(FlashArgs a, ScoreMods m, const Varlen& vl) {
    const int tile = varlen_view(a, m, vl, D);
    tc_forward_v14<D, BF16, MODS, KB, CUT, MT, CAP>(a, m, tile);
}

#if !defined(TC_D) || !defined(TC_BF16)
#error "compile with -DTC_D=64|128|256 -DTC_BF16=1|0 (bf16 or fp16)"
#endif

// At d = 64 three blocks share a SM (at most 168 registers a thread), at d = 128 one fits.
// TC_MT: the m-tiles a warp (tc_forward_v14's MT).
#define TC_FORWARD_BOUNDS __launch_bounds__(TC_NT, TC_D == 64 ? 3 : 1)
#define TC_MT (TC_D > 128 ? 1 : 2)
// The packed kernels are a module of their own (TC_VARLEN=1), so that neither kind of call
// compiles the other's five kernels.
#if !defined(TC_VARLEN) || !TC_VARLEN
extern "C" __global__ void TC_FORWARD_BOUNDS flash2_tc_forward(FlashArgs a, ScoreMods m) {
    tc_forward_v14<TC_D, TC_BF16, false, TC_BC, false, TC_MT>(a, m, grid_tile(m));
}
extern "C" __global__ void TC_FORWARD_BOUNDS flash2_tc_forward_cut(FlashArgs a, ScoreMods m) {
    tc_forward_v14<TC_D, TC_BF16, false, TC_BC, true, TC_MT>(a, m, grid_tile(m));
}
extern "C" __global__ void TC_FORWARD_BOUNDS flash2_tc_forward_cap(FlashArgs a, ScoreMods m) {
    tc_forward_v14<TC_D, TC_BF16, false, TC_BC, true, TC_MT, true>(a, m, grid_tile(m));
}
extern "C" __global__ void TC_FORWARD_BOUNDS flash2_tc_forward_mods(FlashArgs a, ScoreMods m) {
    tc_forward_v14<TC_D, TC_BF16, true, TC_BC, false, TC_MT>(a, m, grid_tile(m));
}
extern "C" __global__ void TC_FORWARD_BOUNDS flash2_tc_forward_mods_cut(FlashArgs a, ScoreMods m) {
    tc_forward_v14<TC_D, TC_BF16, true, TC_BC, true, TC_MT>(a, m, grid_tile(m));
}
#else
extern "C" __global__ void TC_FORWARD_BOUNDS flash2_tc_forward_varlen(FlashArgs a, ScoreMods m, Varlen v) {
    tc_forward_varlen<TC_D, TC_BF16, false, TC_BC, false, TC_MT, false>(a, m, v);
}
extern "C" __global__ void TC_FORWARD_BOUNDS flash2_tc_forward_cut_varlen(FlashArgs a, ScoreMods m, Varlen v) {
    tc_forward_varlen<TC_D, TC_BF16, false, TC_BC, true, TC_MT, false>(a, m, v);
}
extern "C" __global__ void TC_FORWARD_BOUNDS flash2_tc_forward_cap_varlen(FlashArgs a, ScoreMods m, Varlen v) {
    tc_forward_varlen<TC_D, TC_BF16, false, TC_BC, true, TC_MT, true>(a, m, v);
}
extern "C" __global__ void TC_FORWARD_BOUNDS flash2_tc_forward_mods_varlen(FlashArgs a, ScoreMods m, Varlen v) {
    tc_forward_varlen<TC_D, TC_BF16, true, TC_BC, false, TC_MT, false>(a, m, v);
}
extern "C" __global__ void TC_FORWARD_BOUNDS flash2_tc_forward_mods_cut_varlen(FlashArgs a, ScoreMods m, Varlen v) {
    tc_forward_varlen<TC_D, TC_BF16, true, TC_BC, true, TC_MT, false>(a, m, v);
}
#endif
