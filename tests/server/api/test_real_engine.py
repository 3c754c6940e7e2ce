"""The HTTP server on a real uvicorn socket with the REAL engine (tiny random Llama, real adapters).

One module-scoped server: `build_async_engine(settings)` (model, adapter manager, slot pool,
scheduler, runner, engine thread) behind `create_app`, on 127.0.0.1. Every greedy answer is
checked against an independent path: a second plain copy of the model (adapters merged into its
weights, W += scaling * B @ A) decoded by `greedy_generate`, and the raw `tokenizers` files.
Uploads, replaces, deletes and validation failures go through HTTP and are checked on disk and in
the registry, while other traffic runs and must see zero failures.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest
from tokenizers import Tokenizer

from tests.real_server import (
    BackgroundStreams,
    N,
    World,
    adapter_files,
    bad_uploads,
    content_sha,
    multipart,
    save_tiny_model,
    tiny_server,
    wait_until,
)
from tests.server.api.conftest import parse_sse

PROMPT = [72, 101, 108, 108, 111, 44, 32, 119]  # token ids; the byte tokenizer has 256


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    model_dir = save_tiny_model(tmp_path_factory.mktemp("tiny"))
    adapter_dir = tmp_path_factory.mktemp("adapters")
    with tiny_server(model_dir, adapter_dir) as live:
        engine = live.engine
        spec = engine.adapters.spec
        config, weights, tensors = adapter_files(spec, seed=7)
        engine.adapters.upload("alpha", config, weights)
        tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        yield World(live, engine, model_dir, adapter_dir, spec, tok, tensors)


def _complete(http, **body) -> dict:
    r = http.post("/v1/completions", json={"max_tokens": N, "temperature": 0, "ignore_eos": True, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_completions_json_and_sse_equal_the_reference(world):
    base_text = world.expected(PROMPT)
    alpha_text = world.expected(PROMPT, tensors=world.alpha)
    assert base_text != alpha_text  # the adapter changes greedy tokens: the checks below can fail
    name = world.engine.model_name
    with world.http as http:
        out = _complete(http, prompt=PROMPT, model=name)
        assert out["object"] == "text_completion" and out["model"] == name
        assert out["choices"][0]["text"] == base_text and out["choices"][0]["finish_reason"] == "length"
        usage = out["usage"]
        assert {k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")} == {
            "prompt_tokens": len(PROMPT), "completion_tokens": N, "total_tokens": len(PROMPT) + N}
        assert 0 <= usage["prompt_tokens_details"]["cached_tokens"] < len(PROMPT)
        # The adapter named by the `adapter` field or by `model` (vLLM style).
        assert _complete(http, prompt=PROMPT, adapter="alpha")["choices"][0]["text"] == alpha_text
        by_model = _complete(http, prompt=PROMPT, model="alpha")
        assert by_model["choices"][0]["text"] == alpha_text and by_model["model"] == "alpha"
        # A text prompt is tokenized like the raw tokenizer file does it.
        ids = world.tok.encode("Once upon", add_special_tokens=True).ids
        assert _complete(http, prompt="Once upon")["choices"][0]["text"] == world.expected(ids)
        for adapter, want in ((None, base_text), ("alpha", alpha_text)):
            r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": N, "temperature": 0,
                                                   "ignore_eos": True, "stream": True, "adapter": adapter,
                                                   "stream_options": {"include_usage": True}})
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events, done = parse_sse(r.text)
            assert done
            *chunks, last = events
            assert last["choices"] == [] and last["usage"]["completion_tokens"] == N
            assert all(c["object"] == "text_completion" and len(c["choices"]) == 1 for c in chunks)
            assert len({c["id"] for c in events}) == 1
            assert "".join(c["choices"][0]["text"] for c in chunks) == want
            reasons = [c["choices"][0]["finish_reason"] for c in chunks]
            assert reasons[-1] == "length" and set(reasons[:-1]) <= {None}


def test_chat_json_and_sse_equal_the_reference(world):
    messages = [{"role": "user", "content": "hi there"}]
    # The template of tests/server/model/tiny.py, rendered by hand: no special tokens added after it.
    ids = world.tok.encode("<user>hi there\n<assistant>", add_special_tokens=False).ids
    with world.http as http:
        for model, tensors in ((world.engine.model_name, None), ("alpha", world.alpha)):
            want = world.expected(ids, tensors=tensors)
            body = {"model": model, "messages": messages, "max_tokens": N, "temperature": 0, "ignore_eos": True}
            out = http.post("/v1/chat/completions", json=body).json()
            assert out["object"] == "chat.completion" and out["model"] == model
            choice = out["choices"][0]
            assert choice["message"] == {"role": "assistant", "content": want} and choice["finish_reason"] == "length"
            assert out["usage"]["prompt_tokens"] == len(ids) and out["usage"]["completion_tokens"] == N
            r = http.post("/v1/chat/completions", json={**body, "stream": True,
                                                        "stream_options": {"include_usage": True}})
            events, done = parse_sse(r.text)
            assert done and all(e["object"] == "chat.completion.chunk" for e in events)
            first, *middle, finish, usage = events
            assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
            assert "".join(e["choices"][0]["delta"]["content"] for e in middle) == want
            assert finish["choices"][0]["delta"] == {} and finish["choices"][0]["finish_reason"] == "length"
            assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == N


def test_unknown_adapter_404_and_nothing_enqueued(world):
    keys = ("prompt_tokens", "generation_tokens", "steps", "running", "waiting", "kv_blocks_used")
    assert wait_until(lambda: world.engine.stats()["running"] == 0)
    before = {k: world.engine.stats()[k] for k in keys}
    with world.http as http:
        for body in ({"adapter": "nope"}, {"model": "nope"}):
            r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, **body})
            assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found", r.text
        r = http.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 404
    assert {k: world.engine.stats()[k] for k in keys} == before


def test_official_openai_client(world):
    client = openai.OpenAI(base_url=world.live.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    extra = {"ignore_eos": True}
    c = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=N, temperature=0, extra_body=extra)
    assert c.choices[0].text == world.expected(PROMPT, tensors=world.alpha) and c.usage.completion_tokens == N
    ids = world.tok.encode("<user>hello\n<assistant>", add_special_tokens=False).ids
    chat = client.chat.completions.create(model=world.engine.model_name, max_tokens=N, temperature=0,
                                          messages=[{"role": "user", "content": "hello"}], extra_body=extra)
    assert chat.choices[0].message.content == world.expected(ids) and chat.choices[0].finish_reason == "length"
    stream = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hello"}],
                                            max_tokens=N, temperature=0, stream=True, extra_body=extra,
                                            stream_options={"include_usage": True})
    parts, usage = [], None
    for chunk in stream:
        parts += [ch.delta.content or "" for ch in chunk.choices]
        usage = chunk.usage or usage
    assert "".join(parts) == world.expected(ids, tensors=world.alpha) and usage.completion_tokens == N
    text = "".join(ch.choices[0].text for ch in client.completions.create(
        model=world.engine.model_name, prompt=PROMPT, max_tokens=N, temperature=0, stream=True, extra_body=extra))
    assert text == world.expected(PROMPT)
    assert {m.id for m in client.models.list().data} >= {world.engine.model_name, "alpha"}
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-adapter", prompt=PROMPT, max_tokens=2)


def test_adapter_lifecycle_while_another_stream_produces(world):
    registry = world.engine.adapters.registry
    cfg1, w1, t1 = adapter_files(world.spec, r=4, seed=21)
    cfg2, w2, t2 = adapter_files(world.spec, r=8, modules=("q_proj", "v_proj", "down_proj"), seed=22)
    long_n = 900  # long enough to still be running when the replace lands
    with BackgroundStreams(world.live.url, [5, 6, 7], max_tokens=400) as bg, world.http as http:
        assert wait_until(lambda: len(bg.stamps) > 3)
        t_start = time.monotonic()
        r = http.post("/v1/adapters", **multipart("tenant", cfg1, w1))
        assert r.status_code == 201, r.text
        assert r.json()["version"] == 1 and r.json()["rank"] == 4 and r.json()["sha256"] == content_sha(cfg1, w1)
        listed = {a["name"]: a for a in http.get("/v1/adapters").json()["data"]}
        assert listed["tenant"]["version"] == 1 and (world.adapter_dir / "tenant").is_dir()
        v1_text = _complete(http, prompt=PROMPT, adapter="tenant")["choices"][0]["text"]
        assert v1_text == world.expected(PROMPT, tensors=t1) and v1_text != world.expected(PROMPT)
        v1_ref = registry.get("tenant")

        # A long v1 request is in flight across the replace.
        body = {"prompt": PROMPT, "max_tokens": long_n, "temperature": 0, "ignore_eos": True, "stream": True,
                "adapter": "tenant"}
        with world.http as http2, http2.stream("POST", "/v1/completions", json=body) as s:
            lines = s.iter_lines()
            first = next(lines)
            assert first.startswith("data: ")
            r = http.post("/v1/adapters", **multipart("tenant", cfg2, w2, replace=True))
            assert r.status_code == 201 and r.json()["version"] == 2 and r.json()["rank"] == 8, r.text
            assert r.json()["sha256"] == content_sha(cfg2, w2)
            assert registry.in_flight(v1_ref) == 1, "the v1 request ended before the replace: no overlap shown"
            v2_text = _complete(http, prompt=PROMPT, adapter="tenant")["choices"][0]["text"]
            data = [first] + [line for line in lines if line]
            events, done = parse_sse("\n\n".join(data) + "\n\n")
        # The request that started on v1 ran to its end on v1; new requests use v2.
        assert done and events[-1]["choices"][0]["finish_reason"] == "length"
        assert "".join(e["choices"][0]["text"] for e in events) == world.expected(PROMPT, long_n, tensors=t1)
        assert v2_text == world.expected(PROMPT, tensors=t2) and v2_text != v1_text
        assert wait_until(lambda: registry.in_flight(v1_ref) == 0)

        assert http.delete("/v1/adapters/tenant").status_code == 200
        assert http.get("/v1/adapters/tenant").status_code == 404
        r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "adapter": "tenant"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found"
        assert "tenant" not in world.on_disk() and "tenant" not in registry
        t_end = time.monotonic()
    assert bg.failures == [] and bg.tokens_between(t_start, t_end) > 0


def test_bad_uploads_4xx_nothing_stored_and_traffic_unharmed(world):
    disk_before = world.on_disk()
    names_before = sorted(a.name for a in world.engine.adapters.list())
    statuses: list[int] = []
    stop = threading.Event()

    def adapter_traffic():
        with world.http as http:
            while not stop.is_set() or len(statuses) < 3:
                statuses.append(http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8,
                                                                   "adapter": "alpha"}).status_code)

    t = threading.Thread(target=adapter_traffic)
    with BackgroundStreams(world.live.url, [9, 9, 9], max_tokens=200) as bg, world.http as http:
        t.start()
        assert wait_until(lambda: len(bg.stamps) > 3)
        t0 = time.monotonic()
        for code, kwargs in bad_uploads(world.spec):
            r = http.post("/v1/adapters", **kwargs)
            assert 400 <= r.status_code < 500 and r.json()["error"]["code"] == code, (code, r.text)
            assert world.on_disk() == disk_before
            assert sorted(a["name"] for a in http.get("/v1/adapters").json()["data"]) == names_before
        t1 = time.monotonic()
        stop.set()
        t.join()
    assert set(statuses) == {200} and bg.failures == [] and bg.tokens_between(t0, t1) > 0
    assert sorted(a.name for a in world.engine.adapters.list()) == names_before


def test_twenty_concurrent_uploads_one_wins_on_disk(world):
    config, weights, _ = adapter_files(world.spec, r=2, modules=("q_proj",), seed=3)

    async def go():
        async with httpx.AsyncClient(base_url=world.live.url, timeout=60) as http:
            return await asyncio.gather(*[http.post("/v1/adapters", **multipart("race", config, weights))
                                          for _ in range(20)])

    responses = asyncio.run(go())
    assert sorted(r.status_code for r in responses) == [201] + [409] * 19
    assert {r.json()["error"]["code"] for r in responses if r.status_code == 409} == {"exists"}
    (won,) = [r.json() for r in responses if r.status_code == 201]
    assert won["version"] == 1 and won["sha256"] == content_sha(config, weights)
    # Exactly one complete directory, no half-written temp dirs left beside it.
    assert [n for n in world.on_disk() if "race" in n] == ["race"]
    d = world.adapter_dir / "race"
    assert (d / "adapter_config.json").read_bytes() == config
    assert (d / "adapter_model.safetensors").read_bytes() == weights
    assert json.loads((d / "loramux.json").read_text())["sha256"] == won["sha256"]
    with world.http as http:
        assert http.delete("/v1/adapters/race").status_code == 200
    assert "race" not in world.on_disk()


def test_disconnect_mid_stream_frees_kv(world):
    engine = world.engine
    assert wait_until(lambda: engine.stats()["running"] == 0)
    generated_before = engine.stats()["generation_tokens"]
    max_tokens = 1000
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "adapter": "alpha"}
    with world.http as http, http.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()  # keep a reference: a dropped line iterator closes the connection
        assert next(lines).startswith("data: ")
        st = engine.stats()
        assert st["running"] == 1 and st["kv_blocks_used"] > 0 and st["running_adapters"] == ["alpha"]
    # Leaving the block dropped the connection mid-stream: the request is aborted, its blocks freed.
    assert wait_until(lambda: engine.stats()["running"] == 0 and engine.stats()["kv_blocks_used"] == 0)
    assert engine.stats()["generation_tokens"] - generated_before < max_tokens  # it did not run to the end
    assert wait_until(lambda: world.live.app.state.loramux.inflight == 0)
    assert wait_until(lambda: world.engine.adapters.registry.in_flight(world.engine.adapters.registry.get("alpha"))
                      == 0)


def _metric(text: str, name: str) -> float:
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    assert len(values) == 1, name
    return values[0]


def test_metrics_after_traffic(world):
    with world.http as http:
        _complete(http, prompt=PROMPT, adapter="alpha")
        text = http.get("/metrics").text
    stats = world.engine.stats()
    assert _metric(text, "loramux_engine_steps_total") > 0
    assert _metric(text, "loramux_generation_tokens_total") >= N
    # The exposition reads the engine's own counters (both only grow; the scrape came first).
    assert _metric(text, "loramux_generation_tokens_total") <= stats["generation_tokens"]
    assert _metric(text, "loramux_adapter_slots_total") == stats["slots_total"] == 4
    assert 'loramux_e2e_request_latency_seconds_count{adapter="alpha"}' in text
    # alpha was loaded into a slot at least once: a cold load (from the store) is in the load histogram
    assert _metric(text, 'loramux_adapter_load_seconds_count{source="disk"}') >= 1


def test_models_report_cpu_fast_paths(world):
    """Operators can see whether the CPU fast paths are on: pre-packed linears, the fused LoRA kernel
    and the fused decoder-layer ops."""
    with httpx.Client(base_url=world.live.url, timeout=30) as http:
        r = http.get("/v1/models")
    assert r.status_code == 200
    base = next(m for m in r.json()["data"] if m["id"] == world.engine.model_name)
    info = base["loramux"]
    assert info["device"] == "cpu"
    assert info["cpu_prepacked_linears"] > 0  # every projection of the tiny model, plus lm_head
    assert info["cpu_lora_kernel"] == "loaded"
    assert info["cpu_fused_layer_ops"] is True
    assert info["cpu_decode_loop"] is True
    from kernels import cpu_ext

    own = cpu_ext.load().f32_gemm_available()  # our fp32 GEMM needs AVX-512; oneDNN packs otherwise
    assert info["cpu_own_gemm_linears"] == (info["cpu_prepacked_linears"] if own else 0)


def test_prefix_cache_through_http_reports_cached_tokens(world):
    """The same long prompt twice: the second finds its full blocks cached (usage says how many, as
    OpenAI reports them), answers the same text as the uncached reference; the adapter's first use of
    that text finds nothing (KV is per adapter version); /metrics and /v1/models show the cache."""
    prompt = [(37 * i) % 200 + 40 for i in range(40)]  # 2 full blocks of 16 + 8 tokens
    want = world.expected(prompt)
    with world.http as http:
        first, second = _complete(http, prompt=prompt), _complete(http, prompt=prompt)
        third = _complete(http, prompt=prompt, adapter="alpha")
        text = http.get("/metrics").text
        models = http.get("/v1/models").json()
    assert first["choices"][0]["text"] == second["choices"][0]["text"] == want
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert second["usage"]["prompt_tokens_details"] == {"cached_tokens": 32}
    assert third["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert _metric(text, "loramux_prefix_cache_hits_total") >= 32
    assert _metric(text, 'loramux_adapter_prefix_cache_hits_total{adapter="base"}') >= 32
    assert 0 < _metric(text, 'loramux_adapter_prefix_cache_hit_rate{adapter="base"}') <= 1
    info = next(m for m in models["data"] if m["id"] == world.engine.model_name)["loramux"]
    cfg = world.engine.engine.runner.model.config
    assert info["kv_bytes_per_token"] == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4
    assert info["prefix_caching"] is True and info["kv_block_size"] == 16
