// The building blocks of FlashAttention-2 on the tensor cores (bf16 or fp16 inputs and
// outputs, f32 accumulation, warp-level mma.sync.m16n8k16 through inline PTX, sm_80 and
// later), shared by the kernels that ship (flash2_tc_forward.cu, flash2_tc_backward.cu) and
// the ladder that led to them (ladder/tc_*.cu). Prepended: contract.cuh (ScoreMods, key_end,
// modify_score), tiles.cuh (FlashArgs, tile_plain, score) and mma.cuh (attn-cuda).
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

// ANCHOR: varlen_view
// A packed batch in one launch. Block x takes item x of a work list of (sequence s, tile),
// which the host orders costliest first — a query tile in the forward, a key tile in the
// backward; y is the head. Each sequence is a problem of its own inside the packed tensors:
// n_q and n_k are its lengths (so the causal diagonal and the window sit bottom-right inside
// it, and its tiles stop at its last row and key), and every base pointer moves so that the
// kernel's offsets for head h (h · n_q · D, h · n_k · D) land on the sequence's rows, packed
// row h · total + cu[s] + i. A mask, bias or dBias block starts at (cu_q[s], cu_k[s]). No tile
// reads or writes a row of another sequence.
struct Varlen {
    u64 cu_q, cu_k;    // const int*: [num_seqs + 1] offsets
    u64 work;          // const int2*: (sequence, tile) per block
    int total_q, total_k;
};

__device__ __forceinline__ int varlen_view(FlashArgs& a, ScoreMods& m, const Varlen& vl, int D) {
    const int2 w = reinterpret_cast<const int2*>(vl.work)[blockIdx.x];
    const int* cu_q = reinterpret_cast<const int*>(vl.cu_q);
    const int* cu_k = reinterpret_cast<const int*>(vl.cu_k);
    const int q0 = cu_q[w.x], nq = cu_q[w.x + 1] - q0, k0 = cu_k[w.x], nk = cu_k[w.x + 1] - k0;
    const i64 h = blockIdx.y, hk = h / (a.heads / a.kv_heads);
    // rows to move by: per query head (Q, O, dO, lse, D, dQ; the backward's dK, dV per query
    // head) and per key/value head (K, V)
    const i64 rq = h * vl.total_q + q0 - h * nq, rkh = h * vl.total_k + k0 - h * nk;
    const i64 rk = hk * vl.total_k + k0 - hk * nk;
    auto move = [](u64& p, i64 bytes) { if (p) p += (u64)bytes; };
    move(a.q, rq * D * 2), move(a.o, rq * D * 2), move(a.d_out, rq * D * 2);
    move(a.lse, rq * 4), move(a.dvec, rq * 4), move(a.dq, rq * D * 4);
    move(a.k, rk * D * 2), move(a.v, rk * D * 2);
    const int grad_bytes = a.heads == a.kv_heads ? 2 : 4;  // dK, dV: 16-bit, or f32 per head
    move(a.dk, rkh * D * grad_bytes), move(a.dv, rkh * D * grad_bytes);
    const i64 bias_at = q0 * m.bias_stride[2] + k0 * m.bias_stride[3];
    move(m.bias, bias_at * 4), move(a.dbias, bias_at * 4);
    move(m.mask, q0 * m.mask_stride[2] + k0 * m.mask_stride[3]);
    a.n_q = m.n_q = nq, a.n_k = m.n_k = nk, m.diag = nk - nq;
    return w.y;
}
// ANCHOR_END: varlen_view

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
// The same fragments where the softmax step left P~ packed (tc_softmax_step's PACKED): each
// block's registers 0 and 2 hold its two rows' pairs.
__device__ __forceinline__ void p_fragment_packed(const float (*s)[4], int kk, u32* pa) {
    pa[0] = __float_as_uint(s[2 * kk][0]);
    pa[1] = __float_as_uint(s[2 * kk][2]);
    pa[2] = __float_as_uint(s[2 * kk + 1][0]);
    pa[3] = __float_as_uint(s[2 * kk + 1][2]);
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


// ANCHOR: tc_products
// The two products of a tile for a warp's 16 query rows (versions 2 and 3).
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


// One 16-bit value widened to f32.
template <bool BF16>
__device__ __forceinline__ float widen16(u16 x) {
    if (BF16) return __uint_as_float((u32)x << 16);
    float r;
    asm("cvt.f32.f16 %0, %1;\n" : "=f"(r) : "h"(x));
    return r;
}
