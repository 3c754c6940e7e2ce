"""The adapter load-time histogram: bucket arithmetic, and the slot pool telling cold loads (fetched
from the registry / store) from host-cache loads."""
from __future__ import annotations

import pytest
import torch

from adapters.load_times import BUCKETS, LoadTimes
from adapters.registry import AdapterRegistry
from adapters.slots import SlotPool
from adapters.validate import ValidationLimits, validate_adapter
from tests.adapters.helpers import SPEC, make_adapter


def test_buckets_sum_count_and_quantile():
    t = LoadTimes()
    for s in (0.0004, 0.003, 0.003, 0.2, 99.0):
        t.observe("disk", s)
    t.observe("host", 0.0002)
    snap = t.snapshot()
    assert snap["buckets"] == list(BUCKETS)
    disk = snap["disk"]
    assert disk["count"] == 5 and disk["sum"] == pytest.approx(99.2064)
    # cumulative: <=0.0005: 1, <=0.0025: 1, <=0.005: 3, ..., <=0.25: 4, +Inf: 5
    assert disk["cumulative"][BUCKETS.index(0.0005)] == 1
    assert disk["cumulative"][BUCKETS.index(0.005)] == 3
    assert disk["cumulative"][BUCKETS.index(0.25)] == 4 and disk["cumulative"][-1] == 5
    assert snap["host"]["count"] == 1
    assert t.quantile("disk", 0.5) == 0.005 and t.quantile("disk", 1.0) == float("inf")
    assert t.quantile("host", 0.5) == 0.0005
    with pytest.raises(ValueError, match="source"):
        t.observe("gpu", 1.0)


def test_pool_counts_cold_and_host_cache_loads():
    reg = AdapterRegistry()
    fetched = []
    pool = SlotPool(SPEC, 1, 8, torch.float32, "cpu", 2,
                    fetch=lambda ref: fetched.append(ref.name) or reg.weights(ref))
    limits = ValidationLimits(max_rank=8)
    refs = [reg.register(validate_adapter(n, *make_adapter(r=4, seed=i), SPEC, limits)) for i, n in enumerate("ab")]
    pool.prepare([refs[0]])  # cold: fetched
    pool.prepare([refs[1]])  # cold: fetched, evicts a from the one slot (a stays in the host cache)
    pool.prepare([refs[0]])  # from the host cache
    snap = pool.load_times.snapshot()
    assert fetched == ["a", "b"]
    assert snap["disk"]["count"] == 2 and snap["host"]["count"] == 1 and pool.loads == 3
