// FlashAttention-1 as fused CUDA kernels, fp32, in the paper's loop order (Algorithms 1, 2
// and 4 of Dao et al. 2022) as it ran on the A100: one thread block per (batch, head), the
// OUTER loop over key/value tiles held in shared memory, the inner loop over query tiles,
// and O, l, m read from and written back to device memory at every step. Tiles of 64 x 64
// and the thread layout of tiles.cuh (thread (ty, tx): rows ty + 16r; keys tx + 16c;
// output columns tx*D/16 ..). Head dimensions 32, 64, 96, 128 and 256.
//
// Pointers of FlashArgs used here: q, k, v; o (O), lse (l during the loop), dvec (m during
// the loop, then D in the backward), d_out, dq, dk, dv.

// ANCHOR: forward
template <int D>
__device__ void flash1_forward(const FlashArgs& a, const ScoreMods& mods, const Dropout& drop) {
    extern __shared__ float4 smem4[];
    float* Ks = reinterpret_cast<float*>(smem4);  // [BC][D + 4]
    float* Vs = Ks + BC * (D + 4);                // [BC][D + 4]
    float* Qs = Vs + BC * (D + 4);                // [BR][D + 4]
    float* Ps = Qs + BR * (D + 4);                // [BR][BC + 4]
    constexpr int CW = D / 16;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    const auto [z, b, h, q, dout, k, v] = block_head<D>(a, blockIdx.x);  // one block per head
    float* O = (float*)a.o + (i64)z * a.n_q * D;     // in HBM, updated every step
    float* L = (float*)a.lse + (i64)z * a.n_q;        // l_i in HBM
    float* M = (float*)a.dvec + (i64)z * a.n_q;       // m_i in HBM

    for (int j0 = 0; j0 < a.n_k; j0 += BC) {                     // line 5: outer loop, K_j, V_j
        __syncthreads();
        load_tile4<D>(Ks, k, j0, a.n_k);
        load_tile4<D>(Vs, v, j0, a.n_k);
        for (int i0 = 0; i0 < a.n_q; i0 += BR) {                 // line 7: inner loop, Q_i
            const int last = min(i0 + BR, a.n_q) - 1;
            if (j0 >= key_end(mods, last)) continue;              // causal: tile hidden
            __syncthreads();
            load_tile4<D>(Qs, q, i0, a.n_q);                      // line 8: Q_i, O_i, l_i, m_i
            __syncthreads();
            float s[4][4];                                        // line 9: S_ij = tau Q_i K_j^T
            tile_scores<D>(Qs, Ks, s);
            const bool plain = tile_plain(mods, i0, j0);
            float coef_old[4], coef_new[4], l_new[4], m_new[4];
#pragma unroll
            for (int r = 0; r < 4; r++) {
                const int i = i0 + ty + 16 * r;
                const u32 key = drop.enabled ? row_key(drop, b, h, i) : 0u;
                float mx = NEG_INF;
#pragma unroll
                for (int c = 0; c < 4; c++) {
                    s[r][c] = score(mods, plain, a.scale, b, h, i, j0 + tx + 16 * c, s[r][c]);
                    mx = fmaxf(mx, s[r][c]);
                }
                const float m_t = row_max16(mx);                  // line 10: m~, P~, l~
                float sum = 0.0f;
#pragma unroll
                for (int c = 0; c < 4; c++) {
                    float p = s[r][c] == NEG_INF ? 0.0f : expf(s[r][c] - m_t);
                    sum += p;
                    if (drop.enabled) p *= dropout_factor(drop, key, j0 + tx + 16 * c);
                    Ps[(ty + 16 * r) * TROW + tx + 16 * c] = p;
                }
                const float l_t = row_sum16(sum);
                const float m_i = i < a.n_q ? M[i] : NEG_INF;     // line 11: m_new, l_new
                const float l_i = i < a.n_q ? L[i] : 0.0f;
                const float m_n = fmaxf(m_i, m_t);
                const float eo = m_i == NEG_INF ? 0.0f : expf(m_i - m_n);
                const float en = m_t == NEG_INF ? 0.0f : expf(m_t - m_n);
                l_new[r] = eo * l_i + en * l_t;
                coef_old[r] = l_new[r] > 0.0f ? eo * l_i / l_new[r] : 0.0f;
                coef_new[r] = l_new[r] > 0.0f ? en / l_new[r] : 0.0f;
                m_new[r] = m_n;
            }
            __syncthreads();  // P~ complete; every lane has read l_i, m_i
            // line 12: O_i = diag(l_new)^-1 (diag(l_i) e^{m_i - m_new} O_i + e^{m~ - m_new} P~ V_j)
            float acc[4][CW] = {};
            accumulate_pv<D>(Ps, Vs, acc);                        // P~ V_j
#pragma unroll
            for (int r = 0; r < 4; r++) {
                const int i = i0 + ty + 16 * r;
                if (i >= a.n_q) continue;
#pragma unroll
                for (int c = 0; c < CW; c++) {
                    float* o = O + (i64)i * D + thread_col<D>(tx, c);
                    *o = coef_old[r] * *o + coef_new[r] * acc[r][c];
                }
                if (tx == 0) {                                    // line 13: write l_i, m_i
                    L[i] = l_new[r];
                    M[i] = m_new[r];
                }
            }
        }
    }
}
// ANCHOR_END: forward

// lse = m + ln l after the last step (-inf for a row that saw no key).
extern "C" __global__ void flash1_lse(FlashArgs a, i64 rows) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows) return;
    const float l = ((const float*)a.lse)[i], m = ((const float*)a.dvec)[i];
    ((float*)a.lse)[i] = l > 0.0f ? m + logf(l) : NEG_INF;
}

// ANCHOR: one_buffer
// One step of the backward at D > 128, where K_j, V_j, Q_i, dO_i and the two transposed
// tiles do not fit in shared memory together: Q_i and dO_i take turns in one buffer X, and
// (P Z)^T and dS^T in one buffer T. Q_i is loaded twice (for S, then for dK); dS^T stays in T
// for the caller's dQ.
template <int D>
__device__ __forceinline__ void backward_step_one_buffer(const FlashArgs& a, const ScoreMods& mods,
                                                         const Dropout& drop, const BlockHead& hd,
                                                         int i0, int j0, float* X, const float* Ks,
                                                         const float* Vs, float* T,
                                                         float (*dk)[D / 16], float (*dv)[D / 16]) {
    float s[4][4], dp[4][4], p[4][4], ds[4][4];
    __syncthreads();  // the previous step's tiles are no longer read
    load_tile4<D>(X, hd.q, i0, a.n_q);
    __syncthreads();
    tile_scores<D>(X, Ks, s);  // S = Q_i K_j^T
    __syncthreads();
    load_tile4<D>(X, hd.d_out, i0, a.n_q);
    __syncthreads();
    tile_scores<D>(X, Vs, dp);  // dP = dO_i V_j^T
    p_ds_from_products<D>(a, mods, drop, hd.b, hd.h, hd.z, i0, j0, s, dp, p, ds);
    apply_dropout(drop, hd.b, hd.h, i0, j0, p);
    store_transposed(p, T);
    __syncthreads();
    accumulate_tile_product<D>(T, X, dv);  // dV_j += (P Z)^T dO_i
    __syncthreads();
    store_transposed(ds, T);
    load_tile4<D>(X, hd.q, i0, a.n_q);
    __syncthreads();
    accumulate_tile_product<D>(T, X, dk);  // dK_j += dS^T Q_i
}
// ANCHOR_END: one_buffer

// Backward, Algorithm 4: one block per (batch, head); the outer loop over key tiles keeps
// dK_j, dV_j in registers; the inner loop over query tiles adds tau dS K_j into dQ_i in HBM
// (read, add, write: only this block touches this head's dQ). D = rowsum(dO o O) comes
// precomputed in a.dvec. dK, dV per query head (summed per GQA group by the host).
template <int D>
__device__ void flash1_backward(const FlashArgs& a, const ScoreMods& mods, const Dropout& drop) {
    constexpr bool ONE_BUFFER = D > 128;  // Q_i and dO_i take turns (backward_step_one_buffer)
    extern __shared__ float4 smem4[];
    float* Ks = reinterpret_cast<float*>(smem4);
    float* Vs = Ks + BC * ROW;
    float* Qs = Vs + BC * ROW;
    float* dOs = Qs + BR * ROW;   // unused when ONE_BUFFER
    float* PT = ONE_BUFFER ? dOs : dOs + BR * ROW;  // [BC][BR + 4]: (P Z)^T
    float* dST = ONE_BUFFER ? PT : PT + BC * TROW;  // [BC][BR + 4]: dS^T (read row-wise for dQ)
    constexpr int CW = D / 16;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    const BlockHead hd = block_head<D>(a, blockIdx.x);  // one block per head
    float* dQ = (float*)a.dq + (i64)hd.z * a.n_q * D;

    for (int j0 = 0; j0 < a.n_k; j0 += BC) {
        __syncthreads();
        load_tile4<D>(Ks, hd.k, j0, a.n_k);
        load_tile4<D>(Vs, hd.v, j0, a.n_k);
        float dk[4][CW] = {}, dv[4][CW] = {};
        for (int i0 = 0; i0 < a.n_q; i0 += BR) {
            const int last = min(i0 + BR, a.n_q) - 1;
            if (j0 >= key_end(mods, last)) continue;
            if constexpr (ONE_BUFFER)
                backward_step_one_buffer<D>(a, mods, drop, hd, i0, j0, Qs, Ks, Vs, PT, dk, dv);
            else
                backward_step<D>(a, mods, drop, hd, i0, j0, Qs, dOs, Ks, Vs, PT, dST, dk, dv);
            // dQ_i += tau dS K_j, in HBM: rows ty + 16r, columns tx*CW ..
#pragma unroll
            for (int r = 0; r < 4; r++) {
                const int i = i0 + ty + 16 * r;
                float acc[CW];
                ds_times_k<D>(dST, Ks, r, acc);
                if (i >= a.n_q) continue;
#pragma unroll
                for (int c = 0; c < CW; c++) dQ[(i64)i * D + thread_col<D>(tx, c)] += a.scale * acc[c];
            }
        }
        store_dk_dv<D>(a, hd.z, j0, dk, dv);
    }
}

#define FLASH1_KERNELS(D)                                                                  \
    extern "C" __global__ void __launch_bounds__(NT)                                      \
        flash1_forward_d##D(FlashArgs a, ScoreMods m, Dropout dr) {                       \
        flash1_forward<D>(a, m, dr);                                                      \
    }                                                                                      \
    extern "C" __global__ void __launch_bounds__(NT)                                      \
        flash1_backward_d##D(FlashArgs a, ScoreMods m, Dropout dr) {                      \
        flash1_backward<D>(a, m, dr);                                                     \
    }
FLASH1_KERNELS(32)
FLASH1_KERNELS(64)
FLASH1_KERNELS(96)
FLASH1_KERNELS(128)
FLASH1_KERNELS(256)
