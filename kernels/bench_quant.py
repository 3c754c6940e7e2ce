"""Quantized-weight matmul micro-benchmark on the CPU: bf16 weights vs each kept quantized format.

    python -m kernels.bench_quant [--json FILE] [--rows 1,4,8,32] [--repeats 5] [--formats ...] [--threads N]

One "call" is a Llama-3.2-1B decoder layer's projection set (hidden 2048, intermediate 8192,
q 2048, kv 512: q, k, v, o, gate, up, down; 60.8 M weights, 122 MB in bf16), run back to back so
that the weights stream from memory as they do at decode (the set is larger than the caches).
bf16 is what PackedLinear runs (kernels/cpu_ext's bf16_gemm on a packed weight where the CPU has
AVX512-BF16, else oneDNN's pre-packed linear, else F.linear); the quantized formats go through
kernels.quant.quantized_linear (the C++ kernels), activations bf16 for all. For each row count:
ms per set (median of --repeats), effective GB/s (weight bytes / time), bytes per weight, speedup
vs bf16, and the floor (weight bytes / the measured copy bandwidth).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from kernels import cpu_ext, quant

# (name, out_features, in_features) of one Llama-3.2-1B layer
PROJECTIONS = [("q_proj", 2048, 2048), ("k_proj", 512, 2048), ("v_proj", 512, 2048), ("o_proj", 2048, 2048),
               ("gate_proj", 8192, 2048), ("up_proj", 8192, 2048), ("down_proj", 2048, 8192)]


def copy_bandwidth_gbs(mb: int = 256) -> float:
    """Read bandwidth estimate: bytes read / time of a large copy (which also writes as much)."""
    src = torch.empty(mb * 2**20, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() / min(times) / 1e9


def _bf16_linears(weights):
    """The bf16 path PackedLinear would take: (label, [callables x -> y])."""
    ext = cpu_ext.loaded()
    if ext is not None and ext.bf16_gemm_available():
        packed = [(ext.pack_bf16_weight(w), w.shape[0]) for w in weights]
        return "bf16_gemm", [lambda x, p=p, n=n: ext.bf16_gemm(x, p, n, None) for p, n in packed]
    try:
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, 32) for w in weights]
        return "onednn", [lambda x, p=p: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "") for p in packed]
    except RuntimeError:  # oneDNN packs bf16 only with AVX-512 or AVX-NE-CONVERT
        return "F.linear", [lambda x, w=w: torch.nn.functional.linear(x, w) for w in weights]


def _time_set(fns, xs, repeats: int) -> float:
    """Median seconds for one pass over the projection set."""
    for fn, x in zip(fns, xs, strict=True):  # warm-up
        fn(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for fn, x in zip(fns, xs, strict=True):
            fn(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default="bench_quant.json", help="output file ('' to skip)")
    p.add_argument("--rows", default="1,4,8,32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--formats", default="q8_0,q4_0,q4_1,nf4")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); on a shared "
                   "machine 1 avoids OpenMP waiting out a descheduled thread's time slice")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    formats = args.formats.split(",")
    torch.manual_seed(0)
    if cpu_ext.load() is None:
        raise SystemExit(f"the C++ ops are needed: {cpu_ext.status()}")
    weights = [torch.randn(n, k, dtype=torch.bfloat16) * 0.02 for _, n, k in PROJECTIONS]
    n_weights = sum(w.numel() for w in weights)
    bw = copy_bandwidth_gbs()
    label, bf16_fns = _bf16_linears(weights)
    impls = {f"bf16 ({label})": (bf16_fns, 2 * n_weights)}
    for fmt in formats:
        qws = [quant.quantize(w.float(), fmt) for w in weights]
        impls[fmt] = ([lambda x, q=q: quant.quantized_linear(x, q) for q in qws], sum(q.nbytes for q in qws))
    del weights
    print(f"threads {torch.get_num_threads()}, copy bandwidth {bw:.1f} GB/s, {n_weights / 1e6:.1f} M weights per set, "
          f"quant kernels vectorized: {cpu_ext.loaded().quant_linear_vectorized()}")
    print(f"{'rows':>4} {'weights':<18} {'B/weight':>8} {'ms/set':>8} {'GB/s':>6} {'floor ms':>8} {'vs bf16':>7}")
    records = []
    for m in rows:
        xs = [torch.randn(m, k, dtype=torch.bfloat16) for _, _, k in PROJECTIONS]
        base = None
        for name, (fns, nbytes) in impls.items():
            sec = _time_set(fns, xs, args.repeats)
            base = base or sec
            rec = {"rows": m, "weights": name, "bytes_per_weight": nbytes / n_weights, "ms": sec * 1e3,
                   "gb_per_s": nbytes / sec / 1e9, "floor_ms": nbytes / (bw * 1e9) * 1e3, "speedup_vs_bf16": base / sec}
            records.append(rec)
            print(f"{m:>4} {name:<18} {rec['bytes_per_weight']:>8.4f} {rec['ms']:>8.2f} {rec['gb_per_s']:>6.1f} "
                  f"{rec['floor_ms']:>8.2f} {rec['speedup_vs_bf16']:>6.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"copy_bandwidth_gbs": bw, "threads": torch.get_num_threads(), "projections": PROJECTIONS,
                       "records": records}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
