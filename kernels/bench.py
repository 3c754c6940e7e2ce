"""Kernel benchmark: the LoRA add-on per implementation vs the bytes-moved floor.

    python -m kernels.bench --device cpu|cuda --json FILE [--quick]

Sweeps batch size, number of distinct adapters, rank, hidden size and dtype for one hidden->hidden
projection (one slice). Each point times every implementation of the device (CUDA: triton, the
per-adapter loop baseline, the reference; CPU: the auto pick, the fused kernel, each formulation of kernels/bench_formulations.py, the loop, the
reference) and records median_ms next to floor_ms = bytes that must move (x, y read+write, each
distinct adapter's A and B once) / the measured device copy bandwidth. Prints a table and a summary.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from kernels import LoRABatch, alloc_lora_a, alloc_lora_b, bench_formulations, make_backend, reference

_DT = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device: str, budget_s: float = 0.15, max_iters: int = 200) -> float:
    """Median wall time in ms over as many calls as fit the budget (>= 5), after warm-up."""
    for _ in range(3):
        fn()
    _sync(device)
    times: list[float] = []
    t_end = time.perf_counter() + budget_s
    while len(times) < 5 or (time.perf_counter() < t_end and len(times) < max_iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    n = (256 if device == "cuda" else 64) * 2**20 // 4
    a = torch.ones(n, device=device)
    b = torch.empty_like(a)
    ms = timeit(lambda: b.copy_(a), device, budget_s=0.5, max_iters=50)
    return 2 * n * 4 / (ms * 1e-3)


def _loop(y, x, lora_a, lora_b, scaling, groups):
    """Baseline: one matmul pair per distinct adapter (what a server without SGMV does)."""
    for slot, rows in groups:
        y[rows] += scaling[0, slot] * ((x[rows] @ lora_a[0][slot].T) @ lora_b[0][slot].T)


def bench_point(device, dtype, batch_size, num_adapters, rank, hidden, bandwidth, impls):
    slots = [t * num_adapters // batch_size for t in range(batch_size)]  # grouped by adapter
    batch = LoRABatch.build(slots, device)
    a = alloc_lora_a(num_adapters, rank, hidden, 1, dtype=dtype, device=device)
    b = alloc_lora_b(num_adapters, [hidden], rank, dtype=dtype, device=device)
    a[0].copy_(torch.randn(num_adapters, rank, hidden) / hidden**0.5)
    b[0].copy_(torch.randn(num_adapters, hidden, rank))
    scaling = torch.full((1, num_adapters), 0.5, device=device)
    x = torch.randn(batch_size, hidden, device=device).to(dtype)
    y = torch.zeros(batch_size, hidden, device=device, dtype=dtype)
    groups = [(s, torch.tensor([t for t in range(batch_size) if slots[t] == s], device=device))
              for s in sorted(set(slots))]
    elt = x.element_size()
    floor_bytes = elt * (3 * batch_size * hidden + num_adapters * rank * 2 * hidden)
    flops = 2 * batch_size * rank * 2 * hidden
    records = []
    for impl in impls:
        if impl == "loop":
            fn = lambda: _loop(y, x, a, b, scaling, groups)
        elif impl == "reference":
            fn = lambda: reference.add_lora(y, x, a, b, scaling, batch, [(0, hidden)])
        elif impl in ("triton", "auto", "kernel"):
            # What the engine does: buffers bound once per layer, the plan prepared once per step.
            backend = make_backend(device, "triton" if impl == "triton" else "auto",
                                   cpu_impl="kernel" if impl == "kernel" else "auto")
            bound, plan = backend.bind(a, b, scaling, [(0, hidden)]), backend.prepare(batch)
            fn = lambda bound=bound, plan=plan: bound(y, x, plan)
        else:
            plan = make_backend("cpu").prepare(batch)
            fn = lambda impl=impl, plan=plan: bench_formulations.add_lora(y, x, a, b, scaling, plan, [(0, hidden)], impl)
        ms = timeit(fn, device, budget_s=0.05 if device == "cuda" else 0.15)
        records.append({
            "op": "add_lora", "impl": impl, "device": device, "batch_size": batch_size,
            "num_adapters": num_adapters, "rank": rank, "hidden": hidden, "dtype": str(dtype).split(".")[-1],
            "median_ms": round(ms, 4), "floor_ms": round(floor_bytes / bandwidth * 1e3, 4),
            "bytes_per_s": floor_bytes / (ms * 1e-3), "flop_per_s": flops / (ms * 1e-3),
        })
    return records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", default=None, help="write one record per point to this file")
    p.add_argument("--quick", action="store_true", help="a smaller grid (CPU: under ~2 minutes)")
    p.add_argument("--tiny", action="store_true",
                   help="a few points only (make gpu-check: CUDA the target point, CPU a dry run)")
    p.add_argument("--dtypes", default=None, help="comma list (default: cpu float32,bfloat16; cuda bfloat16)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    cuda = args.device == "cuda"
    dtypes = [_DT[d] for d in (args.dtypes or ("bfloat16" if cuda else "float32,bfloat16")).split(",")]
    batches = [1, 32, 64] if args.quick else [1, 8, 32, 64, 256]
    ranks = [8, 16] if args.quick else [8, 16, 64]
    hiddens = [576, 4096] if (args.quick and not cuda) else [576, 4096, 5120]
    impls = ["triton", "loop", "reference"] if cuda else ["auto", "kernel", "embbag", "gather", "segments", "dense", "loop",
                                                          "reference"]
    if not cuda and args.quick:
        impls = ["auto", "kernel", "embbag", "gather", "segments", "dense", "loop"]
    if args.tiny:  # CUDA: only the target point (hidden 4096, r16, batch 64, 1 vs 64 adapters)
        batches, ranks, hiddens = ([64], [16], [4096]) if cuda else ([1, 8], [8], [576])
        impls = ["triton", "loop"] if cuda else ["auto", "kernel", "reference"]
    bw = copy_bandwidth(args.device)
    print(f"device {args.device}: copy bandwidth {bw / 1e9:.1f} GB/s")
    records = []
    for dtype in dtypes:
        for hidden in hiddens:
            for rank in ranks:
                for bs in batches:
                    grid = {1, bs} if (args.tiny and cuda) else {1, 8, 32} if (args.quick or args.tiny) else {1, 8, 32, bs}
                    for na in sorted(grid):
                        if na > bs:
                            continue
                        records += bench_point(args.device, dtype, bs, na, rank, hidden, bw, impls)
    print(f"{'dtype':9} {'hidden':>6} {'r':>3} {'batch':>5} {'adapt':>5} {'impl':>9} {'ms':>9} {'floor':>8} {'GB/s':>7} {'GFLOP/s':>8}")
    for r in records:
        print(f"{r['dtype']:9} {r['hidden']:6} {r['rank']:3} {r['batch_size']:5} {r['num_adapters']:5} {r['impl']:>9} "
              f"{r['median_ms']:9.4f} {r['floor_ms']:8.4f} {r['bytes_per_s'] / 1e9:7.2f} {r['flop_per_s'] / 1e9:8.2f}")
    _summary(records, cuda)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"copy_bandwidth_bytes_per_s": bw, "records": records}, f, indent=1)
    return 0


def _summary(records, cuda: bool) -> None:
    """The issue's two headline ratios, where the grid has them."""
    main_impl = "triton" if cuda else "auto"
    hidden, rank, bs = (4096, 16, 64) if cuda else (576, 8, 32)
    distinct = bs if cuda else 32
    for dt in sorted({r["dtype"] for r in records}):
        pick = {r["num_adapters"]: r for r in records if r["impl"] == main_impl and r["dtype"] == dt
                and (r["hidden"], r["rank"], r["batch_size"]) == (hidden, rank, bs)}
        if 1 in pick and distinct in pick:
            d, i = pick[distinct], pick[1]
            print(f"summary {dt}: hidden {hidden} r{rank} batch {bs}: {distinct} distinct / identical = "
                  f"{d['median_ms'] / i['median_ms']:.2f}x; distinct at {100 * d['floor_ms'] / d['median_ms']:.0f}% of the copy-bandwidth floor")


if __name__ == "__main__":
    sys.exit(main())
