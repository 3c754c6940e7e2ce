"""Long prompts beside running streams: does a long prefill stall the decodes that share its steps?

    python -m server.bench.long_context --model default --long-tokens 8192 --streams 16 \
        --budgets 256,512,2048 --stalls 1.5,0 --json docs/bench-long-context.json

For each per-step budget (`--max-num-batched-tokens`; the scheduler counts a chunk's attention over
its context too, see `Scheduler.chunk_cost`) and each `--max-decode-stall` (0: off; the scheduler
caps prefill beside decode rows at that multiple of a decode-only step's measured time):
`--streams` short requests decode (prompt
`--short-tokens`, greedy, no EOS); their inter-token latency (ITL = the step's wall time: every
stream gets one token per step) is measured over `--baseline-steps` steps alone, then one
`--long-tokens` prompt arrives and is prefilled in chunks beside them until it samples its first
token, then the streams run `--baseline-steps` steps alone again. The streams grow by one token per
step, and over the hundreds of steps of a protected 8k prefill their own decode step grows with
their KV (16 x 800 cached tokens are read each step, as many bytes as the weights): the reference
"without it" is therefore the larger of the two windows' figures (before: the lengths they had when
it arrived; after: the lengths they reached while it prefilled), each window's figures are in the
JSON. Reported per budget: the streams' ITL p50/p99 without and with the long prompt, their ratio,
the long prompt's TTFT, and its chunk sizes (first, last). Each budget gets fresh streams and a fresh
long prompt (random ids, so the prefix cache never helps). In-process (no HTTP), on one engine: the
budget is the only thing that changes. A benchmark (prints a table, writes JSON), not a test.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time

import numpy as np

from server.engine.builder import build_llm_engine
from server.engine.config import SchedulerConfig
from server.engine.decode_protection import DecodeProtection
from server.engine.sampling_params import SamplingParams
from server.model.loader import load_model


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def run_budget(engine, budget: int, stall: float, args, rng: random.Random, tag: str) -> dict:
    """One budget and stall setting: fresh streams, a baseline window, then the long prompt beside them."""
    sched = engine.scheduler
    sched.cfg = dataclasses.replace(sched.cfg, max_num_batched_tokens=max(budget, args.streams),
                                    max_decode_stall=stall or None)
    # the scheduler reads the stall through its DecodeProtection, built with it: a fresh one per run
    # (nothing learnt in one setting carries into the next)
    sched.protection = DecodeProtection(sched.cfg.max_decode_stall)
    vocab = engine.runner.model.config.vocab_size
    lo = min(1000, vocab // 2)  # clear of the special tokens (a tiny test vocabulary has 256)
    # Long enough never to finish inside the window (the scheduler refuses more than max_model_len).
    params = SamplingParams(max_tokens=sched.cfg.max_model_len - args.short_tokens, temperature=0.0, ignore_eos=True)
    ids = [f"{tag}-s{i}" for i in range(args.streams)]
    for rid in ids:
        engine.add_request(rid, [rng.randrange(lo, vocab) for _ in range(args.short_tokens)], params)
    while any(r.num_output_tokens == 0 for r in sched.running) or sched.waiting:
        engine.step()  # every stream prefilled and decoding
    for _ in range(3):
        engine.step()  # warm
    base = []
    for _ in range(args.baseline_steps):
        t = time.perf_counter()
        engine.step()
        base.append(time.perf_counter() - t)
    long_id = f"{tag}-long"
    prompt = [rng.randrange(lo, vocab) for _ in range(args.long_tokens - 1)]
    engine.add_request(long_id, prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    t0 = time.perf_counter()
    during, chunks, ttft = [], [], None
    while ttft is None:
        t = time.perf_counter()
        deltas = engine.step()
        dt = time.perf_counter() - t
        during.append(dt)
        req = sched.get_request(long_id)
        if req is not None:
            chunks.append(req.num_computed_tokens)
        if any(d.request_id == long_id and d.token_ids for d in deltas):
            ttft = time.perf_counter() - t0
    after = []
    for _ in range(args.baseline_steps):  # the streams alone again, at the lengths they reached
        t = time.perf_counter()
        engine.step()
        after.append(time.perf_counter() - t)
    for rid in ids:
        engine.abort(rid)
    while engine.has_unfinished():
        engine.step()
    sizes = [b - a for a, b in zip([0, *chunks], chunks, strict=False) if b > a]
    rec = {
        "budget": budget, "max_decode_stall": stall, "streams": args.streams, "long_tokens": args.long_tokens,
        "itl_p50_before_ms": _pct(base, 50) * 1e3, "itl_p99_before_ms": _pct(base, 99) * 1e3,
        "itl_p50_after_ms": _pct(after, 50) * 1e3, "itl_p99_after_ms": _pct(after, 99) * 1e3,
        # without the long prompt: the larger of the two windows (the streams' steps grow with their KV)
        "itl_p50_ms": max(_pct(base, 50), _pct(after, 50)) * 1e3, "itl_p99_ms": max(_pct(base, 99), _pct(after, 99)) * 1e3,
        "itl_p50_with_long_ms": _pct(during, 50) * 1e3, "itl_p99_with_long_ms": _pct(during, 99) * 1e3,
        "itl_max_with_long_ms": max(during) * 1e3, "long_ttft_s": ttft, "long_steps": len(during),
        "first_chunk": sizes[0] if sizes else None, "last_chunk": sizes[-1] if sizes else None,
    }
    rec["p99_ratio"] = rec["itl_p99_with_long_ms"] / rec["itl_p99_ms"]
    rec["p99_ratio_vs_before"] = rec["itl_p99_with_long_ms"] / rec["itl_p99_before_ms"]
    return rec


def format_table(records: list[dict]) -> str:
    head = (f"{'budget':>7} {'stall':>5} {'p99 before':>10} {'p99 after':>9} {'ITL p50':>8} {'ITL p99':>8} {'p50 w/long':>10} "
            f"{'p99 w/long':>10} {'p99 ratio':>9} {'long TTFT':>9} {'steps':>6} {'chunks (first..last)':>21}")
    lines = [head, "-" * len(head)]
    for r in records:
        stall = f"{r['max_decode_stall']:g}" if r.get("max_decode_stall") else "off"
        lines.append(f"{r['budget']:>7} {stall:>5} {r['itl_p99_before_ms']:>8.1f}ms {r['itl_p99_after_ms']:>7.1f}ms "
                     f"{r['itl_p50_ms']:>6.1f}ms {r['itl_p99_ms']:>6.1f}ms "
                     f"{r['itl_p50_with_long_ms']:>8.1f}ms {r['itl_p99_with_long_ms']:>8.1f}ms "
                     f"{r['p99_ratio']:>8.2f}x {r['long_ttft_s']:>8.1f}s {r['long_steps']:>6} "
                     f"{str(r['first_chunk']) + '..' + str(r['last_chunk']):>21}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m server.bench.long_context", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default", help="model dir, .gguf or 'default'")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--long-tokens", type=int, default=8192, help="the long prompt's length (with its one new token)")
    ap.add_argument("--streams", type=int, default=16, help="short streams decoding meanwhile")
    ap.add_argument("--short-tokens", type=int, default=32, help="prompt length of each short stream")
    ap.add_argument("--budgets", default="256,512,2048", help="comma list of --max-num-batched-tokens")
    ap.add_argument("--stalls", default="1.5,0", help="comma list of --max-decode-stall values (0: off); "
                    "every budget runs with each")
    ap.add_argument("--baseline-steps", type=int, default=40,
                    help="decode-only steps timed before the long prompt and again after its first token")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the records to this file")
    args = ap.parse_args(argv)
    try:
        budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
        stalls = [float(x) for x in args.stalls.split(",") if x.strip()]
    except ValueError:
        print(f"long_context: error: --budgets / --stalls must be comma lists of numbers, got {args.budgets!r} / "
              f"{args.stalls!r}", file=sys.stderr)
        return 2
    if not budgets or not stalls or any(x < 0 for x in stalls):
        print("long_context: error: --budgets and --stalls need at least one value; stalls >= 0", file=sys.stderr)
        return 2
    loaded = load_model(args.model, args.dtype, "cpu")
    kv = args.long_tokens + args.streams * (args.short_tokens + 2048) + 1024
    engine = build_llm_engine(loaded, None, scheduler=SchedulerConfig(max_num_seqs=max(32, args.streams + 1)),
                              kv_cache_tokens=kv)
    print(f"model {loaded.name}, {engine.runner.dtype}, attention_cost_len "
          f"{engine.scheduler.cfg.attention_cost_len:.0f}, max_model_len {engine.scheduler.cfg.max_model_len}",
          flush=True)
    rng = random.Random(args.seed)
    records = []
    for i, (stall, b) in enumerate((x, b) for x in stalls for b in budgets):
        rec = run_budget(engine, b, stall, args, rng, f"b{i}")
        records.append(rec)
        print(format_table(records[-1:]).splitlines()[-1] if records[1:] else format_table(records), flush=True)
    print()
    print(format_table(records))
    if args.json:
        meta = {"model": loaded.name, "dtype": str(engine.runner.dtype), "streams": args.streams,
                "short_tokens": args.short_tokens, "long_tokens": args.long_tokens,
                "attention_cost_len": engine.scheduler.cfg.attention_cost_len}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "records": records}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
