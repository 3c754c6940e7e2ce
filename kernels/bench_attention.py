"""Paged attention benchmark: the Triton decode and prefill kernels vs the bytes they must read.

    python -m kernels.bench_attention --device cuda --json FILE
    python -m kernels.bench_attention --device cpu --dry-run   (Triton interpreter, tiny shapes: checks the path)

Decode: batch B, context L, Llama-3-8B heads (32 query heads, 8 KV heads, head_dim 128), bf16. The
floor is the K and V bytes of every sequence's context (2 * B * L * KVH * D * 2 bytes) over the HBM
bandwidth: the measured device copy bandwidth, and the nominal peak given by --peak-gbps (H200: 4800).
The target printed beside the figure (issue #19): decode >= 60% of HBM bandwidth at batch 64, 2k context.
Prefill: one launch over S sequences of Q new tokens each on top of C cached ones, reported in TFLOP/s.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device: str, iters: int = 20) -> float:
    """Median ms of `iters` calls after one warm-up."""
    fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device: str) -> float:
    n = (256 << 20) // 4 if device == "cuda" else (16 << 20) // 4
    a = torch.randn(n, device=device)
    b = torch.empty_like(a)
    ms = timeit(lambda: b.copy_(a), device)
    return 2 * a.nbytes / (ms * 1e-3)


def _cache(batch: int, ctx: int, kvh: int, d: int, page: int, dtype, device: str):
    """A paged cache holding `batch` contexts of `ctx` tokens in shuffled blocks, and their tables."""
    per_seq = -(-ctx // page)
    blocks = list(range(batch * per_seq))
    random.Random(0).shuffle(blocks)
    cache = torch.randn(2, kvh, batch * per_seq, page, d, device=device).to(dtype)
    tables = torch.tensor([blocks[i * per_seq : (i + 1) * per_seq] for i in range(batch)], dtype=torch.int32,
                          device=device)
    return cache, tables


def bench_decode(device, dtype, batch, ctx, heads=32, kvh=8, d=128, page=16, iters=20) -> dict:
    from kernels.triton_attention import paged_decode_attention

    cache, tables = _cache(batch, ctx, kvh, d, page, dtype, device)
    q = torch.randn(batch, heads, d, device=device).to(dtype)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    out = torch.empty_like(q)
    ms = timeit(lambda: paged_decode_attention(q, cache, tables, lens, out=out, max_context_len=ctx), device, iters)
    nbytes = 2 * batch * ctx * kvh * d * cache.element_size() + 2 * q.nbytes
    return {"op": "decode", "batch": batch, "context": ctx, "heads": heads, "kv_heads": kvh, "head_dim": d,
            "dtype": str(dtype).split(".")[-1], "ms": round(ms, 4), "bytes": nbytes, "bytes_per_s": nbytes / (ms * 1e-3)}


def bench_prefill(device, dtype, seqs, new, cached, heads=32, kvh=8, d=128, page=16, iters=10) -> dict:
    from kernels.triton_attention import paged_prefill_attention

    ctx = cached + new
    cache, tables = _cache(seqs, ctx, kvh, d, page, dtype, device)
    q = torch.randn(seqs * new, heads, d, device=device).to(dtype)
    lens = torch.full((seqs,), ctx, dtype=torch.int32, device=device)
    starts = torch.arange(0, (seqs + 1) * new, new, dtype=torch.int32, device=device)
    out = torch.empty_like(q)
    ms = timeit(lambda: paged_prefill_attention(q, cache, tables, lens, starts, out=out, max_query_len=new,
                                                max_context_len=ctx), device, iters)
    # causal: query j sees cached + j + 1 keys; two matmuls (QK^T and PV) of 2*D flops per key
    keys = seqs * heads * sum(cached + j + 1 for j in range(new))
    flops = 4 * d * keys
    return {"op": "prefill", "seqs": seqs, "new_tokens": new, "cached": cached, "heads": heads, "kv_heads": kvh,
            "head_dim": d, "dtype": str(dtype).split(".")[-1], "ms": round(ms, 4), "flop_per_s": flops / (ms * 1e-3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes under the Triton interpreter (CPU)")
    p.add_argument("--peak-gbps", type=float, default=4800.0, help="nominal HBM bandwidth (H200: 4800 GB/s)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device", file=sys.stderr)
        return 2
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are first jitted
    dry = args.dry_run or args.device == "cpu"
    dtype = torch.float32 if dry else torch.bfloat16
    bw = copy_bandwidth(args.device)
    if dry:
        decode = [dict(batch=2, ctx=40, heads=4, kvh=2, d=16, iters=2)]
        prefill = [dict(seqs=2, new=8, cached=16, heads=4, kvh=2, d=16, iters=2)]
    else:
        decode = [dict(batch=b, ctx=c) for b, c in ((1, 2048), (16, 2048), (64, 2048), (64, 8192), (256, 1024))]
        prefill = [dict(seqs=4, new=512, cached=0), dict(seqs=2, new=512, cached=2048), dict(seqs=1, new=2048, cached=6144)]
    records = [bench_decode(args.device, dtype, **kw) for kw in decode]
    records += [bench_prefill(args.device, dtype, **kw) for kw in prefill]
    print(f"device {args.device}: copy bandwidth {bw / 1e9:.0f} GB/s, nominal peak {args.peak_gbps:.0f} GB/s")
    for r in records:
        if r["op"] == "decode":
            r["pct_of_copy_bw"] = 100 * r["bytes_per_s"] / bw
            r["pct_of_peak"] = 100 * r["bytes_per_s"] / (args.peak_gbps * 1e9)
            target = "  (target >= 60% of HBM)" if (r["batch"], r["context"]) == (64, 2048) else ""
            print(f"decode  B={r['batch']:4} L={r['context']:5}: {r['ms']:8.3f} ms {r['bytes_per_s'] / 1e9:8.0f} GB/s "
                  f"= {r['pct_of_peak']:5.1f}% of peak, {r['pct_of_copy_bw']:5.1f}% of copy{target}")
        else:
            print(f"prefill S={r['seqs']} Q={r['new_tokens']} C={r['cached']}: {r['ms']:8.3f} ms "
                  f"{r['flop_per_s'] / 1e12:7.1f} TFLOP/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"copy_bandwidth_bytes_per_s": bw, "peak_gbps": args.peak_gbps, "dry_run": dry,
                       "records": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
