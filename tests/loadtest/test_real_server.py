"""`loadtest.cli.main` end to end against a real uvicorn server running the REAL engine.

The tiny random Llama (tests/real_server.py) serves a small sweep: workloads distinct, identical
and base at concurrency 1 and 4, streaming, with 4 synthetic rank-4 adapters the tool builds from
GET /v1/models, uploads, and deletes again. Checked: the files written (JSON, CSV, PNG), every
request ok, non-zero throughput, the engine really batched (mean batch size from /metrics > 1 at
concurrency 4), and no adapter left behind, on disk or in the registry.
"""
from __future__ import annotations

import csv
import json

import httpx
import pytest

from loadtest.cli import main
from tests.real_server import save_tiny_model, tiny_server

PNG = b"\x89PNG\r\n\x1a\n"
REQUESTS = 8  # per level
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    model_dir = save_tiny_model(tmp_path_factory.mktemp("tiny"))
    adapter_dir = tmp_path_factory.mktemp("adapters")
    with tiny_server(model_dir, adapter_dir) as server:
        server.adapter_dir = adapter_dir
        yield server


def test_sweep_against_the_real_engine(live, tmp_path, capsys):
    out = tmp_path / "run"
    stats_before = live.engine.stats()
    rc = main([
        "--url", live.url, "--workload", "distinct,identical,base", "--concurrency", "1,4",
        "--requests", str(REQUESTS), "--prompt-tokens", "6:2", "--max-tokens", str(MAX_TOKENS), "--stream",
        "--upload-synthetic", "4", "--rank", "4", "--token-id-range", "3:250", "--seed", "1",
        "--timeout", "60", "--out", str(out), "--no-progress",
    ])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    records = json.loads((out / "results.json").read_text())
    assert [(r["workload"], r["concurrency"]) for r in records] == [
        ("distinct", 1), ("distinct", 4), ("identical", 1), ("identical", 4), ("base", 1), ("base", 4)]
    for r in records:
        assert r["ok"] == REQUESTS and r["failed"] == 0 and r["failed_by_reason"] == {}, r
        assert r["output_tokens_per_s"] > 0 and r["requests_per_s"] > 0
        # ignore_eos holds every answer to MAX_TOKENS tokens: throughput is that count over the wall time.
        assert r["output_tokens_per_s"] == pytest.approx(REQUESTS * MAX_TOKENS / r["duration_s"])
        assert r["ttft_ms"]["p50"] > 0 and r["e2e_ms"]["p50"] >= r["ttft_ms"]["p50"]
        assert r["mean_batch_size"] is not None and 1.0 <= r["mean_batch_size"] <= r["concurrency"] + 1e-9
    assert [r["distinct_adapters"] for r in records][4:] == [0, 0]
    assert all(r["distinct_adapters"] >= 1 for r in records[:4])
    # Concurrency 4 really put several sequences in one engine step for some workload.
    assert max(r["mean_batch_size"] for r in records if r["concurrency"] == 4) > 1.0
    # The engine generated (at least) every token the tool counted.
    generated = live.engine.stats()["generation_tokens"] - stats_before["generation_tokens"]
    assert generated >= len(records) * REQUESTS * MAX_TOKENS
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [row["workload"] for row in rows] == [r["workload"] for r in records]
    for png in ("throughput.png", "latency.png"):
        assert (out / png).read_bytes()[:8] == PNG
    assert "out tok/s" in captured.out
    # Every synthetic adapter is gone again: API, registry and disk.
    with httpx.Client(base_url=live.url, timeout=30) as http:
        assert http.get("/v1/adapters").json()["data"] == []
    assert live.engine.adapters.list() == []
    assert [p for p in live.adapter_dir.iterdir() if not p.name.startswith(".")] == []  # the version ledger stays
