"""Prefix caching without a model: block hashes, reuse, isolation by adapter version, LRU eviction,
reference counts through preemption and abort, and the cost-aware token budget.

The fake "model" of test_scheduler picks each next token from the known tokens only, so a request
served partly from cached blocks must produce exactly what it produces with the cache off; every
step is checked against the scheduler's invariants (ref counts = live holders, budget, KV cover).
"""
from __future__ import annotations

import random

from adapters.ref import AdapterRef
from server.engine.block_manager import BlockManager, block_hash
from server.engine.config import CacheConfig, SchedulerConfig
from server.engine.request import Request
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import Scheduler
from tests.server.engine.test_scheduler import EOS, run_all, step

BS = 4


def ref(name: str, key: int, sha: str, version: int = 1) -> AdapterRef:
    return AdapterRef(name, key, version, sha, (), (), 8, 0.0)


A, B, A2 = ref("a", 1, "sha-a"), ref("b", 2, "sha-b"), ref("a", 3, "sha-a2", version=2)


def make(caching=True, num_blocks=64, **sched) -> Scheduler:
    sched.setdefault("max_num_batched_tokens", 64)
    return Scheduler(SchedulerConfig(**sched),
                     CacheConfig(block_size=BS, num_blocks=num_blocks, enable_prefix_caching=caching))


def rq(rid, prompt, adapter=None, max_tokens=4) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens), adapter=adapter, eos_token_ids=(EOS,))


SYSTEM = list(range(100, 113))  # 13 tokens: three full blocks and one token over


def all_free(s: Scheduler) -> bool:
    bm = s.block_manager
    return bm.num_free_blocks == bm.num_blocks and all(bm.ref_count(b) == 0 for b in range(bm.num_blocks))


# --- hashes ----------------------------------------------------------------------------------------
def test_block_hash_chains_tokens_and_weights():
    h1 = block_hash(None, [1, 2, 3, 4], "base")
    assert h1 == block_hash(None, [1, 2, 3, 4], "base")
    assert len({h1, block_hash(None, [1, 2, 3, 5], "base"), block_hash(None, [1, 2, 3, 4], "lora:x"),
                block_hash(h1, [1, 2, 3, 4], "base")}) == 4
    # A different first block changes every later hash: the chain names the whole prefix.
    assert block_hash(h1, [9], "base") != block_hash(block_hash(None, [0, 2, 3, 4], "base"), [9], "base")


def test_match_leaves_the_last_token_to_compute():
    s = make()
    first = rq("first", list(range(12)), max_tokens=1)  # exactly three full blocks
    s.add_request(first)
    run_all(s)
    assert s.block_manager.num_cached_blocks == 3
    again = rq("again", list(range(12)))
    # All 12 prompt tokens are cached, but the model must run on the last one to sample: 2 blocks.
    assert len(s.block_manager.match_prefix(again)) == 2
    longer = rq("longer", list(range(13)))
    assert len(s.block_manager.match_prefix(longer)) == 3


# --- reuse -----------------------------------------------------------------------------------------
def test_shared_system_prompt_is_computed_once_and_outputs_equal_cache_off():
    rng = random.Random(0)
    adapters = [None, A, B]
    reqs = [(f"r{i}", SYSTEM + [rng.randrange(20, 90) for _ in range(rng.randrange(1, 9))], adapters[i % 3])
            for i in range(9)]
    results = {}
    for caching in (False, True):
        s = make(caching=caching)
        outs: dict[str, list[int]] = {}
        for rid, prompt, adapter in reqs:  # one after the other: each finds the previous ones' blocks
            s.add_request(rq(rid, prompt, adapter))
            outs.update(run_all(s))
        results[caching] = (outs, s.prefix_cache_hits, s.prefix_cache_queries)
        assert all_free(s)  # every reference returned when traffic ends (cached blocks are evictable)
    (off, off_hits, _), (on, on_hits, queries) = results[False], results[True]
    assert on == off and off_hits == 0
    # Per adapter, every request after its adapter's first finds the 3 system-prompt blocks.
    assert on_hits == 6 * 3 * BS and queries == sum(len(p) for _, p, _ in reqs)


def test_cached_request_starts_after_its_prefix_and_reports_cached_tokens():
    s = make()
    s.add_request(rq("x", SYSTEM + [7, 8]))
    run_all(s)
    y = rq("y", SYSTEM + [9])
    s.add_request(y)
    out, _ = step(s)
    (sr,) = out.scheduled
    assert sr.start == 12 and sr.num_new_tokens == 2 and y.num_cached_tokens == 12
    run_all(s)


def test_running_requests_share_blocks_and_refcounts_follow():
    s = make()
    x = rq("x", SYSTEM + [1], max_tokens=8)
    s.add_request(x)
    step(s)  # x's prompt ran: its 3 full blocks are registered
    y = rq("y", SYSTEM + [2], max_tokens=8)
    s.add_request(y)
    step(s)
    shared = x.block_ids[:3]
    assert y.block_ids[:3] == shared and all(s.block_manager.ref_count(b) == 2 for b in shared)
    s.abort("x")  # abort of a holder of shared blocks: y keeps them
    assert all(s.block_manager.ref_count(b) == 1 for b in shared)
    run_all(s)
    assert all_free(s) and s.block_manager.num_cached_blocks >= 3


# --- isolation ----------------------------------------------------------------------------------
def test_same_text_through_a_b_base_and_replaced_a_shares_no_kv():
    s = make()
    seed = rq("seed-a", SYSTEM + [5], A, max_tokens=1)  # A's blocks are cached before the others arrive
    s.add_request(seed)
    step(s)
    seed_blocks = list(seed.block_ids[:3])
    run_all(s)
    reqs = {rid: rq(rid, SYSTEM + [5], adapter, max_tokens=2)
            for rid, adapter in [("b", B), ("base", None), ("a2", A2), ("a", A)]}
    for r in reqs.values():
        s.add_request(r)
    step(s)  # all four prefill in one step, running side by side
    tables = {rid: set(r.block_ids) for rid, r in reqs.items()}
    cached = {rid: r.num_cached_tokens for rid, r in reqs.items()}
    assert cached == {"b": 0, "base": 0, "a2": 0, "a": 12}  # only the same adapter version hits
    # No block is shared between B, the base model, A v2 and A (A holds the seed's cached blocks).
    names = list(tables)
    assert all(not (tables[x] & tables[y]) for i, x in enumerate(names) for y in names[i + 1 :])
    assert set(seed_blocks) <= tables["a"] and not set(seed_blocks) & (tables["b"] | tables["base"] | tables["a2"])
    run_all(s)
    assert s.block_manager.num_cached_blocks == 4 * 3  # A, B, base and A v2 each keep their own prefix
    assert all_free(s)


# --- memory pressure -------------------------------------------------------------------------------
def test_eviction_takes_least_recent_unreferenced_blocks_and_keeps_refcounts():
    bm = BlockManager(num_blocks=6, block_size=BS, enable_caching=True)
    old = rq("old", list(range(1, 10)))  # 2 full blocks + 1 token
    bm.allocate_for(old, 9)
    old.num_computed_tokens = 9
    assert bm.cache_full_blocks(old) == 2
    cached = old.block_ids[:2]
    bm.free(old)
    assert bm.num_free_blocks == 6 and bm.num_cached_blocks == 2
    big = rq("big", list(range(50, 70)))
    bm.allocate_for(big, 4 * BS)  # 4 never-cached blocks go first: the cache survives
    assert bm.num_cached_blocks == 2 and not set(big.block_ids) & set(cached)
    big.num_computed_tokens = 4 * BS
    bm.allocate_for(big, BS)  # a fifth block: the LRU cached one (the old table's tail) is evicted
    assert bm.num_evictions == 1 and bm.num_cached_blocks == 1 and cached[1] in big.block_ids
    assert bm.match_prefix(rq("again", list(range(1, 10)))) == [cached[0]]
    bm.free(big)
    assert bm.num_free_blocks == 6


def test_preemption_of_a_request_whose_prefix_is_shared():
    # 9 blocks: two requests each growing to 7 blocks cannot both fit, so one is preempted.
    tight = make(num_blocks=9, max_num_batched_tokens=64, max_num_seqs=4)
    roomy = make(num_blocks=64, max_num_batched_tokens=64, max_num_seqs=4)
    for s in (tight, roomy):
        s.add_request(rq("seed", SYSTEM + [1], max_tokens=1))
        run_all(s)
        s.add_request(rq("p", SYSTEM + [2], max_tokens=14))
        s.add_request(rq("q", SYSTEM + [3], max_tokens=14))
    reqs = dict(tight.requests)
    expected = run_all(roomy)
    for _ in range(300):
        if not tight.has_unfinished():
            break
        out, _ = step(tight)  # check_invariants: ref counts equal live holders every step
    got = {rid: r.output_token_ids for rid, r in reqs.items()}
    assert tight.num_preemptions >= 1
    assert got == expected
    assert all_free(tight)


def test_abort_waiting_and_running_with_cached_prefix_leaves_counts_at_baseline():
    s = make(max_num_seqs=2)
    s.add_request(rq("seed", SYSTEM + [1], max_tokens=1))
    run_all(s)
    for i in range(4):
        s.add_request(rq(f"r{i}", SYSTEM + [10 + i], max_tokens=6))
    step(s)  # two running (sharing the cached prefix), two waiting
    s.abort(["r0", "r3"])  # one running, one waiting
    run_all(s)
    assert all_free(s)


# --- the cost-aware budget ---------------------------------------------------------------------------
def test_chunks_deep_into_a_long_prompt_get_fewer_tokens_and_decodes_never_stall():
    cfg = dict(max_num_batched_tokens=64, max_num_seqs=8, attention_cost_len=128.0)
    s = make(num_blocks=400, **cfg)
    for i in range(3):
        s.add_request(rq(f"d{i}", [30 + i, 31, 32], max_tokens=80))
    step(s)
    s.add_request(rq("long", list(range(200, 200 + 600)), max_tokens=1))
    chunks = []
    while s.get_request("long") is not None and s.get_request("long").num_output_tokens == 0:
        out, _ = step(s)
        by_id = {x.request_id: x for x in out.scheduled}
        assert all(f"d{i}" in by_id for i in range(3))  # every decode row runs in every step
        assert out.cost <= 64 + 1e-9 and out.cost >= out.num_batched_tokens
        if "long" in by_id:
            x = by_id["long"]
            assert s.chunk_cost(x.start, x.num_new_tokens) <= 64 - sum(
                s.chunk_cost(by_id[f"d{i}"].start, 1) for i in range(3)) + 1e-9
            chunks.append(x.num_new_tokens)
    assert chunks[0] > chunks[-2] >= 1  # later chunks (more context) are smaller
    plain = make(num_blocks=400, max_num_batched_tokens=64, max_num_seqs=8)
    assert plain.chunk_cost(500, 10) == 10.0 and s.chunk_cost(500, 10) > 10 + 10 * 500 / 128


def test_cost_model_counts_each_token_attention():
    s = make(attention_cost_len=100.0)
    # n + sum_{p=start}^{start+n-1} (p + 1) / L
    assert abs(s.chunk_cost(10, 5) - (5 + sum(range(11, 16)) / 100)) < 1e-12
    n = s._chunk_len(1000, 10_000, 50.0)
    assert s.chunk_cost(1000, n) <= 50 < s.chunk_cost(1000, n + 1)
