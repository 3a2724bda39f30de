// FlashAttention-2's backward for f32 inputs on the tensor cores, by 3xTF32 (fp32 backward,
// version 2): Algorithm 2 with the loop of the 16-bit backward (flash2_tc_backward.cu) and
// the arithmetic of the f32 forward (flash2_tf32.cu). Prepended: contract.cuh, tiles.cuh,
// mma.cuh (attn-cuda) and tf32.cuh; compiled for one head dimension and tiling (TF32_D,
// TF32B_KW warps, TF32B_BR query rows a tile).
//
// A block owns a key tile K_j, V_j (16 keys a warp) and walks the query tiles that can see
// it; the warp's dK_j, dV_j stay in its accumulators. Per query tile the accumulators hold
// *transposed* tiles (rows = the warp's 16 keys, columns = the tile's queries):
//   S^T = K_j Q_i^T,  P^T = exp(S^T - lse),  dV_j += (P o Z)^T dO_i,
//   dP^T = V_j dO_i^T, dS^T = P^T o (Z o dP^T - D),  dK_j += dS^T Q_i
// (Z: the dropout factors, 1 without dropout). K_j's and V_j's A fragments and Q_i's and
// dO_i's B fragments of the first two products come by ldmatrix, 8 x 4 f32 blocks. The
// next two take P^T and dS^T from the accumulators as A fragments, the k index (queries)
// renumbered as in the forward's P~ V_j (c_as_a), so Q_i's and dO_i's B fragments read
// rows 2t and 2t + 1: two 32-bit loads, in 32 different banks. dQ_i += dS K_j needs dS with
// rows = queries: the accumulators go to shared memory as dS (f32, [query][key]) and come
// back as A fragments of 8 keys, keys renumbered the same way (one 8-byte load gives a
// row's keys 2t, 2t + 1); dQ is added to device memory two floats an atomic, since every
// key tile adds to the same rows. Q_i+1, dO_i+1 and the next tile's lse and D are on their
// way while tile i is computed. DQ = false leaves dQ to the separate pass over query tiles
// below (tf32_backward_q, Options::deterministic).

#ifndef TF32_D
#error "compile with -DTF32_D=32|64|96|128|256 -DTF32B_KW=4|8 -DTF32B_BR=16|32|64"
#endif

// The two score-shaped products of a backward tile for a warp's 16 rows, X = A B^T and
// Y = A' B'^T over 8 NB columns, k = D, by 3xTF32, one ldmatrix a fragment: A's at the
// lane's address a_at (A' a2 bytes on), B's of column blocks 0 and 1 at b_at (B' b2 bytes on),
// f32 rows of S floats.
template <int D, int NB, int S>
__device__ __forceinline__ void two_products(float (*x)[4], float (*y)[4], unsigned a_at,
                                             unsigned a2, unsigned b_at, unsigned b2) {
    zero_frags<NB>(x);
    zero_frags<NB>(y);
#pragma unroll
    for (int kk = 0; kk < D / 8; kk++) {
        u32 r[4], ab[4], as[4], a2b[4], a2s[4];
        ldsm_x4_at(r, a_at + 32 * kk);
        split4(r, ab, as);
        ldsm_x4_at(r, a_at + a2 + 32 * kk);
        split4(r, a2b, a2s);
#pragma unroll
        for (int nb = 0; nb < NB; nb += 2) {
            const unsigned at = b_at + (8 * nb * S + 8 * kk) * 4;
            u32 big[4], small[4];
            ldsm_x4_at(r, at);
            split4(r, big, small);
            mma_3xtf32(x[nb], ab, as, big, small);
            mma_3xtf32(x[nb + 1], ab, as, big + 2, small + 2);
            ldsm_x4_at(r, at + b2);
            split4(r, big, small);
            mma_3xtf32(y[nb], a2b, a2s, big, small);
            mma_3xtf32(y[nb + 1], a2b, a2s, big + 2, small + 2);
        }
    }
}

// ANCHOR: tf32_backward
// MODS: the kernels for calls with a mask, bias or ALiBi (modify_score, score_grad); CAP
// (without MODS): the twins (_cut) for the softcap, c tanh(s / c) f32-exact (tanh_exp) and dS
// times its slope 1 - tanh^2 from the same tanh. DH < D (d = 256): a block accumulates the
// DH gradient columns from c0 = DH * blockIdx.z, the D / DH blocks of a key tile each
// recomputing S and dP over the whole d (as the 16-bit backward at d = 256).
template <int D, bool MODS, bool DQ, int KW, int QR, bool CAP = false, int DH = D>
__device__ void tf32_backward(const FlashArgs& a, const ScoreMods& mods, const Dropout& drop) {
    static_assert(!(CAP && MODS), "the _mods kernels take the softcap through score_grad");
    constexpr int THREADS = 32 * KW, BK = 16 * KW;  // threads, keys a block
    constexpr int S = D + 4, SQ = BK + 8;            // row strides (floats): d-rows, dS rows
    constexpr unsigned QTB = QR * S * 4;             // bytes of one Q or dO buffer
    constexpr int RG = QR / 16, DC = DH * RG / KW;   // dQ: row groups, columns a warp
    const int c0 = DH == D ? 0 : DH * blockIdx.z;     // the block's first gradient column
    float* const dbias = c0 == 0 ? (float*)a.dbias : nullptr;  // one block of a tile adds dS
    static_assert(KW % RG == 0 && DC % 8 == 0, "dQ's 16-row x DC-column blocks cover the tile");
    extern __shared__ float4 smem_tb[];
    float* const base = reinterpret_cast<float*>(smem_tb);
    const unsigned Ka = (unsigned)__cvta_generic_to_shared(base);  // [BK][S]
    const unsigned Va = Ka + BK * S * 4;                            // [BK][S]
    const unsigned Qa = Va + BK * S * 4;                            // [2][QR][S]
    const unsigned Oa = Qa + 2 * QTB;                               // [2][QR][S] dO
    const float* Ks = base;
    const float* Qs = base + 2 * BK * S;
    float* dSs = base + 2 * BK * S + 4 * QR * S;  // [QR][SQ]: dS, rows = queries
    float* Ls = dSs + (DQ ? QR * SQ : 0);         // [QR] lse of the tile's rows (base 2)
    float* Ds = Ls + QR;                          // [QR] D of the tile's rows
    u32* Rk = reinterpret_cast<u32*>(Ds + QR);    // [QR] their dropout row keys
    const BlockHead hd = block_head<D>(a, blockIdx.y);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
    const int mr = lane % 8, mi = lane / 8;  // ldmatrix: the lane gives row mr of matrix mi
    const int j0 = blockIdx.x * BK;
    const float* lse = (const float*)a.lse + (i64)hd.z * a.n_q;
    const float* dvec = (const float*)a.dvec + (i64)hd.z * a.n_q;
    float* dq = (float*)a.dq + (i64)hd.z * a.n_q * D;
    const int keys[2] = {j0 + 16 * warp + g, j0 + 16 * warp + g + 8};  // the lane's two keys
    const int qr = 16 * (warp % RG), qc = c0 + DC * (warp / RG);  // dQ: the warp's rows, columns
    // The lane's addresses at the first block: K_j's (V_j's) A fragment of the warp's keys,
    // Q_i's (dO_i's) B fragments of queries 0 .. 15 by ldmatrix; Q_i's (dO_i's) rows 2t,
    // 2t + 1 at column g; dS's keys 2t, 2t + 1 of query row qr + g; K_j's rows 2t, 2t + 1 at
    // column qc + g.
    const unsigned ka_at = Ka + ((16 * warp + mr + 8 * (mi % 2)) * S + 4 * (mi / 2)) * 4;
    const unsigned qb_at = Qa + ((mr + 8 * (mi / 2)) * S + 4 * (mi % 2)) * 4;
    const float* q_at = Qs + 2 * t * S + g;
    const float* ds_at = dSs + (qr + g) * SQ + 2 * t;
    const float* k_at = Ks + 2 * t * S + qc + g;

    float dk[DH / 8][4], dv[DH / 8][4];
    zero_frags<DH / 8>(dk);
    zero_frags<DH / 8>(dv);
    using Rows = KeyPassRows<QR, D, BK, THREADS>;
    Rows stats{lse, dvec, a.n_q, Rows::first_tile(mods, j0), Rows::rows_end(a, mods, j0)};
    stats.load_first(Ka, Va, Qa, Oa, hd.k, hd.v, hd.q, hd.d_out, j0, a.n_k);

    for (int i0 = stats.first, step = 0; i0 < stats.end; i0 += QR, step++) {
        const unsigned buf = (step % 2) * QTB;  // this tile's Q, dO buffers; QTB - buf: the next's
        cp_async_wait<0>();  // this thread's copies of Q_i, dO_i (and at step 0, K_j, V_j)
        __syncthreads();     // everyone's; every warp done with tile i - 1 (its lse, D, dS)
        stats.prefetch(Qa + QTB - buf, Oa + QTB - buf, hd.q, hd.d_out, i0);
        stats.store_and_fetch(Ls, Ds, i0);
        if (drop.enabled && threadIdx.x < QR)
            Rk[threadIdx.x] = row_key(drop, hd.b, hd.h, i0 + threadIdx.x);
        __syncthreads();

        // S^T = K_j Q_i^T and dP^T = V_j dO_i^T
        float st[QR / 8][4], dpt[QR / 8][4];
        two_products<D, QR / 8, S>(st, dpt, ka_at, BK * S * 4, qb_at + buf, 2 * QTB);

        // P^T = 2^(S^T scale log2 e - lse) and dS^T = P^T o (Z o dP^T - D) on the
        // accumulators, st becoming (P o Z)^T: the lane's elements are keys keys[e / 2],
        // queries i0 + 8nb + 2t + (e & 1).
        const bool plain = tile_plain(mods, i0, j0, BK);
        const float cap2 = mods.softcap * 1.4426950408889634f, inner = a.scale * mods.inv_softcap;
        const int lo[2] = {CAP ? query_start(mods, keys[0]) : 0, CAP ? query_start(mods, keys[1]) : 0};
        const int hi[2] = {CAP ? query_end(mods, keys[0]) : 0, CAP ? query_end(mods, keys[1]) : 0};
#pragma unroll
        for (int nb = 0; nb < QR / 8; nb++) {
            const float2 L = *reinterpret_cast<const float2*>(Ls + 8 * nb + 2 * t);
            const float2 Dr = *reinterpret_cast<const float2*>(Ds + 8 * nb + 2 * t);
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int q = 8 * nb + 2 * t + (e & 1), i = i0 + q;
                float x, slope = 1.0f;
                if (CAP) {  // every score capped, cut by the key's query range
                    const bool seen = i >= lo[e / 2] && i < hi[e / 2] && keys[e / 2] < a.n_k;
                    x = capped_score2<false>(cap2, inner, st[nb][e], seen, slope);
                } else {
                    x = backward_score2<MODS>(mods, plain, a.scale, hd.b, hd.h, i, keys[e / 2], st[nb][e]);
                }
                const float p = ex2_ftz(x - ((e & 1) ? L.y : L.x));
                const float z = drop.enabled ? dropout_factor(drop, Rk[q], keys[e / 2]) : 1.0f;
                const float ds = p * (z * dpt[nb][e] - ((e & 1) ? Dr.y : Dr.x));
                dpt[nb][e] = MODS && !plain
                                 ? score_grad(mods, dbias, hd.b, hd.h, i, keys[e / 2],
                                              a.scale * st[nb][e], ds)
                                 : ds * slope;
                st[nb][e] = p * z;
            }
        }

        if (DQ) {  // dS to shared memory for dQ: rows = queries, columns = keys
#pragma unroll
            for (int nb = 0; nb < QR / 8; nb++)
#pragma unroll
                for (int e = 0; e < 4; e++)
                    dSs[(8 * nb + 2 * t + (e & 1)) * SQ + 16 * warp + g + 8 * (e / 2)] = dpt[nb][e];
        }

        // ANCHOR: tf32_backward_dk_dv
        // dV_j += (P o Z)^T dO_i and dK_j += dS^T Q_i, 8 queries a step
        const float* qt = q_at + buf / 4;
#pragma unroll
        for (int kq = 0; kq < QR / 8; kq++) {
            u32 pb[4], ps[4], sb[4], ss[4];
            c_as_a(st[kq], pb, ps);
            c_as_a(dpt[kq], sb, ss);
#pragma unroll
            for (int c = 0; c < DH / 8; c++) {
                const float* at = qt + 8 * kq * S + c0 + 8 * c;  // Q[8kq + 2t][c0 + 8c + g]
                u32 big[2], small[2];
                split_tf32(at[2 * QTB / 4], big[0], small[0]);  // dO_i's
                split_tf32(at[2 * QTB / 4 + S], big[1], small[1]);
                mma_3xtf32(dv[c], pb, ps, big, small);
                split_tf32(at[0], big[0], small[0]);
                split_tf32(at[S], big[1], small[1]);
                mma_3xtf32(dk[c], sb, ss, big, small);
            }
        }
        // ANCHOR_END: tf32_backward_dk_dv
        if (!DQ) continue;
        __syncthreads();  // dS is whole

        // dQ_i += dS K_j for the warp's 16 query rows and DC columns, 8 keys a step, added to
        // the f32 accumulator in device memory two floats an atomic
        float dqa[DC / 8][4];
        zero_frags<DC / 8>(dqa);
#pragma unroll
        for (int kk = 0; kk < BK / 8; kk++) {
            const float2 x0 = *reinterpret_cast<const float2*>(ds_at + 8 * kk);
            const float2 x1 = *reinterpret_cast<const float2*>(ds_at + 8 * SQ + 8 * kk);
            u32 db[4], ds[4];
            split_tf32(x0.x, db[0], ds[0]);  // keys renumbered: logical t is key 2t
            split_tf32(x1.x, db[1], ds[1]);
            split_tf32(x0.y, db[2], ds[2]);
            split_tf32(x1.y, db[3], ds[3]);
#pragma unroll
            for (int c = 0; c < DC / 8; c++) {
                const float* at = k_at + 8 * kk * S + 8 * c;  // K[8kk + 2t][qc + 8c + g]
                u32 big[2], small[2];
                split_tf32(at[0], big[0], small[0]);
                split_tf32(at[S], big[1], small[1]);
                mma_3xtf32(dqa[c], db, ds, big, small);
            }
        }
        add_dq_rows<D, DC>(dq, dqa, i0 + qr + g, a.n_q, qc, t, a.scale);
    }
    cp_async_wait<0>();  // (K_j's and V_j's copies, when no query row sees the tile)

    // dK_j (times the scale) and dV_j of the warp's keys, per query head (the host sums a
    // GQA group's heads)
#pragma unroll
    for (int r = 0; r < 2; r++) {
        if (keys[r] >= a.n_k) continue;
#pragma unroll
        for (int c = 0; c < DH / 8; c++) {
            const i64 at = ((i64)hd.z * a.n_k + keys[r]) * D + c0 + 8 * c + 2 * t;
            *reinterpret_cast<float2*>((float*)a.dk + at) =
                make_float2(a.scale * dk[c][2 * r], a.scale * dk[c][2 * r + 1]);
            *reinterpret_cast<float2*>((float*)a.dv + at) =
                make_float2(dv[c][2 * r], dv[c][2 * r + 1]);
        }
    }
}
// ANCHOR_END: tf32_backward

// ANCHOR: tf32_backward_q
// The separate dQ pass (Options::deterministic), over query tiles: a block owns 16 query rows
// a warp (Q_i, dO_i, their lse and D stay put) and walks the key tiles they see, K_j, V_j by
// cp.async into two buffers each, recomputing S = Q_i K_j^T and dP = dO_i V_j^T as the
// forward computes S (rows = queries, so that dS is an A fragment of dQ_i += dS K_j, keys
// renumbered by c_as_a); every dQ element is written once, by one lane, in a fixed order.
template <int D, bool MODS, bool CAP = false, int W = 4, int KB = 64>
__device__ void tf32_backward_q(const FlashArgs& a, const ScoreMods& mods, const Dropout& drop) {
    constexpr int THREADS = 32 * W, QR = 16 * W;  // W warps, QR rows, KB keys a tile
    constexpr int S = D + 4;
    constexpr unsigned QB = QR * S * 4, KVB = KB * S * 4;  // bytes of Q_i (dO_i), of K_j (V_j)
    constexpr float LOG2E = 1.4426950408889634f;
    extern __shared__ float4 smem_tq[];
    const unsigned Qa = (unsigned)__cvta_generic_to_shared(smem_tq);  // [QR][S]
    const unsigned Oa = Qa + QB;                                       // [QR][S] dO
    const unsigned Ka = Oa + QB;                                       // [2][KB][S]
    const unsigned Va = Ka + 2 * KVB;                                  // [2][KB][S]
    const float* Kf = reinterpret_cast<const float*>(smem_tq) + 2 * QR * S;
    const BlockHead hd = block_head<D>(a, blockIdx.y);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
    const int mr = lane % 8, mi = lane / 8;
    // Q_i's (dO_i's) A fragment of the warp's rows, K_j's (V_j's) B fragments of keys 0 .. 15
    // (as the forward's), and K_j's rows 2t, 2t + 1 at column g (dQ's B fragment)
    const unsigned q_at = Qa + ((16 * warp + mr + 8 * (mi % 2)) * S + 4 * (mi / 2)) * 4;
    const unsigned k_at = Ka + ((mr + 8 * (mi / 2)) * S + 4 * (mi % 2)) * 4;
    const float* kq_at = Kf + 2 * t * S + g;
    const int i0 = blockIdx.x * QR;
    const int rows[2] = {i0 + 16 * warp + g, i0 + 16 * warp + g + 8};
    const float* lse = (const float*)a.lse + (i64)hd.z * a.n_q;
    const float* dvec = (const float*)a.dvec + (i64)hd.z * a.n_q;
    float L[2], Dr[2];
    u32 key[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const bool ok = rows[r] < a.n_q;
        const float l = ok ? lse[rows[r]] : NEG_INF;
        L[r] = l == NEG_INF ? -NEG_INF : l * LOG2E;  // no key seen: +inf, so that P = 0
        Dr[r] = ok ? dvec[rows[r]] : 0.0f;
        key[r] = drop.enabled ? row_key(drop, hd.b, hd.h, rows[r]) : 0u;
    }
    const int j_end = key_end(mods, min(i0 + QR, a.n_q) - 1);
    // the first key tile a row of the block sees (the window's left side), on the grid
    const int j_begin = min(key_start(mods, i0), j_end) / KB * KB;

    if (j_begin < j_end) {
        load_rows_at<D, KB, THREADS>(Ka, hd.k, j_begin, a.n_k);
        load_rows_at<D, KB, THREADS>(Va, hd.v, j_begin, a.n_k);
    }
    load_rows_at<D, QR, THREADS>(Qa, hd.q, i0, a.n_q);
    load_rows_at<D, QR, THREADS>(Oa, hd.d_out, i0, a.n_q);
    cp_async_commit();
    float dq[D / 8][4];
    zero_frags<D / 8>(dq);

    for (int j0 = j_begin, step = 0; j0 < j_end; j0 += KB, step++) {
        const unsigned buf = (step % 2) * KVB;  // this tile's buffers; KVB - buf: the next's
        cp_async_wait<0>();
        __syncthreads();  // everyone's copies; every warp done with tile j - 1
        if (j0 + KB < j_end) {
            load_rows_at<D, KB, THREADS>(Ka + KVB - buf, hd.k, j0 + KB, a.n_k);
            load_rows_at<D, KB, THREADS>(Va + KVB - buf, hd.v, j0 + KB, a.n_k);
            cp_async_commit();
        }
        // S = Q_i K_j^T and dP = dO_i V_j^T
        float st[KB / 8][4], dp[KB / 8][4];
        two_products<D, KB / 8, S>(st, dp, q_at, QB, k_at + buf, 2 * KVB);
        // dS = P o (Z o dP - D), P = 2^(S scale log2 e - lse): the lane's elements are rows
        // rows[e / 2], keys j0 + 8nb + 2t + (e & 1)
        const bool plain = tile_plain(mods, i0, j0, KB);
        const float scale2 = a.scale * LOG2E;
        const int lo[2] = {key_start(mods, rows[0]), key_start(mods, rows[1])};
        const int lim[2] = {key_end(mods, rows[0]), key_end(mods, rows[1])};
        const float cap2 = mods.softcap * LOG2E, inner = a.scale * mods.inv_softcap;
#pragma unroll
        for (int nb = 0; nb < KB / 8; nb++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int j = j0 + 8 * nb + 2 * t + (e & 1), r = e / 2;
                float x, slope = 1.0f;
                if (CAP)
                    x = capped_score2<false>(cap2, inner, st[nb][e], j < lim[r] && j >= lo[r], slope);
                else if (plain)
                    x = st[nb][e] * scale2;
                else if (!MODS)
                    x = j < lim[r] && j >= lo[r] ? st[nb][e] * scale2 : NEG_INF;
                else
                    x = score(mods, false, a.scale, hd.b, hd.h, rows[r], j, st[nb][e]) * LOG2E;
                const float p = ex2_ftz(x - L[r]);
                const float z = drop.enabled ? dropout_factor(drop, key[r], j) : 1.0f;
                const float ds = p * (z * dp[nb][e] - Dr[r]);
                dp[nb][e] = MODS && !plain
                                ? score_grad(mods, (float*)a.dbias, hd.b, hd.h, rows[r], j,
                                             a.scale * st[nb][e], ds)
                                : ds * slope;
            }
        // dQ_i += dS K_j, 8 keys a step (logical key t is key 2t, t + 4 is 2t + 1)
#pragma unroll
        for (int kb = 0; kb < KB / 8; kb++) {
            u32 sb[4], ss[4];
            c_as_a(dp[kb], sb, ss);
#pragma unroll
            for (int c = 0; c < D / 8; c++) {
                const float* at = kq_at + buf / 4 + 8 * kb * S + 8 * c;  // K[8kb + 2t][8c + g]
                u32 big[2], small[2];
                split_tf32(at[0], big[0], small[0]);
                split_tf32(at[S], big[1], small[1]);
                mma_3xtf32(dq[c], sb, ss, big, small);
            }
        }
    }
    cp_async_wait<0>();  // (Q_i's copies, when the block saw no key)

    float* out = (float*)a.dq + (i64)hd.z * a.n_q * D;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        if (rows[r] >= a.n_q) continue;
#pragma unroll
        for (int c = 0; c < D / 8; c++)
            *reinterpret_cast<float2*>(out + (i64)rows[r] * D + 8 * c + 2 * t) =
                make_float2(a.scale * dq[c][2 * r], a.scale * dq[c][2 * r + 1]);
    }
}
// ANCHOR_END: tf32_backward_q

// Nine kernels: without mask, bias or ALiBi, with the softcap (_cut) and with them (_mods),
// each with dQ by atomics, without dQ (_kv), and the dQ pass that follows it (_q).
#define TF32B_THREADS (32 * TF32B_KW)
#define TF32B_BOUNDS __launch_bounds__(TF32B_THREADS, TF32B_KW == 4 && TF32_D <= 64 ? 2 : 1)
// At d = 256 two blocks a key tile, 128 gradient columns each (TF32B_DH), and a dQ pass of
// 2 warps (TF32Q_W) over 32-key tiles (TF32Q_KB): the shared memory's limits in f32.
#define TF32B_DH (TF32_D > 128 ? 128 : TF32_D)
#define TF32Q_W (TF32_D > 128 ? 2 : 4)
#define TF32Q_KB (TF32_D > 128 ? 32 : 64)
#define TF32B_KERNEL(NAME, MODS, DQ, CAP)                                             \
    extern "C" __global__ void TF32B_BOUNDS NAME(FlashArgs a, ScoreMods m, Dropout dr) { \
        tf32_backward<TF32_D, MODS, DQ, TF32B_KW, TF32B_BR, CAP, TF32B_DH>(a, m, dr); \
    }
TF32B_KERNEL(flash2_backward_v2, false, true, false)
TF32B_KERNEL(flash2_backward_v2_cut, false, true, true)
TF32B_KERNEL(flash2_backward_v2_mods, true, true, false)
TF32B_KERNEL(flash2_backward_v2_kv, false, false, false)
TF32B_KERNEL(flash2_backward_v2_kv_cut, false, false, true)
TF32B_KERNEL(flash2_backward_v2_kv_mods, true, false, false)
extern "C" __global__ void __launch_bounds__(32 * TF32Q_W, TF32_D <= 64 ? 2 : 1)
    flash2_backward_v2_q(FlashArgs a, ScoreMods m, Dropout dr) {
    tf32_backward_q<TF32_D, false, false, TF32Q_W, TF32Q_KB>(a, m, dr);
}
extern "C" __global__ void __launch_bounds__(32 * TF32Q_W, TF32_D <= 64 ? 2 : 1)
    flash2_backward_v2_q_cut(FlashArgs a, ScoreMods m, Dropout dr) {
    tf32_backward_q<TF32_D, false, true, TF32Q_W, TF32Q_KB>(a, m, dr);
}
extern "C" __global__ void __launch_bounds__(32 * TF32Q_W, TF32_D <= 64 ? 2 : 1)
    flash2_backward_v2_q_mods(FlashArgs a, ScoreMods m, Dropout dr) {
    // the key pass adds dBias
    tf32_backward_q<TF32_D, true, false, TF32Q_W, TF32Q_KB>(without_dbias(a), m, dr);
}
