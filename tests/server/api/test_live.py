"""Against a real uvicorn on loopback: the official `openai` client, mid-stream and pre-answer
disconnects (the engine's abort / running set), and adapter churn while another stream produces."""
from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import openai
import pytest

from tests.server.api.conftest import CONFIG, WEIGHTS, parse_sse
from tests.server.api.fake_engine import FakeEngine
from tests.server.api.live import LiveServer


@pytest.fixture(scope="module")
def live():
    engine = FakeEngine(token_delay_s=0.003)
    with LiveServer(engine) as server:
        yield server


def _files(name: str, replace: bool = False):
    data = {"name": name, **({"replace": "true"} if replace else {})}
    files = {"config": ("adapter_config.json", CONFIG), "weights": ("adapter_model.safetensors", WEIGHTS)}
    return data, files


def test_openai_client_completions_chat_streaming(live):
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=20)
    c = client.completions.create(model="fake-base", prompt="hello", max_tokens=5)
    assert c.choices[0].text == "base " and c.usage.completion_tokens == 5
    chat = client.chat.completions.create(model="fake-base", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4)
    assert chat.choices[0].message.content == "base" and chat.choices[0].finish_reason == "length"
    stream = client.chat.completions.create(model="fake-base", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=6, stream=True, stream_options={"include_usage": True})
    parts, usage = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "".join(parts) == "base b" and usage.completion_tokens == 6
    text = "".join(ch.choices[0].text for ch in client.completions.create(
        model="fake-base", prompt="x", max_tokens=3, stream=True))
    assert text == "bas"
    models = client.models.list()
    assert [m.id for m in models.data][0] == "fake-base"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-adapter", prompt="x", max_tokens=2)


def test_disconnect_mid_stream_aborts(live):
    engine = live.engine
    with live.client() as http, http.stream("POST", "/v1/completions", json={
            "prompt": "long", "max_tokens": 400, "stream": True}) as r:
        lines = r.iter_lines()  # keep a reference: a dropped httpx line iterator closes the connection
        assert next(lines).startswith("data: {")
        assert len(engine.running) == 1
        rid = next(iter(engine.running))  # the stream is producing right now
        assert next(lines) == "" and next(lines).startswith("data: {")  # and it keeps producing
    # leaving the block closed the connection mid-stream
    assert live.wait_for(lambda: rid not in engine.running and rid in engine.aborted)
    assert live.wait_for(lambda: live.app.state.loramux.inflight == 0)


def test_disconnect_mid_stream_releases_adapter_ref(live):
    engine = live.engine
    engine.adapters.upload("held", CONFIG, WEIGHTS, replace=True)
    info = engine.adapters.get("held")
    with live.client() as http, http.stream("POST", "/v1/completions", json={
            "prompt": "p", "max_tokens": 400, "stream": True, "adapter": "held"}) as r:
        lines = r.iter_lines()  # keep a reference: a dropped httpx line iterator closes the connection
        assert next(lines).startswith("data: ")
        assert engine.adapters.inflight[info.id] == 1 and len(engine.running) == 1
    assert live.wait_for(lambda: engine.adapters.inflight[info.id] == 0)
    assert live.wait_for(lambda: not engine.running)


def test_disconnect_before_non_streamed_answer_aborts(live):
    engine = live.engine
    before = set(engine.aborted)
    body = b'{"prompt": "slow", "max_tokens": 400}'
    sock = socket.create_connection(("127.0.0.1", live.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    assert live.wait_for(lambda: len(engine.running) == 1)
    rid = next(iter(engine.running))
    sock.close()
    assert live.wait_for(lambda: rid in engine.aborted and rid not in engine.running)
    assert set(engine.aborted) - before == {rid}
    generated = [s for s in engine.submitted if s[0] == rid]
    assert generated and generated[0][2].max_tokens == 400


def test_adapter_lifecycle_while_streaming(live):
    engine = live.engine
    engine.adapters.upload_delay_s = 0.3  # blocking validation: must not stall other streams
    stamps: list[float] = []
    done = threading.Event()
    result = {}

    def streamer():
        with live.client() as http, http.stream("POST", "/v1/completions", json={
                "prompt": "s", "max_tokens": 500, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    stamps.append(time.monotonic())
            result["status"] = r.status_code
        done.set()

    t = threading.Thread(target=streamer)
    t.start()
    assert live.wait_for(lambda: len(stamps) > 3)
    with live.client() as http:
        t0 = time.monotonic()
        r = http.post("/v1/adapters", data=_files("tenant")[0], files=_files("tenant")[1])
        t1 = time.monotonic()
        assert r.status_code == 201 and r.json()["version"] == 1
        # tokens kept flowing while the upload was being validated in a worker thread
        assert sum(t0 < s < t1 for s in stamps) >= 3
        assert "tenant" in [a["name"] for a in http.get("/v1/adapters").json()["data"]]
        out = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 7, "adapter": "tenant"}).json()
        assert out["choices"][0]["text"] == "tenant "
        r = http.post("/v1/adapters", data=_files("tenant", replace=True)[0], files=_files("tenant")[1])
        assert r.status_code == 201 and r.json()["version"] == 2
        assert http.post("/v1/adapters", data=_files("tenant")[0], files=_files("tenant")[1]).status_code == 409
        assert http.delete("/v1/adapters/tenant").status_code == 200
        assert http.get("/v1/adapters/tenant").status_code == 404
        r = http.post("/v1/completions", json={"prompt": "x", "adapter": "tenant"})
        assert r.status_code == 404
    engine.adapters.upload_delay_s = 0.0
    assert done.wait(30)
    t.join()
    assert result["status"] == 200 and len(stamps) >= 500


def test_bad_uploads_get_4xx_and_good_traffic_sees_no_failure(live):
    bad = [
        ({"name": "../etc"}, CONFIG, WEIGHTS, 400, "bad_name"),
        ({"name": "okname"}, b"{not json", WEIGHTS, 400, "bad_config"),
        ({"name": "okname"}, b'{"r": 4096}', WEIGHTS, 400, "rank_too_large"),
        ({"name": "okname"}, CONFIG, b"\x80\x02pickle", 400, "not_safetensors"),
    ]
    with live.client() as http:
        assert http.post("/v1/adapters", data={"name": "good"}, files=_files("good")[1]).status_code in (201, 409)
        statuses = []

        def traffic():
            for _ in range(8):
                statuses.append(http.post("/v1/completions", json={"prompt": "x", "max_tokens": 3,
                                                                   "adapter": "good"}).status_code)

        t = threading.Thread(target=traffic)
        t.start()
        for data, cfg, w, status, code in bad:
            r = http.post("/v1/adapters", data=data, files={"config": ("c.json", cfg), "weights": ("w", w)})
            assert r.status_code == status and r.json()["error"]["code"] == code, r.text
        r = http.post("/v1/adapters", data={"name": "okname"}, files={"config": ("c.json", CONFIG)})
        assert r.status_code == 400 and r.json()["error"]["param"] == "weights"
        t.join()
        assert statuses == [200] * 8


def test_twenty_concurrent_uploads_one_wins(live):
    engine = live.engine
    engine.adapters.upload_delay_s = 0.05
    before = engine.adapters.uploads_committed

    async def go():
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
            return await asyncio.gather(*[
                http.post("/v1/adapters", data={"name": "race"}, files=_files("race")[1]) for _ in range(20)])

    try:
        responses = asyncio.run(go())
    finally:
        engine.adapters.upload_delay_s = 0.0
    codes = sorted(r.status_code for r in responses)
    assert codes == [201] + [409] * 19
    assert {r.json()["error"]["code"] for r in responses if r.status_code == 409} == {"exists"}
    assert engine.adapters.uploads_committed - before == 1
    assert engine.adapters.get("race").version == 1


def test_upload_too_large_413(make_client):
    from server.settings import ServerSettings

    client = make_client(ServerSettings(max_upload_bytes=1000))
    files = {"config": ("c.json", CONFIG), "weights": ("w", WEIGHTS + b"\0" * 2000)}
    r = client.post("/v1/adapters", data={"name": "big"}, files=files)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert client.app.state.loramux.engine.adapters.list() == []


def test_metrics_names_and_sse_over_real_socket(live):
    with live.client() as http:
        r = http.post("/v1/completions", json={"prompt": "m", "max_tokens": 3, "stream": True})
        events, done = parse_sse(r.text)
        assert done and len(events) == 3
        text = http.get("/metrics").text
    for name in ("loramux_requests_running", "loramux_requests_waiting", "loramux_kv_cache_usage_ratio",
                 "loramux_adapter_slots_used", "loramux_adapter_slots_total", "loramux_adapter_loads_total",
                 "loramux_adapter_evictions_total", "loramux_prompt_tokens_total",
                 "loramux_generation_tokens_total", "loramux_preemptions_total", "loramux_engine_steps_total",
                 "loramux_scheduled_sequences_total", "loramux_time_to_first_token_seconds_bucket",
                 "loramux_inter_token_latency_seconds_bucket", "loramux_e2e_request_latency_seconds_bucket",
                 "loramux_lora_requests_info", "loramux_http_requests_total"):
        assert f"\n{name}" in text, name
    assert 'loramux_e2e_request_latency_seconds_count{adapter="base"}' in text
    assert 'loramux_http_requests_total{route="/v1/completions",status="200"}' in text
