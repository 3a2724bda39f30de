// FlashAttention-2 on the tensor cores: bf16 or fp16 inputs and outputs, f32 accumulation,
// warp-level mma.sync.m16n8k16 through inline PTX (sm_80 and later). Prepended: contract.cuh
// (ScoreMods, key_end, modify_score) and tiles.cuh (FlashArgs, tile_plain, score).
//
// The loop is the fp32 kernel's (flash2.cu): a block owns a tile of query rows, K_j and V_j
// stream through shared memory, m, l and O stay in registers. What changes is who computes
// what: a warp owns 16 query rows, and one mma instruction multiplies a 16 x 16 tile of A by
// a 16 x 8 tile of B into a 16 x 8 tile of f32 accumulators spread over the warp's 32 lanes.
//
// The fragments of m16n8k16 (lane = 4 g + t: g = lane / 4 is the "group", t = lane % 4):
//   A (16 x 16, 4 registers of two 16-bit values): a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1],
//                                                   a2 = A[g][2t+8, 2t+9], a3 = A[g+8][2t+8, 2t+9]
//   B (16 x 8, 2 registers):                       b0 = B[2t, 2t+1][g],  b1 = B[2t+8, 2t+9][g]
//   C (16 x 8, 4 floats):                          c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1]
// A lane therefore holds, of every 16 x 8 block of scores, two keys of row g and the same two
// keys of row g + 8. The four lanes t = 0..3 of a group hold a whole row of the block: the
// row's max and sum are 2 shuffles away, not 4 as in the fp32 kernel. And the accumulators
// of S for keys 16kk .. 16kk + 15 (two C blocks) are exactly the A fragment of P for the
// k-step kk of P V_j, once rounded to 16 bits: P never leaves the registers.

#define TC_BR 64   // query rows a block: 4 warps x 16
#define TC_BC 64   // keys a tile
#define TC_NT 128  // threads a block
typedef unsigned short u16;

// ANCHOR: tc_mma
// Two floats rounded to one register of two bf16 (or fp16) values, lo in the low half.
template <bool BF16>
__device__ __forceinline__ u32 pack2(float lo, float hi) {
    u32 r;
    if (BF16) asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    else asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// c += A B for one 16 x 16 x 8 step (fragments as above), f32 accumulators.
template <bool BF16>
__device__ __forceinline__ void mma16816(float* c, const u32* a, u32 b0, u32 b1) {
    if (BF16)
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
            "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    else
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
            "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ANCHOR_END: tc_mma

// Two consecutive 16-bit values of shared memory as one register.
__device__ __forceinline__ u32 ld2(const u16* p) { return *reinterpret_cast<const u32*>(p); }

// Rows row0 .. row0 + ROWS - 1 of a [n][D] 16-bit tensor into shared memory, rows padded to
// D + 8 values (so that the 8 groups of a warp reading 8 rows hit 8 different bank sets);
// rows past n are zeros. 16 bytes a thread and step.
template <int D, int ROWS, int THREADS = TC_NT>
__device__ __forceinline__ void load_tile16(u16* dst, const u16* src, int row0, int n) {
    constexpr int C8 = D / 8;
    for (int e = threadIdx.x; e < ROWS * C8; e += THREADS) {
        const int r = e / C8, c = (e % C8) * 8;
        uint4 x = make_uint4(0u, 0u, 0u, 0u);
        if (row0 + r < n) x = *reinterpret_cast<const uint4*>(src + (i64)(row0 + r) * D + c);
        *reinterpret_cast<uint4*>(dst + r * (D + 8) + c) = x;
    }
}

// ANCHOR: tc_ldmatrix
// ldmatrix: four 8 x 8 matrices of 16-bit values from shared memory, one per register; lanes
// 8i .. 8i + 7 give the addresses of matrix i's 8 rows (16 bytes each). Lane 4g + t receives
// row g, columns 2t and 2t + 1 of each — an mma fragment. With .trans, of the transposed
// matrix: row 2t and 2t + 1, column g.
// (ldsm_x4_at, ldsm_x4_trans_at in mma.cuh: the same at a 32-bit shared address.)
__device__ __forceinline__ void ldsm_x4(u32* r, const u16* p) {
    ldsm_x4_at(r, (unsigned)__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void ldsm_x4_trans(u32* r, const u16* p) {
    ldsm_x4_trans_at(r, (unsigned)__cvta_generic_to_shared(p));
}


// The four fragment reads of the kernels, from a row-major 16-bit tile t (row stride ts), in
// ldmatrix's lane addressing (lane, 0..31, gives row lane % 8 of matrix lane / 8):
// the A fragment of t's 16 x 16 block at (r0, c0) — matrices: rows +0 / +8, then columns +0 / +8;
__device__ __forceinline__ void frag_a(u32* r, const u16* t, int ts, int r0, int c0, int lane) {
    const int mr = lane % 8, mi = lane / 8;
    ldsm_x4(r, t + (r0 + mr + 8 * (mi % 2)) * ts + c0 + 8 * (mi / 2));
}
// the B fragments of B = t^T (t is [n][k], as K_j) for blocks n0 and n0 + 8 at k-step k0:
// b0, b1 of block n0 in r[0], r[1], of block n0 + 8 in r[2], r[3];
__device__ __forceinline__ void frag_b2(u32* r, const u16* t, int ts, int n0, int k0, int lane) {
    const int mr = lane % 8, mi = lane / 8;
    ldsm_x4(r, t + (n0 + 8 * (mi / 2) + mr) * ts + k0 + 8 * (mi % 2));
}
// the same for B = t (t is [k][n], as V_j), by ldmatrix.trans;
__device__ __forceinline__ void frag_b2_trans(u32* r, const u16* t, int ts, int k0, int n0,
                                              int lane) {
    const int mr = lane % 8, mi = lane / 8;
    ldsm_x4_trans(r, t + (k0 + 8 * (mi % 2) + mr) * ts + n0 + 8 * (mi / 2));
}
// the A fragment of A = t^T (t is [k][m], as dS^T) for rows m0.. at k-step k0, by .trans.
__device__ __forceinline__ void frag_a_trans(u32* r, const u16* t, int ts, int k0, int m0,
                                             int lane) {
    const int mr = lane % 8, mi = lane / 8;
    ldsm_x4_trans(r, t + (k0 + 8 * (mi / 2) + mr) * ts + m0 + 8 * (mi % 2));
}
// ANCHOR_END: tc_ldmatrix

// [tile_async] load_tile16 through cp.async: the copies are only issued here.
template <int D, int ROWS, int THREADS = TC_NT>
__device__ __forceinline__ void load_tile16_async(u16* dst, const u16* src, int row0, int n) {
    constexpr int C8 = D / 8;
    for (int e = threadIdx.x; e < ROWS * C8; e += THREADS) {
        const int r = e / C8, c = (e % C8) * 8;
        const bool ok = row0 + r < n;
        cp_async16(dst + r * (D + 8) + c, ok ? src + (i64)(row0 + r) * D + c : src, ok);
    }
}

// The (batch, head) of the block and where its Q, K, V rows start (16-bit values; with GQA,
// query head h reads key/value head h / (heads / kv_heads)).
struct TcHead {
    int z, b, h;
    const u16 *q, *k, *v;
};
template <int D>
__device__ __forceinline__ TcHead tc_head(const FlashArgs& a) {
    const int z = blockIdx.y, b = z / a.heads, h = z % a.heads;
    const i64 kv = ((i64)b * a.kv_heads + h / (a.heads / a.kv_heads)) * a.n_k * D;
    return {z, b, h, (const u16*)a.q + (i64)z * a.n_q * D, (const u16*)a.k + kv,
            (const u16*)a.v + kv};
}

// N accumulator fragments (4 floats each) set to zero.
template <int N>
__device__ __forceinline__ void zero_frags(float (*x)[4]) {
#pragma unroll
    for (int i = 0; i < N; i++) x[i][0] = x[i][1] = x[i][2] = x[i][3] = 0.0f;
}


// ANCHOR: tc_p_fragment
// The A fragments of P~ for keys 16kk .. 16kk + 15: the accumulators of S's blocks 2kk and
// 2kk + 1, rounded to 16 bits.
template <bool BF16>
__device__ __forceinline__ void p_fragment(const float (*s)[4], int kk, u32* pa) {
    pa[0] = pack2<BF16>(s[2 * kk][0], s[2 * kk][1]);
    pa[1] = pack2<BF16>(s[2 * kk][2], s[2 * kk][3]);
    pa[2] = pack2<BF16>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    pa[3] = pack2<BF16>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
}

// ANCHOR_END: tc_p_fragment

// The end: O = O / l (l summed over the row's 4 lanes), rounded to 16 bits; lse = ln 2 · m + ln l;
// a row that saw no key gets O = 0, lse = -inf.
template <int D, bool BF16>
__device__ __forceinline__ void tc_write_rows(const FlashArgs& a, int z, const int* rows,
                                              const float* m, float* l, const float (*o)[4]) {
    const int t = threadIdx.x % 4;
    u16* out = (u16*)a.o + (i64)z * a.n_q * D;
    float* lse = (float*)a.lse + (i64)z * a.n_q;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
        if (rows[r] >= a.n_q) continue;
        const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
#pragma unroll
        for (int c = 0; c < D / 8; c++)
            *reinterpret_cast<u32*>(out + (i64)rows[r] * D + 8 * c + 2 * t) =
                pack2<BF16>(o[c][2 * r] * inv, o[c][2 * r + 1] * inv);
        if (t == 0) lse[rows[r]] = l[r] > 0.0f ? m[r] * 0.6931471805599453f + logf(l[r]) : NEG_INF;
    }
}

// ANCHOR: tc_forward_v1
// Tensor-core forward, version 1: the first mma kernel. Plain 16-byte loads of Q_i, K_j, V_j
// into shared memory, fragments read from there with 32-bit loads (Q once, into registers;
// K_j every tile), V_j's B fragments assembled from two 16-bit loads each (V_j is stored
// row-major, but B wants two consecutive *keys* of one column in a register).
template <int D, bool BF16>
__device__ void tc_forward_v1(const FlashArgs& a, const ScoreMods& mods) {
    constexpr int S = D + 8;  // shared-memory row stride, in 16-bit values
    extern __shared__ uint4 smem_tc[];
    u16* Qs = reinterpret_cast<u16*>(smem_tc);  // [BR][S]
    u16* Ks = Qs + TC_BR * S;                    // [BC][S]
    u16* Vs = Ks + TC_BC * S;                    // [BC][S]
    const TcHead hd = tc_head<D>(a);
    const int warp = threadIdx.x / 32, g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
    const int i0 = blockIdx.x * TC_BR;
    const int rows[2] = {i0 + warp * 16 + g, i0 + warp * 16 + g + 8};  // the lane's two rows

    load_tile16<D, TC_BR>(Qs, hd.q, i0, a.n_q);
    __syncthreads();
    u32 qf[D / 16][4];  // Q_i's A fragments for the warp's 16 rows, one per 16 columns of d
    const u16* qw = Qs + warp * 16 * S;
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        qf[kk][0] = ld2(qw + g * S + 16 * kk + 2 * t);
        qf[kk][1] = ld2(qw + (g + 8) * S + 16 * kk + 2 * t);
        qf[kk][2] = ld2(qw + g * S + 16 * kk + 2 * t + 8);
        qf[kk][3] = ld2(qw + (g + 8) * S + 16 * kk + 2 * t + 8);
    }
    float o[D / 8][4];                // O_i: the lane's 2 rows x 2 columns of each 8
    float m[2] = {NEG_INF, NEG_INF};  // running max, base-2 units (scores times log2 e)
    float l[2] = {0.0f, 0.0f};        // the lane's part of the running sum (summed at the end)
    zero_frags<D / 8>(o);
    const int j_end = key_end(mods, min(i0 + TC_BR, a.n_q) - 1);

    for (int j0 = 0; j0 < j_end; j0 += TC_BC) {
        __syncthreads();  // every warp is done with K_j-1, V_j-1
        load_tile16<D, TC_BC>(Ks, hd.k, j0, a.n_k);
        load_tile16<D, TC_BC>(Vs, hd.v, j0, a.n_k);
        __syncthreads();

        // S = Q_i K_j^T: the warp's 16 rows x 64 keys, 8 blocks of 8 keys. B = K_j^T, so
        // B[kd][n] = K_j[n][kd]: two consecutive d of one key row, one 32-bit load.
        float s[TC_BC / 8][4];
        zero_frags<TC_BC / 8>(s);
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++)
#pragma unroll
            for (int nb = 0; nb < TC_BC / 8; nb++) {
                const u16* kr = Ks + (8 * nb + g) * S + 16 * kk + 2 * t;
                mma16816<BF16>(s[nb], qf[kk], ld2(kr), ld2(kr + 8));
            }

        tc_softmax_step<D>(a, mods, hd.b, hd.h, i0, j0, rows, s, m, l, o);

        // O_i += P~ V_j: k-step kk covers keys 16kk..16kk+15, whose scores are the C blocks
        // 2kk and 2kk+1 — in A's layout already. B = V_j: b0 = V_j[2t, 2t+1][col], two rows.
#pragma unroll
        for (int kk = 0; kk < TC_BC / 16; kk++) {
            u32 pa[4];
            p_fragment<BF16>(s, kk, pa);
#pragma unroll
            for (int c = 0; c < D / 8; c++) {
                const u16* vc = Vs + (16 * kk + 2 * t) * S + 8 * c + g;
                const u32 b0 = (u32)vc[0] | (u32)vc[S] << 16;
                const u32 b1 = (u32)vc[8 * S] | (u32)vc[9 * S] << 16;
                mma16816<BF16>(o[c], pa, b0, b1);
            }
        }
    }
    tc_write_rows<D, BF16>(a, hd.z, rows, m, l, o);
}
// ANCHOR_END: tc_forward_v1

// ANCHOR: tc_products
// The two products of a tile for a warp's 16 query rows (versions 2, 3, 6, 7, 10).
// S = Q_i K_j^T over KB keys: Q_i's A fragments in registers (qf, one per 16 columns of d);
// one ldmatrix gives the B registers of key blocks nb and nb + 1.
template <int D, bool BF16, int KB>
__device__ __forceinline__ void tc_scores(float (*s)[4], const u32 (*qf)[4], const u16* Ks,
                                          int lane) {
    constexpr int S = D + 8;
    zero_frags<KB / 8>(s);
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++)
#pragma unroll
        for (int nb = 0; nb < KB / 8; nb += 2) {
            u32 kb[4];
            frag_b2(kb, Ks, S, 8 * nb, 16 * kk, lane);
            mma16816<BF16>(s[nb], qf[kk], kb[0], kb[1]);
            mma16816<BF16>(s[nb + 1], qf[kk], kb[2], kb[3]);
        }
}
// O_i += P~ V_j: P~'s A fragments straight from S's accumulators; one ldmatrix.trans gives
// the B registers of column blocks c and c + 1.
template <int D, bool BF16, int KB>
__device__ __forceinline__ void tc_pv(float (*o)[4], const float (*s)[4], const u16* Vs,
                                      int lane) {
    constexpr int S = D + 8;
#pragma unroll
    for (int kk = 0; kk < KB / 16; kk++) {
        u32 pa[4];
        p_fragment<BF16>(s, kk, pa);
#pragma unroll
        for (int c = 0; c < D / 8; c += 2) {
            u32 vb[4];
            frag_b2_trans(vb, Vs, S, 16 * kk, 8 * c, lane);
            mma16816<BF16>(o[c], pa, vb[0], vb[1]);
            mma16816<BF16>(o[c + 1], pa, vb[2], vb[3]);
        }
    }
}
// ANCHOR_END: tc_products

// ANCHOR: tc_forward_v2
// Tensor-core forward, versions 2 and 3. Version 2: every fragment by ldmatrix — one
// instruction gives a lane its part of four 8 x 8 matrices, so Q_i's four A registers, or
// K_j's B registers for two blocks of 8 keys, are one instruction instead of four 32-bit
// loads; and ldmatrix.trans delivers V_j's B fragments straight from the row-major tile
// (version 1 needed four 16-bit loads and two shifts per 16 x 8 block).
// Version 3 (PIPE): K_j+1 and V_j+1 are copied by cp.async into a second pair of buffers
// while tile j is computed; the block waits at the top of a step only for what it asked for
// a whole step earlier.
template <int D, bool BF16, bool PIPE, int FAST = 0, int KB = TC_BC>
__device__ void tc_forward_v2(const FlashArgs& a, const ScoreMods& mods) {
    constexpr int S = D + 8, KV = KB * S;  // row stride; one K or V buffer
    extern __shared__ uint4 smem_tc[];
    u16* Qs = reinterpret_cast<u16*>(smem_tc);  // [BR][S]
    u16* Kb = Qs + TC_BR * S;                    // [2 if PIPE][BC][S]
    u16* Vb = Kb + (PIPE ? 2 : 1) * KV;          // [2 if PIPE][BC][S]
    const TcHead hd = tc_head<D>(a);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4;
    const int i0 = blockIdx.x * TC_BR;
    const int rows[2] = {i0 + warp * 16 + g, i0 + warp * 16 + g + 8};
    const int j_end = key_end(mods, min(i0 + TC_BR, a.n_q) - 1);

    if (PIPE && j_end > 0) {  // K_0, V_0 on their way while Q_i is loaded
        load_tile16_async<D, KB>(Kb, hd.k, 0, a.n_k);
        load_tile16_async<D, KB>(Vb, hd.v, 0, a.n_k);
        cp_async_commit();
    }
    load_tile16<D, TC_BR>(Qs, hd.q, i0, a.n_q);
    __syncthreads();
    u32 qf[D / 16][4];  // Q_i's A fragments for the warp's 16 rows, one per 16 columns of d
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++)
        frag_a(qf[kk], Qs, S, warp * 16, 16 * kk, lane);
    float o[D / 8][4];
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};
    zero_frags<D / 8>(o);

    for (int j0 = 0, step = 0; j0 < j_end; j0 += KB, step++) {
        const u16* Ks = Kb + (PIPE ? (step % 2) * KV : 0);
        const u16* Vs = Vb + (PIPE ? (step % 2) * KV : 0);
        __syncthreads();  // every warp is done with the tiles of step - 1
        if (PIPE) {
            if (j0 + KB < j_end) {  // K_j+1, V_j+1 into the buffers step - 1 used
                load_tile16_async<D, KB>(Kb + ((step + 1) % 2) * KV, hd.k, j0 + KB, a.n_k);
                load_tile16_async<D, KB>(Vb + ((step + 1) % 2) * KV, hd.v, j0 + KB, a.n_k);
            }
            cp_async_commit();   // (empty after the last tile: the count stays right)
            cp_async_wait<1>();  // K_j, V_j have arrived
        } else {
            load_tile16<D, KB>(Kb, hd.k, j0, a.n_k);
            load_tile16<D, KB>(Vb, hd.v, j0, a.n_k);
        }
        __syncthreads();

        float s[KB / 8][4];
        tc_scores<D, BF16, KB>(s, qf, Ks, lane);  // S = Q_i K_j^T
        tc_softmax_step<D, FAST, KB>(a, mods, hd.b, hd.h, i0, j0, rows, s, m, l, o);
        tc_pv<D, BF16, KB>(o, s, Vs, lane);  // O_i += P~ V_j
    }
    tc_write_rows<D, BF16>(a, hd.z, rows, m, l, o);
}
// ANCHOR_END: tc_forward_v2

// ANCHOR: tc_forward_v10
// Tensor-core forward, version 10: version 6's tiling (16 rows a warp, Q_i's fragments in
// registers) with the products software-pipelined inside the warp. S_j+1 = Q_i K_j+1^T is
// issued *before* the softmax of S_j: mma.sync only blocks when its accumulators are read,
// so the tensor cores work on S_j+1 while the same warp spends the exp2 unit and the FP
// pipes on P~_j — at d = 64 the exponentials alone take as many cycles as the mma of a tile.
// K_j+2 and V_j+1 are in flight meanwhile (two buffers of each suffice: K_j+2 takes the
// buffer K_j left at step j - 1, V_j+1 the one V_j-1 left). The two score tiles trade roles
// every step; the loop is unrolled by two so that each stays in registers.
template <int D, bool BF16>
__device__ void tc_forward_v10(const FlashArgs& a, const ScoreMods& mods) {
    constexpr int S = D + 8, KV = TC_BC * S;  // row stride; one K or V buffer
    extern __shared__ uint4 smem_tc[];
    u16* Qs = reinterpret_cast<u16*>(smem_tc);  // [BR][S]
    u16* Kb = Qs + TC_BR * S;                    // [2][BC][S]
    u16* Vb = Kb + 2 * KV;                       // [2][BC][S]
    const TcHead hd = tc_head<D>(a);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4;
    const int i0 = blockIdx.x * TC_BR;
    const int rows[2] = {i0 + warp * 16 + g, i0 + warp * 16 + g + 8};
    const int tiles = (key_end(mods, min(i0 + TC_BR, a.n_q) - 1) + TC_BC - 1) / TC_BC;
    float o[D / 8][4];
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};
    zero_frags<D / 8>(o);

    if (tiles > 0) {
        load_tile16_async<D, TC_BR>(Qs, hd.q, i0, a.n_q);
        load_tile16_async<D, TC_BC>(Kb, hd.k, 0, a.n_k);
        cp_async_commit();  // Q_i, K_0
        if (tiles > 1) load_tile16_async<D, TC_BC>(Kb + KV, hd.k, TC_BC, a.n_k);
        load_tile16_async<D, TC_BC>(Vb, hd.v, 0, a.n_k);
        cp_async_commit();  // K_1, V_0
        cp_async_wait<1>();
        __syncthreads();
    }
    u32 qf[D / 16][4];  // (read only when there is a tile: Q_i is loaded only then)
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++)
        if (tiles > 0) frag_a(qf[kk], Qs, S, warp * 16, 16 * kk, lane);
    // Step t: s_now holds S_t; S_t+1 goes into s_next.
    auto step = [&](int t, float (*s_now)[4], float (*s_next)[4]) {
        const int buf = t % 2;
        __syncthreads();  // every warp is done with step t - 1
        if (t + 2 < tiles) load_tile16_async<D, TC_BC>(Kb + buf * KV, hd.k, (t + 2) * TC_BC, a.n_k);
        if (t + 1 < tiles)
            load_tile16_async<D, TC_BC>(Vb + (1 - buf) * KV, hd.v, (t + 1) * TC_BC, a.n_k);
        cp_async_commit();
        cp_async_wait<1>();  // K_t+1, V_t have arrived
        __syncthreads();
        if (t + 1 < tiles)  // S_t+1, issued and not waited for
            tc_scores<D, BF16, TC_BC>(s_next, qf, Kb + (1 - buf) * KV, lane);
        tc_softmax_step<D, 2>(a, mods, hd.b, hd.h, i0, t * TC_BC, rows, s_now, m, l, o);
        tc_pv<D, BF16, TC_BC>(o, s_now, Vb + buf * KV, lane);
    };
    float sa[TC_BC / 8][4], sb[TC_BC / 8][4];
    if (tiles > 0) tc_scores<D, BF16, TC_BC>(sa, qf, Kb, lane);
    for (int t = 0; t < tiles; t += 2) {
        step(t, sa, sb);
        if (t + 1 < tiles) step(t + 1, sb, sa);
    }
    cp_async_wait<0>();  // (nothing is left in flight when the block ends)
    tc_write_rows<D, BF16>(a, hd.z, rows, m, l, o);
}
// ANCHOR_END: tc_forward_v10

// ANCHOR: tc_forward_v4
// Tensor-core forward, version 4: version 3 with 32 query rows a warp (two 16-row m-tiles,
// 128 a block). Every K_j and V_j fragment a warp reads from shared memory now feeds two
// mma instructions instead of one, halving the shared-memory bytes per FLOP of both
// products; Q_i's fragments no longer fit in registers beside 2 x 64 accumulators of O
// (D = 128), so they are read again (ldmatrix) at every tile, as FlashAttention-2 does.
template <int D, bool BF16, int FAST, int KB = TC_BC>
__device__ void tc_forward_v4(const FlashArgs& a, const ScoreMods& mods) {
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
// ANCHOR_END: tc_forward_v4

// ANCHOR: tc_forward_v11
// Tensor-core forward, versions 11-13: version 8 (32 rows a warp, the folded exp2) with
// what FlashAttention-2 does around the loop rather than in it.
// - Two kernels a version: without a mask or bias (MODS = false) the only tiles that are
//   not plain are the causal diagonal and the keys' end, where a score is cut by one
//   comparison with the row's key_end; the general path (bias and mask pointers, strides,
//   64-bit index arithmetic per score) is compiled only into the _mods kernel. Registers
//   are allocated for the worst path of a kernel, so the common call stops paying for it.
// - One barrier a tile, not two: a thread waits for its own copies of K_j, V_j, then the
//   barrier both publishes every thread's copies and tells that every warp is done with
//   tile j - 1 — whose buffers K_j+1, V_j+1 then go into.
// - Causal: the blocks with the most tiles (the last query rows) are launched first, so
//   the short ones fill the end of the grid instead of one long block running alone.
// Version 11: 64-key tiles; 12: 128-key tiles (FlashAttention-2's d = 64 tiling); 13:
// version 11 compiled for 3 blocks a SM (at most 168 registers: 12 warps, not 8, to hide
// one warp's exp2 phase behind another's mma).
template <int D, bool BF16, bool MODS, int KB>
__device__ void tc_forward_v11(const FlashArgs& a, const ScoreMods& mods) {
    constexpr int S = D + 8, KV = KB * S, QR = 2 * TC_BR;  // QR: query rows a block
    extern __shared__ uint4 smem_tc[];
    u16* Qs = reinterpret_cast<u16*>(smem_tc);  // [QR][S]
    u16* Kb = Qs + QR * S;                       // [2][KB][S]
    u16* Vb = Kb + 2 * KV;                       // [2][KB][S]
    const TcHead hd = tc_head<D>(a);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4;
    const int i0 = (mods.causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x) * QR;
    int rows[2][2];  // m-tile mt of the warp: rows i0 + 64 mt + 16 warp + g (and + 8)
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
        cp_async_wait<0>();  // this thread's copies of K_j, V_j (and at step 0, Q_i)
        __syncthreads();     // everyone's copies; every warp done with tile j - 1
        if (j0 + KB < j_end) {
            load_tile16_async<D, KB>(Kb + ((step + 1) % 2) * KV, hd.k, j0 + KB, a.n_k);
            load_tile16_async<D, KB>(Vb + ((step + 1) % 2) * KV, hd.v, j0 + KB, a.n_k);
            cp_async_commit();
        }

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
            tc_softmax_step<D, 2, KB, MODS>(a, mods, hd.b, hd.h, i0 + 64 * mt, j0, rows[mt], s[mt],
                                            m[mt], l[mt], o[mt]);

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
    cp_async_wait<0>();  // (Q_i's copy, when the block saw no key)
#pragma unroll
    for (int mt = 0; mt < 2; mt++) tc_write_rows<D, BF16>(a, hd.z, rows[mt], m[mt], l[mt], o[mt]);
}
// ANCHOR_END: tc_forward_v11

// ANCHOR: tc_forward_v14
// Tensor-core forward, version 14: version 11 (13 at d = 64) with every address computed
// once. Nsight's stall samples of version 12 put a fifth of the warps' time on integer
// instructions outside the math (IMAD, LEA, SHF, ISETP, BRA; PyTorch's kernel: a twentieth):
// the copy loop of load_tile16_async ran with a trip count the compiler could not see
// (threadIdx.x + 128 i < ROWS · D / 8), re-deriving row, column and two 64-bit addresses for
// every 16 bytes; and each ldmatrix converted a generic pointer (buffer + row · stride +
// column) to a shared-memory address. Here a thread's copies are an unrolled list at fixed
// offsets from one global pointer and one shared address, and a lane's ldmatrix addresses
// are three 32-bit numbers set before the loop (Q_i's, K_j's and V_j's first block): every
// fragment read is that number plus a constant, plus the buffer's offset (load_rows_at,
// ldsm_x4_at in mma.cuh).

template <int D, bool BF16, bool MODS, int KB>
__device__ void tc_forward_v14(const FlashArgs& a, const ScoreMods& mods) {
    constexpr int S = D + 8, QR = 2 * TC_BR;  // row stride (values); query rows a block
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
    const int i0 = (mods.causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x) * QR;
    int rows[2][2];  // m-tile mt of the warp: rows i0 + 64 mt + 16 warp + g (and + 8)
#pragma unroll
    for (int mt = 0; mt < 2; mt++) {
        rows[mt][0] = i0 + 64 * mt + 16 * warp + g;
        rows[mt][1] = rows[mt][0] + 8;
    }
    const int j_end = key_end(mods, min(i0 + QR, a.n_q) - 1);

    if (j_end > 0) {
        load_rows_at<D, KB, TC_NT>(Ka, hd.k, 0, a.n_k);
        load_rows_at<D, KB, TC_NT>(Va, hd.v, 0, a.n_k);
    }
    load_rows_at<D, QR, TC_NT>(Qa, hd.q, i0, a.n_q);
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
        const unsigned buf = (step % 2) * KVB;  // this tile's buffers; KVB - buf: the next's
        cp_async_wait<0>();  // this thread's copies of K_j, V_j (and at step 0, Q_i)
        __syncthreads();     // everyone's copies; every warp done with tile j - 1
        if (j0 + KB < j_end) {
            load_rows_at<D, KB, TC_NT>(Ka + KVB - buf, hd.k, j0 + KB, a.n_k);
            load_rows_at<D, KB, TC_NT>(Va + KVB - buf, hd.v, j0 + KB, a.n_k);
            cp_async_commit();
        }

        float s[2][KB / 8][4];  // S = Q_i K_j^T
        zero_frags<KB / 8>(s[0]);
        zero_frags<KB / 8>(s[1]);
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            u32 qf[2][4];
#pragma unroll
            for (int mt = 0; mt < 2; mt++) ldsm_x4_at(qf[mt], q_at + (64 * mt * S + 16 * kk) * 2);
#pragma unroll
            for (int nb = 0; nb < KB / 8; nb += 2) {
                u32 kb[4];
                ldsm_x4_at(kb, k_at + buf + (8 * nb * S + 16 * kk) * 2);
#pragma unroll
                for (int mt = 0; mt < 2; mt++) {
                    mma16816<BF16>(s[mt][nb], qf[mt], kb[0], kb[1]);
                    mma16816<BF16>(s[mt][nb + 1], qf[mt], kb[2], kb[3]);
                }
            }
        }
#pragma unroll
        for (int mt = 0; mt < 2; mt++)
            tc_softmax_step<D, 2, KB, MODS>(a, mods, hd.b, hd.h, i0 + 64 * mt, j0, rows[mt], s[mt], m[mt],
                                            l[mt], o[mt]);

#pragma unroll
        for (int kk = 0; kk < KB / 16; kk++) {  // O_i += P~ V_j
            u32 pa[2][4];
#pragma unroll
            for (int mt = 0; mt < 2; mt++) p_fragment<BF16>(s[mt], kk, pa[mt]);
#pragma unroll
            for (int c = 0; c < D / 8; c += 2) {
                u32 vb[4];
                ldsm_x4_trans_at(vb, v_at + buf + (16 * kk * S + 8 * c) * 2);
#pragma unroll
                for (int mt = 0; mt < 2; mt++) {
                    mma16816<BF16>(o[mt][c], pa[mt], vb[0], vb[1]);
                    mma16816<BF16>(o[mt][c + 1], pa[mt], vb[2], vb[3]);
                }
            }
        }
    }
    cp_async_wait<0>();  // (Q_i's copy, when the block saw no key)
#pragma unroll
    for (int mt = 0; mt < 2; mt++) tc_write_rows<D, BF16>(a, hd.z, rows[mt], m[mt], l[mt], o[mt]);
}
// ANCHOR_END: tc_forward_v14

// ANCHOR: tc_forward_v5
// Tensor-core forward, version 5: version 4 with the FAST softmax step (tc_softmax_step
// above): fewer instructions between the two products on plain tiles, and O rescaled only
// when a row's max grew.
// ANCHOR_END: tc_forward_v5

// ANCHOR: tc_forward_v6
// Tensor-core forward, version 6: version 3 (16 rows a warp, Q_i's fragments in registers)
// with version 5's softmax step — which of version 5's two changes did the work, per head
// dimension.
// ANCHOR_END: tc_forward_v6

// ANCHOR: tc_forward_v8
// Tensor-core forward, version 8: version 5 with the softmax step's FAST = 2 — on a plain
// tile the scale folds into the exponent's FMA and the exponential is the bare MUFU.EX2
// (ex2_ftz): 4 instructions a score instead of 8, which matters most at d = 64, where a
// score costs half as many mma instructions as at d = 128.
// ANCHOR_END: tc_forward_v8

// ANCHOR: tc_forward_v7
// Tensor-core forward, version 7: version 6 with 128-key tiles (KB). At d = 64 a tile's mma
// work halves with d but its other work does not — the two __syncthreads, the loads' issue,
// the max and sum shuffles, the rescale test — so twice the keys a tile halve that overhead
// per FLOP (FlashAttention-2 uses 128-key tiles at d = 64). Measured: 10 % slower than
// version 5 at d = 64 — the 16-row tiling's doubled K/V reads cost more than it saves.
// ANCHOR_END: tc_forward_v7

// BOUNDS: __launch_bounds__'s arguments in parentheses — (threads) or (threads, the blocks a
// SM the registers must allow). (A written-out 1 is not the same as none: ptxas allocates
// registers a little differently, so the versions timed without it keep the plain form.)
#define TC_KERNEL_LB(NAME, BOUNDS, CALL) \
    ALONE_KERNEL(NAME, BOUNDS, CALL, (FlashArgs a, ScoreMods m), (a, m))
#define TC_KERNEL(NAME, THREADS, CALL) TC_KERNEL_LB(NAME, (THREADS), CALL)
#define TC_KERNEL_MB(NAME, THREADS, MIN_BLOCKS, CALL) TC_KERNEL_LB(NAME, (THREADS, MIN_BLOCKS), CALL)

#define TC_KERNELS(D, T, BF16)                                                              \
    TC_KERNEL(flash2_tc_forward_v1_##T##_d##D, TC_NT, (tc_forward_v1<D, BF16>))             \
    TC_KERNEL(flash2_tc_forward_v2_##T##_d##D, TC_NT, (tc_forward_v2<D, BF16, false>))      \
    TC_KERNEL(flash2_tc_forward_v3_##T##_d##D, TC_NT, (tc_forward_v2<D, BF16, true>))       \
    TC_KERNEL(flash2_tc_forward_v4_##T##_d##D, TC_NT, (tc_forward_v4<D, BF16, 0>))          \
    TC_KERNEL(flash2_tc_forward_v5_##T##_d##D, TC_NT, (tc_forward_v4<D, BF16, 1>))          \
    TC_KERNEL(flash2_tc_forward_v6_##T##_d##D, TC_NT, (tc_forward_v2<D, BF16, true, 1>))    \
    TC_KERNEL(flash2_tc_forward_v7_##T##_d##D, TC_NT,                                       \
              (tc_forward_v2<D, BF16, true, 1, 2 * TC_BC>))                                 \
    TC_KERNEL(flash2_tc_forward_v8_##T##_d##D, TC_NT, (tc_forward_v4<D, BF16, 2>))          \
    TC_KERNEL(flash2_tc_forward_v9_##T##_d##D, TC_NT, (tc_forward_v4<D, BF16, 2, 2 * TC_BC>)) \
    TC_KERNEL(flash2_tc_forward_v10_##T##_d##D, TC_NT, (tc_forward_v10<D, BF16>))            \
    TC_KERNEL_MB(flash2_tc_forward_v11_##T##_d##D, TC_NT, 1, (tc_forward_v11<D, BF16, false, TC_BC>)) \
    TC_KERNEL_MB(flash2_tc_forward_v11_##T##_d##D##_mods, TC_NT, 1,                                \
              (tc_forward_v11<D, BF16, true, TC_BC>))                                         \
    TC_KERNEL_MB(flash2_tc_forward_v12_##T##_d##D, TC_NT, 1,                                       \
              (tc_forward_v11<D, BF16, false, 2 * TC_BC>))                                    \
    TC_KERNEL_MB(flash2_tc_forward_v12_##T##_d##D##_mods, TC_NT, 1,                                \
              (tc_forward_v11<D, BF16, true, 2 * TC_BC>))                                     \
    TC_KERNEL_MB(flash2_tc_forward_v13_##T##_d##D, TC_NT, 3,                                 \
                 (tc_forward_v11<D, BF16, false, TC_BC>))                                     \
    TC_KERNEL_MB(flash2_tc_forward_v13_##T##_d##D##_mods, TC_NT, 3,                          \
                 (tc_forward_v11<D, BF16, true, TC_BC>))                                      \
    TC_KERNEL_MB(flash2_tc_forward_v14_##T##_d##D, TC_NT, D == 64 ? 3 : 1,                   \
                 (tc_forward_v14<D, BF16, false, TC_BC>))                                     \
    TC_KERNEL_MB(flash2_tc_forward_v14_##T##_d##D##_mods, TC_NT, D == 64 ? 3 : 1,            \
                 (tc_forward_v14<D, BF16, true, TC_BC>))                                      \
    TC_KERNEL_MB(flash2_tc_forward_v15_##T##_d##D, TC_NT, 1, (tc_forward_v14<D, BF16, false, 2 * TC_BC>)) \
    TC_KERNEL_MB(flash2_tc_forward_v15_##T##_d##D##_mods, TC_NT, 1,                                \
              (tc_forward_v14<D, BF16, true, 2 * TC_BC>))
TC_KERNELS(64, bf16, true)
TC_KERNELS(128, bf16, true)
TC_KERNELS(64, f16, false)
TC_KERNELS(128, f16, false)

// ---------------------------------------------------------------------------------------
// The backward (FlashAttention-2's Algorithm 2 on the tensor cores).

// One 16-bit value widened to f32.
template <bool BF16>
__device__ __forceinline__ float widen16(u16 x) {
    if (BF16) return __uint_as_float((u32)x << 16);
    float r;
    asm("cvt.f32.f16 %0, %1;\n" : "=f"(r) : "h"(x));
    return r;
}

// Two adjacent floats added to device memory: one vector reduction on sm_90
// (red.global.add.v2.f32), two scalar ones before.
__device__ __forceinline__ void red_add2(float* p, float x, float y) {
#if __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(p), "f"(x), "f"(y) : "memory");
#else
    atomicAdd(p, x);
    atomicAdd(p + 1, y);
#endif
}

// ANCHOR: tc_backward_v1
// Tensor-core backward. A block owns a key tile K_j, V_j (16 keys a warp) and walks the query
// tiles that can see it; the warp's dK_j, dV_j stay in registers. Per query tile, with the
// warp's accumulators holding *transposed* tiles (rows = the warp's 16 keys, columns = the
// tile's 64 queries), so that P^T and dS^T are A fragments as they stand:
//   S^T = K_j Q_i^T,  P^T = exp(S^T - lse),  dV_j += P^T dO_i,
//   dP^T = V_j dO_i^T, dS^T = P^T o (dP^T - D),  dK_j += dS^T Q_i,
// and dQ_i += dS K_j, which needs dS with rows = queries: dS^T goes through shared memory
// (16-bit) and comes back by ldmatrix.trans; each 16 query rows of dQ are added to an f32
// accumulator in device memory with atomics (other key tiles add to the same rows).
// Version 1: 4 warps, 64 keys. PIPE (version 2): Q_i+1 and dO_i+1 are copied by cp.async
// into second buffers while query tile i is computed, as K_j+1, V_j+1 in the forward's
// version 3. LEAN (version 3): lse and D of tile i+1 read into registers during tile i (they
// were the loop's one wait on device memory), lse kept in base-2 units so that P^T costs one
// FMA and one exp2 on a plain tile, and dQ added two floats per atomic (red.v2 on sm_90).
// KW (version 4: 8): warps a block, 16 keys each — 128 keys share each Q_i, dO_i read, and dQ
// gets half as many atomics (one per key tile); the KW/4 warps of 16 query rows split dQ's
// columns. DEFER (version 5): dQ_i is computed after the next tile's first barrier, beside
// the copies of Q_i+2, dO_i+2, instead of behind a barrier of its own: two barriers a tile.
// LEAN = 2 (version 6, with the better of 4 and 8 warps per head dimension): P^T's
// exponential is ex2_ftz (the forward's version 8), one instruction instead of four.
template <int D, bool BF16, bool PIPE = false, int LEAN = 0, int KW = 4, bool DEFER = false>
__device__ void tc_backward_v1(const FlashArgs& a, const ScoreMods& mods) {
    constexpr int THREADS = 32 * KW, BK = 16 * KW;  // threads, keys a block
    constexpr int S = D + 8, SP = TC_BR + 8;   // row strides: d-rows, dS^T rows
    constexpr int QT = TC_BR * S, NB = PIPE ? 2 : 1;  // one Q or dO buffer; buffers of each
    constexpr int DC = D * 4 / KW;                    // dQ columns a warp
    constexpr float LOG2E = 1.4426950408889634f;
    extern __shared__ uint4 smem_tc[];
    u16* Ks = reinterpret_cast<u16*>(smem_tc);  // [BK][S]
    u16* Vs = Ks + BK * S;                       // [BK][S]
    u16* Qb = Vs + BK * S;                       // [NB][BR][S]
    u16* dOb = Qb + NB * QT;                     // [NB][BR][S]
    u16* dSs = dOb + NB * QT;                    // [BK][SP]: dS^T, keys x queries
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
    // the first query row that sees key j0 (causal: i >= j - (n_k - n_q)), on a tile boundary
    const int i_first = mods.causal ? max(0, j0 - (a.n_k - a.n_q)) / TC_BR * TC_BR : 0;
    // LEAN: lse and D of query row i0 + threadIdx.x, read one tile ahead
    float next_l = NEG_INF, next_d = 0.0f;
    auto fetch_stats = [&](int i0) {
        const int i = i0 + threadIdx.x;
        const bool ok = threadIdx.x < TC_BR && i < a.n_q;
        next_l = ok ? lse[i] : NEG_INF;
        next_d = ok ? dvec[i] : 0.0f;
    };
    if (LEAN) fetch_stats(i_first);

    if (PIPE && i_first < a.n_q) {
        load_tile16_async<D, TC_BR, THREADS>(Qb, hd.q, i_first, a.n_q);
        load_tile16_async<D, TC_BR, THREADS>(dOb, d_out, i_first, a.n_q);
        cp_async_commit();
    }
    // dQ_i += dS K_j for the warp's 16 query rows (16 (warp % 4)) and DC columns
    // (DC (warp / 4)), from dS^T in shared memory: A[q][key] = dS^T[key][q] (ldmatrix.trans),
    // B[key][n] = K_j[key][n] (ldmatrix.trans, as V_j in the forward); added to the f32
    // accumulator in device memory.
    auto dq_step = [&](int i0) {
        const int qr = 16 * (warp % 4), qc = DC * (warp / 4);
        float dqa[DC / 8][4];
        zero_frags<DC / 8>(dqa);
#pragma unroll
        for (int kk = 0; kk < BK / 16; kk++) {
            u32 da[4];
            frag_a_trans(da, dSs, SP, 16 * kk, qr, lane);
#pragma unroll
            for (int c = 0; c < DC / 8; c += 2) {
                u32 kb[4];
                frag_b2_trans(kb, Ks, S, 16 * kk, qc + 8 * c, lane);
                mma16816<BF16>(dqa[c], da, kb[0], kb[1]);
                mma16816<BF16>(dqa[c + 1], da, kb[2], kb[3]);
            }
        }
        const int qrows[2] = {i0 + qr + g, i0 + qr + g + 8};
#pragma unroll
        for (int r = 0; r < 2; r++) {
            if (qrows[r] >= a.n_q) continue;
            float* row = dq + (i64)qrows[r] * D + qc + 2 * t;
#pragma unroll
            for (int c = 0; c < DC / 8; c++) {
                if (LEAN) {
                    red_add2(row + 8 * c, a.scale * dqa[c][2 * r], a.scale * dqa[c][2 * r + 1]);
                } else {
                    atomicAdd(row + 8 * c, a.scale * dqa[c][2 * r]);
                    atomicAdd(row + 8 * c + 1, a.scale * dqa[c][2 * r + 1]);
                }
            }
        }
    };

    for (int i0 = i_first; i0 < a.n_q; i0 += TC_BR) {
        const int buf = PIPE ? ((i0 - i_first) / TC_BR) % 2 : 0;  // this tile's Q, dO buffer
        const u16* Qs = Qb + buf * QT;
        const u16* dOs = dOb + buf * QT;
        // every warp is done with Q_i-1, dO_i-1, lse, D and (but in DEFER) dS^T; (DEFER:) dS^T of
        // tile i-1 is whole
        __syncthreads();
        if (PIPE) {
            if (i0 + TC_BR < a.n_q) {  // Q_i+1, dO_i+1 into the buffers tile i - 1 used
                load_tile16_async<D, TC_BR, THREADS>(Qb + (1 - buf) * QT, hd.q, i0 + TC_BR,
                                                     a.n_q);
                load_tile16_async<D, TC_BR, THREADS>(dOb + (1 - buf) * QT, d_out, i0 + TC_BR,
                                                     a.n_q);
            }
            cp_async_commit();
            if (DEFER && i0 > i_first) dq_step(i0 - TC_BR);  // while the copies fly
            cp_async_wait<1>();  // Q_i, dO_i have arrived
        } else {
            load_tile16<D, TC_BR, THREADS>(Qb, hd.q, i0, a.n_q);
            load_tile16<D, TC_BR, THREADS>(dOb, d_out, i0, a.n_q);
        }
        if (LEAN) {
            // lse in base-2 units; a row that saw no key (lse = -inf) gets +inf, so that
            // 2^(s - lse) is 0 without a test
            if (threadIdx.x < TC_BR) {
                Ls[threadIdx.x] = next_l == NEG_INF ? -NEG_INF : next_l * LOG2E;
                Ds[threadIdx.x] = next_d;
            }
            if (i0 + TC_BR < a.n_q) fetch_stats(i0 + TC_BR);
        } else {
            for (int r = threadIdx.x; r < TC_BR; r += THREADS) {
                const bool ok = i0 + r < a.n_q;
                Ls[r] = ok ? lse[i0 + r] : NEG_INF;
                Ds[r] = ok ? dvec[i0 + r] : 0.0f;
            }
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
        if (LEAN) {
            const float scale2 = a.scale * LOG2E;
#pragma unroll
            for (int nb = 0; nb < TC_BR / 8; nb++) {
                const float2 L = *reinterpret_cast<const float2*>(Ls + 8 * nb + 2 * t);
                const float2 Dr = *reinterpret_cast<const float2*>(Ds + 8 * nb + 2 * t);
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int qi = 8 * nb + 2 * t + (e & 1);
                    const float x = plain ? st[nb][e] * scale2
                                          : score(mods, false, a.scale, hd.b, hd.h, i0 + qi,
                                                  keys[e / 2], st[nb][e]) * LOG2E;
                    const float y = x - ((e & 1) ? L.y : L.x);
                    const float p = LEAN >= 2 ? ex2_ftz(y) : exp2f(y);
                    st[nb][e] = p;
                    dpt[nb][e] = p * (dpt[nb][e] - ((e & 1) ? Dr.y : Dr.x));
                }
            }
        } else {
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
                    st[nb][e] = p;
                    dpt[nb][e] = p * (dpt[nb][e] - Ds[qi]);
                }
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
        if (!DEFER) {
            __syncthreads();  // dS^T is whole
            dq_step(i0);
        }
    }
    if (DEFER && i_first < a.n_q) {  // the last tile's dQ
        __syncthreads();
        dq_step(i_first + (a.n_q - 1 - i_first) / TC_BR * TC_BR);
    }

    cp_async_wait<0>();  // (nothing is left in flight when the block ends)

    // dK_j (times the scale) and dV_j of the warp's keys. LEAN without GQA (each query head
    // has its own K, V head): rounded to 16 bits here, the gradients as they are returned.
    // Otherwise f32 per query head (the GQA group sum and the rounding follow in tc_group_sum).
    const bool final16 = LEAN && a.heads == a.kv_heads;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        if (keys[r] >= a.n_k) continue;
#pragma unroll
        for (int c = 0; c < D / 8; c++) {
            const i64 at = ((i64)hd.z * a.n_k + keys[r]) * D + 8 * c + 2 * t;
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
// ANCHOR_END: tc_backward_v1

// ANCHOR: tc_backward_v7
// Tensor-core backward, version 7: version 6 (PIPE, LEAN = 2; 4 warps at d = 64, 8 at
// d = 128) with what made the forward's version 14: every copy an unrolled cp.async at a
// fixed offset (K_j, V_j too, with Q_i and dO_i of the first tile), every ldmatrix at a
// 32-bit shared address set before the loop plus a constant, and (MODS = false, the kernel
// for calls without mask or bias) a cut score on the causal diagonal by one comparison.
template <int D, bool BF16, bool MODS, int KW>
__device__ void tc_backward_v7(const FlashArgs& a, const ScoreMods& mods) {
    constexpr int THREADS = 32 * KW, BK = 16 * KW;  // threads, keys a block
    constexpr int S = D + 8, SP = TC_BR + 8;          // row strides: d-rows, dS^T rows
    constexpr unsigned QTB = TC_BR * S * 2;           // bytes of one Q or dO buffer
    constexpr int DC = D * 4 / KW;                    // dQ columns a warp
    constexpr float LOG2E = 1.4426950408889634f;
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
    const int j0 = blockIdx.x * BK;
    const u16* d_out = (const u16*)a.d_out + (i64)hd.z * a.n_q * D;
    const float* lse = (const float*)a.lse + (i64)hd.z * a.n_q;
    const float* dvec = (const float*)a.dvec + (i64)hd.z * a.n_q;
    float* dq = (float*)a.dq + (i64)hd.z * a.n_q * D;
    const int keys[2] = {j0 + 16 * warp + g, j0 + 16 * warp + g + 8};  // the lane's two keys
    const int qr = 16 * (warp % 4), qc = DC * (warp / 4);  // dQ: the warp's rows, columns
    // The lane's ldmatrix addresses (frag_a, frag_b2, frag_b2_trans, frag_a_trans at the
    // first block; the loops add constants and the buffer's offset):
    const unsigned ka_at = Ka + ((16 * warp + mr + 8 * (mi % 2)) * S + 8 * (mi / 2)) * 2;  // K_j, V_j as A
    const unsigned qb_at = Qa + ((8 * (mi / 2) + mr) * S + 8 * (mi % 2)) * 2;  // Q_i, dO_i as B^T
    const unsigned qt_at = Qa + ((8 * (mi % 2) + mr) * S + 8 * (mi / 2)) * 2;  // Q_i, dO_i as B
    const unsigned da_at = dSa + ((8 * (mi / 2) + mr) * SP + qr + 8 * (mi % 2)) * 2;  // dS as A
    const unsigned kt_at = Ka + ((8 * (mi % 2) + mr) * S + qc + 8 * (mi / 2)) * 2;  // K_j as B

    float dk[D / 8][4], dv[D / 8][4];
    zero_frags<D / 8>(dk);
    zero_frags<D / 8>(dv);
    // the first query row that sees key j0 (causal: i >= j - (n_k - n_q)), on a tile boundary
    const int i_first = mods.causal ? max(0, j0 - (a.n_k - a.n_q)) / TC_BR * TC_BR : 0;
    // lse and D of query row i0 + threadIdx.x, read one tile ahead
    float next_l = NEG_INF, next_d = 0.0f;
    auto fetch_stats = [&](int i0) {
        const int i = i0 + threadIdx.x;
        const bool ok = threadIdx.x < TC_BR && i < a.n_q;
        next_l = ok ? lse[i] : NEG_INF;
        next_d = ok ? dvec[i] : 0.0f;
    };
    fetch_stats(i_first);
    load_rows_at<D, BK, THREADS>(Ka, hd.k, j0, a.n_k);
    load_rows_at<D, BK, THREADS>(Va, hd.v, j0, a.n_k);
    if (i_first < a.n_q) {
        load_rows_at<D, TC_BR, THREADS>(Qa, hd.q, i_first, a.n_q);
        load_rows_at<D, TC_BR, THREADS>(Oa, d_out, i_first, a.n_q);
    }
    cp_async_commit();

    for (int i0 = i_first, step = 0; i0 < a.n_q; i0 += TC_BR, step++) {
        const unsigned buf = (step % 2) * QTB;  // this tile's Q, dO buffers; QTB - buf: the next's
        cp_async_wait<0>();  // this thread's copies of Q_i, dO_i (and at step 0, K_j, V_j)
        __syncthreads();     // everyone's; every warp done with tile i - 1 (its lse, D, dS^T)
        if (i0 + TC_BR < a.n_q) {
            load_rows_at<D, TC_BR, THREADS>(Qa + QTB - buf, hd.q, i0 + TC_BR, a.n_q);
            load_rows_at<D, TC_BR, THREADS>(Oa + QTB - buf, d_out, i0 + TC_BR, a.n_q);
            cp_async_commit();
        }
        // lse in base-2 units; a row that saw no key (lse = -inf) gets +inf, so that
        // 2^(s - lse) is 0 without a test
        if (threadIdx.x < TC_BR) {
            Ls[threadIdx.x] = next_l == NEG_INF ? -NEG_INF : next_l * LOG2E;
            Ds[threadIdx.x] = next_d;
        }
        if (i0 + TC_BR < a.n_q) fetch_stats(i0 + TC_BR);
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
        const float scale2 = a.scale * LOG2E;
#pragma unroll
        for (int nb = 0; nb < TC_BR / 8; nb++) {
            const float2 L = *reinterpret_cast<const float2*>(Ls + 8 * nb + 2 * t);
            const float2 Dr = *reinterpret_cast<const float2*>(Ds + 8 * nb + 2 * t);
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int i = i0 + 8 * nb + 2 * t + (e & 1);
                float x;
                if (plain)
                    x = st[nb][e] * scale2;
                else if (!MODS)  // the causal diagonal or the keys' end: one comparison
                    x = keys[e / 2] < key_end(mods, i) ? st[nb][e] * scale2 : NEG_INF;
                else
                    x = score(mods, false, a.scale, hd.b, hd.h, i, keys[e / 2], st[nb][e]) * LOG2E;
                const float p = ex2_ftz(x - ((e & 1) ? L.y : L.x));
                st[nb][e] = p;
                dpt[nb][e] = p * (dpt[nb][e] - ((e & 1) ? Dr.y : Dr.x));
            }
        }

        // dV_j += P^T dO_i and dK_j += dS^T Q_i
#pragma unroll
        for (int kq = 0; kq < TC_BR / 16; kq++) {
            u32 pa[4], sa[4];
            p_fragment<BF16>(st, kq, pa);
            p_fragment<BF16>(dpt, kq, sa);
#pragma unroll
            for (int c = 0; c < D / 8; c += 2) {
                u32 ob[4], qb[4];
                const unsigned at = qt_at + buf + (16 * kq * S + 8 * c) * 2;
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
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const int i = i0 + qr + g + 8 * r;
            if (i >= a.n_q) continue;
            float* row = dq + (i64)i * D + qc + 2 * t;
#pragma unroll
            for (int c = 0; c < DC / 8; c++)
                red_add2(row + 8 * c, a.scale * dqa[c][2 * r], a.scale * dqa[c][2 * r + 1]);
        }
    }
    cp_async_wait<0>();  // (K_j's and V_j's copies, when no query row sees the tile)

    // dK_j (times the scale) and dV_j of the warp's keys: rounded to 16 bits here without
    // GQA; otherwise f32 per query head (the group sum and the rounding follow).
    const bool final16 = a.heads == a.kv_heads;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        if (keys[r] >= a.n_k) continue;
#pragma unroll
        for (int c = 0; c < D / 8; c++) {
            const i64 at = ((i64)hd.z * a.n_k + keys[r]) * D + 8 * c + 2 * t;
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
// ANCHOR_END: tc_backward_v7

#define TC_BACKWARD_KERNELS(D, T, BF16)                                                     \
    TC_KERNEL(flash2_tc_backward_v1_##T##_d##D, TC_NT, (tc_backward_v1<D, BF16, false>))    \
    TC_KERNEL(flash2_tc_backward_v2_##T##_d##D, TC_NT, (tc_backward_v1<D, BF16, true>))     \
    TC_KERNEL(flash2_tc_backward_v3_##T##_d##D, TC_NT, (tc_backward_v1<D, BF16, true, 1>))  \
    TC_KERNEL(flash2_tc_backward_v4_##T##_d##D, 2 * TC_NT,                                  \
              (tc_backward_v1<D, BF16, true, 1, 8>))                                        \
    TC_KERNEL(flash2_tc_backward_v5_##T##_d##D, 2 * TC_NT,                                  \
              (tc_backward_v1<D, BF16, true, 1, 8, true>))                                  \
    TC_KERNEL(flash2_tc_backward_v6_##T##_d##D, D == 64 ? TC_NT : 2 * TC_NT,                \
              (tc_backward_v1<D, BF16, true, 2, D == 64 ? 4 : 8>))                          \
    TC_KERNEL_MB(flash2_tc_backward_v7_##T##_d##D, D == 64 ? TC_NT : 2 * TC_NT, 1,                \
              (tc_backward_v7<D, BF16, false, D == 64 ? 4 : 8>))                            \
    TC_KERNEL_MB(flash2_tc_backward_v7_##T##_d##D##_mods, D == 64 ? TC_NT : 2 * TC_NT, 1,         \
              (tc_backward_v7<D, BF16, true, D == 64 ? 4 : 8>))
TC_BACKWARD_KERNELS(64, bf16, true)
TC_BACKWARD_KERNELS(128, bf16, true)
TC_BACKWARD_KERNELS(64, f16, false)
TC_BACKWARD_KERNELS(128, f16, false)

// D = rowsum(dO o O) from 16-bit dO and O, and the GQA group sums of dK, dV (or dQ's f32
// accumulator, heads == kv_heads) rounded to 16 bits: contract.cuh's steps with a 16-bit
// read and a 16-bit store.
#define TC_SMALL_KERNELS(T, BF16)                                                           \
    extern "C" __global__ void tc_row_dot_##T(const u16* d_out, const u16* out, float* D,  \
                                              i64 rows, int d) {                            \
        row_dot_rows(d_out, out, D, rows, d, [](u16 x) { return widen16<BF16>(x); });       \
    }                                                                                       \
    extern "C" __global__ void tc_group_sum_##T(const float* per_head, u16* out, int heads, \
                                                int kv_heads, i64 per_head_elems,           \
                                                i64 total) {                                \
        group_sum_rows(per_head, heads, kv_heads, per_head_elems, total, [=](i64 e, float s) { \
            out[e] = (u16)(pack2<BF16>(s, 0.0f) & 0xffffu);                                 \
        });                                                                                 \
    }
TC_SMALL_KERNELS(bf16, true)
TC_SMALL_KERNELS(f16, false)
