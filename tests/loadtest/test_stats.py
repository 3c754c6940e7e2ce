"""Statistics on known inputs: percentiles by hand and against numpy, level summaries, metrics."""
from __future__ import annotations

import math

import numpy as np
import pytest

from loadtest.metrics import mean_batch_size, parse_prometheus
from loadtest.stats import RequestRecord, percentile, summarize_level, summary_ms


def test_percentile_hand_computed():
    xs = [4.0, 1.0, 3.0, 2.0]
    # sorted 1,2,3,4; rank (n-1)q: p50 -> 1.5 -> 2.5; p90 -> 2.7 -> 3.7; p99 -> 2.97 -> 3.97
    assert percentile(xs, 50) == pytest.approx(2.5)
    assert percentile(xs, 90) == pytest.approx(3.7)
    assert percentile(xs, 99) == pytest.approx(3.97)
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 4.0
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile(xs, 101)


def test_percentile_matches_numpy():
    xs = np.random.default_rng(0).lognormal(size=1001)
    for q in (1, 50, 90, 99, 99.9):
        assert percentile(xs.tolist(), q) == pytest.approx(np.percentile(xs, q), rel=1e-12)


def test_summary_ms_in_milliseconds():
    s = summary_ms([0.010, 0.020, 0.030])
    assert s == pytest.approx({"p50": 20.0, "p90": 28.0, "p99": 29.8, "mean": 20.0})
    assert summary_ms([]) == {"p50": None, "p90": None, "p99": None, "mean": None}


def test_summarize_level_counts_and_throughput():
    def ok(start, end, ttft, itl, out):
        return RequestRecord(ok=True, status=200, start=start, end=end, ttft=ttft, itl=itl,
                             prompt_tokens=10, output_tokens=out)

    records = [
        ok(0.0, 1.0, 0.2, [0.2, 0.2, 0.2, 0.2], 5),
        ok(0.0, 2.0, 0.4, [0.4, 0.4, 0.4, 0.4], 5),
        RequestRecord(status=503, reason="queue_full", start=0, end=0.1, prompt_tokens=10),
        RequestRecord(status=503, reason="queue_full", start=0, end=0.1, prompt_tokens=10),
        RequestRecord(status=None, reason="connect", start=0, end=0.1, prompt_tokens=10),
        RequestRecord(status=200, reason="disconnected", disconnected=True, start=0, end=0.5, output_tokens=2,
                      prompt_tokens=10),
    ]
    s = summarize_level(records, wall_s=4.0)
    assert (s["requests"], s["ok"], s["failed"], s["disconnected"]) == (6, 2, 3, 1)
    assert s["failed_by_reason"] == {"- connect": 1, "503 queue_full": 2}
    assert s["requests_per_s"] == pytest.approx(2 / 4)
    assert s["output_tokens_per_s"] == pytest.approx((5 + 5 + 2) / 4)  # dropped streams' tokens count
    assert s["total_tokens_per_s"] == pytest.approx((12 + 30) / 4)
    assert s["ttft_ms"]["p50"] == pytest.approx(300.0)
    assert s["itl_ms"]["p50"] == pytest.approx(300.0) and s["itl_ms"]["p99"] == pytest.approx(400.0)
    assert s["e2e_ms"]["p90"] == pytest.approx(1900.0)
    assert s["tpot_ms"]["mean"] == pytest.approx(((1.0 - 0.2) / 4 + (2.0 - 0.4) / 4) / 2 * 1000)


def test_prometheus_parsing_and_mean_batch_size():
    text = (
        "# HELP loramux_engine_steps_total steps\n# TYPE loramux_engine_steps_total counter\n"
        "loramux_engine_steps_total 100\n"
        'loramux_scheduled_sequences_total{kind="prefill",note="a b}"} 40\n'
        'loramux_scheduled_sequences_total{kind="decode"} 360 1700000000\n'
        "loramux_requests_running 3\nbogus_line\n"
    )
    before = parse_prometheus(text)
    assert before["loramux_engine_steps_total"] == 100
    assert before["loramux_scheduled_sequences_total"] == 400  # summed over label sets
    after = {"loramux_engine_steps_total": 150.0, "loramux_scheduled_sequences_total": 800.0}
    assert mean_batch_size(before, after) == pytest.approx(400 / 50)
    assert mean_batch_size(before, before) is None  # no steps in between
    assert mean_batch_size(None, after) is None
    assert mean_batch_size({"x": 1.0}, after) is None
