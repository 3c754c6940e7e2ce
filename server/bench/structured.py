"""Structured-output benchmark: a batch of 32 rows with 32 different JSON schemas vs the same batch unconstrained.

    python -m server.bench.structured --json docs/bench-structured.json
    python -m server.bench.structured --rows 8 --tokens 24 --repeats 1     # a quick look

In process (no HTTP), on the embedded model unless --model says otherwise. One run measures:
  compile  - each schema's first compile (llguidance, server/engine/structured.py) and a cached lookup;
  mask     - the cost of one step's masks for all rows: standalone (one LLExecutor call filling the
             batch's bitmask, replaying the structured run's own tokens, no model running) and in the
             engine: how long the step still waited for the masks after its forward pass (0 = fully
             hidden), and the worker's wall time per step (it includes waiting for the GIL while the
             C++ decode loop, which keeps the GIL, runs: about one forward pass, not mask work);
  step     - the median engine step over all-decode steps with every row alive, structured vs
             unstructured (same prompts; every row runs exactly --tokens tokens: the unstructured rows
             ignore EOS, the schemas hold a long required array so no grammar ends early), runs
             alternated --repeats times so both share the machine's noise.
Prints a table and writes JSON. Not a test: nothing here asserts a speed.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from server.engine.builder import build_llm_engine
from server.engine.config import SchedulerConfig
from server.engine.sampling_params import SamplingParams
from server.engine.structured import GuideSpec, compiler_for
from server.model.loader import load_model


def schemas(n: int) -> list[dict]:
    """n distinct schemas: an enum, a bounded integer, a short string, then a long array of small
    objects (at least 40 items, so that no grammar can end within the benchmark's tokens)."""
    out = []
    for i in range(n):
        item = {"type": "object", "additionalProperties": False, "required": ["id", "tag"],
                "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99},
                               "tag": {"enum": [f"t{i}", "x", "y"]}}}
        out.append({"type": "object", "additionalProperties": False,
                    "required": [f"kind_{i}", "n", "name", "items"],
                    "properties": {f"kind_{i}": {"enum": [f"a{i}", f"b{i}", f"c{i}"]},
                                   "n": {"type": "integer", "minimum": 0, "maximum": 10 + i},
                                   "name": {"type": "string", "maxLength": 8 + i % 8},
                                   "items": {"type": "array", "items": item, "minItems": 40}}})
    return out


def run_batch(engine, prompt_ids: list[list[int]], params: list[SamplingParams]) -> tuple[list[float], list[list[int]]]:
    """Step times of all-decode steps with every row alive, and each row's output ids."""
    rows = len(params)
    for i, (ids, sp) in enumerate(zip(prompt_ids, params, strict=True)):
        engine.add_request(f"r{i}", ids, sp)
    outs: dict[str, list[int]] = {f"r{i}": [] for i in range(rows)}
    times = []
    c = engine.counters
    while engine.has_unfinished():
        seqs, toks = c.scheduled_sequences, c.batched_tokens
        t0 = time.perf_counter()
        deltas = engine.step()
        dt = time.perf_counter() - t0
        if c.scheduled_sequences - seqs == rows and c.batched_tokens - toks == rows:
            times.append(dt)
        for d in deltas:
            outs[d.request_id] += d.token_ids
    return times, [outs[f"r{i}"] for i in range(rows)]


def standalone_masks(guides, outputs: list[list[int]]) -> list[float]:
    """Seconds per step to fill every row's mask in one call, replaying the rows' own tokens."""
    import llguidance
    import llguidance.numpy as lnp

    from server.engine.grammar_masks import _mask_threads

    executor = llguidance.LLExecutor(_mask_threads())
    matchers = [g.new_matcher() for g in guides]
    bitmask = lnp.allocate_token_bitmask(len(guides), guides[0].vocab_size)
    times = []
    for step in range(min(len(o) for o in outputs)):
        t0 = time.perf_counter()
        lnp.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(matchers)], bitmask)
        times.append(time.perf_counter() - t0)
        for m, o in zip(matchers, outputs, strict=True):
            m.consume_token(o[step])
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--rows", type=int, default=32, help="batch rows, one schema each")
    ap.add_argument("--tokens", type=int, default=48, help="tokens generated per row")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)

    loaded = load_model(args.model, args.dtype, "cpu")
    tok = loaded.tokenizer
    engine = build_llm_engine(loaded, kv_cache_tokens=args.rows * (args.tokens + 96) + 512,
                              scheduler=SchedulerConfig(max_num_seqs=args.rows))
    compiler = compiler_for(tok, tok.vocab_size)
    specs = [GuideSpec.json_schema(s, "bench") for s in schemas(args.rows)]
    t0 = time.perf_counter()
    guides = [compiler.compile(s) for s in specs]
    compile_s = (time.perf_counter() - t0) / len(specs)
    t0 = time.perf_counter()
    for s in specs:
        compiler.compile(s)
    cached_s = (time.perf_counter() - t0) / len(specs)

    prompts = []
    for i in range(args.rows):
        text = tok.apply_chat_template([{"role": "user", "content": f"Describe item {i} as JSON."}],
                                       add_generation_prompt=True)
        prompts.append(tok.encode(text, add_special_tokens=False))
    plain = [SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)] * args.rows
    guided = [SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True, guide=g) for g in guides]

    masks = engine.runner.grammar
    run_batch(engine, prompts, plain)  # warm-up (C++ ops, caches)
    med = {"plain": [], "structured": []}
    fill, wait, outputs = [], [], None
    for _ in range(args.repeats):
        med["plain"].append(statistics.median(run_batch(engine, prompts, plain)[0]))
        s0, f0, w0 = masks.steps, masks.fill_s, masks.wait_s
        times, outputs = run_batch(engine, prompts, guided)
        med["structured"].append(statistics.median(times))
        steps = max(1, masks.steps - s0)
        fill.append((masks.fill_s - f0) / steps)
        wait.append((masks.wait_s - w0) / steps)
    alone = standalone_masks(guides, outputs)

    plain_ms, struct_ms = statistics.median(med["plain"]) * 1e3, statistics.median(med["structured"]) * 1e3
    result = {
        "model": args.model, "rows": args.rows, "tokens": args.tokens, "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(), "grammar_engine": "llguidance",
        "compile_ms_per_schema": compile_s * 1e3, "cached_compile_ms": cached_s * 1e3,
        "mask_ms_per_step_standalone_median": float(np.median(alone)) * 1e3,
        "mask_ms_per_step_standalone_mean": float(np.mean(alone)) * 1e3,
        "mask_worker_wall_ms_per_step_incl_gil_wait": statistics.median(fill) * 1e3,
        "mask_wait_ms_per_step_after_forward": statistics.median(wait) * 1e3,
        "step_ms_plain": plain_ms, "step_ms_structured": struct_ms, "ratio": struct_ms / plain_ms,
        "step_ms_plain_runs": [x * 1e3 for x in med["plain"]],
        "step_ms_structured_runs": [x * 1e3 for x in med["structured"]],
    }
    rows = [("compile per schema (cold)", f"{result['compile_ms_per_schema']:.2f} ms"),
            ("compile per schema (cached)", f"{result['cached_compile_ms']:.4f} ms"),
            (f"masks for {args.rows} rows, standalone (median / mean)",
             f"{result['mask_ms_per_step_standalone_median']:.2f} / {result['mask_ms_per_step_standalone_mean']:.2f} ms"),
            ("mask worker wall time (incl. GIL wait)", f"{result['mask_worker_wall_ms_per_step_incl_gil_wait']:.2f} ms"),
            ("step waited for masks after forward", f"{result['mask_wait_ms_per_step_after_forward']:.2f} ms"),
            ("decode step, unconstrained", f"{plain_ms:.2f} ms"),
            (f"decode step, {args.rows} schemas", f"{struct_ms:.2f} ms"),
            ("structured / unconstrained", f"{result['ratio']:.3f}x")]
    width = max(len(k) for k, _ in rows)
    print(f"structured output, batch {args.rows}, {args.tokens} tokens/row, {torch.get_num_threads()} torch threads")
    for k, v in rows:
        print(f"  {k:<{width}}  {v:>16}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
