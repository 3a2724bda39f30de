// Decoding from a KV cache (flash-decoding): a few query rows against a long cache, where the
// cost is reading K and V once. Prepended: contract.cuh (ScoreMods, modify_score, key_start,
// key_end), tiles.cuh and mma.cuh (ex2_ftz, pack2, widen_f16x2).
//
// One block takes one key/value head g of one batch row b, the query rows of g's whole GQA
// group (heads g * group .. and every query i, up to DEC_ROWS of them: a tile), and one
// split of the row's keys. Its 8 half-warps stream through the split, each keeping its own
// (m, l, O) for every row: 16 lanes share a key, a lane holding DEC_E of its d values, so a
// key's dot products are one multiply-add per value and four shuffles a row. The half-warps'
// states are merged at the end, exactly as the online softmax merges two partial softmaxes.
// With one split the block writes O and lse; with more, each split writes its (O_s, lse_s)
// in f32 and decode_merge combines them by the log-sum-exp (attn-core's merge_partials).
//
// Compiled per element type (DEC_KIND 0: f32, 1: bf16, 2: fp16), lane width DEC_E and row tile
// DEC_ROWS, and with or without the score modifiers (DEC_MODS). Softmax statistics run in base 2 (scores times log2 e).

#ifndef DEC_KIND
#define DEC_KIND 1
#endif
#ifndef DEC_E
#define DEC_E 8
#endif
#ifndef DEC_ROWS
#define DEC_ROWS 4
#endif
#ifndef DEC_MODS
#define DEC_MODS 0  // 1: every score through modify_score (a bias, mask, ALiBi or softcap)
#endif

#define DEC_THREADS 128
#define DEC_LANES 16                              // lanes that share a key
#define DEC_STREAMS (DEC_THREADS / DEC_LANES)     // half-warps, each its own key stream
#define DEC_WARPS (DEC_THREADS / 32)
#ifndef DEC_U
#define DEC_U 4                                   // keys a half-warp computes on at once
#endif
#define DEC_KT (DEC_STREAMS * DEC_U)              // keys a tile
#ifndef DEC_STAGES
#define DEC_STAGES 4                              // tiles of shared memory in the pipeline
#endif

#if DEC_KIND == 0
typedef float elem_t;
#else
typedef unsigned short elem_t;
#endif
#define DEC_W (DEC_E * (int)sizeof(elem_t) / 4)   // 32-bit words a lane loads a key

#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

struct DecodeArgs {
    u64 q;            // [batch, heads, n_q, d]
    u64 k, v;         // pools [pages, kv_heads, page_size, d]; a contiguous cache is
                      // batch pages of page_size = n_max
    u64 block_table;  // int [batch, max_blocks], or 0: row b's keys are page b
    u64 seqlens;      // int [batch]
    u64 o;            // [batch, heads, n_q, d], when splits = 1
    u64 lse;          // float [batch, heads, n_q], when splits = 1
    u64 o_part;       // float [splits, batch, heads, n_q, d], when splits > 1
    u64 lse_part;     // float [splits, batch, heads, n_q], when splits > 1
    int batch, heads, kv_heads, n_q, d, page_size, max_blocks, splits;
    float scale;
    int pad_;
};

// cp.async of 16 bytes that asks the L2 to fetch the whole 128-byte line from memory at once:
// the cache is read front to back, so the rest of the line is the next lanes' (or the next
// row's) and arrives in one DRAM burst.
__device__ __forceinline__ void cp_async16_line(void* dst, const void* src, bool valid) {
#if __CUDA_ARCH__ >= 800
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src),
                 "r"(valid ? 16 : 0));
#else
    cp_async16(dst, src, valid);  // a plain copy before sm_80
#endif
}

// A lane's DEC_E values of a row (a key, a value or a query) as raw words. `vec`: d is a
// multiple of DEC_E, so the lane's values are all in the row or all past it, and aligned:
// one to four 16-byte loads. Otherwise value by value, zeros past d.
__device__ __forceinline__ void load_lane(u32 (&w)[DEC_W], const elem_t* row, int c0, int d,
                                          bool vec) {
    if (vec) {
        if (c0 >= d) {
#pragma unroll
            for (int x = 0; x < DEC_W; ++x) w[x] = 0u;
            return;
        }
        const u32* p = reinterpret_cast<const u32*>(row + c0);
        if (DEC_W % 4 == 0) {
#pragma unroll
            for (int x = 0; x < DEC_W; x += 4) {
                const uint4 y = __ldg(reinterpret_cast<const uint4*>(p + x));
                w[x] = y.x, w[x + 1] = y.y, w[x + 2] = y.z, w[x + 3] = y.w;
            }
        } else if (DEC_W == 2) {
            const uint2 y = __ldg(reinterpret_cast<const uint2*>(p));
            w[0] = y.x, w[DEC_W - 1] = y.y;
        } else {
            w[0] = __ldg(p);
        }
        return;
    }
#if DEC_KIND == 0
#pragma unroll
    for (int e = 0; e < DEC_E; ++e) w[e] = c0 + e < d ? __float_as_uint(row[c0 + e]) : 0u;
#else
#pragma unroll
    for (int x = 0; x < DEC_W; ++x) {
        const u32 lo = c0 + 2 * x < d ? row[c0 + 2 * x] : 0u;
        const u32 hi = c0 + 2 * x + 1 < d ? row[c0 + 2 * x + 1] : 0u;
        w[x] = lo | (hi << 16);
    }
#endif
}

// Raw words as floats: f32 as it is, bf16 by a shift, fp16 by the conversion instruction.
__device__ __forceinline__ void widen_lane(const u32 (&w)[DEC_W], float (&x)[DEC_E]) {
#pragma unroll
    for (int i = 0; i < DEC_W; ++i) {
#if DEC_KIND == 0
        x[i] = __uint_as_float(w[i]);
#elif DEC_KIND == 1
        x[2 * i] = __uint_as_float(w[i] << 16);
        x[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
#else
        const float2 f = widen_f16x2(w[i]);
        x[2 * i] = f.x, x[2 * i + 1] = f.y;
#endif
    }
}

__device__ __forceinline__ void store_elem(elem_t* p, float x) {
#if DEC_KIND == 0
    *p = x;
#else
    *p = (elem_t)(pack2<DEC_KIND == 1>(x, x) & 0xffffu);
#endif
}

// Where key j of batch row b lies in the pool: its page through the block table, then its
// slot in the page.
__device__ __forceinline__ i64 key_offset(const DecodeArgs& a, const int* table, int b, int g,
                                          int j) {
    if (!table) return (((i64)b * a.kv_heads + g) * a.page_size + j) * a.d;
    const int blk = j / a.page_size, slot = j - blk * a.page_size;
    const i64 page = table[(i64)b * a.max_blocks + blk];
    return ((page * a.kv_heads + g) * a.page_size + slot) * a.d;
}

// The smem row of a key: d values padded to a whole number of a lane's loads and of 16 bytes.
#define DEC_ALIGN (DEC_E > 16 / (int)sizeof(elem_t) ? DEC_E : 16 / (int)sizeof(elem_t))
__device__ __forceinline__ int smem_row(int d) { return (d + DEC_ALIGN - 1) / DEC_ALIGN * DEC_ALIGN; }

// A lane's DEC_E values of a key row in shared memory (zeros past d: the padding is zero).
__device__ __forceinline__ void load_lane_smem(u32 (&w)[DEC_W], const elem_t* row, int c0, int d) {
    if (c0 >= d) {
#pragma unroll
        for (int x = 0; x < DEC_W; ++x) w[x] = 0u;
        return;
    }
    const u32* p = reinterpret_cast<const u32*>(row + c0);
    if (DEC_W % 4 == 0) {
#pragma unroll
        for (int x = 0; x < DEC_W; x += 4) {
            const uint4 y = *reinterpret_cast<const uint4*>(p + x);
            w[x] = y.x, w[x + 1] = y.y, w[x + 2] = y.z, w[x + 3] = y.w;
        }
    } else if (DEC_W == 2) {
        const uint2 y = *reinterpret_cast<const uint2*>(p);
        w[0] = y.x, w[DEC_W - 1] = y.y;
    } else {
        w[0] = p[0];
    }
}

// Starts copying the keys and values j0 .. j0 + DEC_KT - 1 (zeros from j_end on) into a
// stage of shared memory: 16-byte cp.async copies where a row is whole 16-byte chunks,
// else value by value (synchronously).
__device__ __forceinline__ void fetch_tile(const DecodeArgs& a, const int* table, int b, int g,
                                           int j0, int j_end, elem_t* ks, elem_t* vs) {
    const elem_t* K = (const elem_t*)a.k;
    const elem_t* V = (const elem_t*)a.v;
    const int ds = smem_row(a.d);
    constexpr int PER = 16 / (int)sizeof(elem_t);
    if (a.d % PER == 0) {
        const int chunks = a.d / PER;
        for (int c = threadIdx.x; c < DEC_KT * chunks; c += DEC_THREADS) {
            const int r = c / chunks, x = (c - r * chunks) * PER, j = j0 + r;
            const bool valid = j < j_end;
            const i64 at = valid ? key_offset(a, table, b, g, j) + x : 0;
            cp_async16_line(ks + r * ds + x, K + at, valid);
            cp_async16_line(vs + r * ds + x, V + at, valid);
        }
    } else {
        for (int e = threadIdx.x; e < DEC_KT * a.d; e += DEC_THREADS) {
            const int r = e / a.d, x = e - r * a.d, j = j0 + r;
            const bool valid = j < j_end;
            const i64 at = valid ? key_offset(a, table, b, g, j) + x : 0;
            ks[r * ds + x] = valid ? K[at] : (elem_t)0;
            vs[r * ds + x] = valid ? V[at] : (elem_t)0;
        }
    }
    cp_async_commit();
}

// ANCHOR: decode_split
extern "C" __global__ void __launch_bounds__(DEC_THREADS)
decode_split(const DecodeArgs a, const ScoreMods mods) {
    const int tile = blockIdx.x, split = blockIdx.y;
    const int b = blockIdx.z / a.kv_heads, g = blockIdx.z % a.kv_heads;
    const int group = a.heads / a.kv_heads, rows = group * a.n_q;
    const int L = ((const int*)a.seqlens)[b];
    ScoreMods m = mods;
    m.n_k = L;  // causal masking, the window and ALiBi align to the row's valid keys
    m.diag = L - m.n_q;

    // the tile's query rows: head h of g's group, query i
    int hr[DEC_ROWS], ir[DEC_ROWS];
    const int live = min(DEC_ROWS, rows - tile * DEC_ROWS);
    int i_lo = a.n_q, i_hi = -1;
#pragma unroll
    for (int r = 0; r < DEC_ROWS; ++r) {
        const int x = min(tile * DEC_ROWS + r, rows - 1);
        hr[r] = g * group + x / a.n_q, ir[r] = x % a.n_q;
        if (r < live) i_lo = min(i_lo, ir[r]), i_hi = max(i_hi, ir[r]);
    }

    // the keys any of them sees, and this split's share (whole runs of 32 keys)
    const int lo = L > 0 ? key_start(m, i_lo) : 0, hi = L > 0 ? key_end(m, i_hi) : 0;
    const int span = max(hi - lo, 0);
    const int chunk = ((span + a.splits - 1) / a.splits + 31) / 32 * 32;
    const int j_begin = lo + split * chunk, j_end = min(j_begin + chunk, hi);

    const int lane = threadIdx.x % DEC_LANES, stream = threadIdx.x / DEC_LANES;
    const int c0 = lane * DEC_E;
    const bool vec = a.d % DEC_E == 0;
    const int* table = (const int*)a.block_table;

    // Q_i, scaled, and each row's key range
    float q[DEC_ROWS][DEC_E];
    int ks[DEC_ROWS], ke[DEC_ROWS];
#pragma unroll
    for (int r = 0; r < DEC_ROWS; ++r) {
        u32 w[DEC_W];
        const i64 row = ((i64)b * a.heads + hr[r]) * a.n_q + ir[r];
        load_lane(w, (const elem_t*)a.q + row * a.d, c0, a.d, vec);
        widen_lane(w, q[r]);
#pragma unroll
        for (int e = 0; e < DEC_E; ++e) q[r][e] *= a.scale;
        ks[r] = key_start(m, ir[r]), ke[r] = key_end(m, ir[r]);
    }

    // m_i (base 2), l_i and O_i of every row, this half-warp's keys only
    float mi[DEC_ROWS], li[DEC_ROWS], o[DEC_ROWS][DEC_E];
#pragma unroll
    for (int r = 0; r < DEC_ROWS; ++r) {
        mi[r] = NEG_INF, li[r] = 0.0f;
#pragma unroll
        for (int e = 0; e < DEC_E; ++e) o[r][e] = 0.0f;
    }

    // K_j, V_j stream through DEC_STAGES stages of shared memory, DEC_STAGES - 1 tiles in
    // flight while one is computed on; the padding past d is zeroed once
    extern __shared__ __align__(16) unsigned char dec_smem[];
    const int ds = smem_row(a.d), stage = 2 * DEC_KT * ds;
    elem_t* tiles = reinterpret_cast<elem_t*>(dec_smem);
    if (ds > a.d)
        for (int e = threadIdx.x; e < DEC_STAGES * 2 * DEC_KT; e += DEC_THREADS)
            for (int x = a.d; x < ds; ++x) tiles[e * ds + x] = (elem_t)0;
    __syncthreads();
    const int n_tiles = (j_end - j_begin + DEC_KT - 1) / DEC_KT;
#pragma unroll
    for (int t = 0; t < DEC_STAGES - 1; ++t) {
        if (t < n_tiles)
            fetch_tile(a, table, b, g, j_begin + t * DEC_KT, j_end, tiles + t * stage,
                       tiles + t * stage + DEC_KT * ds);
        else
            cp_async_commit();  // an empty group keeps the count of groups in step
    }
    for (int t = 0; t < n_tiles; ++t) {
        cp_async_wait<DEC_STAGES - 2>();
        __syncthreads();  // tile t is in, and every thread is done with tile t - 1's stage
        {
            const int next = t + DEC_STAGES - 1, at = next % DEC_STAGES;
            if (next < n_tiles)
                fetch_tile(a, table, b, g, j_begin + next * DEC_KT, j_end, tiles + at * stage,
                           tiles + at * stage + DEC_KT * ds);
            else
                cp_async_commit();
        }
        const elem_t* kt = tiles + (t % DEC_STAGES) * stage;
        const elem_t* vt = kt + DEC_KT * ds;
        const int base = j_begin + t * DEC_KT;
        u32 kw[DEC_U][DEC_W], vw[DEC_U][DEC_W];
#pragma unroll
        for (int u = 0; u < DEC_U; ++u) {
            load_lane_smem(kw[u], kt + (stream * DEC_U + u) * ds, c0, a.d);
            load_lane_smem(vw[u], vt + (stream * DEC_U + u) * ds, c0, a.d);
        }
        // S_ij = scale q_i . k_j (base 2), -inf where row i does not see key j
        float s[DEC_U][DEC_ROWS];
#pragma unroll
        for (int u = 0; u < DEC_U; ++u) {
            float kx[DEC_E];
            widen_lane(kw[u], kx);
            const int j = base + stream * DEC_U + u;
#pragma unroll
            for (int r = 0; r < DEC_ROWS; ++r) {
                s[u][r] = NEG_INF;
                if (r >= live) continue;  // the same for the whole block: the shuffles agree
                float dot = 0.0f;
#pragma unroll
                for (int e = 0; e < DEC_E; ++e) dot = fmaf(q[r][e], kx[e], dot);
#pragma unroll
                for (int off = DEC_LANES / 2; off > 0; off /= 2)
                    dot += __shfl_xor_sync(0xffffffffu, dot, off);
                float x = dot;
                if (DEC_MODS) x = modify_score(m, b, hr[r], ir[r], j, x);
                const bool seen = j < j_end && j >= ks[r] && j < ke[r];
                s[u][r] = seen ? x * LOG2E : NEG_INF;
            }
        }
        // the online softmax: m_i, l_i and O_i rescaled once per DEC_U keys
#pragma unroll
        for (int r = 0; r < DEC_ROWS; ++r) {
            if (r >= live) continue;
            float mx = mi[r];
#pragma unroll
            for (int u = 0; u < DEC_U; ++u) mx = fmaxf(mx, s[u][r]);
            if (mx == NEG_INF) continue;  // no key seen yet: nothing to add
            const float c = ex2_ftz(mi[r] - mx);
            li[r] *= c;
#pragma unroll
            for (int e = 0; e < DEC_E; ++e) o[r][e] *= c;
#pragma unroll
            for (int u = 0; u < DEC_U; ++u) {
                float vx[DEC_E];
                widen_lane(vw[u], vx);
                const float p = ex2_ftz(s[u][r] - mx);
                li[r] += p;
#pragma unroll
                for (int e = 0; e < DEC_E; ++e) o[r][e] = fmaf(p, vx[e], o[r][e]);
            }
            mi[r] = mx;
        }
    }

    // merge the two half-warps of each warp, then the warps through shared memory
#pragma unroll
    for (int r = 0; r < DEC_ROWS; ++r) {
        const float mo = __shfl_xor_sync(0xffffffffu, mi[r], 16);
        const float lo_ = __shfl_xor_sync(0xffffffffu, li[r], 16);
        const float mx = fmaxf(mi[r], mo);
        const float ca = mx == NEG_INF ? 0.0f : ex2_ftz(mi[r] - mx);
        const float cb = mx == NEG_INF ? 0.0f : ex2_ftz(mo - mx);
        li[r] = li[r] * ca + lo_ * cb;
#pragma unroll
        for (int e = 0; e < DEC_E; ++e) {
            const float x = __shfl_xor_sync(0xffffffffu, o[r][e], 16);
            o[r][e] = o[r][e] * ca + x * cb;
        }
        mi[r] = mx;
    }
    __shared__ float sm_m[DEC_WARPS][DEC_ROWS], sm_l[DEC_WARPS][DEC_ROWS];
    __shared__ float sm_o[DEC_WARPS][DEC_ROWS][DEC_LANES * DEC_E];
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 < DEC_LANES) {
#pragma unroll
        for (int r = 0; r < DEC_ROWS; ++r) {
            if (lane == 0) sm_m[warp][r] = mi[r], sm_l[warp][r] = li[r];
#pragma unroll
            for (int e = 0; e < DEC_E; ++e) sm_o[warp][r][c0 + e] = o[r][e];
        }
    }
    __syncthreads();

    for (int x = threadIdx.x; x < live * a.d; x += DEC_THREADS) {
        const int r = x / a.d, c = x % a.d;
        float mx = NEG_INF;
        for (int w = 0; w < DEC_WARPS; ++w) mx = fmaxf(mx, sm_m[w][r]);
        float l = 0.0f, acc = 0.0f;
        if (mx != NEG_INF) {
            for (int w = 0; w < DEC_WARPS; ++w) {
                const float f = ex2_ftz(sm_m[w][r] - mx);
                l += sm_l[w][r] * f;
                acc += sm_o[w][r][c] * f;
            }
        }
        const float out = mx == NEG_INF ? 0.0f : acc / l;
        const float lse = mx == NEG_INF ? NEG_INF : (mx + log2f(l)) * LN2;
        // row r's index in [batch, heads, n_q]
        const int rr = tile * DEC_ROWS + r;
        const i64 zi = ((i64)b * a.heads + g * group + rr / a.n_q) * a.n_q + rr % a.n_q;
        if (a.splits == 1) {
            store_elem((elem_t*)a.o + zi * a.d + c, out);
            if (c == 0) ((float*)a.lse)[zi] = lse;
        } else {
            const i64 part = (i64)split * a.batch * a.heads * a.n_q + zi;
            ((float*)a.o_part)[part * a.d + c] = out;
            if (c == 0) ((float*)a.lse_part)[part] = lse;
        }
    }
}
// ANCHOR_END: decode_split

// ANCHOR: decode_merge
// Split-KV's second step, one block a query row: lse = log sum_s e^(lse_s), O = sum_s
// e^(lse_s - lse) O_s. A split that saw no key (lse_s = -inf) weighs nothing; a row no split
// saw gets O = 0, lse = -inf. The weights go to shared memory once; then each warp sums every
// DEC_WARPS-th split, a lane's columns lane + 32 k, so that a thread has every load of its
// splits in flight at once (the partials are in the L2: latency, not bandwidth, is the cost);
// the warps' sums meet in shared memory.
#define DEC_MAX_SPLITS 1024
#define DEC_MERGE_COLS 8  // columns a lane: 32 lanes · 8 cover MAX_HEAD_DIM
extern "C" __global__ void __launch_bounds__(DEC_THREADS) decode_merge(const DecodeArgs a) {
    __shared__ float w[DEC_MAX_SPLITS];
    __shared__ float sums[DEC_WARPS][32 * DEC_MERGE_COLS];
    const i64 rows = (i64)a.batch * a.heads * a.n_q, zi = blockIdx.x;
    const float* lse_part = (const float*)a.lse_part;
    for (int s = threadIdx.x; s < a.splits; s += DEC_THREADS) w[s] = lse_part[s * rows + zi];
    __syncthreads();
    float mx = NEG_INF;
    for (int s = 0; s < a.splits; ++s) mx = fmaxf(mx, w[s]);
    float l = 0.0f;
    if (mx != NEG_INF)
        for (int s = 0; s < a.splits; ++s) l += __expf(w[s] - mx);
    __syncthreads();  // every thread has read the lse_s: now their weights
    for (int s = threadIdx.x; s < a.splits; s += DEC_THREADS)
        w[s] = mx == NEG_INF ? 0.0f : __expf(w[s] - mx) / l;
    __syncthreads();
    const float* o_part = (const float*)a.o_part;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    float acc[DEC_MERGE_COLS] = {};
#pragma unroll 4
    for (int s = warp; s < a.splits; s += DEC_WARPS) {
        const float ws = w[s];
        const float* o_s = o_part + (s * rows + zi) * a.d;
#pragma unroll
        for (int k = 0; k < DEC_MERGE_COLS; ++k)
            if (lane + 32 * k < a.d) acc[k] += ws * o_s[lane + 32 * k];
    }
#pragma unroll
    for (int k = 0; k < DEC_MERGE_COLS; ++k) sums[warp][lane + 32 * k] = acc[k];
    __syncthreads();
    for (int c = threadIdx.x; c < a.d; c += DEC_THREADS) {
        float o = 0.0f;
#pragma unroll
        for (int v = 0; v < DEC_WARPS; ++v) o += sums[v][c];
        store_elem((elem_t*)a.o + zi * a.d + c, o);
    }
    if (threadIdx.x == 0) ((float*)a.lse)[zi] = mx == NEG_INF ? NEG_INF : mx + __logf(l);
}
// ANCHOR_END: decode_merge

// Values uniform in [-1, 1) from a hash of their index: synthetic caches for the benchmark,
// made on the device (a cache of many gigabytes is not worth copying from the host).
extern "C" __global__ void decode_fill(elem_t* x, i64 n, u32 seed) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const u32 h = mix32((u32)i ^ mix32(seed ^ (u32)(i >> 32)));
        store_elem(x + i, (float)(h >> 8) * (2.0f / 16777216.0f) - 1.0f);
    }
}

// ---------------------------------------------------------------------------------------
// ANCHOR: decode_mma
// The same call on the tensor cores, for bf16 / fp16 caches at head dimension DEC_D (64, 128
// or 256) without a bias, mask or ALiBi (the key ranges and the softcap it keeps). Prepended
// also: tc.cuh (mma16816, the fragment reads, tc_scores, tc_pv) — the forward's own steps.
// The block's query rows (up to 16: the GQA group's heads times n_q) are one mma tile, its
// rows past the group zero; each warp takes 16 keys of every 64-key tile of the split and
// keeps m, l and O of the 16 rows in mma accumulators (tc_softmax_step), the warps merged at
// the end as in decode_split. K_j and V_j stream through DEC_STAGES stages of shared memory
// by cp.async, rows padded to D + 8 values as the forward's tiles.
#if DEC_KIND != 0 && defined(DEC_D)
#define DEC_KB 16                      // keys a warp a tile
#define DEC_MT (DEC_WARPS * DEC_KB)    // keys a tile
// Starts copying keys and values j0 .. j0 + DEC_MT - 1 (zeros from j_end on) into a stage.
// A thread copies one 16-byte column x of every ROWS-th row. A whole tile inside one page
// (every tile of a contiguous cache but a row's last) is rows D apart in memory: one row's
// offset, then fixed steps, where a tile that ends early or crosses pages looks up each row.
__device__ __forceinline__ void fetch_tile16(const DecodeArgs& a, const int* table, int b, int g,
                                             int j0, int j_end, u16* ks, u16* vs) {
    constexpr int D = DEC_D, S = D + 8, C8 = D / 8, ROWS = DEC_THREADS / C8;
    static_assert(DEC_THREADS % C8 == 0 && DEC_MT % ROWS == 0, "whole rows a pass");
    const u16* K = (const u16*)a.k;
    const u16* V = (const u16*)a.v;
    const int r0 = threadIdx.x / C8, x = threadIdx.x % C8 * 8;
    const bool whole = j0 + DEC_MT <= j_end && (!table || j0 % a.page_size + DEC_MT <= a.page_size);
    if (whole) {
        const i64 at = key_offset(a, table, b, g, j0 + r0) + x;
#pragma unroll
        for (int i = 0; i < DEC_MT / ROWS; ++i) {
            const int r = r0 + i * ROWS;
            cp_async16_line(ks + r * S + x, K + at + (i64)i * ROWS * D, true);
            cp_async16_line(vs + r * S + x, V + at + (i64)i * ROWS * D, true);
        }
    } else {
        for (int r = r0; r < DEC_MT; r += ROWS) {
            const int j = j0 + r;
            const bool valid = j < j_end;
            const i64 at = valid ? key_offset(a, table, b, g, j) + x : 0;
            cp_async16_line(ks + r * S + x, K + at, valid);
            cp_async16_line(vs + r * S + x, V + at, valid);
        }
    }
    cp_async_commit();
}

extern "C" __global__ void __launch_bounds__(DEC_THREADS)
decode_mma(const DecodeArgs a, const ScoreMods mods) {
    constexpr int D = DEC_D, S = D + 8;
    constexpr bool BF16 = DEC_KIND == 1;
    const int tile = blockIdx.x, split = blockIdx.y;
    const int b = blockIdx.z / a.kv_heads, g = blockIdx.z % a.kv_heads;
    const int group = a.heads / a.kv_heads, rows = group * a.n_q;
    const int L = ((const int*)a.seqlens)[b];
    ScoreMods m = mods;
    m.n_k = L, m.diag = L - m.n_q;
    const int live = min(16, rows - tile * 16);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;

    // the keys any live row sees, and this split's share (whole tiles)
    int i_lo = a.n_q, i_hi = -1;
    for (int r = 0; r < live; ++r) {
        const int i = (tile * 16 + r) % a.n_q;
        i_lo = min(i_lo, i), i_hi = max(i_hi, i);
    }
    const int lo = L > 0 ? key_start(m, i_lo) : 0, hi = L > 0 ? key_end(m, i_hi) : 0;
    const int span = max(hi - lo, 0);
    const int chunk = ((span + a.splits - 1) / a.splits + DEC_MT - 1) / DEC_MT * DEC_MT;
    const int j_begin = lo + split * chunk, j_end = min(j_begin + chunk, hi);

    extern __shared__ __align__(16) unsigned char dec_smem[];
    u16* Qs = reinterpret_cast<u16*>(dec_smem);
    u16* tiles = Qs + 16 * S;
    const int stage = 2 * DEC_MT * S;
    const int* table = (const int*)a.block_table;

    // the first tiles' copies start before Q's rows are read: Q's latency hides under them
    const int n_tiles = (j_end - j_begin + DEC_MT - 1) / DEC_MT;
#pragma unroll
    for (int t = 0; t < DEC_STAGES - 1; ++t) {
        if (t < n_tiles)
            fetch_tile16(a, table, b, g, j_begin + t * DEC_MT, j_end, tiles + t * stage,
                         tiles + t * stage + DEC_MT * S);
        else
            cp_async_commit();
    }
    // Q's rows (zeros past the group) and their A fragments
    for (int e = threadIdx.x; e < 16 * (D / 8); e += DEC_THREADS) {
        const int r = e / (D / 8), c = (e % (D / 8)) * 8, x = tile * 16 + r;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (r < live) {
            const i64 row = ((i64)b * a.heads + g * group + x / a.n_q) * a.n_q + x % a.n_q;
            v = *reinterpret_cast<const uint4*>((const u16*)a.q + row * D + c);
        }
        *reinterpret_cast<uint4*>(Qs + r * S + c) = v;
    }
    __syncthreads();
    u32 qf[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) frag_a(qf[kk], Qs, S, 0, 16 * kk, lane);

    // the lane's two rows (g and g + 8 of the tile) as query indices, for the key ranges
    const int gq = lane / 4;
    int rq[2];
#pragma unroll
    for (int r = 0; r < 2; r++) rq[r] = (tile * 16 + gq + 8 * r) % a.n_q;
    FlashArgs fa = {};
    fa.scale = a.scale;
    float mi[2] = {NEG_INF, NEG_INF}, li[2] = {0.0f, 0.0f}, o[D / 8][4];
    zero_frags<D / 8>(o);

    for (int t = 0; t < n_tiles; ++t) {
        cp_async_wait<DEC_STAGES - 2>();
        __syncthreads();  // tile t is in, and every thread is done with tile t - 1's stage
        {
            const int next = t + DEC_STAGES - 1, at = next % DEC_STAGES;
            if (next < n_tiles)
                fetch_tile16(a, table, b, g, j_begin + next * DEC_MT, j_end, tiles + at * stage,
                             tiles + at * stage + DEC_MT * S);
            else
                cp_async_commit();
        }
        const u16* ks = tiles + (t % DEC_STAGES) * stage + warp * DEC_KB * S;
        const u16* vs = ks + DEC_MT * S;
        const int j0 = j_begin + t * DEC_MT + warp * DEC_KB;
        float s[DEC_KB / 8][4];
        tc_scores<D, BF16, DEC_KB>(s, qf, ks, lane);
        tc_softmax_step<D, 2, DEC_KB, false, false, true, false, BF16>(fa, m, b, 0, 0, j0, rq, s, mi,
                                                                      li, o);
        tc_pv<D, BF16, DEC_KB>(o, s, vs, lane);
    }
    cp_async_wait<0>();
    __syncthreads();  // the stages are free: the warps' states go there

    // each warp's m (base 2), l and unnormalised O of the 16 rows, then their merge
    float* sm_m = reinterpret_cast<float*>(dec_smem);
    float* sm_l = sm_m + DEC_WARPS * 16;
    float* sm_o = sm_l + DEC_WARPS * 16;  // [warp][row][D]
    const int tq = lane % 4;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        li[r] += __shfl_xor_sync(0xffffffffu, li[r], 1);
        li[r] += __shfl_xor_sync(0xffffffffu, li[r], 2);
        const int row = gq + 8 * r;
        if (tq == 0) sm_m[warp * 16 + row] = mi[r], sm_l[warp * 16 + row] = li[r];
#pragma unroll
        for (int c = 0; c < D / 8; c++) {
            sm_o[(warp * 16 + row) * D + 8 * c + 2 * tq] = o[c][2 * r];
            sm_o[(warp * 16 + row) * D + 8 * c + 2 * tq + 1] = o[c][2 * r + 1];
        }
    }
    __syncthreads();
    for (int x = threadIdx.x; x < live * D; x += DEC_THREADS) {
        const int r = x / D, c = x % D;
        float mx = NEG_INF;
        for (int w = 0; w < DEC_WARPS; ++w) mx = fmaxf(mx, sm_m[w * 16 + r]);
        float l = 0.0f, acc = 0.0f;
        if (mx != NEG_INF)
            for (int w = 0; w < DEC_WARPS; ++w) {
                const float f = sm_m[w * 16 + r] == NEG_INF ? 0.0f : ex2_ftz(sm_m[w * 16 + r] - mx);
                l += sm_l[w * 16 + r] * f;
                acc += sm_o[(w * 16 + r) * D + c] * f;
            }
        const bool none = mx == NEG_INF || l == 0.0f;
        const float out = none ? 0.0f : acc / l;
        const float lse = none ? NEG_INF : (mx + log2f(l)) * LN2;
        const int rr = tile * 16 + r;
        const i64 zi = ((i64)b * a.heads + g * group + rr / a.n_q) * a.n_q + rr % a.n_q;
        if (a.splits == 1) {
            store_elem((elem_t*)a.o + zi * D + c, out);
            if (c == 0) ((float*)a.lse)[zi] = lse;
        } else {
            const i64 part = (i64)split * a.batch * a.heads * a.n_q + zi;
            ((float*)a.o_part)[part * D + c] = out;
            if (c == 0) ((float*)a.lse_part)[part] = lse;
        }
    }
}
#endif
// ANCHOR_END: decode_mma
