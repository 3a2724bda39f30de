// Ladder step 3 of the tensor-core forward (parent: step 2): K_j+1 and V_j+1 copied by
// cp.async into a second pair of buffers while tile j is computed. What: the block waits at
// the top of a step only for what it asked for a whole step earlier. Why: in step 2 every
// warp stalls on the loads of each tile before its first mma.
// What it measured, with machine and date: the book's chapter "Tensor cores" and
// notes/tensor-cores.md.

// ANCHOR: tc_forward_03
template <int D, bool BF16>
__device__ void tc_forward_v3(const FlashArgs& a, const ScoreMods& mods) {
    constexpr int KB = TC_BC;
    constexpr int S = D + 8, KV = KB * S;  // row stride; one K or V buffer
    extern __shared__ uint4 smem_tc[];
    u16* Qs = reinterpret_cast<u16*>(smem_tc);  // [BR][S]
    u16* Kb = Qs + TC_BR * S;                    // [2][BC][S]
    u16* Vb = Kb + 2 * KV;                       // [2][BC][S]
    const TcHead hd = tc_head<D>(a);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4;
    const int i0 = blockIdx.x * TC_BR;
    const int rows[2] = {i0 + warp * 16 + g, i0 + warp * 16 + g + 8};
    const int j_end = key_end(mods, min(i0 + TC_BR, a.n_q) - 1);

    if (j_end > 0) {  // K_0, V_0 on their way while Q_i is loaded
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
        const u16* Ks = Kb + (step % 2) * KV;
        const u16* Vs = Vb + (step % 2) * KV;
        __syncthreads();  // every warp is done with the tiles of step - 1
        if (j0 + KB < j_end) {  // K_j+1, V_j+1 into the buffers step - 1 used
            load_tile16_async<D, KB>(Kb + ((step + 1) % 2) * KV, hd.k, j0 + KB, a.n_k);
            load_tile16_async<D, KB>(Vb + ((step + 1) % 2) * KV, hd.v, j0 + KB, a.n_k);
        }
        cp_async_commit();   // (empty after the last tile: the count stays right)
        cp_async_wait<1>();  // K_j, V_j have arrived
        __syncthreads();

        float s[KB / 8][4];
        tc_scores<D, BF16, KB>(s, qf, Ks, lane);  // S = Q_i K_j^T
        tc_softmax_step<D, 0, KB>(a, mods, hd.b, hd.h, i0, j0, rows, s, m, l, o);
        tc_pv<D, BF16, KB>(o, s, Vs, lane);  // O_i += P~ V_j
    }
    tc_write_rows<D, BF16>(a, hd.z, rows, m, l, o);
}
// ANCHOR_END: tc_forward_03

#if !defined(TC_D) || !defined(TC_BF16)
#error "compile with -DTC_D=64|128 -DTC_BF16=1|0 (bf16 or fp16)"
#endif
extern "C" __global__ void __launch_bounds__(TC_NT) flash2_tc_forward_v3(FlashArgs a, ScoreMods m) {
    tc_forward_v3<TC_D, TC_BF16>(a, m);
}
