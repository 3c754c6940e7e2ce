"""A tiny run of the many-adapters benchmark (server/bench/many_adapters.py): more adapters than the
host cache holds, served from disk on demand; the host cache never exceeds its bound; cold loads are
counted in the load-time histogram."""
from __future__ import annotations

import json


def test_many_adapters_bench_tiny(tmp_path, capsys):
    from server.bench.many_adapters import main

    out = tmp_path / "many.json"
    rc = main(["--shape", "tiny", "--dtype", "float32", "--adapters", "12", "--rank", "4", "--slots", "2",
               "--max-cpu-adapters", "3", "--requests", "24", "--batch", "4", "--new-tokens", "2",
               "--prompt-tokens", "4", "--zipf-alpha", "0.5", "--store", str(tmp_path / "store"), "--json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["distinct_adapters_used"] > r["max_cpu_adapters"]  # the workload needs the disk tier
    assert r["host_cache_peak"] <= 3
    assert r["loads_from_disk"] >= r["distinct_adapters_used"]  # every adapter's first load is cold
    assert r["load_histogram"]["disk"]["count"] == r["loads_from_disk"] and r["cold_load_mean_s"] > 0
    assert r["output_tokens_per_s"] > 0 and "host cache peak" in capsys.readouterr().out


def test_bad_sizes_are_refused(capsys):
    from server.bench.many_adapters import main

    assert main(["--slots", "8", "--max-cpu-adapters", "4"]) == 2
    assert "max-cpu-adapters" in capsys.readouterr().err
