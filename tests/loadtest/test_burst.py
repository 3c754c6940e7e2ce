"""`loramux-loadtest --burst N` against the REAL engine (tiny model) run with a small queue: a burst
of 10x what the queue admits on top of steady traffic gets only 200s and 503s with Retry-After (the
tool counts anything else as unacceptable). The p99 and RSS figures are the benchmark's to report
(docs/reliability.md); a test does not assert speed."""
from __future__ import annotations

import json

from loadtest.cli import main
from tests.real_server import save_tiny_model, tiny_server


def test_burst_gets_only_200_and_503_with_retry_after(tmp_path):
    model_dir = save_tiny_model(tmp_path / "tiny")
    with tiny_server(model_dir, tmp_path / "adapters", max_waiting=2, max_batch_size=2) as live:
        out = tmp_path / "burst"
        main(["--url", live.url, "--burst", "20", "--concurrency", "2", "--duration", "2",
              "--prompt-tokens", "4", "--max-tokens", "4", "--token-id-range", "3:250", "--out", str(out)])
        result = json.loads((out / "burst.json").read_text())
        assert result["unacceptable"] == 0, result["statuses"]
        assert set(result["statuses"]) <= {"200", "503"} and result["statuses"].get("503", 0) > 0
        assert result["baseline"]["requests"] > 0 and result["during_burst"]["requests"] > 0
        assert live.engine.stats()["kv_blocks_used"] == 0
