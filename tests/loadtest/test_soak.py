"""`loramux-loadtest --soak` end to end against the REAL engine (tiny model), briefly: traffic on
adapters that churn replaces and deletes while they serve, disconnects, bad uploads. Checked: the
report is written, no request or admin call failed unexpectedly (no 500, no hang, only 404/409 for
adapters churn got to first, 503 only with Retry-After), the KV blocks went back to their idle
level, the snapshots hold RSS, descriptors and threads, and no adapter was left behind. The
resource-drift checks need minutes: they are the 10-minute run's job (docs/reliability.md)."""
from __future__ import annotations

import json

from loadtest.cli import main
from tests.real_server import save_tiny_model, tiny_server


def test_soak_against_the_real_engine(tmp_path, capsys):
    model_dir = save_tiny_model(tmp_path / "tiny")
    with tiny_server(model_dir, tmp_path / "adapters", unload_timeout_s=2.0) as live:
        out = tmp_path / "soak"
        main(["--url", live.url, "--soak", "12", "--soak-warmup", "4", "--concurrency", "4", "--adapters", "3",
              "--rank", "4", "--prompt-tokens", "6", "--max-tokens", "16", "--token-id-range", "3:250",
              "--churn", "2", "--disconnect-fraction", "0.3", "--no-progress", "--out", str(out)])
        report = json.loads((out / "soak.json").read_text())
        assert report["unexpected"] == {}, report["unexpected"]
        assert report["checks"]["kv_blocks_back_to_idle"] and report["drained"]["kv_blocks_used"] == 0
        assert report["traffic"].get("completed", 0) > 0 and report["traffic"].get("disconnected", 0) > 0
        assert any(k.startswith("bad_upload 400") for k in report["churn"]) or report["seconds_run"] < 12
        for key in ("rss_bytes", "open_fds", "threads"):
            assert report["after_warmup"][key] > 0 and report["end"][key] > 0
        assert live.engine.adapters.list() == []  # the tool deleted what it uploaded
        assert "checks:" in capsys.readouterr().out
