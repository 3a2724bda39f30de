#!/usr/bin/env python3
"""FlashAttention-2 on the CPU (this workspace's `attn`) beside PyTorch's
scaled_dot_product_attention, on the same machine, threads and shapes, in one run.

Optional, not part of CI. Needs: a release build of the `attn` binary and
`pip install torch numpy` in a virtualenv.

    cargo build --release
    python benches/compare/sdpa_cpu.py [--attn target/release/attn] [--lengths 1024 4096 16384]

Shapes follow the FlashAttention-2 issue: b = 1, h = 8, d = 64, causal and not. Prints one
row per (n, causal) with forward and forward+backward times, GFLOP/s (FLOPs counted as in
the FlashAttention-2 paper: forward 4·b·h·n²·d, halved by causal masking, backward 2.5×),
the ratio ours / PyTorch (> 1: ours is faster), and the machine's fp32 matmul peak.
"""

import argparse
import datetime
import os
import platform
import re
import subprocess
import time

import torch
import torch.nn.functional as F


def median_time(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def flops_forward(b, h, n, d, causal):
    pairs = n * (n + 1) // 2 if causal else n * n
    return 4 * b * h * d * pairs


def torch_times(b, h, n, d, causal, repeats):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=g, requires_grad=True) for _ in range(3))
    d_out = torch.randn(b, h, n, d, generator=g)

    def fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def fwd_bwd():
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        o.backward(d_out)

    return median_time(fwd, repeats), median_time(fwd_bwd, repeats)


def attn_times(binary, b, h, n, d, causal, repeats):
    cmd = [binary, "table", "--stages", "flash2", "--batch", str(b), "--heads", str(h),
           "--seq", str(n), "--head-dim", str(d), "--causal", str(causal).lower(),
           "--no-check", "--repeats", str(repeats)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    row = next(line for line in out.splitlines() if line.startswith("flash2"))
    cols = row.split()
    fwd_ms, bwd_ms = float(cols[4]), float(cols[6])
    return fwd_ms / 1e3, (fwd_ms + bwd_ms) / 1e3


def matmul_peak(size=2048, repeats=5):
    a, b = torch.randn(size, size), torch.randn(size, size)
    t = median_time(lambda: a @ b, repeats)
    return 2 * size**3 / t / 1e9


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attn", default="target/release/attn")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    b, h, d = 1, 8, 64
    threads = torch.get_num_threads()
    print(f"# {cpu_model()}, {threads} threads (torch {torch.__version__}, RAYON_NUM_THREADS="
          f"{os.environ.get('RAYON_NUM_THREADS', 'default')}), {datetime.date.today()}")
    peak = matmul_peak()
    print(f"# fp32 matmul peak (torch, 2048^3): {peak:.1f} GFLOP/s")
    # The same ceiling through the products our stages use (the gemm crate): `attn matmul-peak`.
    out = subprocess.run([args.attn, "matmul-peak"], check=True, capture_output=True, text=True).stdout
    gemm_peak = float(re.search(r"peak: ([0-9.]+) GFLOP/s", out).group(1))
    print(f"# fp32 matmul peak (ours, gemm crate, 1536^3): {gemm_peak:.1f} GFLOP/s")
    print("n,causal,pass,ours_ms,torch_ms,ours_gflops,torch_gflops,ratio,ours_frac_peak,ours_frac_gemm_peak")
    for n in args.lengths:
        for causal in (False, True):
            # Alternate the two implementations, one timed run each, so that a slow phase of
            # a shared machine hits both; report each one's median.
            reps = args.repeats if n <= 4096 else 1
            runs = [(torch_times(b, h, n, d, causal, 1), attn_times(args.attn, b, h, n, d, causal, 1))
                    for _ in range(reps)]
            med = lambda xs: sorted(xs)[len(xs) // 2]
            t_fwd, t_fb = med([r[0][0] for r in runs]), med([r[0][1] for r in runs])
            o_fwd, o_fb = med([r[1][0] for r in runs]), med([r[1][1] for r in runs])
            f = flops_forward(b, h, n, d, causal)
            for name, ours, theirs, flops in (("fwd", o_fwd, t_fwd, f), ("fwd+bwd", o_fb, t_fb, 3.5 * f)):
                print(f"{n},{str(causal).lower()},{name},{ours*1e3:.1f},{theirs*1e3:.1f},"
                      f"{flops/ours/1e9:.1f},{flops/theirs/1e9:.1f},{theirs/ours:.2f},{flops/ours/1e9/peak:.2f},"
                      f"{flops/ours/1e9/gemm_peak:.2f}",
                      flush=True)

if __name__ == "__main__":
    main()
