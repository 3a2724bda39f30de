// Ladder step 1 of the tensor-core forward (parent: the fp32 forward on the CUDA cores,
// flash2.cu): the first mma kernel. What: a warp owns 16 query rows; S = Q_i K_j^T and
// O_i += P~ V_j are m16n8k16 mma instructions, and the accumulators of S for 16 keys are
// exactly the A fragment of P~ for the next product, so P~ never leaves the registers. Why:
// the tensor cores multiply 16-bit matrices at many times the CUDA cores' rate.
// What it measured, with machine and date: the book's chapter "Tensor cores" and
// notes/tensor-cores.md.

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

#if !defined(TC_D) || !defined(TC_BF16)
#error "compile with -DTC_D=64|128 -DTC_BF16=1|0 (bf16 or fp16)"
#endif
extern "C" __global__ void __launch_bounds__(TC_NT) flash2_tc_forward_v1(FlashArgs a, ScoreMods m) {
    tc_forward_v1<TC_D, TC_BF16>(a, m);
}
