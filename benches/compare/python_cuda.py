"""attn_rs on CUDA tensors from Python beside the same kernels timed by `attn gpu-bench`
(Rust, in the same run) and beside PyTorch's SDPA (flash and cuDNN backends) on the same
tensors: if the Python call moved the tensors off the device, its time could not match
the Rust call's. bf16, forward and forward + backward; CUDA events around 10 calls back to
back a sample, the median of the samples.

Usage: python3 benches/compare/python_cuda.py --attn PATH/TO/attn [--shapes 4x16x4096x128,...]
"""
import argparse, csv, subprocess

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import attn_rs

p = argparse.ArgumentParser()
p.add_argument("--attn", required=True)
p.add_argument("--shapes", default="4x16x4096x128,8x32x2048x64")
p.add_argument("--repeats", type=int, default=7)
a = p.parse_args()
CALLS = 10


def timed(fn):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(a.repeats):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(CALLS):
            fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / CALLS)
    return sorted(times)[len(times) // 2]


print("# attn_rs from Python on CUDA tensors (bf16, causal) against attn gpu-bench (Rust) and SDPA; ms a call")
print("shape,pass,rust_ms,python_ms,python_over_rust,unchecked_ms,unchecked_over_rust,sdpa_flash_ms,sdpa_cudnn_ms")
for shape in a.shapes.split(","):
    b, h, n, d = map(int, shape.split("x"))
    out_csv = f"/tmp/python_cuda_rust_{shape}.csv"
    subprocess.run([a.attn, "gpu-bench", "--seq", str(n), "--batch", str(b), "--heads", str(h),
                    "--head-dim", str(d), "--stages", "flash2-bf16", "--causal-only",
                    "--repeats", str(a.repeats), "--csv", out_csv],
                   capture_output=True, text=True, check=True)
    row = next(csv.DictReader(l for l in open(out_csv) if not l.startswith("#")))
    rust = {"forward": float(row["forward_ms"]),
            "backward": float(row["forward_ms"]) + float(row["backward_ms"])}
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    d_out = torch.randn_like(q)

    def fwd_bwd(f):
        def run():
            out = f(qg, kg, vg)
            torch.autograd.grad(out, (qg, kg, vg), d_out)
        return run

    ours = lambda q_, k_, v_: attn_rs.attention(q_, k_, v_, causal=True)
    unchecked = lambda q_, k_, v_: attn_rs.attention(q_, k_, v_, causal=True, check_finite=False)
    sdpa = lambda q_, k_, v_: F.scaled_dot_product_attention(q_, k_, v_, is_causal=True)
    res = {}
    with torch.no_grad():
        res["forward"] = [timed(lambda: ours(q, k, v)), timed(lambda: unchecked(q, k, v))]
        for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            with sdpa_kernel(be):
                res["forward"].append(timed(lambda: sdpa(q, k, v)))
    res["backward"] = [timed(fwd_bwd(ours)), timed(fwd_bwd(unchecked))]
    for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        with sdpa_kernel(be):
            res["backward"].append(timed(fwd_bwd(sdpa)))
    for pas in ("forward", "backward"):  # "backward": a forward and its backward
        py, un, fl, cu = res[pas]
        r = rust[pas]
        print(f"{shape},{pas},{r:.3f},{py:.3f},{py / r:.3f},{un:.3f},{un / r:.3f},{fl:.3f},{cu:.3f}")
