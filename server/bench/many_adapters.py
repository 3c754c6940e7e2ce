"""Many adapters: N registered rank-r adapters on disk, a skewed workload, host memory bounded by the host cache.

    python -m server.bench.many_adapters --adapters 1000 --rank 8 --max-cpu-adapters 64 --slots 32 \
        --requests 512 --json docs/bench-many-adapters.json

Flow: N synthetic PEFT adapters are uploaded through the real path (`AdapterManager.upload`: validation,
atomic store write, registry) into a store directory; the engine is built with `--slots` device slots
and a host LRU of `--max-cpu-adapters` adapters (the server's `--max-cpu-adapters`), so every other
adapter is read from disk on demand. `--requests` requests pick adapters from a Zipf(alpha) law over
all N, all queued at once. Reported: throughput, slot loads from disk (cold) and from the host cache,
the cold-load latency from the pool's histogram (the same one `/metrics` exports as
`loramux_adapter_load_seconds`), the host cache's size against its bound, and the process RSS before
and after. A benchmark (prints a table, writes JSON), not a test; tests run a tiny version.
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save

from adapters.manager import AdapterManager
from adapters.spec import MODULES
from adapters.validate import ValidationLimits
from server.engine.builder import base_spec, build_llm_engine
from server.engine.config import LoRASettings, SchedulerConfig
from server.engine.sampling_params import SamplingParams


def rss_bytes() -> int:
    """Current resident set size (Linux /proc), else the peak from getrusage."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_adapter(spec, rank: int, modules: list[str], seed: int) -> tuple[bytes, bytes]:
    """(adapter_config.json, adapter_model.safetensors) bytes of one random PEFT adapter."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(spec.num_layers):
        for m in modules:
            d_in, d_out = spec.module_dims[m]
            parent = "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{parent}.{m}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, d_in, generator=g) / d_in**0.5).half()
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(d_out, rank, generator=g) * 0.01).half()
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": modules, "bias": "none",
              "task_type": "CAUSAL_LM"}
    return json.dumps(config).encode(), save(tensors)


def zipf_picks(n_adapters: int, n_requests: int, alpha: float, rng: random.Random) -> list[int]:
    weights = [1.0 / (k + 1) ** alpha for k in range(n_adapters)]
    order = list(range(n_adapters))
    rng.shuffle(order)  # popularity is not the upload order
    return [order[k] for k in rng.choices(range(n_adapters), weights=weights, k=n_requests)]


def run(loaded, args, store: Path) -> dict:
    spec = base_spec(loaded)
    manager = AdapterManager(store, spec, ValidationLimits(max_rank=max(args.rank, 8)))
    modules = list(MODULES) if args.target_modules == "all" else args.target_modules.split(",")
    t0 = time.perf_counter()
    for i in range(args.adapters):
        manager.upload(f"ad{i}", *make_adapter(spec, args.rank, modules, seed=1000 + i))
    upload_s = time.perf_counter() - t0
    engine = build_llm_engine(
        loaded, manager, scheduler=SchedulerConfig(max_num_seqs=args.batch, max_waiting=max(1024, args.requests)),
        lora=LoRASettings(max_slots=args.slots, max_lora_rank=max(args.rank, 8), host_cache_size=args.max_cpu_adapters),
        kv_cache_tokens=args.batch * (args.prompt_tokens + args.new_tokens + 16))
    pool = engine.runner.slot_pool
    rng = random.Random(args.seed)
    picks = zipf_picks(args.adapters, args.requests, args.zipf_alpha, rng)
    rss_before = rss_bytes()
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    refs = []
    for i, k in enumerate(picks):
        ref = manager.acquire(f"ad{k}")
        refs.append(ref)
        prompt = [rng.randrange(3, loaded.config.vocab_size) for _ in range(args.prompt_tokens)]
        engine.add_request(f"r{i}", prompt, params, ref)
    t1 = time.perf_counter()
    tokens = 0
    host_peak = 0
    while engine.has_unfinished():
        for d in engine.step():
            tokens += len(d.token_ids)
        host_peak = max(host_peak, len(pool._host))
    elapsed = time.perf_counter() - t1
    for ref in refs:
        manager.release(ref)
    snap = pool.load_times.snapshot()
    return {
        "model": loaded.name, "device": str(loaded.device), "dtype": str(loaded.dtype).replace("torch.", ""),
        "adapters": args.adapters, "rank": args.rank, "target_modules": modules, "slots": args.slots,
        "max_cpu_adapters": args.max_cpu_adapters, "requests": args.requests, "distinct_adapters_used": len(set(picks)),
        "zipf_alpha": args.zipf_alpha, "batch": args.batch, "new_tokens": args.new_tokens,
        "upload_s": round(upload_s, 2), "serve_s": round(elapsed, 2), "output_tokens_per_s": tokens / elapsed,
        "loads_from_disk": snap["disk"]["count"], "loads_from_host_cache": snap["host"]["count"],
        "slot_hits": pool.hits, "host_cache_peak": host_peak,
        "cold_load_mean_s": snap["disk"]["sum"] / max(1, snap["disk"]["count"]),
        "cold_load_p50_le_s": pool.load_times.quantile("disk", 0.5),
        "cold_load_p99_le_s": pool.load_times.quantile("disk", 0.99),
        "host_load_p50_le_s": pool.load_times.quantile("host", 0.5),
        "load_histogram": snap, "rss_before_traffic_mib": rss_before / 2**20, "rss_after_mib": rss_bytes() / 2**20,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="model dir, .gguf or 'default' (ignored with --shape)")
    ap.add_argument("--shape", default=None, help="random weights of a named shape (server.bench.engine.SHAPES)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--adapters", type=int, default=1000)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--target-modules", default="q_proj,v_proj", help="comma list or 'all' (PEFT's Llama default)")
    ap.add_argument("--slots", type=int, default=32, help="device slots (--max-adapters-per-batch)")
    ap.add_argument("--max-cpu-adapters", type=int, default=64, help="host cache of adapters (the server flag)")
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--zipf-alpha", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--store", default=None, help="adapter store directory (default: a temporary one)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if min(args.adapters, args.rank, args.slots, args.requests, args.batch, args.new_tokens) < 1 or \
            args.max_cpu_adapters < args.slots:
        print("error: sizes must be >= 1 and --max-cpu-adapters >= --slots", file=sys.stderr)
        return 2
    from server.bench.engine import random_model
    from server.model.loader import load_model

    loaded = random_model(args.shape, args.dtype, "cpu") if args.shape else load_model(args.model, args.dtype, "cpu")
    with tempfile.TemporaryDirectory(prefix="loramux-many-") as tmp:
        result = run(loaded, args, Path(args.store or tmp))
    print(f"# {result['model']} ({result['dtype']}): {result['adapters']} rank-{result['rank']} adapters on "
          f"{'+'.join(result['target_modules'])}, {result['slots']} slots, host cache {result['max_cpu_adapters']}")
    rows = [("requests / distinct adapters used", f"{result['requests']} / {result['distinct_adapters_used']}"),
            ("upload (validate + store) of all adapters", f"{result['upload_s']:.1f} s"),
            ("output tok/s", f"{result['output_tokens_per_s']:.1f}"),
            ("slot loads from disk (cold) / host cache / slot hits",
             f"{result['loads_from_disk']} / {result['loads_from_host_cache']} / {result['slot_hits']}"),
            ("cold load mean / p50 <= / p99 <=",
             f"{result['cold_load_mean_s'] * 1e3:.1f} ms / {result['cold_load_p50_le_s']} s / {result['cold_load_p99_le_s']} s"),
            ("host cache peak (bound)", f"{result['host_cache_peak']} ({result['max_cpu_adapters']})"),
            ("RSS before traffic / after", f"{result['rss_before_traffic_mib']:.0f} / {result['rss_after_mib']:.0f} MiB")]
    for k, v in rows:
        print(f"| {k} | {v} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
