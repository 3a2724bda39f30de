#!/usr/bin/env python3
"""A numpy model of the warp-level fragments of mma.sync.m16n8k16 and ldmatrix(.trans), and
of the tensor-core backward (tc_backward_v1 in crates/attn-flash2/kernels/ladder/tc_backward_01.cu)
written on top of it, block by block, with the kernel's own index arithmetic transcribed.
It checks that arithmetic without a GPU: the gradients must match float64 to bf16's
rounding (~2e-3), and a swapped index gives errors near 1 (try it). The fragment semantics
are those the forward kernels rely on, which pass their tests on the H100.

    python3 scripts/gpu/fragment_model.py      # needs numpy
"""
import numpy as np
rng = np.random.default_rng(0)
L = np.arange(32); G = L // 4; T = L % 4; MR = L % 8; MI = L // 8

def bf16(x):
    x = np.asarray(x, dtype=np.float32)
    b = x.view(np.uint32).astype(np.uint64)
    b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
    return b.astype(np.uint32).view(np.float32)

def ldsm(arr, rows, cols, trans=False):
    # rows, cols: per-lane address of row (lane%8) of matrix (lane/8); returns [32, 4, 2]
    mats = []
    for i in range(4):
        m = np.stack([arr[rows[8 * i + r], cols[8 * i + r]:cols[8 * i + r] + 8] for r in range(8)])
        mats.append(m)
    out = np.zeros((32, 4, 2), np.float32)
    for i, m in enumerate(mats):
        for j in range(2):
            out[:, i, j] = m.T[G, 2 * T + j] if trans else m[G, 2 * T + j]
    return out

# The kernel's four fragment reads (frag_a, frag_b2, frag_b2_trans, frag_a_trans).
def frag_a(t, r0, c0):
    return ldsm(t, r0 + MR + 8 * (MI % 2), c0 + 8 * (MI // 2))

def frag_b2(t, n0, k0):
    return ldsm(t, n0 + 8 * (MI // 2) + MR, k0 + 8 * (MI % 2))

def frag_b2_trans(t, k0, n0):
    return ldsm(t, k0 + 8 * (MI % 2) + MR, n0 + 8 * (MI // 2), trans=True)

def frag_a_trans(t, k0, m0):
    return ldsm(t, k0 + 8 * (MI // 2) + MR, m0 + 8 * (MI % 2), trans=True)

def mma(c, a, b0, b1):
    A = np.zeros((16, 16)); B = np.zeros((16, 8))
    for j in range(2):
        A[G, 2 * T + j] = a[:, 0, j]; A[G + 8, 2 * T + j] = a[:, 1, j]
        A[G, 2 * T + 8 + j] = a[:, 2, j]; A[G + 8, 2 * T + 8 + j] = a[:, 3, j]
        B[2 * T + j, G] = b0[:, j]; B[2 * T + 8 + j, G] = b1[:, j]
    C = np.zeros((16, 8))
    for j in range(2):
        C[G, 2 * T + j] = c[:, j]; C[G + 8, 2 * T + j] = c[:, 2 + j]
    C = C + A @ B
    for j in range(2):
        c[:, j] = C[G, 2 * T + j]; c[:, 2 + j] = C[G + 8, 2 * T + j]

def p_fragment(s, kk):  # s: [nb][32][4] -> [32, 4, 2], rounded
    pa = np.zeros((32, 4, 2), np.float32)
    pa[:, 0] = s[2 * kk][:, 0:2]; pa[:, 1] = s[2 * kk][:, 2:4]
    pa[:, 2] = s[2 * kk + 1][:, 0:2]; pa[:, 3] = s[2 * kk + 1][:, 2:4]
    return bf16(pa)

def backward_block(Q, K, V, dO, lse, Dv, scale, j0, causal, n_q, n_k):
    D = Q.shape[1]; BR = BC = 64
    Ks = np.zeros((BC, D), np.float32); Vs = np.zeros((BC, D), np.float32)
    kr = min(BC, n_k - j0); Ks[:kr] = K[j0:j0 + kr]; Vs[:kr] = V[j0:j0 + kr]
    dk = np.zeros((4, D // 8, 32, 4)); dv = np.zeros((4, D // 8, 32, 4))
    dQ = np.zeros((n_q, D))
    i_first = (max(0, j0 - (n_k - n_q)) // BR) * BR if causal else 0
    for i0 in range(i_first, n_q, BR):
        Qs = np.zeros((BR, D), np.float32); dOs = np.zeros((BR, D), np.float32)
        qr = min(BR, n_q - i0); Qs[:qr] = Q[i0:i0 + qr]; dOs[:qr] = dO[i0:i0 + qr]
        Ls = np.full(BR, -np.inf); Ds = np.zeros(BR)
        Ls[:qr] = lse[i0:i0 + qr]; Ds[:qr] = Dv[i0:i0 + qr]
        dSs = np.zeros((BC, BR), np.float32)
        saved = []
        for w in range(4):
            st = [np.zeros((32, 4)) for _ in range(BR // 8)]; dpt = [np.zeros((32, 4)) for _ in range(BR // 8)]
            for kk in range(D // 16):
                ka = frag_a(Ks, 16 * w, 16 * kk)
                va = frag_a(Vs, 16 * w, 16 * kk)
                for nb in range(0, BR // 8, 2):
                    qb = frag_b2(Qs, 8 * nb, 16 * kk)
                    ob = frag_b2(dOs, 8 * nb, 16 * kk)
                    mma(st[nb], ka, qb[:, 0], qb[:, 1]); mma(st[nb + 1], ka, qb[:, 2], qb[:, 3])
                    mma(dpt[nb], va, ob[:, 0], ob[:, 1]); mma(dpt[nb + 1], va, ob[:, 2], ob[:, 3])
            keys = [j0 + 16 * w + G, j0 + 16 * w + G + 8]
            for nb in range(BR // 8):
                for e in range(4):
                    qi = 8 * nb + 2 * T + (e & 1)
                    key = keys[e // 2]
                    sc = scale * st[nb][:, e]
                    hidden = (key >= n_k) | (i0 + qi >= n_q)
                    if causal: hidden |= key > (i0 + qi) + (n_k - n_q)
                    sc = np.where(hidden, -np.inf, sc)
                    Lq = Ls[qi]
                    dead = np.isinf(sc) | np.isinf(Lq)
                    p = np.where(dead, 0.0, np.exp(np.where(dead, 0.0, sc) - np.where(dead, 0.0, Lq)))
                    st[nb][:, e] = p
                    dpt[nb][:, e] = p * (dpt[nb][:, e] - Ds[qi])
            for kq in range(BR // 16):
                pa = p_fragment(st, kq); sa = p_fragment(dpt, kq)
                for c in range(0, D // 8, 2):
                    ob = frag_b2_trans(dOs, 16 * kq, 8 * c)
                    qb = frag_b2_trans(Qs, 16 * kq, 8 * c)
                    mma(dv[w][c], pa, ob[:, 0], ob[:, 1]); mma(dv[w][c + 1], pa, ob[:, 2], ob[:, 3])
                    mma(dk[w][c], sa, qb[:, 0], qb[:, 1]); mma(dk[w][c + 1], sa, qb[:, 2], qb[:, 3])
            for nb in range(BR // 8):
                for j in range(2):
                    dSs[16 * w + G, 8 * nb + 2 * T + j] = bf16(dpt[nb][:, j])
                    dSs[16 * w + G + 8, 8 * nb + 2 * T + j] = bf16(dpt[nb][:, 2 + j])
        for w in range(4):  # after __syncthreads
            dqa = [np.zeros((32, 4)) for _ in range(D // 8)]
            for kk in range(BC // 16):
                da = frag_a_trans(dSs, 16 * kk, 16 * w)
                for c in range(0, D // 8, 2):
                    kb = frag_b2_trans(Ks, 16 * kk, 8 * c)
                    mma(dqa[c], da, kb[:, 0], kb[:, 1]); mma(dqa[c + 1], da, kb[:, 2], kb[:, 3])
            for r in range(2):
                rows = i0 + 16 * w + G + 8 * r
                for c in range(D // 8):
                    for j in range(2):
                        ok = rows < n_q
                        np.add.at(dQ, (rows[ok], 8 * c + 2 * T[ok] + j), scale * dqa[c][ok, 2 * r + j])
    dK = np.zeros((n_k, D)); dV = np.zeros((n_k, D))
    for w in range(4):
        for r in range(2):
            keys = j0 + 16 * w + G + 8 * r
            ok = keys < n_k
            for c in range(D // 8):
                for j in range(2):
                    dK[keys[ok], 8 * c + 2 * T[ok] + j] = scale * dk[w][c][ok, 2 * r + j]
                    dV[keys[ok], 8 * c + 2 * T[ok] + j] = dv[w][c][ok, 2 * r + j]
    return dQ, dK, dV

def run(n_q, n_k, D, causal):
    Q, K, V, dO = (bf16(rng.standard_normal((n, D))) for n in (n_q, n_k, n_k, n_q))
    scale = 1 / np.sqrt(D)
    S = scale * Q.astype(np.float64) @ K.T
    if causal:
        S = np.where(np.arange(n_k)[None, :] > np.arange(n_q)[:, None] + (n_k - n_q), -np.inf, S)
    m = S.max(1, keepdims=True); m = np.where(np.isinf(m), 0, m)
    E = np.exp(S - m); l = E.sum(1, keepdims=True)
    P = np.where(l > 0, E / np.where(l > 0, l, 1), 0)
    lse = np.where(l[:, 0] > 0, m[:, 0] + np.log(np.where(l[:, 0] > 0, l[:, 0], 1)), -np.inf)
    O = P @ V
    dP = dO @ V.T; Dv = (dO * O).sum(1); dS = P * (dP - Dv[:, None])
    dQr = scale * dS @ K; dKr = scale * dS.T @ Q; dVr = P.T @ dO
    dQ = np.zeros_like(dQr); dK = np.zeros_like(dKr); dV = np.zeros_like(dVr)
    for j0 in range(0, n_k, 64):
        a, b, c = backward_block(Q, K, V, dO, lse, Dv, scale, j0, causal, n_q, n_k)
        dQ += a; dK += b; dV += c
    err = lambda x, r: np.linalg.norm(x - r) / np.linalg.norm(r)
    print(f"n_q={n_q} n_k={n_k} d={D} causal={causal}: dQ {err(dQ, dQr):.1e} dK {err(dK, dKr):.1e} dV {err(dV, dVr):.1e}")

if __name__ == "__main__":
    for args in [(64, 64, 64, False), (100, 130, 64, True), (130, 70, 64, True), (64, 64, 128, False)]:
        run(*args)
