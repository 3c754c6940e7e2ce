"""Completions and chat through the real app on the fake engine: JSON and SSE shapes, adapters,
the model-names-an-adapter convention, and unknown adapters (404, nothing submitted)."""
from __future__ import annotations

from tests.server.api.conftest import parse_sse, upload


def test_completion_json_shape_and_usage(client, engine):
    r = client.post("/v1/completions", json={"model": "fake-base", "prompt": "hello", "max_tokens": 7})
    assert r.status_code == 200
    body = r.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["model"] == "fake-base" and isinstance(body["created"], int)
    # The fake speaks "base " cyclically for the base model: 7 tokens -> "base ba".
    assert body["choices"] == [{"text": "base ba", "index": 0, "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    (rid, ids, params, ref), = engine.submitted
    assert ids == list(b"hello") and params.max_tokens == 7 and ref is None


def test_completion_with_adapter_field_and_model_convention(client, engine):
    assert upload(client, "pirate").status_code == 201
    a = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 6, "adapter": "pirate"}).json()
    b = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 6, "model": "pirate"}).json()
    c = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 6, "model": "fake-base",
                                             "adapter": "pirate"}).json()
    for body in (a, b, c):
        assert body["model"] == "pirate" and body["choices"][0]["text"] == "pirate"
    assert [s[3].name for s in engine.submitted] == ["pirate"] * 3
    # every request released its reference
    assert all(v == 0 for v in engine.adapters.inflight.values())


def test_model_and_adapter_disagree_is_400(client, engine):
    upload(client, "a1")
    upload(client, "a2")
    r = client.post("/v1/completions", json={"prompt": "x", "model": "a1", "adapter": "a2"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "adapter"
    assert engine.submitted == []


def test_unknown_adapter_404_nothing_submitted(client, engine):
    for body in ({"prompt": "x", "adapter": "ghost"}, {"prompt": "x", "model": "ghost"}):
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 404
        err = r.json()["error"]
        assert err["code"] == "adapter_not_found" and "ghost" in err["message"]
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                  "adapter": "ghost"})
    assert r.status_code == 404
    assert engine.submitted == []


def test_prompt_forms_and_n(client, engine):
    r = client.post("/v1/completions", json={"prompt": ["ab", "cde"], "max_tokens": 3, "n": 2, "seed": 5})
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"]["prompt_tokens"] == 5 and body["usage"]["completion_tokens"] == 12
    assert sorted(s[1] for s in engine.submitted) == [list(b"ab")] * 2 + [list(b"cde")] * 2
    assert sorted(s[2].seed for s in engine.submitted) == [5, 5, 6, 6]  # seed + j per sample
    engine.submitted.clear()
    client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 2})
    client.post("/v1/completions", json={"prompt": [[4, 5], [6]], "max_tokens": 2})
    assert [s[1] for s in engine.submitted][:1] == [[1, 2, 3]]
    assert sorted(s[1] for s in engine.submitted[1:]) == [[4, 5], [6]]


def test_completion_logprobs_shape(client):
    body = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "logprobs": 2}).json()
    lp = body["choices"][0]["logprobs"]
    assert lp["tokens"] == ["b", "a", "s"]
    assert lp["token_logprobs"] == [-0.1, -0.2, -0.3]
    assert lp["top_logprobs"][0] == {"c": -1.1, "d": -2.1}  # tokens b+1, b+2
    assert lp["text_offset"] == [0, 1, 2]


def test_stop_string_cut(client):
    body = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 10, "stop": "se"}).json()
    assert body["choices"][0]["text"] == "ba" and body["choices"][0]["finish_reason"] == "stop"


def test_completion_sse_chunks_usage_and_done(client):
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4, "stream": True,
                                             "stream_options": {"include_usage": True}, "adapter": None})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events, done = parse_sse(r.text)
    assert done
    *chunks, last = events
    assert "".join(c["choices"][0]["text"] for c in chunks) == "base"
    assert all(c["object"] == "text_completion" and c["id"] == events[0]["id"] for c in events)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "length"]
    assert last["choices"] == [] and last["usage"] == {"prompt_tokens": 2, "completion_tokens": 4,
                                                       "total_tokens": 6, "prompt_tokens_details": {"cached_tokens": 0}}


def test_sse_without_usage_has_no_usage_chunk(client):
    events, done = parse_sse(client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2,
                                                                  "stream": True}).text)
    assert done and all("usage" not in e for e in events)


def test_chat_json_and_template(client, engine):
    upload(client, "bot")
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    body = client.post("/v1/chat/completions", json={"model": "bot", "messages": msgs, "max_tokens": 3}).json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == "bot"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "bot"},
                                "logprobs": None, "finish_reason": "length"}]
    expected = list(b"<system>be brief\n<user>hi\n<assistant>")
    assert engine.submitted[0][1] == expected
    assert body["usage"]["prompt_tokens"] == len(expected)


def test_chat_default_max_tokens_fills_context(make_client, engine):
    engine.max_model_len = 40
    client = make_client()
    body = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    prompt = body["usage"]["prompt_tokens"]
    assert body["usage"]["completion_tokens"] == 40 - prompt


def test_chat_sse_and_logprobs(client):
    r = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True,
        "logprobs": True, "top_logprobs": 1, "stream_options": {"include_usage": True}})
    events, done = parse_sse(r.text)
    assert done
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [e for e in events if e["choices"] and e["choices"][0]["delta"].get("content")]
    assert "".join(e["choices"][0]["delta"]["content"] for e in content) == "ba"
    lp = content[0]["choices"][0]["logprobs"]["content"][0]
    assert lp["token"] == "b" and lp["logprob"] == -0.1 and lp["bytes"] == [98]
    assert lp["top_logprobs"] == [{"token": "c", "logprob": -1.1, "bytes": [99]}]
    final = [e for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert len(final) == 1 and final[0]["choices"][0]["delta"] == {}
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[-1]["usage"]["completion_tokens"] == 2


def test_chat_template_rejection_is_400(client, engine):
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "assistant", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert engine.submitted == []


def test_models_lists_base_and_adapters(client):
    upload(client, "pirate")
    data = client.get("/v1/models").json()["data"]
    base, ad = data
    assert base["id"] == "fake-base" and base["parent"] is None and base["owned_by"] == "loramux"
    assert base["loramux"]["projections"]["q_proj"] == [64, 64] and base["loramux"]["max_lora_rank"] == 64
    assert ad["id"] == "pirate" and ad["parent"] == "fake-base" and ad["object"] == "model"
    assert ad["loramux"]["rank"] == 8 and ad["loramux"]["version"] == 1
    assert client.get("/v1/models/pirate").json()["id"] == "pirate"
    assert client.get("/v1/models/fake-base").json()["parent"] is None
    r = client.get("/v1/models/ghost")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_delete_waits_for_in_flight_then_409(make_client, engine):
    from server.settings import ServerSettings

    client = make_client(ServerSettings(unload_timeout_s=0.1))
    upload(client, "busy")
    ref = engine.adapters.acquire("busy")  # a request in flight
    r = client.delete("/v1/adapters/busy")
    assert r.status_code == 409 and r.json()["error"]["code"] == "in_use"
    assert client.get("/v1/adapters/busy").status_code == 200  # still registered
    engine.adapters.release(ref)
    assert client.delete("/v1/adapters/busy").json()["deleted"] is True
    assert client.delete("/v1/adapters/busy").status_code == 404
