"""Packed against uniform and padded batches on the CPU through `attn run` (FlashAttention-2,
causal): 16 documents of 128 to 4 096 tokens packed with --cu-seqlens-q/-k, a uniform batch of
the same 32 768 tokens (8 x 4 096), and the 16 documents padded to 4 096 with a key-padding
mask; forward and backward, each run the median of 3 calls in one process (`--repeats 3`), the
best of two alternated runs. GFLOP/s count the causal pairs
of the documents (the uniform batch its own).

Usage: cargo build --release -p attn-cli && python3 benches/compare/packed_cpu.py [WORKDIR]
"""
import numpy as np, subprocess, re, sys
import os
attn = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "target", "release", "attn")
os.makedirs(sys.argv[1] if len(sys.argv) > 1 else "target/packed-bench", exist_ok=True)
os.chdir(sys.argv[1] if len(sys.argv) > 1 else "target/packed-bench")
lens = [4096, 4096, 4096, 3584, 3072, 2560, 2304, 2048, 1792, 1536, 1280, 1024, 512, 384, 256, 128]
h, d = 8, 64
rng = np.random.default_rng(0)
T = sum(lens)
def save(name, shape):
    np.save(name, rng.standard_normal(shape, dtype=np.float32))
save("pq.npy", (1, h, T, d)); save("pk.npy", (1, h, T, d)); save("pv.npy", (1, h, T, d)); save("pdo.npy", (1, h, T, d))
cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32); np.save("cu.npy", cu)
save("uq.npy", (8, h, 4096, d)); save("uk.npy", (8, h, 4096, d)); save("uv.npy", (8, h, 4096, d)); save("udo.npy", (8, h, 4096, d))
save("dq_.npy", (16, h, 4096, d)); save("dk_.npy", (16, h, 4096, d)); save("dv_.npy", (16, h, 4096, d)); save("ddo.npy", (16, h, 4096, d))
pad = np.zeros((16, 4096), bool)
for i, l in enumerate(lens): pad[i, :l] = True
np.save("pad.npy", pad)
def run(args):
    out = subprocess.run([attn, "run", "--algo", "flash2", "--causal", "--out", "o.npy", "--grad-out", args[-1], "--dq", "gq.npy", "--dk", "gk.npy", "--dv", "gv.npy", "--repeats", "3"] + args[:-1], capture_output=True, text=True, check=True).stdout
    f, b = re.search(r"forward ([\d.]+) ms, backward ([\d.]+) ms", out).groups()
    return float(f), float(b)
pairs_p = sum(l * (l + 1) // 2 for l in lens)
pairs_u = 8 * 4096 * 4097 // 2
best = {}
for r in range(2):
    for name, args in [("packed", ["--q", "pq.npy", "--k", "pk.npy", "--v", "pv.npy", "--cu-seqlens-q", "cu.npy", "--cu-seqlens-k", "cu.npy", "pdo.npy"]),
                       ("uniform", ["--q", "uq.npy", "--k", "uk.npy", "--v", "uv.npy", "udo.npy"]),
                       ("padded", ["--q", "dq_.npy", "--k", "dk_.npy", "--v", "dv_.npy", "--mask", "pad.npy", "ddo.npy"])]:
        t = run(args)
        best[name] = tuple(min(a, b) for a, b in zip(best.get(name, t), t))
print(f"16 documents of 128-4096 tokens ({T} tokens), h {h}, d {d}, causal, flash2 on the CPU; medians of 3 calls, best of 2 alternated runs")
print("layout   forward ms  backward ms  fwd GFLOP/s  bwd GFLOP/s")
for name, pairs in [("packed", pairs_p), ("uniform", pairs_u), ("padded", pairs_p)]:
    f, b = best[name]
    fl = 4 * h * d * pairs
    print(f"{name:8} {f:10.1f} {b:12.1f} {fl / f / 1e6:12.1f} {2.5 * fl / b / 1e6:12.1f}")
p, u, pd = best["packed"], best["uniform"], best["padded"]
print(f"packed/uniform GFLOP/s: forward {(pairs_p / p[0]) / (pairs_u / u[0]):.2f}, backward {(pairs_p / p[1]) / (pairs_u / u[1]):.2f}")
print(f"padded/packed time: forward {pd[0] / p[0]:.2f}, backward {pd[1] / p[1]:.2f}")
