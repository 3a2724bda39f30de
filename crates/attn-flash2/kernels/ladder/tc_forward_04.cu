// Ladder step 4 of the tensor-core forward (parent: step 3): 32 query rows a warp, 128 a
// block (two 16-row m-tiles). What: every K_j and V_j fragment a warp reads from shared
// memory feeds two mma instructions instead of one, halving the shared-memory bytes per FLOP
// of both products; Q_i's fragments no longer fit in registers beside 2 x 64 accumulators of
// O (d = 128), so they are read again (ldmatrix) at every tile, as FlashAttention-2 does. Why:
// step 3 was bound by shared-memory reads.
// It ran slower than step 3: more registers, and twice the softmax work between a warp's
// products; the lean softmax step (tc_softmax_step's FAST in mma.cuh) is what made the two
// m-tiles pay.
// What it measured, with machine and date: the book's chapter "Tensor cores" and
// notes/tensor-cores.md.

// ANCHOR: tc_forward_04
template <int D, bool BF16>
__device__ void tc_forward_v4(const FlashArgs& a, const ScoreMods& mods) {
    constexpr int FAST = 0, KB = TC_BC;  // the plain softmax step, 64-key tiles
    constexpr int S = D + 8, KV = KB * S, QR = 2 * TC_BR;  // QR: query rows a block
    extern __shared__ uint4 smem_tc[];
    u16* Qs = reinterpret_cast<u16*>(smem_tc);  // [QR][S]
    u16* Kb = Qs + QR * S;                       // [2][BC][S]
    u16* Vb = Kb + 2 * KV;                       // [2][BC][S]
    const TcHead hd = tc_head<D>(a);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4;
    const int i0 = blockIdx.x * QR;
    // m-tile mt of the warp: rows i0 + 64 mt + 16 warp .. + 15; the lane's rows g and g + 8
    int rows[2][2];
#pragma unroll
    for (int mt = 0; mt < 2; mt++) {
        rows[mt][0] = i0 + 64 * mt + 16 * warp + g;
        rows[mt][1] = rows[mt][0] + 8;
    }
    const int j_end = key_end(mods, min(i0 + QR, a.n_q) - 1);

    if (j_end > 0) {
        load_tile16_async<D, KB>(Kb, hd.k, 0, a.n_k);
        load_tile16_async<D, KB>(Vb, hd.v, 0, a.n_k);
    }
    load_tile16_async<D, QR>(Qs, hd.q, i0, a.n_q);
    cp_async_commit();
    float o[2][D / 8][4];
    float m[2][2], l[2][2];
#pragma unroll
    for (int mt = 0; mt < 2; mt++) {
        m[mt][0] = m[mt][1] = NEG_INF;
        l[mt][0] = l[mt][1] = 0.0f;
        zero_frags<D / 8>(o[mt]);
    }

    for (int j0 = 0, step = 0; j0 < j_end; j0 += KB, step++) {
        const u16* Ks = Kb + (step % 2) * KV;
        const u16* Vs = Vb + (step % 2) * KV;
        __syncthreads();  // every warp is done with the tiles of step - 1
        if (j0 + KB < j_end) {
            load_tile16_async<D, KB>(Kb + ((step + 1) % 2) * KV, hd.k, j0 + KB, a.n_k);
            load_tile16_async<D, KB>(Vb + ((step + 1) % 2) * KV, hd.v, j0 + KB, a.n_k);
        }
        cp_async_commit();
        cp_async_wait<1>();  // K_j, V_j (and at step 0, Q_i) have arrived
        __syncthreads();

        float s[2][KB / 8][4];
        zero_frags<KB / 8>(s[0]);
        zero_frags<KB / 8>(s[1]);
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            u32 qf[2][4];
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
                frag_a(qf[mt], Qs, S, 64 * mt + 16 * warp, 16 * kk, lane);
#pragma unroll
            for (int nb = 0; nb < KB / 8; nb += 2) {
                u32 kb[4];
                frag_b2(kb, Ks, S, 8 * nb, 16 * kk, lane);
#pragma unroll
                for (int mt = 0; mt < 2; mt++) {
                    mma16816<BF16>(s[mt][nb], qf[mt], kb[0], kb[1]);
                    mma16816<BF16>(s[mt][nb + 1], qf[mt], kb[2], kb[3]);
                }
            }
        }
#pragma unroll
        for (int mt = 0; mt < 2; mt++)
            tc_softmax_step<D, FAST, KB>(a, mods, hd.b, hd.h, i0 + 64 * mt, j0, rows[mt], s[mt], m[mt], l[mt],
                                     o[mt]);

#pragma unroll
        for (int kk = 0; kk < KB / 16; kk++) {
            u32 pa[2][4];
#pragma unroll
            for (int mt = 0; mt < 2; mt++) p_fragment<BF16>(s[mt], kk, pa[mt]);
#pragma unroll
            for (int c = 0; c < D / 8; c += 2) {
                u32 vb[4];
                frag_b2_trans(vb, Vs, S, 16 * kk, 8 * c, lane);
#pragma unroll
                for (int mt = 0; mt < 2; mt++) {
                    mma16816<BF16>(o[mt][c], pa[mt], vb[0], vb[1]);
                    mma16816<BF16>(o[mt][c + 1], pa[mt], vb[2], vb[3]);
                }
            }
        }
    }
    cp_async_wait<0>();  // (nothing is left in flight when the block ends)
#pragma unroll
    for (int mt = 0; mt < 2; mt++) tc_write_rows<D, BF16>(a, hd.z, rows[mt], m[mt], l[mt], o[mt]);
}
// ANCHOR_END: tc_forward_04

#if !defined(TC_D) || !defined(TC_BF16)
#error "compile with -DTC_D=64|128 -DTC_BF16=1|0 (bf16 or fp16)"
#endif
extern "C" __global__ void __launch_bounds__(TC_NT) flash2_tc_forward_v4(FlashArgs a, ScoreMods m) {
    tc_forward_v4<TC_D, TC_BF16>(a, m);
}
