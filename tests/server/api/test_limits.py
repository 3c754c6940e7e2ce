"""Every limit is a 4xx in OpenAI's error shape naming the field, and nothing reaches the engine."""
from __future__ import annotations

import pytest

from server.settings import ServerSettings

MSG = [{"role": "user", "content": "hi"}]
CASES = [
    # (route, body, status, param)
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[]]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "n": 5}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": "s" * 257}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "temperature": 2.5}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": -0.1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_k": -2}, 400, "top_k"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 500}, 400, "max_tokens"),  # 1 + 500 > 64
    ("/v1/completions", {"prompt": "x" * 64}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 260]}, 400, "prompt"),  # vocab is 260
    ("/v1/completions", {"prompt": [-1]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "echo": True, "logprobs": 1}, 400, "echo"),
    ("/v1/completions", {"prompt": "x", "no_such_field": 1}, 400, "no_such_field"),
    ("/v1/chat/completions", {"messages": MSG, "no_such_field": 1}, 400, "no_such_field"),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": 2.5}, 400, "frequency_penalty"),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"260": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {str(i): 1 for i in range(301)}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"messages": MSG, "response_format": {"type": "json_schema"}}, 400,
     "response_format.json_schema.schema"),
    ("/v1/chat/completions", {"messages": MSG, "response_format": {"type": "xml"}}, 400, "response_format.type"),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {}}, 400, "structured_outputs"),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"regex": "a", "grammar": "start: x"}}, 400,
     "structured_outputs.grammar"),
    ("/v1/completions", {"prompt": "x", "best_of": 2}, 400, "best_of"),
    ("/v1/completions", {"prompt": "x", "min_tokens": 20, "max_tokens": 4}, 400, "min_tokens"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": -3.0}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"messages": MSG, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": MSG, "max_tokens": 1000}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": MSG, "n": 9}, 400, "n"),
    ("/v1/chat/completions", {"messages": MSG, "temperature": 9}, 400, "temperature"),
]


@pytest.fixture
def limited(make_client, engine):
    engine.max_model_len = 64
    return make_client(ServerSettings(max_body_bytes=4096))


@pytest.mark.parametrize("route,body,status,param", CASES, ids=[f"{c[3]}-{i}" for i, c in enumerate(CASES)])
def test_limit(limited, engine, route, body, status, param):
    r = limited.post(route, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert engine.submitted == []


def test_body_too_large_from_content_length(limited, engine):
    r = limited.post("/v1/completions", json={"prompt": "x" * 5000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert engine.submitted == []


def test_body_too_large_streamed_without_content_length(limited, engine):
    def chunks():  # a generator body is sent chunked: no Content-Length for the guard to read
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    r = limited.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert engine.submitted == []


def test_invalid_json_is_400(limited, engine):
    r = limited.post("/v1/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_queue_full_503_retry_after(limited, engine):
    engine.full = True
    r = limited.post("/v1/completions", json={"prompt": "x"})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "queue_full" and engine.submitted == []


def test_error_bodies_never_leak_paths_or_tracebacks(make_client, engine):
    def boom(*a, **k):
        raise RuntimeError("failed at /home/user/secret/model.bin\nTraceback (most recent call last)")

    engine.adapters.list = boom
    client = make_client(raise_server_exceptions=False)
    r = client.get("/v1/adapters")
    assert r.status_code == 500
    text = r.text
    assert "/home" not in text and "Traceback" not in text and "secret" not in text
    assert r.json()["error"] == {"message": "internal server error", "type": "server_error", "param": None,
                                 "code": "internal_error"}


def test_scrub_removes_paths():
    from server.api.errors import scrub

    assert scrub("cannot open /srv/data/a.safetensors: bad") == "cannot open <path>: bad"
    assert scrub("bad\nTraceback") == "bad Traceback"


def test_404_405_shapes(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = client.get("/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["message"] == "method not allowed"
