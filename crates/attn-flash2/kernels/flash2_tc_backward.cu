// FlashAttention-2's backward (Algorithm 2) on the tensor cores, as the stage runs it
// (version 7 of the ladder, ladder/README.md). A block owns a key tile K_j, V_j (16 keys a
// warp: 4 warps at d = 64, 8 at d = 128) and walks the query tiles that can see it; the
// warp's dK_j, dV_j stay in registers. Per query tile, with the warp's accumulators holding
// *transposed* tiles (rows = the warp's 16 keys, columns = the tile's 64 queries), so that
// P^T and dS^T are A fragments as they stand:
//   S^T = K_j Q_i^T,  P^T = exp(S^T - lse),  dV_j += P^T dO_i,
//   dP^T = V_j dO_i^T, dS^T = P^T o (dP^T - D),  dK_j += dS^T Q_i,
// and dQ_i += dS K_j, which needs dS with rows = queries: dS^T goes through shared memory
// (16-bit) and comes back by ldmatrix.trans; dQ is added to an f32 accumulator in device
// memory two floats an atomic (other key tiles add to the same rows). Q_i+1, dO_i+1 and the
// next tile's lse and D are on their way while tile i is computed. Prepended: contract.cuh,
// tiles.cuh, mma.cuh (attn-cuda) and tc.cuh; compiled for one type and head dimension
// (TC_BF16, TC_D), with the small kernels that D = rowsum(dO o O) and the GQA group sums need.

// ANCHOR: tc_backward
// Every copy is an unrolled cp.async at a fixed offset and every ldmatrix a 32-bit shared
// address set before the loop plus a constant (as in the forward); MODS = false is the
// kernel for calls without mask, bias or ALiBi, where a score is cut by its row's key range
// (causal masking, the window). CAP (with MODS = false): the softcap, as the forward's lean
// kernels take it — c tanh(s / c) by tanh_approx, and dS times its slope 1 - tanh^2 from the
// same tanh — in a twin kernel (_cut), so that the plain calls' kernel keeps its registers.
// DH < D (d = 256, whose dK_j and dV_j would need every register twice over): a block
// accumulates the DH gradient columns from c0 = DH * blockIdx.z, and the D / DH blocks of a
// key tile each recompute S and dP over the whole d.
template <int D, bool BF16, bool MODS, int KW, bool CAP = false, int DH = D>
__device__ void tc_backward_v7(const FlashArgs& a, const ScoreMods& mods, int tile) {
    static_assert(!(CAP && MODS), "the _mods kernels take the softcap through score_grad");
    constexpr int THREADS = 32 * KW, BK = 16 * KW;  // threads, keys a block
    constexpr int S = D + 8, SP = TC_BR + 8;          // row strides: d-rows, dS^T rows
    constexpr unsigned QTB = TC_BR * S * 2;           // bytes of one Q or dO buffer
    constexpr int DC = DH * 4 / KW;                   // dQ columns a warp
    const int c0 = DH == D ? 0 : DH * blockIdx.z;     // the block's first gradient column
    float* const dbias = c0 == 0 ? (float*)a.dbias : nullptr;  // one block of a tile adds dS
    extern __shared__ uint4 smem_tc[];
    u16* const base = reinterpret_cast<u16*>(smem_tc);
    const unsigned Ka = (unsigned)__cvta_generic_to_shared(base);  // [BK][S]
    const unsigned Va = Ka + BK * S * 2;                            // [BK][S]
    const unsigned Qa = Va + BK * S * 2;                            // [2][BR][S]
    const unsigned Oa = Qa + 2 * QTB;                               // [2][BR][S] dO
    u16* dSs = base + 2 * BK * S + 4 * TC_BR * S;                   // [BK][SP]: dS^T
    const unsigned dSa = (unsigned)__cvta_generic_to_shared(dSs);
    float* Ls = reinterpret_cast<float*>(dSs + BK * SP);  // [BR] lse of the tile's rows
    float* Ds = Ls + TC_BR;                               // [BR] D of the tile's rows
    const TcHead hd = tc_head<D>(a);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
    const int mr = lane % 8, mi = lane / 8;  // ldmatrix: the lane gives row mr of matrix mi
    const int j0 = tile * BK;
    const u16* d_out = (const u16*)a.d_out + (i64)hd.z * a.n_q * D;
    const float* lse = (const float*)a.lse + (i64)hd.z * a.n_q;
    const float* dvec = (const float*)a.dvec + (i64)hd.z * a.n_q;
    float* dq = (float*)a.dq + (i64)hd.z * a.n_q * D;
    const int keys[2] = {j0 + 16 * warp + g, j0 + 16 * warp + g + 8};  // the lane's two keys
    const int qr = 16 * (warp % 4), qc = c0 + DC * (warp / 4);  // dQ: the warp's rows, columns
    // The lane's ldmatrix addresses (frag_a, frag_b2, frag_b2_trans, frag_a_trans at the
    // first block; the loops add constants and the buffer's offset):
    const unsigned ka_at = Ka + ((16 * warp + mr + 8 * (mi % 2)) * S + 8 * (mi / 2)) * 2;  // K_j, V_j as A
    const unsigned qb_at = Qa + ((8 * (mi / 2) + mr) * S + 8 * (mi % 2)) * 2;  // Q_i, dO_i as B^T
    const unsigned qt_at = Qa + ((8 * (mi % 2) + mr) * S + 8 * (mi / 2)) * 2;  // Q_i, dO_i as B
    const unsigned da_at = dSa + ((8 * (mi / 2) + mr) * SP + qr + 8 * (mi % 2)) * 2;  // dS as A
    const unsigned kt_at = Ka + ((8 * (mi % 2) + mr) * S + qc + 8 * (mi / 2)) * 2;  // K_j as B

    float dk[DH / 8][4], dv[DH / 8][4];
    zero_frags<DH / 8>(dk);
    zero_frags<DH / 8>(dv);
    using Rows = KeyPassRows<TC_BR, D, BK, THREADS>;
    Rows stats{lse, dvec, a.n_q, Rows::first_tile(mods, j0), Rows::rows_end(a, mods, j0)};
    stats.load_first(Ka, Va, Qa, Oa, hd.k, hd.v, hd.q, d_out, j0, a.n_k);

    for (int i0 = stats.first, step = 0; i0 < stats.end; i0 += TC_BR, step++) {
        const unsigned buf = (step % 2) * QTB;  // this tile's Q, dO buffers; QTB - buf: the next's
        cp_async_wait<0>();  // this thread's copies of Q_i, dO_i (and at step 0, K_j, V_j)
        __syncthreads();     // everyone's; every warp done with tile i - 1 (its lse, D, dS^T)
        stats.prefetch(Qa + QTB - buf, Oa + QTB - buf, hd.q, d_out, i0);
        stats.store_and_fetch(Ls, Ds, i0);
        __syncthreads();

        // S^T = K_j Q_i^T and dP^T = V_j dO_i^T
        float st[TC_BR / 8][4], dpt[TC_BR / 8][4];
        zero_frags<TC_BR / 8>(st);
        zero_frags<TC_BR / 8>(dpt);
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            u32 ka[4], va[4];
            ldsm_x4_at(ka, ka_at + 32 * kk);
            ldsm_x4_at(va, ka_at + BK * S * 2 + 32 * kk);
#pragma unroll
            for (int nb = 0; nb < TC_BR / 8; nb += 2) {
                u32 qb[4], ob[4];
                const unsigned at = qb_at + buf + (8 * nb * S + 16 * kk) * 2;
                ldsm_x4_at(qb, at);
                ldsm_x4_at(ob, at + 2 * QTB);
                mma16816<BF16>(st[nb], ka, qb[0], qb[1]);
                mma16816<BF16>(st[nb + 1], ka, qb[2], qb[3]);
                mma16816<BF16>(dpt[nb], va, ob[0], ob[1]);
                mma16816<BF16>(dpt[nb + 1], va, ob[2], ob[3]);
            }
        }

        // P^T = 2^(S^T scale log2 e - lse) and dS^T = P^T o (dP^T - D) on the accumulators:
        // the lane's elements are keys keys[e / 2], queries i0 + 8nb + 2t + (e & 1).
        const bool plain = tile_plain(mods, i0, j0, BK);
        // CAP: the softcap in base 2, (c log2 e) tanh((scale / c) s), as the forward's
        const float cap2 = mods.softcap * 1.4426950408889634f, inner = a.scale * mods.inv_softcap;
        const int lo[2] = {CAP ? query_start(mods, keys[0]) : 0, CAP ? query_start(mods, keys[1]) : 0};
        const int hi[2] = {CAP ? query_end(mods, keys[0]) : 0, CAP ? query_end(mods, keys[1]) : 0};
#pragma unroll
        for (int nb = 0; nb < TC_BR / 8; nb++) {
            const float2 L = *reinterpret_cast<const float2*>(Ls + 8 * nb + 2 * t);
            const float2 Dr = *reinterpret_cast<const float2*>(Ds + 8 * nb + 2 * t);
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int i = i0 + 8 * nb + 2 * t + (e & 1);
                float x, slope = 1.0f;
                if (CAP) {  // every score capped (no plain tiles), cut by the key's query range
                    const bool seen = i >= lo[e / 2] && i < hi[e / 2] && keys[e / 2] < a.n_k;
                    x = capped_score2<true>(cap2, inner, st[nb][e], seen, slope);
                } else {
                    x = backward_score2<MODS>(mods, plain, a.scale, hd.b, hd.h, i, keys[e / 2], st[nb][e]);
                }
                const float p = ex2_ftz(x - ((e & 1) ? L.y : L.x));
                const float ds = p * (dpt[nb][e] - ((e & 1) ? Dr.y : Dr.x));
                dpt[nb][e] = MODS && !plain
                                 ? score_grad(mods, dbias, hd.b, hd.h, i, keys[e / 2],
                                              a.scale * st[nb][e], ds)
                                 : ds * slope;
                st[nb][e] = p;
            }
        }

        // dV_j += P^T dO_i and dK_j += dS^T Q_i
#pragma unroll
        for (int kq = 0; kq < TC_BR / 16; kq++) {
            u32 pa[4], sa[4];
            p_fragment<BF16>(st, kq, pa);
            p_fragment<BF16>(dpt, kq, sa);
#pragma unroll
            for (int c = 0; c < DH / 8; c += 2) {
                u32 ob[4], qb[4];
                const unsigned at = qt_at + buf + (16 * kq * S + c0 + 8 * c) * 2;
                ldsm_x4_trans_at(ob, at + 2 * QTB);
                ldsm_x4_trans_at(qb, at);
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

        // dQ_i += dS K_j for the warp's 16 query rows and DC columns, added to the f32
        // accumulator in device memory two floats an atomic
        float dqa[DC / 8][4];
        zero_frags<DC / 8>(dqa);
#pragma unroll
        for (int kk = 0; kk < BK / 16; kk++) {
            u32 da[4];
            ldsm_x4_trans_at(da, da_at + 16 * kk * SP * 2);
#pragma unroll
            for (int c = 0; c < DC / 8; c += 2) {
                u32 kb[4];
                ldsm_x4_trans_at(kb, kt_at + (16 * kk * S + 8 * c) * 2);
                mma16816<BF16>(dqa[c], da, kb[0], kb[1]);
                mma16816<BF16>(dqa[c + 1], da, kb[2], kb[3]);
            }
        }
        add_dq_rows<D, DC>(dq, dqa, i0 + qr + g, a.n_q, qc, t, a.scale);
    }
    cp_async_wait<0>();  // (K_j's and V_j's copies, when no query row sees the tile)

    // dK_j (times the scale) and dV_j of the warp's keys: rounded to 16 bits here without
    // GQA; otherwise f32 per query head (the group sum and the rounding follow).
    const bool final16 = a.heads == a.kv_heads;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        if (keys[r] >= a.n_k) continue;
#pragma unroll
        for (int c = 0; c < DH / 8; c++) {
            const i64 at = ((i64)hd.z * a.n_k + keys[r]) * D + c0 + 8 * c + 2 * t;
            const float k0 = a.scale * dk[c][2 * r], k1 = a.scale * dk[c][2 * r + 1];
            if (final16) {
                *reinterpret_cast<u32*>((u16*)a.dk + at) = pack2<BF16>(k0, k1);
                *reinterpret_cast<u32*>((u16*)a.dv + at) = pack2<BF16>(dv[c][2 * r], dv[c][2 * r + 1]);
            } else {
                *reinterpret_cast<float2*>((float*)a.dk + at) = make_float2(k0, k1);
                *reinterpret_cast<float2*>((float*)a.dv + at) =
                    make_float2(dv[c][2 * r], dv[c][2 * r + 1]);
            }
        }
    }
}
// ANCHOR_END: tc_backward

#if !defined(TC_D) || !defined(TC_BF16)
#error "compile with -DTC_D=64|128|256 -DTC_BF16=1|0 (bf16 or fp16)"
#endif

// Warps a block (16 keys each): 4 at d = 64, 8 at d = 128, 4 at d = 256 (where K_j, V_j and
// two buffers each of Q_i and dO_i for 128 keys would not fit the shared memory); the
// gradient columns a block, 128 at d = 256 (two blocks a key tile), else all.
#define TC_BACKWARD_KW (TC_D == 128 ? 8 : 4)
#define TC_BACKWARD_DH (TC_D > 128 ? 128 : TC_D)
#define TC_BACKWARD_THREADS (32 * TC_BACKWARD_KW)
// The packed kernels (tc.cuh's varlen_view: a work list of (sequence, key tile)) are a
// module of their own (TC_VARLEN=1).
#if !defined(TC_VARLEN) || !TC_VARLEN
extern "C" __global__ void __launch_bounds__(TC_BACKWARD_THREADS, 1)
    flash2_tc_backward(FlashArgs a, ScoreMods m) {
    tc_backward_v7<TC_D, TC_BF16, false, TC_BACKWARD_KW, false, TC_BACKWARD_DH>(a, m, blockIdx.x);
}
extern "C" __global__ void __launch_bounds__(TC_BACKWARD_THREADS, 1)
    flash2_tc_backward_cut(FlashArgs a, ScoreMods m) {
    tc_backward_v7<TC_D, TC_BF16, false, TC_BACKWARD_KW, true, TC_BACKWARD_DH>(a, m, blockIdx.x);
}
extern "C" __global__ void __launch_bounds__(TC_BACKWARD_THREADS, 1)
    flash2_tc_backward_mods(FlashArgs a, ScoreMods m) {
    tc_backward_v7<TC_D, TC_BF16, true, TC_BACKWARD_KW, false, TC_BACKWARD_DH>(a, m, blockIdx.x);
}
#else
extern "C" __global__ void __launch_bounds__(TC_BACKWARD_THREADS, 1)
    flash2_tc_backward_varlen(FlashArgs a, ScoreMods m, Varlen v) {
    const int tile = varlen_view(a, m, v, TC_D);
    tc_backward_v7<TC_D, TC_BF16, false, TC_BACKWARD_KW, false, TC_BACKWARD_DH>(a, m, tile);
}
extern "C" __global__ void __launch_bounds__(TC_BACKWARD_THREADS, 1)
    flash2_tc_backward_cut_varlen(FlashArgs a, ScoreMods m, Varlen v) {
    const int tile = varlen_view(a, m, v, TC_D);
    tc_backward_v7<TC_D, TC_BF16, false, TC_BACKWARD_KW, true, TC_BACKWARD_DH>(a, m, tile);
}
extern "C" __global__ void __launch_bounds__(TC_BACKWARD_THREADS, 1)
    flash2_tc_backward_mods_varlen(FlashArgs a, ScoreMods m, Varlen v) {
    const int tile = varlen_view(a, m, v, TC_D);
    tc_backward_v7<TC_D, TC_BF16, true, TC_BACKWARD_KW, false, TC_BACKWARD_DH>(a, m, tile);
}
#endif

// D = rowsum(dO o O) from 16-bit dO and O, and the GQA group sums of dK, dV (or dQ's f32
// accumulator, heads == kv_heads) rounded to 16 bits: contract.cuh's steps with a 16-bit
// read and a 16-bit store.
extern "C" __global__ void tc_row_dot(const u16* d_out, const u16* out, float* D, i64 rows,
                                      int d) {
    row_dot_rows(d_out, out, D, rows, d, [](u16 x) { return widen16<TC_BF16>(x); });
}
extern "C" __global__ void tc_group_sum(const float* per_head, u16* out, int heads,
                                        int kv_heads, i64 per_head_elems, i64 total) {
    group_sum_rows(per_head, heads, kv_heads, per_head_elems, total, [=](i64 e, float s) {
        out[e] = (u16)(pack2<TC_BF16>(s, 0.0f) & 0xffffu);
    });
}
