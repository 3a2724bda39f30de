"""Decoding from a KV cache on the GPU: our decode kernel (`attn decode-bench --device cuda`)
beside PyTorch's scaled_dot_product_attention on the same shapes, in one run. One query row a
sequence, GQA, bf16 (or --dtype f16 / f32), contiguous caches full to n_k. PyTorch gets
[b, heads, 1, d] queries and [b, kv_heads, n_k, d] caches with enable_gqa=True, not causal
(one query row sees the whole cache either way), each backend that accepts the call.
Both sides: 20 steps back to back between CUDA events a sample, the median of the samples;
bandwidth is the cache bytes read (K and V) over a step's time, beside the copy bandwidth
each side measures itself (bytes read plus written by a device-to-device copy).

Usage: python3 decode_sdpa.py --attn PATH/TO/attn [--batch 1,8,64] [--seq 4096,32768,131072]
       [--dtype bf16] [--csv OUT.csv]
"""
import argparse, csv, io, subprocess, sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

p = argparse.ArgumentParser()
p.add_argument("--attn", required=True)
p.add_argument("--batch", default="1,8,64")
p.add_argument("--seq", default="4096,32768,131072")
p.add_argument("--heads", type=int, default=32)
p.add_argument("--kv-heads", type=int, default=8)
p.add_argument("--head-dim", type=int, default=128)
p.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"])
p.add_argument("--repeats", type=int, default=7)
p.add_argument("--csv")
a = p.parse_args()

ours = subprocess.run(
    [a.attn, "decode-bench", "--device", "cuda", "--dtype", a.dtype, "--batch", a.batch, "--seq", a.seq,
     "--heads", str(a.heads), "--kv-heads", str(a.kv_heads), "--head-dim", str(a.head_dim),
     "--repeats", str(a.repeats)],
    capture_output=True, text=True, check=True).stdout
print(ours, end="")
ours_rows = {(int(r["batch"]), int(r["n_k"])): r for r in csv.DictReader(
    io.StringIO("\n".join(l for l in ours.splitlines() if not l.startswith("#"))))}
our_copy = float(next(l for l in ours.splitlines() if "copy bandwidth" in l).split(":")[1].split()[0]) * 1e9

dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[a.dtype]
dev = torch.device("cuda")
STEPS = 20


def timed(fn):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(a.repeats):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(STEPS):
            fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3 / STEPS)
    return sorted(times)[len(times) // 2]


src = torch.empty(1 << 29, dtype=torch.float32, device=dev)
dst = torch.empty_like(src)
torch_copy = max(2 * src.numel() * 4 / timed(lambda: dst.copy_(src)) for _ in range(2))
del src, dst
print(f"# PyTorch {torch.__version__}, copy bandwidth (read + write): {torch_copy / 1e9:.1f} GB/s")

backends = [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
            ("efficient", SDPBackend.EFFICIENT_ATTENTION)]
rows = []
for b in map(int, a.batch.split(",")):
    for n in map(int, a.seq.split(",")):
        print(f"decode_sdpa: batch {b}, n_k {n} …", file=sys.stderr)
        q = torch.randn(b, a.heads, 1, a.head_dim, dtype=dtype, device=dev)
        k = torch.randn(b, a.kv_heads, n, a.head_dim, dtype=dtype, device=dev)
        v = torch.randn_like(k)
        kv_bytes = 2 * k.numel() * k.element_size()
        best = None
        for name, be in backends:
            try:
                with sdpa_kernel(be):
                    t = timed(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
            except (RuntimeError, torch.OutOfMemoryError) as err:
                print(f"  {name}: refused ({str(err).splitlines()[0][:100]})", file=sys.stderr)
                continue
            if best is None or t < best[1]:
                best = (name, t)
        del q, k, v
        torch.cuda.empty_cache()
        r = ours_rows[(b, n)]
        t_ours = float(r["step_ms"]) / 1e3
        row = dict(batch=b, n_k=n, kv_mb=kv_bytes / 1e6, splits=int(r["splits"]), ours_us=t_ours * 1e6,
                   ours_share=kv_bytes / t_ours / our_copy,
                   sdpa=best[0] if best else "none", sdpa_us=best[1] * 1e6 if best else float("nan"),
                   sdpa_share=kv_bytes / best[1] / torch_copy if best else float("nan"))
        row["speedup"] = row["sdpa_us"] / row["ours_us"]
        rows.append(row)

print(f"\ndecode, n_q 1, heads {a.heads}, kv_heads {a.kv_heads}, d {a.head_dim}, {a.dtype}; share = K/V bytes a step reads over its time, against the copy bandwidth")
print(f"{'batch':>5} {'n_k':>7} {'K/V MB':>8} {'splits':>6} {'ours us':>9} {'share':>6} {'SDPA':>9} {'SDPA us':>9} {'share':>6} {'SDPA/ours':>9}")
for r in rows:
    print(f"{r['batch']:>5} {r['n_k']:>7} {r['kv_mb']:>8.0f} {r['splits']:>6} {r['ours_us']:>9.1f} {r['ours_share']:>6.2f} "
          f"{r['sdpa']:>9} {r['sdpa_us']:>9.1f} {r['sdpa_share']:>6.2f} {r['speedup']:>9.2f}")
if a.csv:
    with open(a.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
