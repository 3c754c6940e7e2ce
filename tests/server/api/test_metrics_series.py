"""Issue #16: the per-adapter latency histograms are bounded (at most `max_series` adapter names,
then "other"; an idle name makes room) and a deleted adapter's series are removed."""
from __future__ import annotations

import re

from tests.server.api.conftest import upload


def _adapter_labels(text: str) -> set[str]:
    return set(re.findall(r'loramux_e2e_request_latency_seconds_count\{adapter="([^"]+)"\}', text))


def _complete(client, adapter: str | None) -> None:
    body = {"prompt": "x", "max_tokens": 1, **({"adapter": adapter} if adapter else {})}
    assert client.post("/v1/completions", json=body).status_code == 200


def test_adapter_series_are_bounded_and_dropped_on_delete(client):
    metrics = client.app.state.loramux.metrics
    metrics.max_series = 3
    names = [f"ad{i}" for i in range(6)]
    for name in names:
        assert upload(client, name).status_code == 201
    _complete(client, None)
    for name in names:
        _complete(client, name)
    labels = _adapter_labels(client.get("/metrics").text)
    assert labels == {"base", "ad0", "ad1", "ad2", "other"}  # busy names keep theirs; the rest: "other"

    assert client.delete("/v1/adapters/ad1").status_code == 200
    labels = _adapter_labels(client.get("/metrics").text)
    assert "ad1" not in labels and labels == {"base", "ad0", "ad2", "other"}
    _complete(client, "ad5")  # the freed place goes to the next adapter seen
    assert "ad5" in _adapter_labels(client.get("/metrics").text)

    metrics.idle_s = 0.0  # every series counts as idle: the least recently seen one makes room
    _complete(client, "ad4")
    labels = _adapter_labels(client.get("/metrics").text)
    assert "ad4" in labels and "ad0" not in labels and len(labels - {"base", "other"}) == 3
