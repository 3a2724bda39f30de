#!/usr/bin/env python3
"""Every stage of the `attn` binary against an independent numpy implementation of the
contract, on random shapes and options (n_q != n_k, GQA, causal bottom-right, key-padding and
broadcast 4-D masks, numpy-broadcast biases with -inf, custom scales, odd block sizes).

Optional, not part of CI (the Rust tests check the same against the float64 reference in
attn-core; this script shares no code with the workspace). Needs numpy and a release build:

    cargo build --release
    python benches/compare/check_against_numpy.py [--attn target/release/attn] [--cases 60]

Prints each mismatch and "fails N" last; exits 1 if N > 0.
"""
import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np

STAGES = ["naive", "chunked", "flash1", "flash2"]


def reference(q, k, v, mask, bias, causal, scale):
    """Output and log-sum-exp in float64, straight from the contract (shared/DESIGN.md)."""
    b, h, n_q, _ = q.shape
    kv_heads, n_k = k.shape[1], k.shape[2]
    group = h // kv_heads
    k64 = np.repeat(k, group, axis=1).astype(np.float64)
    v64 = np.repeat(v, group, axis=1).astype(np.float64)
    s = scale * np.einsum("bhid,bhjd->bhij", q.astype(np.float64), k64)
    if bias is not None:
        s = s + bias.astype(np.float64)
    keep = np.ones(s.shape, bool)
    if causal:  # bottom-right: key j hidden from query i when j > i + (n_k - n_q)
        i = np.arange(n_q)[:, None]
        j = np.arange(n_k)[None, :]
        keep &= ~(j > i + (n_k - n_q))
    if mask is not None:
        m = mask[:, None, None, :] if mask.ndim == 2 else mask
        keep &= np.broadcast_to(m, s.shape)
    s = np.where(keep, s, -np.inf)
    row_max = s.max(-1, keepdims=True)
    empty = np.isneginf(row_max)  # every key removed: zeros, lse -inf
    e = np.where(empty, 0.0, np.exp(s - np.where(empty, 0.0, row_max)))
    row_sum = e.sum(-1, keepdims=True)
    p = np.where(empty, 0.0, e / np.where(row_sum == 0, 1.0, row_sum))
    out = np.einsum("bhij,bhjd->bhid", p, v64)
    lse = np.where(empty[..., 0], -np.inf, (row_max + np.log(np.where(row_sum == 0, 1.0, row_sum)))[..., 0])
    return out, lse


def random_case(rng):
    b = int(rng.integers(1, 3))
    kv_heads = int(rng.integers(1, 3))
    h = kv_heads * int(rng.integers(1, 4))
    n_q, n_k = int(rng.integers(1, 70)), int(rng.integers(1, 70))
    d = int(rng.choice([1, 2, 7, 16, 64, 100]))
    q = rng.standard_normal((b, h, n_q, d), dtype=np.float32)
    k = rng.standard_normal((b, kv_heads, n_k, d), dtype=np.float32)
    v = rng.standard_normal((b, kv_heads, n_k, d), dtype=np.float32)
    np.save("q.npy", q)
    np.save("k.npy", k)
    np.save("v.npy", v)
    args, mask, bias = [], None, None
    causal = bool(rng.integers(0, 2))
    if causal:
        args.append("--causal")
    kind = int(rng.integers(0, 3))
    if kind == 1:
        mask = rng.random((b, n_k)) < 0.8
    elif kind == 2:
        dims = [x if rng.random() < 0.5 else 1 for x in (b, h, n_q)] + [n_k]
        mask = rng.random(dims) < 0.7
    if mask is not None:
        np.save("m.npy", mask)
        args += ["--mask", "m.npy"]
    if rng.random() < 0.5:
        dims = [x if rng.random() < 0.5 else 1 for x in (b, h, n_q, n_k)]
        dims = dims[4 - int(rng.integers(1, 5)):]  # 1 to 4 axes, broadcast like numpy
        bias = rng.standard_normal(dims).astype(np.float32)
        bias[rng.random(dims) < 0.1] = -np.inf
        np.save("b.npy", bias)
        args += ["--bias", "b.npy"]
        bias = np.broadcast_to(bias.reshape([1] * (4 - bias.ndim) + list(bias.shape)), (b, h, n_q, n_k))
    scale = np.float32(1 / np.sqrt(d))
    if rng.random() < 0.3:
        scale = np.float32(rng.uniform(0.1, 2))
        args += ["--scale", repr(float(scale))]
    return (q, k, v, mask, bias, causal, scale), args


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--attn", default="target/release/attn")
    ap.add_argument("--cases", type=int, default=60)
    ap.add_argument("--seed", type=int, default=7)
    opts = ap.parse_args()
    binary = os.path.abspath(opts.attn)
    rng = np.random.default_rng(opts.seed)
    os.chdir(tempfile.mkdtemp(prefix="attn-check-"))
    fails = 0
    for case in range(opts.cases):
        problem, args = random_case(rng)
        out, lse = reference(*problem)
        for stage in STAGES:
            blocks = []
            if stage != "naive" and rng.random() < 0.5:
                blocks = ["--q-block", str(int(rng.integers(1, 40))), "--k-block", str(int(rng.integers(1, 40)))]
            cmd = [binary, "run", "--algo", stage, "--q", "q.npy", "--k", "k.npy", "--v", "v.npy",
                   "--out", "o.npy", "--lse", "l.npy"] + args + blocks
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                print("FAILED", stage, case, r.stderr.strip())
                fails += 1
                continue
            o, l = np.load("o.npy"), np.load("l.npy")
            err = np.linalg.norm(o - out) / max(np.linalg.norm(out), 1e-30)
            finite = np.isfinite(lse)
            lse_err = np.abs(l[finite] - lse[finite]).max() if finite.any() else 0.0
            same_empty = (np.isneginf(l) == np.isneginf(lse)).all()
            if (err > 1e-5 and np.linalg.norm(out) > 0) or lse_err > 1e-4 or not same_empty:
                print("MISMATCH", stage, case, f"out {err:.2e} lse {lse_err:.2e}", args + blocks)
                fails += 1
    print("fails", fails)
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
