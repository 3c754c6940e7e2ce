"""Prefix caching through the real engine (tiny random Llama, real adapters, fp32 on CPU).

The reference is the same engine with `--prefix-caching off`: greedy outputs must be identical,
while the cache really serves prompt tokens (hits are asserted, so the comparison is not vacuous).
KV depends on the weights: the same text through adapter A, adapter B, the base model and A after
a replace must share no block, and A after the replace must answer as v2 does with no cache at all.
"""
from __future__ import annotations

import random

from safetensors.torch import save

from server.engine.builder import build_llm_engine
from server.engine.config import CacheConfig, LoRASettings
from server.engine.sampling_params import SamplingParams
from server.model.loader import load_model
from tests.adapters.helpers import make_config, make_tensors
from tests.server.engine.test_engine import ADAPTERS, _run
from tests.server.engine.test_engine import world as world  # noqa: F401  (the module-scoped fixture)

SYSTEM = [(7 * i) % 240 + 5 for i in range(26)]  # a shared "system prompt": 6 full blocks of 4 + 2


def _engine(world, caching: bool, kv_cache_tokens=1024):
    root, manager = world
    loaded = load_model(root, dtype="float32", device="cpu")
    return build_llm_engine(loaded, manager=manager, kv_cache_tokens=kv_cache_tokens,
                            cache=CacheConfig(block_size=4, enable_prefix_caching=caching),
                            lora=LoRASettings(max_slots=4))


def _chat_requests(seed=0, n=10):
    rng = random.Random(seed)
    names = [None, *ADAPTERS]
    return [(f"r{i}", SYSTEM + [rng.randrange(3, 256) for _ in range(rng.randrange(1, 9))], names[i % 4],
             rng.randrange(3, 8)) for i in range(n)]


def _baseline(engine) -> bool:
    bm = engine.scheduler.block_manager
    return bm.num_free_blocks == bm.num_blocks and all(bm.ref_count(b) == 0 for b in range(bm.num_blocks))


def test_greedy_outputs_equal_cache_off_for_mixed_adapters_sharing_a_system_prompt(world):
    reqs = _chat_requests()
    arrivals = {rid: 3 * i for i, (rid, *_rest) in enumerate(reqs)}  # later ones find earlier blocks
    off = _engine(world, caching=False)
    expected = _run(off, world[1], reqs, arrivals)
    assert off.scheduler.prefix_cache_hits == 0
    on = _engine(world, caching=True)
    got = _run(on, world[1], reqs, arrivals)
    assert {k: v[0] for k, v in got.items()} == {k: v[0] for k, v in expected.items()}
    assert on.scheduler.prefix_cache_hits >= 6 * 4 * 6  # each adapter's later requests hit 6 blocks
    assert _baseline(on)


def test_eviction_and_preemption_under_memory_pressure_keep_outputs_and_counts(world):
    reqs = _chat_requests(seed=5, n=8)
    off = _engine(world, caching=False)
    expected = _run(off, world[1], reqs)
    tight = _engine(world, caching=True, kv_cache_tokens=96)  # 24 blocks: the batch needs more
    got = _run(tight, world[1], reqs, {rid: i for i, (rid, *_rest) in enumerate(reqs)})
    bm = tight.scheduler.block_manager
    assert {k: v[0] for k, v in got.items()} == {k: v[0] for k, v in expected.items()}
    assert tight.scheduler.num_preemptions > 0 and bm.num_evictions > 0
    assert _baseline(tight)


def test_a_b_base_and_replaced_a_share_no_kv(world):
    root, manager = world
    engine = _engine(world, caching=True)
    prompt = SYSTEM + [9, 9]
    name = "a4"
    r, mods = ADAPTERS[name]

    def run_one(rid, adapter_name):
        ref = manager.registry.acquire(adapter_name) if adapter_name else None
        engine.add_request(rid, prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), ref)
        engine.step()  # the whole prompt runs in this step
        req = engine.scheduler.get_request(rid)
        table, cached = list(req.block_ids), req.num_cached_tokens
        out = []
        while engine.has_unfinished():
            out += [t for d in engine.step() for t in d.token_ids]
        if ref is not None:
            manager.registry.release(ref)
        return table, cached, ref

    a_table, a_cached, a_ref = run_one("a", name)
    b_table, b_cached, _ = run_one("b", "b8")
    base_table, base_cached, _ = run_one("base", None)
    again_table, again_cached, _ = run_one("a-again", name)
    assert (a_cached, b_cached, base_cached, again_cached) == (0, 0, 0, 24)
    assert again_table[:6] == a_table[:6]  # the same version does reuse: the checks below can fail
    # Replace A with different weights: v2 must never see v1's cached KV.
    tensors = {k: v * 3.0 for k, v in make_tensors(spec=manager.spec, r=r, modules=mods, seed=99).items()}
    manager.upload(name, make_config(r=r, alpha=2 * r, modules=mods), save(tensors), replace=True)
    v2_table, v2_cached, v2_ref = run_one("a-v2", name)
    assert v2_ref.version == a_ref.version + 1 and v2_ref.sha256 != a_ref.sha256
    assert v2_cached == 0
    full = [set(t[:6]) for t in (a_table, b_table, base_table, v2_table)]
    assert all(not (full[i] & full[j]) for i in range(4) for j in range(i + 1, 4))
    # And v2's answer is v2's: equal to an engine that never cached anything.
    ref_engine = _engine(world, caching=False)
    want = _run(ref_engine, manager, [("v2", prompt, name, 4)])["v2"][0]
    got = _run(engine, manager, [("v2-again", prompt, name, 4)])["v2-again"][0]
    assert got == want
    assert _baseline(engine)
