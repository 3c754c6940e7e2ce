"""loramux and llama.cpp's server side by side on one GGUF file, in one run, on loopback.

    python -m server.bench.llamacpp --write-gguf 1b-q4_0.gguf --shape llama3.2-1b --type q4_0
    python -m server.bench.llamacpp --gguf 1b-q4_0.gguf --llama-server PATH/llama-server \\
        --concurrency 1,32 --adapters 32 --json out.json

`--write-gguf` writes a random-weight GGUF of a named shape of `server.bench` (the embedded model's
tokenizer and vocabulary, so both servers read the same prompts; tied embeddings), every linear
weight and the embedding in `--type` (q8_0 | q4_0 | q4_1, quantized by the `gguf` package).

The comparison: `--adapters` random rank-`--rank` LoRA adapters on all 7 projections, written once as
PEFT directories (loramux's --adapter-dir) and as llama.cpp LoRA GGUF files (the same tensors); then
each server in turn (one at a time, so they never share the cores) gets, at each concurrency c, a
closed loop of c clients sending `--requests` completions of `--prompt-tokens` random token ids and
`--max-tokens` greedy tokens (ignore_eos), first all on the base model ("base"), then each request
on its own adapter, round robin ("distinct": loramux's `adapter` field, llama.cpp's per-request
`lora` list). Every level (and its warm-up) has its own prompts, the same for both engines, so no
prefix cache helps. llama.cpp runs "base" on a server started without adapters (its 32 loaded
adapters slowed base requests 4x at scale 0); loramux serves both mixes from one server. Reported:
output tok/s, mean and p90 request latency, and loramux / llama.cpp.
llama.cpp's server batches only requests with the same LoRA set (its README says so); loramux
batches them all.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from loadtest.synthetic import ALL_MODULES, make_adapter
from server.bench.prefix_cache import _free_port, _wait_ready

TYPES = ("q8_0", "q4_0", "q4_1")


# --- files -------------------------------------------------------------------------------------------
def write_shape_gguf(path: Path, shape: str, qtype: str, seed: int = 0) -> dict:
    """A random-weight GGUF of `shape` (server.bench.engine.SHAPES), the embedded tokenizer's vocab."""
    import gguf

    from server.bench.engine import SHAPES
    from server.model.loader import default_model_path

    s = SHAPES[shape]
    if s.get("architecture", "LlamaForCausalLM") != "LlamaForCausalLM":
        raise SystemExit(f"--write-gguf writes llama shapes; {shape} is {s['architecture']}")
    src = gguf.GGUFReader(str(default_model_path()))
    tokens = src.fields["tokenizer.ggml.tokens"]
    vocab = len(tokens.data)
    hidden, ffn, layers = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    heads, kv = s["num_attention_heads"], s["num_key_value_heads"]
    head_dim = hidden // heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"random-{shape}-{qtype}")
    w.add_block_count(layers)
    w.add_context_length(4096)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(s.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    for name, field in src.fields.items():  # the embedded model's tokenizer, as it is
        if name.startswith("tokenizer."):
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(name, field.contents(), field.types[0], sub_type=sub)
    rng = np.random.default_rng(seed)
    qt = gguf.GGMLQuantizationType[qtype.upper()]

    def add(name: str, shape_: tuple[int, ...], quantized: bool = True):
        a = (rng.standard_normal(shape_, dtype=np.float32) * 0.02) if quantized else np.ones(shape_, np.float32)
        if quantized:
            raw = gguf.quants.quantize(a, qt)
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qt)
        else:
            w.add_tensor(name, a)

    add("token_embd.weight", (vocab, hidden))  # tied: also the LM head
    add("output_norm.weight", (hidden,), quantized=False)
    for i in range(layers):
        add(f"blk.{i}.attn_norm.weight", (hidden,), quantized=False)
        add(f"blk.{i}.ffn_norm.weight", (hidden,), quantized=False)
        add(f"blk.{i}.attn_q.weight", (hidden, hidden))
        add(f"blk.{i}.attn_k.weight", (kv * head_dim, hidden))
        add(f"blk.{i}.attn_v.weight", (kv * head_dim, hidden))
        add(f"blk.{i}.attn_output.weight", (hidden, hidden))
        add(f"blk.{i}.ffn_gate.weight", (ffn, hidden))
        add(f"blk.{i}.ffn_up.weight", (ffn, hidden))
        add(f"blk.{i}.ffn_down.weight", (hidden, ffn))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"path": str(path), "shape": shape, "type": qtype, "vocab": vocab}


def base_info(gguf_path: Path) -> dict:
    """num_layers and {module: (in, out)} from a llama GGUF's metadata (loadtest.synthetic's input)."""
    import gguf

    r = gguf.GGUFReader(str(gguf_path))

    def kv(key: str) -> int:
        return int(r.fields[f"llama.{key}"].contents())

    hidden, ffn, heads, kvh = kv("embedding_length"), kv("feed_forward_length"), kv("attention.head_count"), \
        kv("attention.head_count_kv")
    kvd = kvh * hidden // heads
    proj = {"q_proj": (hidden, hidden), "k_proj": (hidden, kvd), "v_proj": (hidden, kvd), "o_proj": (hidden, hidden),
            "gate_proj": (hidden, ffn), "up_proj": (hidden, ffn), "down_proj": (ffn, hidden)}
    return {"num_layers": kv("block_count"), "projections": proj, "heads": heads, "kv_heads": kvh}


_GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
               "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def write_lora_gguf(path: Path, safetensors_bytes: bytes, rank: int, info: dict) -> None:
    """The same LoRA as llama.cpp's adapter GGUF (convert_lora_to_gguf.py's layout: A [r, in], B [out, r],
    B's rows of q/k permuted as the base rows are)."""
    import gguf

    from adapters.safetensors_io import load_tensors

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(2 * rank))
    for key, t in sorted(load_tensors(safetensors_bytes).items()):
        parts = key.split(".")  # base_model.model.model.layers.{i}.{block}.{module}.lora_{A|B}.weight
        layer, module, which = int(parts[4]), parts[6], parts[7][-1]
        a = t.float().numpy()
        heads = info["heads"] if module == "q_proj" else info["kv_heads"] if module == "k_proj" else 0
        if which == "B" and heads:  # convert_hf_to_gguf's permute of q/k rows
            a = a.reshape(heads, 2, a.shape[0] // heads // 2, a.shape[1]).swapaxes(1, 2).reshape(a.shape)
        w.add_tensor(f"blk.{layer}.{_GGUF_NAMES[module]}.weight.lora_{which.lower()}", np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# --- load --------------------------------------------------------------------------------------------
async def _level(url: str, bodies: list[dict], concurrency: int, timeout: float, transport=None) -> dict:
    queue = list(reversed(bodies))
    latencies: list[float] = []
    tokens = 0
    errors: list[str] = []

    async def client(http: httpx.AsyncClient):
        nonlocal tokens
        while queue:
            body = queue.pop()
            t = time.perf_counter()
            r = await http.post(f"{url}/v1/completions", json=body)
            if r.status_code != 200:
                errors.append(f"{r.status_code} {r.text[:200]}")
                continue
            latencies.append(time.perf_counter() - t)
            tokens += int(r.json()["usage"]["completion_tokens"])

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, transport=transport) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    lat = sorted(latencies)
    return {"requests": len(lat), "output_tokens": tokens, "seconds": wall, "output_tokens_per_s": tokens / wall,
            "latency_mean_s": statistics.fmean(lat), "latency_p90_s": lat[min(len(lat) - 1, int(0.9 * len(lat)))]}


def _bodies(engine: str, mix: str, n: int, args, names: list[str], level: int = 0) -> list[dict]:
    """The requests of one level; `level` seeds the prompts, so no level reuses another's (or its warm-up's)
    prompts from a prefix cache, and both engines get the same ones."""
    rng = np.random.default_rng([args.seed, level])
    out = []
    for i in range(n):
        body = {"prompt": rng.integers(1000, 10000, args.prompt_tokens).tolist(), "max_tokens": args.max_tokens,
                "temperature": 0.0, "ignore_eos": True}
        if mix == "distinct":
            if engine == "loramux":
                body["adapter"] = names[i % len(names)]
            else:
                body["lora"] = [{"id": i % len(names), "scale": 1.0}]
        out.append(body)
    return out


def run_engine(engine: str, cmd: list[str], url: str, ready: str, args, names: list[str], log: Path,
               mixes: list[str]) -> list[dict]:
    rows = []
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            _wait_ready(url, proc, 900, path=ready)
            for mix in mixes:
                for c in (int(v) for v in args.concurrency.split(",")):
                    n = max(args.requests, c)
                    level = 4 * c + (2 if mix == "distinct" else 0)
                    warm = _bodies(engine, mix, min(c, 4), args, names, level + 1)
                    asyncio.run(_level(url, warm, min(c, 4), 600))
                    r = asyncio.run(_level(url, _bodies(engine, mix, n, args, names, level), c, 1800))
                    rows.append({"engine": engine, "mix": mix, "concurrency": c, **r})
                    print(f"{engine:8s} {mix:8s} c={c:3d}: {r['output_tokens_per_s']:7.2f} tok/s, "
                          f"mean latency {r['latency_mean_s']:.2f} s", flush=True)
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    return rows


def compare(args) -> dict:
    gguf_path = Path(args.gguf).resolve()
    info = base_info(gguf_path)
    work = Path(tempfile.mkdtemp(prefix="loramux-llamacpp-"))
    peft_dir, lora_dir = work / "peft", work / "lora"
    peft_dir.mkdir()
    lora_dir.mkdir()
    names = [f"a{i:03d}" for i in range(args.adapters)]
    lora_files = []
    for i, name in enumerate(names):
        cfg, weights = make_adapter(info, args.rank, seed=1000 + i, target_modules=ALL_MODULES)
        (peft_dir / name).mkdir()
        (peft_dir / name / "adapter_config.json").write_bytes(cfg)
        (peft_dir / name / "adapter_model.safetensors").write_bytes(weights)
        write_lora_gguf(lora_dir / f"{name}.gguf", weights, args.rank, info)
        lora_files.append(str(lora_dir / f"{name}.gguf"))
    cmax = max(int(v) for v in args.concurrency.split(","))
    rows = []
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "server", "serve", "--model", str(gguf_path), "--host", "127.0.0.1", "--port",
           str(port), "--adapter-dir", str(peft_dir), "--max-batch-size", str(cmax), "--max-lora-rank", str(args.rank),
           *args.loramux_args.split()]
    mixes = args.mixes.split(",")
    rows += run_engine("loramux", cmd, url, "/ready", args, names, work / "loramux.log", mixes)
    ctx = cmax * (args.prompt_tokens + args.max_tokens + 16)
    for mix in mixes:  # llama.cpp: base on a server without adapters (loaded ones cost even at scale 0)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        loras = [a for f in lora_files for a in ("--lora", f)] if mix == "distinct" else []
        cmd = [args.llama_server, "-m", str(gguf_path), "--host", "127.0.0.1", "--port", str(port), "-t",
               str(args.threads), "-np", str(cmax), "-c", str(ctx), "--lora-init-without-apply", *loras,
               *args.llama_args.split()]
        rows += run_engine("llama.cpp", cmd, url, "/health", args, names, work / f"llama-{mix}.log", [mix])
    table = []
    for r in rows:
        if r["engine"] == "loramux":
            other = next(o for o in rows if o["engine"] != "loramux" and o["mix"] == r["mix"]
                         and o["concurrency"] == r["concurrency"])
            table.append({"mix": r["mix"], "concurrency": r["concurrency"], "loramux_tok_s": r["output_tokens_per_s"],
                          "llamacpp_tok_s": other["output_tokens_per_s"],
                          "ratio": r["output_tokens_per_s"] / other["output_tokens_per_s"]})
    print("\n| mix | concurrency | loramux tok/s | llama.cpp tok/s | loramux / llama.cpp |\n|---|---:|---:|---:|---:|")
    for t in table:
        print(f"| {t['mix']} | {t['concurrency']} | {t['loramux_tok_s']:.2f} | {t['llamacpp_tok_s']:.2f} | "
              f"{t['ratio']:.2f}x |")
    return {"gguf": str(gguf_path), "machine": platform.processor() or platform.machine(), "rows": rows,
            "table": table, "settings": {k: v for k, v in vars(args).items() if k not in ("json",)}, "logs": str(work)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m server.bench.llamacpp", description=__doc__.split("\n\n")[0])
    ap.add_argument("--write-gguf", metavar="PATH", help="write a random-weight GGUF of --shape / --type and exit")
    ap.add_argument("--shape", default="llama3.2-1b", help="a llama shape of server.bench (default llama3.2-1b)")
    ap.add_argument("--type", default="q4_0", choices=TYPES, help="GGUF type of the written weights")
    ap.add_argument("--gguf", help="the GGUF file both servers load")
    ap.add_argument("--llama-server", help="path of llama.cpp's llama-server binary")
    ap.add_argument("--concurrency", default="1,32", help="closed-loop client counts (default 1,32)")
    ap.add_argument("--mixes", default="base,distinct", help="base and/or distinct (default both)")
    ap.add_argument("--adapters", type=int, default=32, help="distinct adapters (default 32)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--requests", type=int, default=8, help="requests per level (at least the concurrency)")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp's -t (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--loramux-args", default="", help="extra `loramux serve` flags, one string")
    ap.add_argument("--llama-args", default="", help="extra llama-server flags, one string")
    ap.add_argument("--json", help="write the rows and the table here")
    args = ap.parse_args(argv)
    if args.write_gguf:
        print(json.dumps(write_shape_gguf(Path(args.write_gguf), args.shape, args.type)))
        return 0
    if not args.gguf or not args.llama_server:
        ap.error("--gguf and --llama-server are required (or --write-gguf)")
    if not Path(args.llama_server).is_file():
        ap.error(f"--llama-server {args.llama_server}: no such file")
    result = compare(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
