"""Decode protection (`SchedulerConfig.max_decode_stall`, `--max-decode-stall`) without a model.

The scheduler turns "a prefill may add at most X decode-only steps of time" into chunk lengths from
the step times the engine reports (`observe_step`). Here a virtual clock plays the machine: a step
costs DECODE_S when it carries decode rows, plus, per prefill chunk, PER_TOKEN_S per token,
PER_KPAIR_S per 1024 query-key pairs its attention computes and PER_CTX_S per cached context token it
reads (the shape measured on the 2-core CPU: ~120 ms per 16-row decode step, ~5 ms per prefill token,
~3.5 ms per 1024 pairs, ~7 ms per 1k tokens of context read), so the feedback loop is tested
deterministically, with no wall clock and no sleeping.
"""
from __future__ import annotations

import math

import pytest

from server.engine.config import CacheConfig, SchedulerConfig
from server.engine.decode_protection import DecodeProtection, PrefillPrice, chunk_features
from server.engine.request import Request
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import Scheduler
from server.settings import ServerSettings
from tests.server.engine.test_scheduler import EOS, step

DECODE_S, PER_TOKEN_S, PER_KPAIR_S, PER_CTX_S = 0.12, 0.005, 0.0035, 0.000007
COST_LEN = 3072.0  # SmolLM2-135M's attention_cost_len


def make(stall: float | None, budget: int = 2048) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=budget, attention_cost_len=COST_LEN,
                                     max_decode_stall=stall),
                     CacheConfig(block_size=16, num_blocks=4096, enable_prefix_caching=False))


def rq(rid: str, n_prompt: int, max_tokens: int) -> Request:
    prompt = [1000 + (i * 7919 + len(rid)) % 40000 for i in range(n_prompt)]
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), eos_token_ids=(EOS,))


def virtual_seconds(out, per_ctx: float = PER_CTX_S) -> float:
    """What the step 'took' on the virtual machine."""
    seconds = DECODE_S if out.num_decode_rows else 0.0
    for start, n in out.prefill_chunks:
        tokens, kpairs, context = chunk_features(start, n)
        seconds += PER_TOKEN_S * tokens + PER_KPAIR_S * kpairs + per_ctx * context
    return seconds


def run_step(s: Scheduler, per_ctx: float = PER_CTX_S):
    out, outputs = step(s)
    seconds = virtual_seconds(out, per_ctx)
    s.observe_step(out, seconds)
    return out, outputs, seconds


def start_streams(s: Scheduler, n: int = 16) -> None:
    for i in range(n):
        s.add_request(rq(f"s{i}", 32, 4000))
    while any(r.num_output_tokens == 0 for r in s.running) or s.waiting:
        run_step(s)
    for _ in range(3):  # decode-only steps: the scheduler learns DECODE_S
        out, _, _ = run_step(s)
        assert out.prefill_cost == 0 and out.num_decode_rows == n


def prefill_long(s: Scheduler, n_prompt: int, per_ctx: float = PER_CTX_S) -> list[tuple[float, float, int]]:
    """(step seconds, chunk cost, the long prompt's tokens in the step) of every step until the long
    prompt samples its first token; it is never preempted (the pool holds everything)."""
    s.add_request(rq("long", n_prompt, 1))
    steps = []
    for _ in range(5000):
        out, outputs, seconds = run_step(s, per_ctx)
        assert not out.preempted_ids
        n = sum(x.num_new_tokens for x in out.scheduled if x.request_id == "long")
        steps.append((seconds, out.prefill_cost, n))
        if any(o.request_id == "long" for o in outputs):
            return steps
    raise AssertionError("the long prompt never finished its prefill")


def test_long_prompt_beside_streams_adds_at_most_the_stall_multiple():
    s = make(stall=1.5)
    start_streams(s)
    steps = prefill_long(s, 6144)
    assert s.protection.decode_step_s == pytest.approx(DECODE_S)
    # The three prices are learnt: per token, per query-key pair, per cached context token read.
    assert s.protection.prefill_price.fit() == pytest.approx((PER_TOKEN_S, PER_KPAIR_S, PER_CTX_S), rel=0.02)
    # After the first few chunks (which teach the context price), every step with the long prompt's
    # chunk stays within (1 + 1.5) decode-only steps, and uses most of it.
    late = [sec for sec, _, _ in steps[8:]]
    assert max(late) <= (1 + 1.5) * DECODE_S * 1.02, max(late)
    assert sorted(late)[len(late) // 2] >= (1 + 1.2) * DECODE_S
    # Chunks shrink as the context grows (each token attends over more) but never stop.
    tokens = [n for _, _, n in steps]
    assert all(n > 0 for n in tokens) and tokens[0] > 3 * tokens[-1]
    assert sum(tokens) == 6144


def test_when_the_context_alone_costs_more_than_the_cap_the_tokens_get_the_cap():
    s = make(stall=1.5)
    start_streams(s, n=4)
    # 60 ms per 1k tokens of context: past 3k tokens, reading the context alone exceeds the cap of
    # 1.5 decode steps. The chunk then gets the cap for its own tokens (not one token per step,
    # which would take thousands of steps): a step costs at most decode + context read + cap.
    per_ctx = 0.00006
    steps = prefill_long(s, 4096, per_ctx=per_ctx)
    starts = [0]
    for _, _, n in steps:
        starts.append(starts[-1] + n)
    cap = 1.5 * DECODE_S
    beyond = [(sec, n, start) for (sec, _, n), start in zip(steps, starts, strict=False) if start * per_ctx > cap * 1.05]
    assert beyond and min(n for _, n, _ in beyond) > 1  # still real chunks
    for sec, _, start in beyond:
        assert sec <= (DECODE_S + per_ctx * start + cap) * 1.02
    assert sum(n for _, _, n in steps) == 4096


def test_an_unpriced_prefill_starts_with_a_probe_chunk():
    s = make(stall=1.5)
    start_streams(s, n=4)
    s.protection.prefill_price = type(s.protection.prefill_price)()  # forget the streams' prefill: the price is unknown
    steps = prefill_long(s, 2048)
    assert steps[0][2] == DecodeProtection.PROBE_TOKENS  # small, and then priced
    assert s.protection.prefill_price.fit() is not None


def test_without_protection_the_budget_alone_decides():
    s = make(stall=None)
    start_streams(s)
    steps = prefill_long(s, 8192)
    assert s.protection.decode_step_s is None and s.protection.prefill_price.fit() is None  # nothing is estimated
    assert max(sec for sec, _, _ in steps) > 10 * DECODE_S  # the stall the protection removes


def test_a_prompt_with_no_stream_beside_it_prefills_at_the_full_budget():
    s = make(stall=1.5, budget=512)
    start_streams(s, n=2)
    for r in list(s.running):  # the streams go: only the long prompt is left
        s.abort(r.request_id)
    steps = prefill_long(s, 2048)
    # Nothing decodes beside it, so nothing caps it: every chunk but the last fills the budget.
    assert all(cost >= 512 - 4 for _, cost, _ in steps[:-1]), steps
    assert s.protection.left_s == math.inf  # its steps had no decode row: never capped


def test_a_token_dearer_than_the_cap_still_advances():
    s = make(stall=0.01)  # cap far below one token's cost deep in the prompt
    start_streams(s, n=2)
    steps = prefill_long(s, 1024)
    assert all(n >= 1 for _, _, n in steps)  # one token per step at least: it finishes
    assert sum(n for _, _, n in steps) == 1024


def test_no_cap_before_a_decode_only_step_was_timed():
    s = make(stall=1.5)
    assert s.protection.cap_s(has_decodes=True) == math.inf
    s.add_request(rq("a", 32, 8))
    run_step(s)  # prefill-only: prices chunks, says nothing about decode steps
    assert s.protection.decode_step_s is None and s.protection.cap_s(has_decodes=True) == math.inf


def test_flag_default_and_off(capsys):
    from server.cli import build_parser
    from server.engine.builder import engine_configs

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    assert "--max-decode-stall" in capsys.readouterr().out
    assert ServerSettings().max_decode_stall == 1.5
    assert engine_configs(ServerSettings())[0].max_decode_stall == 1.5
    assert engine_configs(ServerSettings(max_decode_stall=0))[0].max_decode_stall is None
    assert ServerSettings.from_args(["--max-decode-stall", "2.5"]).max_decode_stall == 2.5
    for bad in ("-1", "nan"):
        with pytest.raises(ValueError, match="--max-decode-stall"):
            ServerSettings.from_args(["--max-decode-stall", bad])
    with pytest.raises(ValueError, match="max_decode_stall"):
        SchedulerConfig(max_decode_stall=0)


def test_long_context_bench_runs_each_budget_with_each_stall(tmp_path):
    """`python -m server.bench.long_context` end to end on the tiny model (small sizes): one record
    per (stall, budget), the protection's rows marked, nothing left running; the reference ITL is
    the larger of the windows before and after the long prompt."""
    import json

    from server.bench.long_context import main
    from tests.real_server import save_tiny_model

    model = save_tiny_model(tmp_path / "tiny")
    out = tmp_path / "lc.json"
    assert main(["--model", str(model), "--dtype", "float32", "--long-tokens", "200", "--streams", "2",
                 "--short-tokens", "8", "--budgets", "32,64", "--stalls", "1.5,0", "--baseline-steps", "3",
                 "--json", str(out)]) == 0
    records = json.loads(out.read_text())["records"]
    assert [(r["max_decode_stall"], r["budget"]) for r in records] == [(1.5, 32), (1.5, 64), (0.0, 32), (0.0, 64)]
    for r in records:
        assert r["long_ttft_s"] > 0 and r["long_steps"] >= 1 and r["itl_p99_with_long_ms"] > 0
        assert r["itl_p99_ms"] == max(r["itl_p99_before_ms"], r["itl_p99_after_ms"]) > 0
        assert r["p99_ratio"] == pytest.approx(r["itl_p99_with_long_ms"] / r["itl_p99_ms"])
        # the setting reached the scheduler: with the protection on, the first chunk beside the
        # streams is the unpriced probe (16 tokens); off, what the budget leaves beside the 2
        # decode rows (each charged its cost, more than a token)
        if r["max_decode_stall"]:
            assert r["first_chunk"] <= DecodeProtection.PROBE_TOKENS, r
        else:
            assert DecodeProtection.PROBE_TOKENS < r["first_chunk"] < r["budget"], r
    assert main(["--stalls", "x"]) == 2 and main(["--stalls", "-1"]) == 2


def test_prefill_price_is_a_nonnegative_least_squares_fit():
    price = PrefillPrice()
    assert price.fit() is None
    chunks = [(start, n) for start in (0, 500, 2000, 6000) for n in (1, 8, 64, 300)]
    for start, n in chunks:  # a machine with no per-pair cost
        tokens, _, context = chunk_features(start, n)
        price.add(chunk_features(start, n), 0.005 * tokens + 0.00001 * context)
    per_token, per_kpair, per_ctx = price.fit()
    assert per_token == pytest.approx(0.005, rel=1e-3) and per_ctx == pytest.approx(0.00001, rel=1e-3)
    assert 0 <= per_kpair < 1e-7
    price = PrefillPrice()
    for start, n in chunks:  # data a term could only fit with a negative price: that term gets 0
        tokens, kpairs, _ = chunk_features(start, n)
        price.add(chunk_features(start, n), max(0.0, 0.005 * tokens - 0.0001 * kpairs))
    assert all(p >= 0 for p in price.fit()) and price.fit()[0] > 0
    price = PrefillPrice()
    for start, n in chunks:  # time that only the context explains: no fit may ignore the chunk's length
        price.add(chunk_features(start, n), 0.00001 * start + 0.001)
    fit = price.fit()
    assert fit is None or fit[0] > 0
    price = PrefillPrice()
    for _ in range(5):  # one chunk shape only: the terms cannot be told apart, one price explains it
        price.add(chunk_features(1000, 10), 0.1)
    fit = price.fit()
    assert sum(p * f for p, f in zip(fit, chunk_features(1000, 10), strict=True)) == pytest.approx(0.1, rel=1e-6)
    assert sum(p > 0 for p in fit) == 1


def test_a_mispriced_fit_cannot_extrapolate_to_a_long_chunk():
    """Deep into a long prompt the chunks are small; a fit that underprices length (the terms move
    together there) must not let a chunk grow past GROWTH x the recent steps' tokens."""
    p = DecodeProtection(1.5)
    p.observe((), 16, 0.12)  # a decode-only step
    for _ in range(30):
        p.observe(((8000, 20),), 16, 0.12 + 0.3)
    p.prefill_price.fit = lambda: (1e-6, 0.0, 0.0)  # says a token is nearly free
    p.start_step(has_decodes=True)
    assert p.chunk_len(8020, 2000, first=True) == int(DecodeProtection.GROWTH * 20)
    p.start_step(has_decodes=False)  # no decode row beside it: no cap, no trust region
    assert p.chunk_len(8020, 2000, first=True) == 2000
