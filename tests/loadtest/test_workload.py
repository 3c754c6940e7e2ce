"""Workload generation: deterministic for a seed, and each adapter mix follows its definition."""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from loadtest.workload import (
    LengthDist,
    arrival_offsets,
    assign_adapters,
    make_requests,
    uniform_subset_size,
    zipf_probabilities,
)

POOL = [f"a{i}" for i in range(64)]


def _make(workload, n=200, seed=7, batch=16, pool=POOL, **kw):
    return make_requests(workload, n, pool, seed=seed, batch_size=batch, prompt_len=LengthDist.parse("8:2"),
                         output_len=LengthDist.parse("4-12"), **kw)


@pytest.mark.parametrize("workload", ["distinct", "uniform", "skewed", "identical", "base"])
def test_same_seed_same_requests_other_seed_differs(workload):
    a, b, c = _make(workload), _make(workload), _make(workload, seed=8)
    assert a == b
    assert [s.prompt for s in a] != [s.prompt for s in c]


def test_prompts_and_lengths_do_not_depend_on_the_workload():
    # One seed = one set of prompts, so workloads differ only in their adapters.
    d, b = _make("distinct"), _make("base")
    assert [(s.prompt, s.max_tokens) for s in d] == [(s.prompt, s.max_tokens) for s in b]


def test_distinct_every_request_its_own_adapter():
    specs = _make("distinct", n=50)
    assert len({s.adapter for s in specs}) == 50
    # A pool smaller than n is cycled: any window of len(pool) consecutive requests is all-distinct.
    small = _make("distinct", n=30, pool=POOL[:8])
    assert all(len({s.adapter for s in small[i : i + 8]}) == 8 for i in range(23))


@pytest.mark.parametrize("batch,k", [(1, 1), (4, 2), (5, 3), (16, 4), (32, 6), (64, 8)])
def test_uniform_uses_ceil_sqrt_n_adapters(batch, k):
    assert uniform_subset_size(batch) == k == math.ceil(math.sqrt(batch))
    counts = Counter(s.adapter for s in _make("uniform", n=4000, batch=batch))
    assert len(counts) == k
    # Equally popular: each within 15% of n/k (binomial sd at n=4000, k=8 is ~4%).
    assert all(abs(c - 4000 / k) < 0.15 * 4000 / k for c in counts.values())


def test_skewed_follows_zipf():
    alpha, n = 1.5, 20000
    pool = POOL[:4]
    # Hand-computed: weights 1, 2^-1.5, 3^-1.5, 4^-1.5 = 1, .35355, .19245, .125 (sum 1.67100).
    expected = [0.59844, 0.21158, 0.11517, 0.07481]
    assert np.allclose(zipf_probabilities(4, alpha), expected, atol=1e-4)
    counts = Counter(s.adapter for s in _make("skewed", n=n, pool=pool, zipf_alpha=alpha))
    freqs = sorted((c / n for c in counts.values()), reverse=True)
    assert np.allclose(freqs, expected, atol=0.015)


def test_identical_and_base():
    assert len({s.adapter for s in _make("identical")}) == 1
    assert {s.adapter for s in _make("identical")} <= set(POOL)
    assert {s.adapter for s in _make("base", pool=[])} == {None}


def test_prompts_are_token_ids_of_the_drawn_length_in_range():
    specs = make_requests("base", 300, [], seed=1, batch_size=1, prompt_len=LengthDist.parse("16"),
                          output_len=LengthDist.parse("5"), token_range=(100, 200))
    assert all(len(s.prompt) == s.prompt_tokens == 16 for s in specs)
    assert all(100 <= t < 200 for s in specs for t in s.prompt)
    assert {s.max_tokens for s in specs} == {5}
    words = make_requests("base", 3, [], seed=1, batch_size=1, prompt_len=LengthDist.parse("6"),
                          output_len=LengthDist.parse("5"), prompt_mode="words")
    assert all(isinstance(s.prompt, str) and len(s.prompt.split()) == 6 for s in words)


def test_length_distributions():
    rng = np.random.default_rng(0)
    normal = LengthDist.parse("64:8").sample(rng, 20000)
    assert abs(normal.mean() - 64) < 0.5 and abs(normal.std() - 8) < 0.5
    uni = LengthDist.parse("10-20").sample(rng, 20000)
    assert uni.min() == 10 and uni.max() == 20 and abs(uni.mean() - 15) < 0.2
    assert LengthDist.parse("5:50").sample(rng, 1000).min() >= 1  # clamped, never 0 tokens
    for bad in ("", "abc", "0", "10-5", "1:2:3"):
        with pytest.raises(ValueError):
            LengthDist.parse(bad)


def test_disconnect_fraction_and_points():
    specs = _make("base", n=4000, disconnect_fraction=0.25)
    cut = [s for s in specs if s.disconnect_after is not None]
    assert abs(len(cut) / 4000 - 0.25) < 0.03
    assert all(1 <= s.disconnect_after < s.max_tokens for s in cut)


def test_arrivals_poisson_and_bursty():
    rng = np.random.default_rng(3)
    t = arrival_offsets(20001, rate=50.0, burstiness=1.0, rng=rng)
    gaps = np.diff(t)
    assert t[0] == 0 and abs(gaps.mean() - 1 / 50) < 0.001
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.05  # exponential: coefficient of variation 1
    bursty = np.diff(arrival_offsets(20001, rate=50.0, burstiness=0.25, rng=rng))
    assert abs(bursty.mean() - 1 / 50) < 0.002 and abs(bursty.std() / bursty.mean() - 2.0) < 0.15  # cv = 1/sqrt(k)


def test_bad_inputs_raise_value_error():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown workload"):
        assign_adapters("zipfy", 3, POOL, 4, rng)
    with pytest.raises(ValueError, match="needs adapters"):
        assign_adapters("distinct", 3, [], 4, rng)
    with pytest.raises(ValueError):
        _make("base", disconnect_fraction=1.5)
    with pytest.raises(ValueError):
        arrival_offsets(3, rate=0, burstiness=1, rng=rng)
