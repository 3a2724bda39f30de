// Ladder step 2 of the tensor-core forward (parent: step 1): every fragment by ldmatrix. What:
// one ldmatrix gives each lane its part of four 8 x 8 matrices, so Q_i's four A registers,
// or K_j's B registers for two blocks of 8 keys, are one instruction instead of four 32-bit
// loads, and ldmatrix.trans delivers V_j's B fragments straight from the row-major tile
// (step 1 needed four 16-bit loads and two shifts per 16 x 8 block). Why: step 1 spent more
// instructions reading fragments than multiplying them.
// What it measured, with machine and date: the book's chapter "Tensor cores" and
// notes/tensor-cores.md.

// ANCHOR: tc_forward_02
template <int D, bool BF16>
__device__ void tc_forward_v2(const FlashArgs& a, const ScoreMods& mods) {
    constexpr int KB = TC_BC;
    constexpr int S = D + 8, KV = KB * S;  // row stride; one K or V buffer
    extern __shared__ uint4 smem_tc[];
    u16* Qs = reinterpret_cast<u16*>(smem_tc);  // [BR][S]
    u16* Ks = Qs + TC_BR * S;                    // [BC][S]
    u16* Vs = Ks + KV;                           // [BC][S]
    const TcHead hd = tc_head<D>(a);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4;
    const int i0 = blockIdx.x * TC_BR;
    const int rows[2] = {i0 + warp * 16 + g, i0 + warp * 16 + g + 8};
    const int j_end = key_end(mods, min(i0 + TC_BR, a.n_q) - 1);

    load_tile16<D, TC_BR>(Qs, hd.q, i0, a.n_q);
    __syncthreads();
    u32 qf[D / 16][4];  // Q_i's A fragments for the warp's 16 rows, one per 16 columns of d
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++)
        frag_a(qf[kk], Qs, S, warp * 16, 16 * kk, lane);
    float o[D / 8][4];
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};
    zero_frags<D / 8>(o);

    for (int j0 = 0; j0 < j_end; j0 += KB) {
        __syncthreads();  // every warp is done with the tiles of step - 1
        load_tile16<D, KB>(Ks, hd.k, j0, a.n_k);
        load_tile16<D, KB>(Vs, hd.v, j0, a.n_k);
        __syncthreads();

        float s[KB / 8][4];
        tc_scores<D, BF16, KB>(s, qf, Ks, lane);  // S = Q_i K_j^T
        tc_softmax_step<D, 0, KB>(a, mods, hd.b, hd.h, i0, j0, rows, s, m, l, o);
        tc_pv<D, BF16, KB>(o, s, Vs, lane);  // O_i += P~ V_j
    }
    tc_write_rows<D, BF16>(a, hd.z, rows, m, l, o);
}
// ANCHOR_END: tc_forward_02

#if !defined(TC_D) || !defined(TC_BF16)
#error "compile with -DTC_D=64|128 -DTC_BF16=1|0 (bf16 or fp16)"
#endif
extern "C" __global__ void __launch_bounds__(TC_NT) flash2_tc_forward_v2(FlashArgs a, ScoreMods m) {
    tc_forward_v2<TC_D, TC_BF16>(a, m);
}
