"""`python -m server.bench` end to end on a tiny random model: the JSON records the issue asks for,
the table, and the PEFT baseline on the same weights and adapters."""
from __future__ import annotations

import json

from server.bench import engine as bench


def test_bench_writes_records_with_floors_and_peft_baseline(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = bench.main(["--shape", "tiny", "--dtype", "float32", "--batch-sizes", "1,2", "--mixes", "none,distinct",
                     "--new-tokens", "3", "--prompt-tokens", "5", "--baseline", "peft", "--peft-batch-sizes", "2",
                     "--repeats", "2", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["rates"]["matmul_flops"] > 0 and data["rates"]["read_bytes_per_s"] > 0
    recs = {(r["mix"], r["batch_size"]): r for r in data["records"]}
    assert set(recs) == {("none", 1), ("distinct", 1), ("none", 2), ("distinct", 2), ("peft-none", 2),
                         ("peft-distinct", 2)}
    for r in recs.values():
        for key in ("mix", "batch_size", "dtype", "rank", "output_tokens_per_s", "step_ms", "floor_ms"):
            assert key in r, key
        assert r["dtype"] == "float32" and r["rank"] == 8
        assert r["output_tokens_per_s"] > 0 and r["step_ms"] > 0 and r["floor_ms"] > 0
    assert recs[("distinct", 2)]["distinct_adapters"] == 2 and recs[("none", 2)]["distinct_adapters"] == 0
    assert len(recs[("distinct", 2)]["repeats_tokens_per_s"]) == 2  # the point is the median of its repeats
    # a distinct step moves more bytes (each adapter's A and B) than a base-only one
    assert recs[("distinct", 2)]["floor_ms"] >= recs[("none", 2)]["floor_ms"]
    table = capsys.readouterr().out
    assert "| 2 | distinct |" in table and "vs PEFT same mix" in table


def test_bench_rejects_bad_mix(capsys):
    assert bench.main(["--shape", "tiny", "--mixes", "nope"]) == 2
    assert "--mixes" in capsys.readouterr().err
    assert bench.main(["--shape", "tiny", "--repeats", "0"]) == 2
