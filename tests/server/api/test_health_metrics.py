"""/health, /ready (loading, draining, stalled step loop), /metrics from engine.stats(), lifespan."""
from __future__ import annotations

from fastapi.testclient import TestClient

from server.api.app import create_app
from server.settings import ServerSettings
from tests.server.api.fake_engine import FakeEngine


def test_health_and_ready_states(client, engine):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").status_code == 200
    engine.ready = False
    r = client.get("/ready")
    assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
    engine.ready, engine.loop_alive = True, False
    assert client.get("/ready").json()["error"]["code"] == "engine_stalled"
    engine.loop_alive = True
    client.app.state.loramux.draining = True
    assert client.get("/ready").json()["error"]["code"] == "server_draining"
    r = client.post("/v1/completions", json={"prompt": "x"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "server_draining"
    assert client.get("/health").status_code == 200  # liveness is unaffected
    assert engine.submitted == []


def test_metrics_read_engine_stats_at_scrape(client, engine):
    engine.generated_tokens = 42
    text = client.get("/metrics").text
    assert "loramux_generation_tokens_total 42.0" in text
    assert "loramux_kv_cache_usage_ratio 0.0" in text
    assert "loramux_adapter_slots_total 8.0" in text
    assert 'loramux_lora_requests_info{max_lora="8",running_lora_adapters="",waiting_lora_adapters=""}' in text


def test_two_apps_in_one_process_have_separate_registries():
    a, b = FakeEngine(), FakeEngine()
    a.generated_tokens, b.generated_tokens = 1, 2
    with TestClient(create_app(a)) as ca, TestClient(create_app(b)) as cb:
        assert "loramux_generation_tokens_total 1.0" in ca.get("/metrics").text
        assert "loramux_generation_tokens_total 2.0" in cb.get("/metrics").text


def test_lifespan_builds_starts_and_drains_engine():
    built = []

    def factory(settings):
        built.append(settings)
        return FakeEngine()

    settings = ServerSettings(drain_timeout_s=3)
    app = create_app(factory, settings)
    with TestClient(app) as c:
        engine = app.state.loramux.engine
        assert built == [settings] and engine.started
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
    assert engine.shutdown_calls == [3] and app.state.loramux.draining


def test_request_log_is_one_json_line(client, caplog):
    import json
    import logging

    with caplog.at_level(logging.INFO, logger="loramux.requests"):
        client.post("/v1/completions", json={"prompt": "hey", "max_tokens": 3})
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "loramux.requests"]
    assert len(lines) == 1
    line = lines[0]
    assert line["id"].startswith("cmpl-") and line["adapter"] == "base" and line["status"] == 200
    assert line["prompt_tokens"] == 3 and line["completion_tokens"] == 3 and line["latency_s"] >= 0
