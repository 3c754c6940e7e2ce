"""Engine end to end on a tiny random Llama: batched equals alone, with and without preemption.

The reference for every request is the same engine run with that request alone (greedy); the
batched runs mix base rows and several adapters (different ranks and target modules), different
prompt lengths, and requests that arrive at different steps.
"""
from __future__ import annotations

import asyncio
import random

import pytest

from adapters.manager import AdapterManager
from server.engine.async_engine import AsyncEngine
from server.engine.builder import base_spec, build_llm_engine, model_info
from server.engine.config import CacheConfig, LoRASettings
from server.engine.sampling_params import SamplingParams
from server.model.loader import load_model
from tests.adapters.helpers import make_config, make_tensors
from tests.server.model.tiny import save_tiny_hf

ADAPTERS = {  # name -> (rank, target modules)
    "a4": (4, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    "b8": (8, ("q_proj", "v_proj")),
    "c2": (2, ("gate_proj", "up_proj", "down_proj")),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from safetensors.torch import save

    root = tmp_path_factory.mktemp("tiny")
    save_tiny_hf(root, "untied")
    loaded = load_model(str(root), dtype="float32", device="cpu")
    store = tmp_path_factory.mktemp("adapters")
    manager = AdapterManager(store, base_spec(loaded))
    for i, (name, (r, mods)) in enumerate(ADAPTERS.items()):
        tensors = make_tensors(spec=manager.spec, r=r, modules=mods, seed=10 + i)
        tensors = {k: v * 3.0 for k, v in tensors.items()}  # big enough to change greedy tokens
        manager.upload(name, make_config(r=r, alpha=2 * r, modules=mods), save(tensors))
    return str(root), manager


def _engine(world, kv_cache_tokens=1024, max_slots=8):
    root, manager = world
    loaded = load_model(root, dtype="float32", device="cpu")
    return build_llm_engine(loaded, manager=manager, kv_cache_tokens=kv_cache_tokens, cache=CacheConfig(block_size=4),
                            lora=LoRASettings(max_slots=max_slots))


def _requests(n=7, seed=0):
    rng = random.Random(seed)
    names = [None, *ADAPTERS]
    reqs = []
    for i in range(n):
        prompt = [rng.randrange(3, 256) for _ in range(rng.randrange(3, 20))]
        reqs.append((f"r{i}", prompt, names[i % len(names)], rng.randrange(4, 12)))
    return reqs


def _run(engine, manager, reqs, arrivals=None):
    """Add requests at their arrival step, step to completion; returns id -> (tokens, text, reason)."""
    arrivals = arrivals or {}
    out: dict[str, list] = {}
    refs = []
    pending = list(reqs)
    step = 0
    while pending or engine.has_unfinished():
        for r in [r for r in pending if arrivals.get(r[0], 0) <= step]:
            rid, prompt, name, max_tokens = r
            ref = manager.registry.acquire(name) if name else None
            if ref is not None:
                refs.append(ref)
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            engine.add_request(rid, prompt, params, ref)
            pending.remove(r)
        for d in engine.step():
            toks, text, _ = out.get(d.request_id, ([], "", None))
            out[d.request_id] = [toks + d.token_ids, text + d.text, d.finish_reason]
        step += 1
        assert step < 500
    for ref in refs:
        manager.registry.release(ref)
    return out


def _alone(world, reqs):
    root, manager = world
    engine = _engine(world)
    return {r[0]: _run(engine, manager, [r])[r[0]] for r in reqs}


def test_mixed_batch_equals_alone_with_staggered_arrivals(world):
    reqs = _requests()
    alone = _alone(world, reqs)
    # The adapters really change the output (otherwise this test could not fail).
    assert len({tuple(alone[r[0]][0]) for r in reqs}) == len(reqs)
    engine = _engine(world, max_slots=4)
    arrivals = {"r3": 2, "r4": 3, "r5": 5, "r6": 6}
    batched = _run(engine, world[1], reqs, arrivals)
    for rid, _prompt, _name, max_tokens in reqs:
        assert batched[rid][0] == alone[rid][0], rid
        assert len(batched[rid][0]) == max_tokens and batched[rid][2] == "length"
    assert engine.scheduler.block_manager.num_free_blocks == engine.scheduler.block_manager.num_blocks


def test_preemption_keeps_outputs_and_happens(world):
    reqs = _requests(6, seed=3)
    alone = _alone(world, reqs)
    # 14 blocks of 4 tokens: far fewer than the batch needs at once, enough for any one request.
    engine = _engine(world, kv_cache_tokens=56, max_slots=4)
    batched = _run(engine, world[1], reqs)
    assert engine.scheduler.num_preemptions > 0
    for rid, *_ in reqs:
        assert batched[rid][0] == alone[rid][0], rid


def test_more_adapters_than_slots(world):
    reqs = _requests(8, seed=5)
    alone = _alone(world, reqs)
    engine = _engine(world, max_slots=1)
    batched = _run(engine, world[1], reqs)
    for rid, *_ in reqs:
        assert batched[rid][0] == alone[rid][0], rid
    assert engine.runner.slot_pool.evictions > 0


def test_stop_string_cuts_text_and_finishes(world):
    root, manager = world
    engine = _engine(world)
    prompt = [72, 101, 108, 108, 111, 44, 32]
    free = _run(engine, manager, [("s", prompt, None, 12)])["s"]
    text = free[1]
    stop = text[4:6]
    assert stop and text.find(stop) == 4, "pick a stop string that first occurs at index 4"
    engine.add_request("s2", prompt, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop=(stop,)))
    got, reason = "", None
    while engine.has_unfinished():
        for d in engine.step():
            got += d.text
            reason = d.finish_reason or reason
    assert got == text[:4] and reason == "stop"


def test_abort_frees_blocks(world):
    root, manager = world
    engine = _engine(world)
    bm = engine.scheduler.block_manager
    engine.add_request("x", [5] * 10, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    engine.step()
    engine.step()
    assert bm.num_free_blocks < bm.num_blocks
    engine.abort("x")
    deltas = engine.step()
    assert [(d.request_id, d.finish_reason) for d in deltas] == [("x", "abort")]
    assert bm.num_free_blocks == bm.num_blocks and not engine.has_unfinished()


def test_async_engine_streams_and_cancel_aborts(world):
    root, manager = world
    engine = _engine(world)
    loaded_info = model_info(load_model(root, dtype="float32", device="cpu"), 64)
    aeng = AsyncEngine(engine, None, "tiny", loaded_info, max_model_len=64, max_waiting=8)
    aeng.start()
    try:
        async def full(rid, prompt):
            text, n = "", 0
            async for d in aeng.generate(rid, prompt, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)):
                text += d.text
                n = d.completion_tokens
            return text, n

        async def cancelled():
            agen = aeng.generate("c", [7] * 5, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
            await agen.__anext__()
            await agen.aclose()  # the client went away

        async def main():
            return await asyncio.gather(full("a", [9, 8, 7]), full("b", [4] * 9), cancelled())

        (ta, na), (tb, nb), _ = asyncio.run(main())
        assert na == 8 and nb == 8
        alone = _alone(world, [("a", [9, 8, 7], None, 8)])
        assert ta == alone["a"][1]
        # The cancelled request is aborted and its blocks come back.
        for _ in range(100):
            st = aeng.stats()
            if st["running"] == 0 and st["waiting"] == 0 and st["kv_blocks_used"] == 0:
                break
            asyncio.run(asyncio.sleep(0.02))
        assert st["kv_blocks_used"] == 0 and st["running"] == 0
    finally:
        aeng.shutdown(0)


def test_stalled_step_loop_is_reported_not_alive(world):
    """/ready relies on stats()["step_loop_alive"]: a step stuck past step_stall_s must flip it."""
    import threading
    import time

    root, manager = world
    engine = _engine(world)
    aeng = AsyncEngine(engine, None, "tiny", {}, max_model_len=64, max_waiting=8, step_stall_s=0.3)
    release = threading.Event()
    real_step = engine.step

    def stuck_step(lock=None):
        release.wait(5)  # a step that hangs until the test lets it go
        return real_step(lock)

    engine.step = stuck_step
    aeng.start()
    try:
        assert aeng.stats()["step_loop_alive"]

        async def submit():
            agen = aeng.generate("s", [5, 6, 7], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
            return [d async for d in agen]

        result: list = []
        th = threading.Thread(target=lambda: result.append(asyncio.run(submit())))
        th.start()
        deadline = time.monotonic() + 5
        while aeng.stats()["step_loop_alive"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not aeng.stats()["step_loop_alive"]
        release.set()
        th.join(10)
        assert result and result[0][-1].finished
        assert aeng.stats()["step_loop_alive"]
    finally:
        release.set()
        aeng.shutdown(0)


def test_adapter_that_cannot_load_fails_only_its_requests(world, tmp_path):
    """A stored adapter whose files no longer match its hash (changed behind the server's back)
    fails its own requests with an error; the step's other requests are recomputed and finish
    with exactly the tokens they get alone."""
    from safetensors.torch import save

    root, shared = world
    manager = AdapterManager(tmp_path, shared.spec)
    files = {}
    for i, name in enumerate(("good", "bad")):
        tensors = {k: v * 3.0 for k, v in make_tensors(spec=manager.spec, r=4, seed=40 + i).items()}
        files[name] = (make_config(r=4, alpha=8), save(tensors))
        manager.upload(name, *files[name])
    # The store now holds other weights than the ones registered: loading "bad" must fail.
    (tmp_path / "bad" / "adapter_model.safetensors").write_bytes(files["good"][1])

    reqs = [("base", [9, 8, 7, 6], None, 6), ("g", [5, 4, 3], "good", 6), ("b", [7, 7, 7, 7, 7], "bad", 6)]
    engine = build_llm_engine(load_model(root, dtype="float32", device="cpu"), manager=manager,
                              kv_cache_tokens=1024, cache=CacheConfig(block_size=4))
    out = _run(engine, manager, reqs)
    assert out["b"][2] == "error" and out["b"][0] == []
    assert engine.scheduler.num_preemptions >= 2  # base and good were recomputed, not dropped
    for rid in ("base", "g"):
        alone_engine = build_llm_engine(load_model(root, dtype="float32", device="cpu"), manager=manager,
                                        kv_cache_tokens=1024, cache=CacheConfig(block_size=4))
        alone = _run(alone_engine, manager, [r for r in reqs if r[0] == rid])[rid]
        assert out[rid][0] == alone[0] and out[rid][2] == "length", rid
    bm = engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not engine.has_unfinished()
