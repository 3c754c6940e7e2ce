"""Scheduler without a model: a fake "model" picks each next token from the known tokens only
(so a recomputed request must produce the same output), and every step is checked against the
limits the scheduler promises (token budget, batch size, adapter cap, KV block ownership)."""
from __future__ import annotations

from collections import Counter

import pytest

from adapters.ref import AdapterRef
from server.engine.config import CacheConfig, SchedulerConfig
from server.engine.outputs import TokenLogprob
from server.engine.request import Request, RequestStatus
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import QueueFullError, Scheduler, SchedulerOutput

EOS = 2


def fake_next_token(tokens: list[int]) -> int:
    """Deterministic in the prefix, never EOS (>= 10)."""
    return 10 + (sum(t * (i + 1) for i, t in enumerate(tokens)) % 997)


def make(block_size=4, num_blocks=64, **sched) -> Scheduler:
    return Scheduler(SchedulerConfig(**sched), CacheConfig(block_size=block_size, num_blocks=num_blocks))


def req(rid, n_prompt=4, adapter=None, **sp) -> Request:
    sp.setdefault("max_tokens", 4)
    prompt = [100 + (hash(rid) + i) % 50 for i in range(n_prompt)]
    ref = None if adapter is None else AdapterRef(f"a{adapter}", adapter, 1, "", (), (), 8, 0.0)
    return Request(rid, prompt, SamplingParams(**sp), adapter=ref, eos_token_ids=(EOS,))


def check_invariants(s: Scheduler, out: SchedulerOutput) -> None:
    cfg, bm = s.cfg, s.block_manager
    assert out.num_batched_tokens == sum(x.num_new_tokens for x in out.scheduled)
    assert out.num_batched_tokens <= cfg.max_num_batched_tokens
    assert len(out.scheduled) <= cfg.max_num_seqs and s.num_running <= cfg.max_num_seqs
    running_adapters = {r.adapter_key for r in s.running if r.adapter_key is not None}
    assert len(out.adapter_keys) <= cfg.max_adapters_per_batch
    assert len(running_adapters) <= cfg.max_adapters_per_batch
    ids = [x.request_id for x in out.scheduled]
    assert len(ids) == len(set(ids))
    for x in out.scheduled:
        assert x.num_new_tokens >= 1
        assert len(x.block_ids) * bm.block_size >= x.start + x.num_new_tokens  # KV covers the chunk
        assert x.do_sample == (x.start + x.num_new_tokens == x.request.num_tokens)
    # Every block is referenced exactly as often as live requests hold it (prefix caching shares
    # full blocks), or is free (never cached, or cached and evictable).
    owned = Counter(b for r in s.requests.values() for b in r.block_ids)
    assert all(bm.ref_count(b) == c for b, c in owned.items())
    assert sum(bm.ref_count(b) for b in range(bm.num_blocks)) == sum(owned.values())
    assert len(owned) + bm.num_free_blocks == bm.num_blocks


def step(s: Scheduler, token_fn=fake_next_token):
    out = s.schedule()
    check_invariants(s, out)
    sampled = {x.request_id: token_fn(x.request.all_token_ids) for x in out.scheduled if x.do_sample}
    return out, s.update_from_output(out, sampled)


def run_all(s: Scheduler, max_steps=1000) -> dict[str, list[int]]:
    """Steps until nothing is left; returns each request's generated tokens."""
    reqs = dict(s.requests)
    for _ in range(max_steps):
        if not s.has_unfinished():
            return {rid: r.output_token_ids for rid, r in reqs.items()}
        step(s)
    raise AssertionError("did not finish")


# --- token budget, chunked prefill, batch size ---------------------------------------------------
def test_chunked_prefill_never_stalls_running_decode():
    s = make(max_num_batched_tokens=16, max_num_seqs=8)
    s.add_request(req("short", n_prompt=4, max_tokens=20))
    out, _ = step(s)  # short: prefill of 4 tokens, samples its first token
    assert [(x.request_id, x.num_new_tokens, x.do_sample) for x in out.scheduled] == [("short", 4, True)]
    s.add_request(req("long", n_prompt=50, max_tokens=2))
    chunks = []
    for _ in range(4):
        out, outputs = step(s)
        by_id = {x.request_id: x for x in out.scheduled}
        assert out.scheduled[0].request_id == "short"  # running decodes go first
        assert by_id["short"].num_new_tokens == 1 and by_id["short"].do_sample
        assert "short" in {o.request_id for o in outputs}  # one token every step
        chunks.append((by_id["long"].start, by_id["long"].num_new_tokens, by_id["long"].do_sample))
    # 15 tokens of budget left per step: 50 = 15 + 15 + 15 + 5, sampling only at the end.
    assert chunks == [(0, 15, False), (15, 15, False), (30, 15, False), (45, 5, True)]
    assert s.get_request("long").num_output_tokens == 1


def test_token_budget_and_max_num_seqs_hold_every_step():
    s = make(max_num_batched_tokens=10, max_num_seqs=3, num_blocks=200)
    for i in range(8):
        s.add_request(req(f"r{i}", n_prompt=3 + 2 * i, max_tokens=3 + i % 4))
    outputs = run_all(s)  # check_invariants runs on every step
    assert {rid: len(t) for rid, t in outputs.items()} == {f"r{i}": 3 + i % 4 for i in range(8)}
    assert s.block_manager.num_free_blocks == 200


# --- adapters ------------------------------------------------------------------------------------
def test_adapter_cap_skips_without_blocking_others():
    s = make(max_adapters_per_batch=2)
    for rid, adapter in [("a1", 1), ("b1", 2), ("c1", 3), ("base", None), ("a2", 1), ("c2", 3)]:
        s.add_request(req(rid, adapter=adapter))
    out, _ = step(s)
    assert [x.request_id for x in out.scheduled] == ["a1", "b1", "base", "a2"]
    assert out.adapter_keys == {1, 2}
    assert [r.request_id for r in s.waiting] == ["c1", "c2"]
    # Adapter 3 gets in once adapters 1 and 2 have no running request left.
    outputs = run_all(s)
    assert all(len(t) == 4 for t in outputs.values())


def _adversarial_stream(starvation_steps: int, steps: int) -> int | None:
    """Two popular adapters fill both slots forever; a rare one (3) waits behind them.
    Returns the step at which the rare request is first scheduled (None if never)."""
    s = make(max_adapters_per_batch=2, starvation_steps=starvation_steps, num_blocks=4000,
             max_num_seqs=256, max_num_batched_tokens=4096, max_waiting=10_000)
    s.add_request(req("a-0", adapter=1))
    s.add_request(req("b-0", adapter=2))
    s.add_request(req("rare", adapter=3))
    for t in range(1, steps + 1):
        s.add_request(req(f"a-{t}", adapter=1))
        s.add_request(req(f"b-{t}", adapter=2))
        out, _ = step(s)
        if any(x.request_id == "rare" for x in out.scheduled):
            return t
    return None


def test_anti_starvation_bounds_the_wait_of_a_rare_adapter():
    # Control: without the bound the stream starves the rare adapter indefinitely.
    assert _adversarial_stream(starvation_steps=10**6, steps=120) is None
    for bound in (3, 8):
        t = _adversarial_stream(starvation_steps=bound, steps=120)
        # skipped `bound` times, then the running requests (max_tokens = 4) drain.
        assert t is not None and bound < t <= bound + 4 + 1


# --- preemption ----------------------------------------------------------------------------------
def test_preemption_newest_yields_and_output_is_unchanged():
    def fill(s):
        for i in range(3):
            s.add_request(req(f"p{i}", n_prompt=6, max_tokens=8))

    roomy = make(block_size=4, num_blocks=64)
    fill(roomy)
    expected = run_all(roomy)
    assert roomy.num_preemptions == 0

    tight = make(block_size=4, num_blocks=7)  # each request needs up to ceil(13/4) = 4 blocks
    fill(tight)
    reqs = dict(tight.requests)
    newest_at_preemption = []
    for _ in range(200):
        if not tight.has_unfinished():
            break
        newest = tight.running[-1].request_id if tight.running else None
        out, _ = step(tight)
        if out.preempted_ids:
            newest_at_preemption.append((newest, out.preempted_ids[0]))
    assert not tight.has_unfinished()
    assert tight.num_preemptions >= 1
    assert tight.num_preemptions == sum(r.num_preemptions for r in reqs.values())
    assert all(newest == first for newest, first in newest_at_preemption)
    # Same tokens as the run that never preempted (the fake model depends on the prefix only).
    assert {rid: r.output_token_ids for rid, r in reqs.items()} == expected
    assert all(len(t) == 8 for t in expected.values())
    assert tight.block_manager.num_free_blocks == 7


def test_preempted_request_goes_to_front_and_keeps_its_tokens():
    s = make(block_size=2, num_blocks=6, max_num_batched_tokens=64, max_num_seqs=2)
    s.add_request(req("old", n_prompt=4, max_tokens=7))  # up to ceil(10/2) = 5 blocks
    s.add_request(req("new", n_prompt=4, max_tokens=7))
    s.add_request(req("queued", n_prompt=2, max_tokens=2))
    while not s.num_preemptions:
        step(s)
    assert [r.request_id for r in s.waiting] == ["new", "queued"]
    victim = s.waiting[0]
    assert victim.request_id == "new" and victim.status == RequestStatus.PREEMPTED
    assert victim.num_computed_tokens == 0 and victim.block_ids == [] and victim.num_preemptions == 1
    assert victim.num_tokens == 4 + victim.num_output_tokens  # generated tokens kept for recompute
    outputs = run_all(s)
    assert len(outputs["new"]) == 7 and len(outputs["old"]) == 7


# --- abort and finish ----------------------------------------------------------------------------
def test_abort_in_the_step_a_request_finishes_frees_blocks_once():
    s = make(block_size=4, num_blocks=8)
    s.add_request(req("x", n_prompt=6, max_tokens=1))
    s.add_request(req("y", n_prompt=3, max_tokens=5))
    out = s.schedule()
    assert s.block_manager.num_free_blocks == 8 - 2 - 1
    s.abort("x")  # arrives while the step that would finish x is executing
    assert s.block_manager.num_free_blocks == 8 - 1
    outputs = s.update_from_output(out, {"x": 50, "y": 51})  # x's token would hit max_tokens
    assert s.block_manager.num_free_blocks == 8 - 1  # not freed a second time
    by_id = {o.request_id: o for o in outputs}
    assert by_id["x"].finished and by_id["x"].finish_reason == "abort" and by_id["x"].new_token_ids == []
    assert [o.request_id for o in outputs].count("x") == 1
    assert by_id["y"].new_token_ids == [51] and not by_id["y"].finished
    assert s.schedule().finished_ids == ["x"]
    # The other order: finished by update first, then the abort is a no-op.
    s2 = make(block_size=4, num_blocks=8)
    s2.add_request(req("x", n_prompt=6, max_tokens=1))
    out = s2.schedule()
    (o,) = s2.update_from_output(out, {"x": 50})
    assert o.finish_reason == "length" and s2.block_manager.num_free_blocks == 8
    s2.abort(["x", "unknown"])
    assert s2.block_manager.num_free_blocks == 8 and s2.update_from_output(s2.schedule(), {}) == []


def test_abort_waiting_and_finish_requests():
    s = make(max_num_seqs=1)
    s.add_request(req("run"))
    s.add_request(req("wait"))
    step(s)
    s.abort("wait")
    assert s.num_waiting == 0 and not s.get_request("wait")
    s.finish_requests("run", RequestStatus.FINISHED_STOPPED)  # e.g. a stop string matched
    assert s.block_manager.num_free_blocks == 64 and s.num_running == 0
    assert [o.finish_reason for o in s.update_from_output(s.schedule(), {})] == ["abort"]
    assert not s.has_unfinished()
    with pytest.raises(ValueError):
        s.finish_requests("x", RequestStatus.RUNNING)


# --- admission errors ----------------------------------------------------------------------------
def test_unservable_requests_fail_fast():
    s = make(block_size=4, num_blocks=3, max_model_len=64, max_waiting=2)
    with pytest.raises(ValueError, match="max_model_len"):
        s.add_request(req("long", n_prompt=60, max_tokens=5))
    with pytest.raises(ValueError, match="KV blocks"):
        s.add_request(req("big", n_prompt=10, max_tokens=4))  # 13 KV tokens -> 4 blocks > 3
    with pytest.raises(ValueError, match="prompt"):
        s.add_request(Request("empty", [], SamplingParams()))
    assert s.num_waiting == 0 and not s.has_unfinished()
    s.add_request(req("fits", n_prompt=9, max_tokens=4))  # 12 KV tokens = the whole pool
    with pytest.raises(ValueError, match="in flight"):
        s.add_request(req("fits"))
    s.add_request(req("second"))
    with pytest.raises(QueueFullError):
        s.add_request(req("third"))
    outputs = run_all(s)
    assert len(outputs["fits"]) == 4 and len(outputs["second"]) == 4


# --- stop rules ----------------------------------------------------------------------------------
def _generate(script: list[int], **sp) -> tuple[list[int], str]:
    """Feed `script` as the sampled tokens of one request; returns (tokens, finish_reason)."""
    s = make()
    s.add_request(req("r", **sp))
    tokens, it = [], iter(script)
    while s.has_unfinished():
        out = s.schedule()
        lp = {"r": TokenLogprob(0, -0.5)}
        for o in s.update_from_output(out, {"r": next(it)}, lp):
            tokens += o.new_token_ids
            assert o.new_logprobs == [lp["r"]]
            if o.finished:
                return tokens, o.finish_reason
    raise AssertionError("unreachable")


def test_stop_rules():
    assert _generate([11, EOS, 12], max_tokens=5) == ([11, EOS], "stop")
    assert _generate([11, EOS, 12, 13, 14], max_tokens=5, ignore_eos=True) == ([11, EOS, 12, 13, 14], "length")
    # min_tokens=2: the first two tokens can never stop; the third can.
    assert _generate([EOS, 7, EOS], max_tokens=5, min_tokens=2, stop_token_ids=(7,)) == ([EOS, 7, EOS], "stop")
    assert _generate([11, 7, 12], max_tokens=5, stop_token_ids=(7,)) == ([11, 7], "stop")
    assert _generate([11, 7, 12], max_tokens=5, stop_token_ids=(7,), ignore_eos=True) == ([11, 7], "stop")
    assert _generate([11, 12, 13], max_tokens=3) == ([11, 12, 13], "length")
    assert _generate([11, 12, EOS], max_tokens=3) == ([11, 12, EOS], "stop")  # stop beats length


def test_model_max_len_caps_generation():
    s = make(max_model_len=8)
    s.add_request(req("r", n_prompt=4, max_tokens=4))
    outputs = run_all(s)
    assert len(outputs["r"]) == 4 and s.get_request("r") is None
