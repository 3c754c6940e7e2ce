"""Fixtures for the HTTP tests: a fake engine, the real app around it, helpers to parse SSE and to
upload fake adapters."""
from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.settings import ServerSettings
from tests.server.api.fake_engine import FakeEngine

CONFIG = json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}).encode()
WEIGHTS = b"SAFE" + b"\0" * 60


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def make_client(engine):
    clients = []

    def make(settings: ServerSettings | None = None, eng: FakeEngine | None = None, **kw) -> TestClient:
        app = create_app(eng or engine, settings or ServerSettings())
        client = TestClient(app, **kw)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client()


def parse_sse(text: str) -> tuple[list[dict], bool]:
    """(JSON events, whether the stream ended with [DONE] as its last event)."""
    events, done = [], False
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        assert not done, "event after [DONE]"
        if payload == "[DONE]":
            done = True
        else:
            events.append(json.loads(payload))
    return events, done


def upload(client: TestClient, name: str, *, replace: bool = False, config: bytes = CONFIG,
           weights: bytes = WEIGHTS, headers: dict | None = None):
    data = {"name": name}
    if replace:
        data["replace"] = "true"
    files = {"config": ("adapter_config.json", config, "application/json"),
             "weights": ("adapter_model.safetensors", weights, "application/octet-stream")}
    return client.post("/v1/adapters", data=data, files=files, headers=headers or {})
