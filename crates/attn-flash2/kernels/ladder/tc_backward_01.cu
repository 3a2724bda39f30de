// Ladder step 1 of the tensor-core backward (parent: the fp32 backward on the CUDA cores,
// flash2.cu): FlashAttention-2's Algorithm 2 on mma.sync. A block owns a key tile K_j, V_j
// (16 keys a warp, 4 warps) and walks the query tiles that can see it; the warp's dK_j, dV_j
// stay in registers. Per query tile, with the warp's accumulators holding *transposed* tiles
// (rows = the warp's 16 keys, columns = the tile's 64 queries), so that P^T and dS^T are A
// fragments as they stand:
//   S^T = K_j Q_i^T,  P^T = exp(S^T - lse),  dV_j += P^T dO_i,
//   dP^T = V_j dO_i^T, dS^T = P^T o (dP^T - D),  dK_j += dS^T Q_i,
// and dQ_i += dS K_j, which needs dS with rows = queries: dS^T goes through shared memory
// (16-bit) and comes back by ldmatrix.trans; each 16 query rows of dQ are added to an f32
// accumulator in device memory with atomics (other key tiles add to the same rows).
// Its child, version 7 (flash2_tc_backward.cu), pipelines the copies and the statistics, adds
// two floats an atomic, uses 8 warps at d = 128 and computes every address once.
// What it measured, with machine and date: the book's chapter "Tensor cores" and
// notes/tensor-cores.md.

// ANCHOR: tc_backward_01
template <int D, bool BF16>
__device__ void tc_backward_v1(const FlashArgs& a, const ScoreMods& mods) {
    constexpr int THREADS = TC_NT, BK = 64;  // threads (4 warps), keys a block
    constexpr int S = D + 8, SP = TC_BR + 8;   // row strides: d-rows, dS^T rows
    constexpr int QT = TC_BR * S;  // one Q or dO buffer
    constexpr float LOG2E = 1.4426950408889634f;
    extern __shared__ uint4 smem_tc[];
    u16* Ks = reinterpret_cast<u16*>(smem_tc);  // [BK][S]
    u16* Vs = Ks + BK * S;                       // [BK][S]
    u16* Qs = Vs + BK * S;                       // [BR][S]
    u16* dOs = Qs + QT;                          // [BR][S]
    u16* dSs = dOs + QT;                         // [BK][SP]: dS^T, keys x queries
    float* Ls = reinterpret_cast<float*>(dSs + BK * SP);  // [BR] lse of the tile's rows
    float* Ds = Ls + TC_BR;                               // [BR] D of the tile's rows
    const TcHead hd = tc_head<D>(a);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
    const int j0 = blockIdx.x * BK;
    const u16* d_out = (const u16*)a.d_out + (i64)hd.z * a.n_q * D;
    const float* lse = (const float*)a.lse + (i64)hd.z * a.n_q;
    const float* dvec = (const float*)a.dvec + (i64)hd.z * a.n_q;
    float* dq = (float*)a.dq + (i64)hd.z * a.n_q * D;
    const int keys[2] = {j0 + 16 * warp + g, j0 + 16 * warp + g + 8};  // the lane's two keys

    load_tile16<D, BK, THREADS>(Ks, hd.k, j0, a.n_k);
    load_tile16<D, BK, THREADS>(Vs, hd.v, j0, a.n_k);
    float dk[D / 8][4], dv[D / 8][4];
    zero_frags<D / 8>(dk);
    zero_frags<D / 8>(dv);
    // the first query row that sees key j0 (causal: i >= j0 - diagonal), on a tile boundary
    const int i_first = query_start(mods, j0) / TC_BR * TC_BR;

    // dQ_i += dS K_j for the warp's 16 query rows (16 warp), all D columns, from dS^T in
    // shared memory: A[q][key] = dS^T[key][q] (ldmatrix.trans),
    // B[key][n] = K_j[key][n] (ldmatrix.trans, as V_j in the forward); added to the f32
    // accumulator in device memory.
    auto dq_step = [&](int i0) {
        const int qr = 16 * warp;
        float dqa[D / 8][4];
        zero_frags<D / 8>(dqa);
#pragma unroll
        for (int kk = 0; kk < BK / 16; kk++) {
            u32 da[4];
            frag_a_trans(da, dSs, SP, 16 * kk, qr, lane);
#pragma unroll
            for (int c = 0; c < D / 8; c += 2) {
                u32 kb[4];
                frag_b2_trans(kb, Ks, S, 16 * kk, 8 * c, lane);
                mma16816<BF16>(dqa[c], da, kb[0], kb[1]);
                mma16816<BF16>(dqa[c + 1], da, kb[2], kb[3]);
            }
        }
        const int qrows[2] = {i0 + qr + g, i0 + qr + g + 8};
#pragma unroll
        for (int r = 0; r < 2; r++) {
            if (qrows[r] >= a.n_q) continue;
            float* row = dq + (i64)qrows[r] * D + 2 * t;
#pragma unroll
            for (int c = 0; c < D / 8; c++) {
                atomicAdd(row + 8 * c, a.scale * dqa[c][2 * r]);
                atomicAdd(row + 8 * c + 1, a.scale * dqa[c][2 * r + 1]);
            }
        }
    };

    for (int i0 = i_first; i0 < a.n_q; i0 += TC_BR) {
        __syncthreads();  // every warp is done with Q_i-1, dO_i-1, lse, D and dS^T
        load_tile16<D, TC_BR, THREADS>(Qs, hd.q, i0, a.n_q);
        load_tile16<D, TC_BR, THREADS>(dOs, d_out, i0, a.n_q);
        for (int r = threadIdx.x; r < TC_BR; r += THREADS) {
            const bool ok = i0 + r < a.n_q;
            Ls[r] = ok ? lse[i0 + r] : NEG_INF;
            Ds[r] = ok ? dvec[i0 + r] : 0.0f;
        }
        __syncthreads();

        // S^T = K_j Q_i^T and dP^T = V_j dO_i^T: A = the warp's 16 rows of K_j (V_j),
        // B[kd][n] = Q_i[n][kd] (dO_i): the forward's K_j addressing.
        float st[TC_BR / 8][4], dpt[TC_BR / 8][4];
        zero_frags<TC_BR / 8>(st);
        zero_frags<TC_BR / 8>(dpt);
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            u32 ka[4], va[4];
            frag_a(ka, Ks, S, 16 * warp, 16 * kk, lane);
            frag_a(va, Vs, S, 16 * warp, 16 * kk, lane);
#pragma unroll
            for (int nb = 0; nb < TC_BR / 8; nb += 2) {
                u32 qb[4], ob[4];
                frag_b2(qb, Qs, S, 8 * nb, 16 * kk, lane);
                frag_b2(ob, dOs, S, 8 * nb, 16 * kk, lane);
                mma16816<BF16>(st[nb], ka, qb[0], qb[1]);
                mma16816<BF16>(st[nb + 1], ka, qb[2], qb[3]);
                mma16816<BF16>(dpt[nb], va, ob[0], ob[1]);
                mma16816<BF16>(dpt[nb + 1], va, ob[2], ob[3]);
            }
        }

        // P^T = exp(S^T - lse) and dS^T = P^T o (dP^T - D), on the accumulators: the lane's
        // elements are keys keys[e / 2], queries i0 + 8nb + 2t + (e & 1).
        const bool plain = tile_plain(mods, i0, j0, BK);
#pragma unroll
        for (int nb = 0; nb < TC_BR / 8; nb++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int qi = 8 * nb + 2 * t + (e & 1);
                const float sc =
                    score(mods, plain, a.scale, hd.b, hd.h, i0 + qi, keys[e / 2], st[nb][e]);
                const float L = Ls[qi];
                const float p =
                    (sc == NEG_INF || L == NEG_INF) ? 0.0f : exp2f((sc - L) * LOG2E);
                const float ds = p * (dpt[nb][e] - Ds[qi]);
                dpt[nb][e] = plain ? ds
                                   : score_grad(mods, (float*)a.dbias, hd.b, hd.h, i0 + qi,
                                                keys[e / 2], a.scale * st[nb][e], ds);
                st[nb][e] = p;
            }

        // dV_j += P^T dO_i and dK_j += dS^T Q_i: k-steps over 16 queries; B[kq][n] =
        // dO_i[kq][n] (Q_i): the forward's V_j addressing (ldmatrix.trans).
#pragma unroll
        for (int kq = 0; kq < TC_BR / 16; kq++) {
            u32 pa[4], sa[4];
            p_fragment<BF16>(st, kq, pa);
            p_fragment<BF16>(dpt, kq, sa);
#pragma unroll
            for (int c = 0; c < D / 8; c += 2) {
                u32 ob[4], qb[4];
                frag_b2_trans(ob, dOs, S, 16 * kq, 8 * c, lane);
                frag_b2_trans(qb, Qs, S, 16 * kq, 8 * c, lane);
                mma16816<BF16>(dv[c], pa, ob[0], ob[1]);
                mma16816<BF16>(dv[c + 1], pa, ob[2], ob[3]);
                mma16816<BF16>(dk[c], sa, qb[0], qb[1]);
                mma16816<BF16>(dk[c + 1], sa, qb[2], qb[3]);
            }
        }

        // dS^T to shared memory (16-bit): rows = keys, columns = queries.
#pragma unroll
        for (int nb = 0; nb < TC_BR / 8; nb++) {
            u16* row0 = dSs + (16 * warp + g) * SP + 8 * nb + 2 * t;
            *reinterpret_cast<u32*>(row0) = pack2<BF16>(dpt[nb][0], dpt[nb][1]);
            *reinterpret_cast<u32*>(row0 + 8 * SP) = pack2<BF16>(dpt[nb][2], dpt[nb][3]);
        }
        __syncthreads();  // dS^T is whole
        dq_step(i0);
    }

    // dK_j (times the scale) and dV_j of the warp's keys, f32 per query head (the GQA group
    // sum and the rounding to 16 bits follow in tc_group_sum).
#pragma unroll
    for (int r = 0; r < 2; r++) {
        if (keys[r] >= a.n_k) continue;
#pragma unroll
        for (int c = 0; c < D / 8; c++) {
            const i64 at = ((i64)hd.z * a.n_k + keys[r]) * D + 8 * c + 2 * t;
            const float k0 = a.scale * dk[c][2 * r], k1 = a.scale * dk[c][2 * r + 1];
            *reinterpret_cast<float2*>((float*)a.dk + at) = make_float2(k0, k1);
            *reinterpret_cast<float2*>((float*)a.dv + at) =
                make_float2(dv[c][2 * r], dv[c][2 * r + 1]);
        }
    }
}
// ANCHOR_END: tc_backward_01

#if !defined(TC_D) || !defined(TC_BF16)
#error "compile with -DTC_D=64|128 -DTC_BF16=1|0 (bf16 or fp16)"
#endif
extern "C" __global__ void __launch_bounds__(TC_NT) flash2_tc_backward_v1(FlashArgs a, ScoreMods m) {
    tc_backward_v1<TC_D, TC_BF16>(a, m);
}
