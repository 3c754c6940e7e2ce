"""AdapterRegistry + SlotPool: in-flight accounting, unload waits, replace, LRU never evicts in use."""
from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from adapters.errors import AdapterBusy, AdapterExists, AdapterNotFound
from adapters.registry import AdapterRegistry
from adapters.slots import SlotPool
from adapters.spec import MODULE_INDEX, MODULES
from adapters.validate import ValidationLimits, validate_adapter
from tests.adapters.helpers import SPEC, make_adapter

LIMITS = ValidationLimits(max_rank=8)


def loaded(name, seed=0, r=4, **kw):
    return validate_adapter(name, *make_adapter(r=r, seed=seed, **kw), SPEC, LIMITS)


def setup(num_slots=2, host_cache_size=2):
    reg = AdapterRegistry()
    pool = SlotPool(SPEC, num_slots, 8, torch.float32, "cpu", host_cache_size, fetch=reg.weights)
    reg.add_retire_listener(lambda ref: pool.evict(ref.id))
    return reg, pool


def assert_slot_holds(pool, slot, adapter):
    """The slot's padded buffers equal the adapter's weights (zeros where it has none)."""
    for layer in range(SPEC.num_layers):
        for m in MODULES:
            w = adapter.weights.get((layer, m))
            a, b = pool.A[m][layer][slot], pool.B[m][layer][slot]
            s = pool.scaling[layer, MODULE_INDEX[m], slot]
            if w is None:
                assert not a.any() and not b.any() and s == 0
                continue
            assert torch.equal(a[: w.rank], w.a) and not a[w.rank:].any()
            assert torch.equal(b[:, : w.rank], w.b) and not b[:, w.rank:].any()
            assert s == pytest.approx(w.scaling)


def test_acquire_release_and_errors():
    reg, _ = setup()
    with pytest.raises(AdapterNotFound):
        reg.acquire("nope")
    ref = reg.register(loaded("a"))
    with pytest.raises(AdapterExists):
        reg.register(loaded("a"))
    assert reg.acquire("a") == ref and reg.in_flight(ref) == 1
    reg.release(ref)
    assert reg.in_flight(ref) == 0
    with pytest.raises(ValueError):
        reg.release(ref)
    assert [r.name for r in reg.list()] == ["a"] and ref.max_rank == 4 and ref.target_modules == MODULES


def test_unregister_waits_for_in_flight_then_frees_slot():
    reg, pool = setup()
    ref = reg.register(loaded("a"))
    held = reg.acquire("a")
    slot = pool.prepare([held])[held.id]
    done = threading.Event()
    t = threading.Thread(target=lambda: (reg.unregister("a", timeout_s=10), done.set()))
    t.start()
    time.sleep(0.1)
    assert not done.is_set()  # waiting for the in-flight request
    with pytest.raises(AdapterNotFound):
        reg.acquire("a")  # ... while no new request can take it
    assert pool.slot_of(ref.id) == slot  # still resident for the running request
    reg.release(held)
    t.join(5)
    assert done.is_set() and "a" not in reg and pool.slot_of(ref.id) is None


def test_unregister_timeout_keeps_adapter():
    reg, pool = setup()
    ref = reg.register(loaded("a"))
    held = reg.acquire("a")
    pool.prepare([held])
    with pytest.raises(AdapterBusy) as info:
        reg.unregister("a", timeout_s=0.05)
    assert info.value.http_status == 409 and info.value.in_flight == 1
    assert reg.get("a") == ref and pool.slot_of(ref.id) is not None
    reg.release(reg.acquire("a"))
    reg.release(held)
    reg.unregister("a", timeout_s=1)
    assert pool.slot_of(ref.id) is None


def test_replace_is_seen_by_new_acquires_only():
    reg, pool = setup(num_slots=2)
    old_w, new_w = loaded("a", seed=1), loaded("a", seed=2, r=8)
    old = reg.register(old_w)
    running = reg.acquire("a")
    old_slot = pool.prepare([running])[old.id]
    new = reg.register(new_w, replace=True)
    assert new.id != old.id and new.version == old.version + 1 and new.sha256 != old.sha256
    fresh = reg.acquire("a")
    assert fresh == new and running == old
    slots = pool.prepare([running, fresh])
    assert slots[old.id] == old_slot and slots[new.id] != old_slot
    assert_slot_holds(pool, slots[old.id], old_w)  # the old request still sees the old weights
    assert_slot_holds(pool, slots[new.id], new_w)
    reg.release(running)  # last user of v1: retired, slot freed
    assert pool.slot_of(old.id) is None and pool.slot_of(new.id) == slots[new.id]
    reg.release(fresh)


def test_prepare_more_refs_than_slots_is_refused():
    reg, pool = setup(num_slots=2)
    refs = [reg.register(loaded(f"a{i}", seed=i)) for i in range(3)]
    with pytest.raises(ValueError):
        pool.prepare(refs)


def test_lru_never_evicts_a_slot_in_use_over_a_stream_of_steps():
    reg, pool = setup(num_slots=3, host_cache_size=2)
    adapters = {f"a{i}": loaded(f"a{i}", seed=i, r=2 + 2 * (i % 4),
                                modules=MODULES[i % 7:] or MODULES) for i in range(7)}
    refs = {name: reg.register(w) for name, w in adapters.items()}
    rng = random.Random(0)
    requested = 0
    for _ in range(30):
        step = rng.sample(sorted(refs), rng.randint(1, 3))
        before = pool.resident()
        slots = pool.prepare([refs[n] for n in step])
        requested += len(step)
        assert len(set(slots.values())) == len(step)  # distinct slots per step
        for n in step:
            assert_slot_holds(pool, slots[refs[n].id], adapters[n])
            if refs[n].id in before:  # a hit keeps its slot
                assert slots[refs[n].id] == before[refs[n].id]
    assert pool.loads + pool.hits == requested and pool.loads > 3 and pool.hits > 0
    assert pool.evictions == pool.loads - len(pool.resident())
