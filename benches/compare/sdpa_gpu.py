#!/usr/bin/env python3
"""PyTorch's scaled_dot_product_attention on the GPU, on the shapes `attn gpu-bench` uses:
device time (CUDA events, median) and device bytes allocated above the inputs, forward and
backward, for the math backend (it materialises S like stage 1) and the memory-efficient
backend, fp32. Writes a CSV beside the table it prints. With --dtype bf16 or f16: the flash
backend (FlashAttention-2) and the cuDNN backend instead, the rivals of the tensor-core stage.
With --seed WHEEL: the chunked PyTorch code of the seed project
(memory-efficient-attention-pytorch, imported from its wheel), the rival of the chunked stage,
at its README's setting unless --seq says otherwise (b 1, h 8, d 64, causal, n 65 536).

    python3 sdpa_gpu.py --seq 1024,4096,16384 --csv sdpa.csv
    python3 sdpa_gpu.py --paper --dtype bf16 --csv sdpa-bf16.csv
    python3 sdpa_gpu.py --seed memory_efficient_attention_pytorch-0.1.6-py3-none-any.whl --seq 65536 --causal-only
"""
import argparse
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def flops(b, h, n, d, causal):
    pairs = n * (n + 1) / 2 if causal else n * n
    return 4.0 * b * h * d * pairs


def sdpa(backend):
    def run(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


def seed(wheel):
    """The seed project's chunked attention, at its own default chunk sizes (512 x 1024)."""
    sys.path.insert(0, wheel)  # a pure-Python wheel imports as a zip archive
    from memory_efficient_attention_pytorch.memory_efficient_attention import memory_efficient_attention
    return lambda q, k, v, causal: memory_efficient_attention(q, k, v, causal=causal)


def measure(attention, b, h, n, d, causal, repeats, dtype=torch.float32, infer_forward=False):
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    d_out = torch.randn(b, h, n, d, device="cuda", dtype=dtype)
    torch.cuda.synchronize()

    def fwd():
        return attention(q, k, v, causal)

    fwd_ms, bwd_ms, peaks = [], [], (0, 0)
    for _ in range(repeats + 1):
        for t in (q, k, v):
            t.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        s, m, e = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        s.record()
        out = fwd()
        m.record()
        torch.cuda.synchronize()
        fwd_peak = torch.cuda.max_memory_allocated() - base
        torch.cuda.reset_peak_memory_stats()
        base_b = torch.cuda.memory_allocated()
        m2 = torch.cuda.Event(enable_timing=True)
        m2.record()
        out.backward(d_out)
        e.record()
        torch.cuda.synchronize()
        bwd_peak = torch.cuda.max_memory_allocated() - base_b
        fwd_ms.append(s.elapsed_time(m))
        bwd_ms.append(m2.elapsed_time(e))
        peaks = (fwd_peak, bwd_peak)
        del out
    med = lambda xs: sorted(xs[1:])[len(xs[1:]) // 2]
    if infer_forward:
        # The forward as inference runs it, without autograd (the seed's code then skips its
        # checkpointing): its time and memory replace the forward's under autograd.
        fwd_ms = []
        for _ in range(repeats + 1):
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            s, e = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            with torch.no_grad():
                s.record()
                out = fwd()
                e.record()
            torch.cuda.synchronize()
            fwd_ms.append(s.elapsed_time(e))
            peaks = (torch.cuda.max_memory_allocated() - base, peaks[1])
            del out
    return med(fwd_ms), med(bwd_ms), peaks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", default="1024,4096,16384")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--csv")
    ap.add_argument("--dtype", default="f32", choices=("f32", "bf16", "f16"),
                    help="bf16/f16: the flash and cuDNN backends instead of math/efficient")
    ap.add_argument("--paper", action="store_true",
                    help="the FlashAttention-2 paper's setting: batch*n = 16384, hidden 2048, d in {64, 128}, efficient backend only")
    ap.add_argument("--seed", metavar="WHEEL",
                    help="time the seed project's chunked attention from this wheel instead of SDPA")
    ap.add_argument("--causal-only", action="store_true")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    b, h, d = args.batch, args.heads, args.head_dim
    rows = ["backend,causal,batch,heads,n,head_dim,forward_ms,forward_tflops,backward_ms,backward_tflops,forward_device_bytes,backward_device_bytes"]
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[args.dtype]
    what = "fp32, TF32 off" if args.dtype == "f32" else args.dtype
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}, {what}")
    if args.seed:
        backends = (("seed-chunked", seed(args.seed)),)
    elif args.dtype != "f32":
        backends = (("flash", sdpa(SDPBackend.FLASH_ATTENTION)), ("cudnn", sdpa(SDPBackend.CUDNN_ATTENTION)))
    elif args.paper:
        backends = (("efficient", sdpa(SDPBackend.EFFICIENT_ATTENTION)),)
    else:
        backends = (("math", sdpa(SDPBackend.MATH)), ("efficient", sdpa(SDPBackend.EFFICIENT_ATTENTION)))
    if args.paper:
        shapes = [(16384 // n, 2048 // d, n, d) for d in (64, 128) for n in (512, 1024, 2048, 4096, 8192, 16384)]
    else:
        shapes = [(b, h, int(x), d) for x in args.seq.split(",")]
    for (b, h, n, d) in shapes:
        for causal in (True,) if args.causal_only else (False, True):
            for name, backend in backends:
                try:
                    fm, bm, (fp, bp) = measure(backend, b, h, n, d, causal, args.repeats, dtype, infer_forward=bool(args.seed))
                except RuntimeError as e:  # out of memory, or a backend that refuses the shape
                    print(f"{name:<10} causal={causal:d} n={n:>6} d={d}: {str(e).splitlines()[0][:100]}")
                    torch.cuda.empty_cache()
                    continue
                ft = flops(b, h, n, d, causal) / fm / 1e9
                bt = 2.5 * flops(b, h, n, d, causal) / bm / 1e9
                print(f"{name:<10} causal={causal:d} n={n:>6} d={d:<3}: fwd {fm:9.3f} ms {ft:6.2f} TF/s  bwd {bm:9.3f} ms {bt:6.2f} TF/s  fwd dev {fp/2**20:9.1f} MiB  bwd dev {bp/2**20:9.1f} MiB")
                rows.append(f"{name},{int(causal)},{b},{h},{n},{d},{fm:.4f},{ft:.3f},{bm:.4f},{bt:.3f},{fp},{bp}")
                torch.cuda.empty_cache()
    if args.csv:
        with open(args.csv, "w") as f:
            code = "the seed's chunked memory_efficient_attention (forward without autograd; backward after a forward with it)" if args.seed else "scaled_dot_product_attention"
            f.write(f"# torch {torch.__version__} {code} on {torch.cuda.get_device_name()}, {what}; device time (CUDA events), median of {args.repeats}\n")
            f.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
