"""Affinity from the server's arrivals counter: Δ(device + host) / Δ(all), per level of a run."""
from __future__ import annotations

import pytest

from loadtest.metrics import affinity, parse_prometheus
from loadtest.report import format_table


def _scrape(device: int, host: int, cold: int) -> dict[str, float]:
    return parse_prometheus(
        "# TYPE loramux_adapter_requests_total counter\n"
        f'loramux_adapter_requests_total{{resident="device"}} {device}.0\n'
        f'loramux_adapter_requests_total{{resident="host"}} {host}.0\n'
        f'loramux_adapter_requests_total{{resident="cold"}} {cold}.0\n')


def test_affinity_counts_device_and_host_hits_between_scrapes():
    before, after = _scrape(10, 5, 5), _scrape(100, 15, 15)
    assert after["loramux_adapter_requests_total"] == 130  # the summed value stays as before
    assert affinity(before, after) == pytest.approx((90 + 10) / 110)
    assert affinity(before, before) is None  # no adapter request in between
    assert affinity(None, after) is None
    assert affinity(before, {"loramux_engine_steps_total": 1.0}) is None  # a server without the counter


def test_table_shows_affinity():
    record = {"workload": "skewed", "concurrency": 32, "ok": 10, "failed": 0, "requests_per_s": 1.0,
              "output_tokens_per_s": 2.0, "total_tokens_per_s": 3.0, "mean_batch_size": 4.0, "affinity": 0.953,
              **{k: {"p50": 1.0, "p99": 2.0} for k in ("ttft_ms", "itl_ms", "e2e_ms")}}
    table = format_table([record])
    assert "affinity" in table.splitlines()[0] and "0.953" in table
