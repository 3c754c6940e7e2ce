"""Structured output on the tiny random model (fast; runs without the embedded model): whatever a random
model prefers, the grammar masks force every output to match, in batches that mix the base model and two
adapters, and a finished grammar ends the request. `jsonschema` is the independent check.
"""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import pytest

from tests.real_server import adapter_files, save_tiny_model, tiny_server

# Finite schemas (enums, booleans, one-digit integers, closed objects): every path ends within a few
# dozen byte tokens, so a random model cannot run out of max_tokens.
SCHEMAS = [
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "d": {"type": "integer", "minimum": 0, "maximum": 9}},
     "required": ["ok", "d"], "additionalProperties": False},
    {"type": "object", "properties": {"c": {"enum": ["red", "green"]}, "in": {"type": "object", "properties": {
        "b": {"type": "boolean"}}, "required": ["b"], "additionalProperties": False}},
     "required": ["c", "in"], "additionalProperties": False},
    {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 2},
]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    model_dir = save_tiny_model(tmp_path_factory.mktemp("tiny"))
    with tiny_server(model_dir, tmp_path_factory.mktemp("adapters")) as live:
        for i, name in enumerate(("alpha", "beta")):
            config, weights, _ = adapter_files(live.engine.adapters.spec, seed=11 + i)
            live.engine.adapters.upload(name, config, weights)
        yield live


def _post(live, route, body):
    with httpx.Client(base_url=live.url, timeout=120) as http:
        return http.post(route, json=body)


def test_schemas_mixed_over_adapters_always_validate(live):
    models = (live.engine.model_name, "alpha", "beta")

    def one(i):
        schema = SCHEMAS[i % len(SCHEMAS)]
        body = {"model": models[i % 3], "prompt": "Hello", "max_tokens": 60, "temperature": 1.0, "seed": i,
                "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}}
        r = _post(live, "/v1/completions", body)
        assert r.status_code == 200, r.text
        return schema, r.json()["choices"][0]

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(24)))
    for schema, choice in results:
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["text"]), schema)


def test_regex_choice_and_chat_end_when_the_grammar_is_complete(live):
    r = _post(live, "/v1/completions", {"prompt": "x", "max_tokens": 30, "temperature": 1.0, "seed": 3, "n": 3,
                                        "structured_outputs": {"regex": "[0-9]{2}-[a-c]"}}).json()
    for c in r["choices"]:
        assert re.fullmatch(r"[0-9]{2}-[a-c]", c["text"]) and c["finish_reason"] == "stop", c
        assert r["usage"]["completion_tokens"] <= 3 * 5  # 4 bytes (+ EOS at most): the grammar ended it
    r = _post(live, "/v1/chat/completions", {
        "model": "alpha", "messages": [{"role": "user", "content": "pick"}], "max_tokens": 30, "temperature": 0,
        "logprobs": True, "top_logprobs": 2, "structured_outputs": {"choice": ["left", "right"]}}).json()
    c = r["choices"][0]
    assert c["message"]["content"] in ("left", "right") and c["finish_reason"] == "stop"
    # logprobs of the sampled (masked) distribution: finite numbers, never -inf in the JSON
    assert all(-9999.0 <= t["logprob"] <= 0.0 for t in c["logprobs"]["content"])


def test_streamed_structured_output(live):
    body = {"prompt": "x", "max_tokens": 40, "temperature": 1.0, "seed": 5, "stream": True,
            "structured_outputs": {"json": SCHEMAS[1]}}
    with httpx.Client(base_url=live.url, timeout=120) as http, http.stream("POST", "/v1/completions", json=body) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    jsonschema.validate(json.loads(text), SCHEMAS[1])


def test_logit_bias_penalties_and_echo(live):
    base = {"prompt": "Hi", "max_tokens": 3, "temperature": 0}
    a_id = str(live.engine.tokenizer.encode("A", add_special_tokens=False)[0])
    r = _post(live, "/v1/completions", {**base, "logit_bias": {a_id: 100}}).json()
    assert r["choices"][0]["text"] == "AAA"
    r = _post(live, "/v1/completions", {**base, "logit_bias": {a_id: 100}, "echo": True, "stream": False}).json()
    assert r["choices"][0]["text"] == "HiAAA"
    # a frequency penalty of 2 per repeat undoes a bias of +5 after a few 'A's
    r = _post(live, "/v1/completions", {**base, "max_tokens": 6, "logit_bias": {a_id: 5.0},
                                        "frequency_penalty": 2.0}).json()
    assert r["choices"][0]["text"].count("A") < 6
    r = _post(live, "/v1/completions", {**base, "echo": True, "logprobs": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "echo"
