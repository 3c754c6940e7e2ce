"""The LoRA-affinity metrics on the single server (no Ray): `lora_requests_info` unprefixed with vLLM's
label set, per-adapter residency by level, arrivals by residency, all through GET /metrics."""
from __future__ import annotations

import re

import httpx
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.api.metrics import MAX_ADAPTER_SERIES
from tests.real_server import adapter_files, multipart, save_tiny_model, tiny_server
from tests.server.api.fake_engine import FakeEngine


def _samples(text: str, name: str) -> dict[str, float]:
    """{label text: value} of one metric's samples."""
    out = {}
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{.*\}})? (\S+)$", line)
        if m:
            out[m.group(1) or ""] = float(m.group(2))
    return out


def test_lora_requests_info_labels_and_bounds():
    """Labels as vLLM names them; value = scrape time; at most MAX_ADAPTER_SERIES names per list."""
    engine = FakeEngine()
    many = [f"a{i:03d}" for i in range(MAX_ADAPTER_SERIES + 5)]
    engine.stats = lambda: {"running": 1, "slots_total": 4, "running_adapters": ["b", "a", "b"],
                            "waiting_adapters": many,
                            "adapter_residency": {"a": "device", "b": "host"} | dict.fromkeys(many, "host"),
                            "adapter_arrivals": {"device": 3, "host": 1, "cold": 2}}
    with TestClient(create_app(engine)) as client:
        text = client.get("/metrics").text
    [(labels, value)] = _samples(text, "lora_requests_info").items()
    waiting = ",".join([*many[:MAX_ADAPTER_SERIES], "other"])
    assert labels == f'{{max_lora="4",running_lora_adapters="a,b",waiting_lora_adapters="{waiting}"}}'
    assert value > 1.7e9  # a unix timestamp, as vLLM's gauge
    resident = _samples(text, "loramux_adapter_resident")
    assert resident['{adapter="a",level="device"}'] == 1.0
    assert len(resident) == MAX_ADAPTER_SERIES + 1  # device-resident "a" kept first, the rest under "other"
    assert resident['{adapter="other",level="host"}'] == 7.0  # 39 names held, 32 series kept
    assert _samples(text, "loramux_adapter_requests_total") == {
        '{resident="device"}': 3.0, '{resident="host"}': 1.0, '{resident="cold"}': 2.0}


def test_single_server_reports_residency_and_arrivals(tmp_path):
    """The real engine: the first request for an adapter arrives cold, the next finds it in a slot."""
    model_dir = save_tiny_model(tmp_path / "model")
    with tiny_server(model_dir, tmp_path / "adapters") as live, httpx.Client(base_url=live.url, timeout=60) as http:
        config, weights, _ = adapter_files(live.engine.adapters.spec, r=4)
        assert http.post("/v1/adapters", **multipart("pirate", config, weights)).status_code in (200, 201)
        body = {"prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0, "adapter": "pirate"}
        for _ in range(2):
            assert http.post("/v1/completions", json=body).status_code == 200
        text = http.get("/metrics").text
    assert _samples(text, "loramux_adapter_requests_total") == {
        '{resident="device"}': 1.0, '{resident="host"}': 0.0, '{resident="cold"}': 1.0}
    assert _samples(text, "loramux_adapter_resident") == {'{adapter="pirate",level="device"}': 1.0}
    [labels] = _samples(text, "lora_requests_info")
    assert labels == '{max_lora="4",running_lora_adapters="",waiting_lora_adapters=""}'
