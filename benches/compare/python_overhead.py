"""The cost of calling a stage from Python: attn_rs.attention() on NumPy arrays and on torch
tensors against the same stage timed inside Rust on the same arrays, in one process; and,
beside them, PyTorch's scaled_dot_product_attention on the same tensors.

Usage: python3 benches/compare/python_overhead.py [--algo flash2] [--shapes 1x1x16x16,1x8x256x64]
       [--repeats 2000]
"""
import argparse, os, statistics, time

# PyTorch's OpenMP workers spin for a while after each of its calls; spinning, they take the
# cores from the next call's thread pool and lend the call after SDPA a few milliseconds it
# did not spend. Passive waiting makes the turns independent (set before torch loads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

import attn_rs
from attn_rs import _native

p = argparse.ArgumentParser()
p.add_argument("--algo", default="flash2")
p.add_argument("--shapes", default="1x1x16x16,1x8x128x64,4x16x1024x64")
p.add_argument("--repeats", type=int, default=2000)
a = p.parse_args()

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    torch = None


def interleaved(fns, repeats):
    """Each callable's median per-call ns, the callables taking turns (so that the host's
    state — caches, the thread pool's wake-ups — is the same for each)."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t = time.perf_counter_ns()
            fn()
            ts.append(time.perf_counter_ns() - t)
    return [statistics.median(ts) for ts in times]


OPTS = {"causal": True, "scale": None, "dropout": 0.0, "seed": 0, "window": None, "softcap": None,
        "q_block": None, "k_block": None, "deterministic": False}
print(f"# attn_rs call overhead, algo {a.algo}, causal, f32 on the CPU; median of per-call times (µs)")
print("shape,rust_us,python_numpy_us,python_torch_us,overhead_numpy_us,overhead_torch_us,sdpa_torch_us")
for shape in a.shapes.split(","):
    b, h, n, d = map(int, shape.split("x"))
    reps = max(10, a.repeats // max(1, (b * h * n * n * d) // (1 << 20)))
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((b, h, n, d), dtype=np.float32) for _ in range(3))
    inner = []  # the stage's own time, measured in Rust inside a call made from Python
    rust_call = lambda: inner.append(_native.forward_times_ns(a.algo, "cpu", q, k, v, OPTS, 1)[0])
    fns = [rust_call, lambda: attn_rs.attention(q, k, v, algo=a.algo, causal=True)]
    if torch is not None:
        tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
        fns += [lambda: attn_rs.attention(tq, tk, tv, algo=a.algo, causal=True),
                lambda: F.scaled_dot_product_attention(tq, tk, tv, is_causal=True)]
    meds = interleaved(fns, reps)
    rust = statistics.median(inner)
    row = [shape, rust / 1e3, meds[1] / 1e3]
    if torch is not None:
        row += [meds[2] / 1e3, (meds[1] - rust) / 1e3, (meds[2] - rust) / 1e3, meds[3] / 1e3]
    else:
        row += ["", (meds[1] - rust) / 1e3, "", ""]
    print(",".join(f"{x:.1f}" if isinstance(x, float) else str(x) for x in row))
