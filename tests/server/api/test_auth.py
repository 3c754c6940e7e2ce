"""Auth is default-deny on every route of the app (walked from app.routes), with two scopes."""
from __future__ import annotations

import pytest
from fastapi.routing import APIRoute

from server.settings import ServerSettings
from tests.server.api.conftest import upload

PUBLIC = {"/health", "/ready", "/metrics"}
ADMIN = {("POST", "/v1/adapters"), ("DELETE", "/v1/adapters/{name}")}
API, ADM = "inference-key", "admin-key"


def _routes(app):
    def walk(routes):
        for route in routes:
            if isinstance(route, APIRoute):
                yield from ((m, route.path) for m in sorted(route.methods - {"HEAD"}))
            elif hasattr(route, "original_router"):  # FastAPI >= 0.16x keeps included routers lazily
                yield from walk(route.original_router.routes)
            else:  # no docs pages, static mounts or bare Starlette routes outside the auth model
                raise AssertionError(f"unexpected non-API route {route!r}")

    return list(walk(app.routes))


def _call(client, method, path, key):
    url = path.replace("{name}", "pirate").replace("{model_id:path}", "pirate")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return client.request(method, url, headers=headers)


@pytest.fixture
def authed(make_client):
    return make_client(ServerSettings(api_key=API, admin_key=ADM))


def test_every_route_denies_without_valid_key(authed, engine):
    routes = list(_routes(authed.app))
    assert len(routes) >= 11
    for method, path in routes:
        for key in (None, "wrong", API.upper(), API + "x"):
            r = _call(authed, method, path, key)
            if path in PUBLIC:
                assert r.status_code != 401, (method, path)
                continue
            assert r.status_code == 401, (method, path, key, r.status_code)
            assert r.json()["error"]["type"] == "authentication_error"
            assert r.headers["www-authenticate"] == "Bearer"
    assert engine.submitted == []


def test_inference_key_scope(authed, engine):
    for method, path in _routes(authed.app):
        r = _call(authed, method, path, API)
        if (method, path) in ADMIN:
            assert r.status_code == 403, (method, path)
            assert r.json()["error"]["type"] == "permission_error"
        else:
            assert r.status_code not in (401, 403), (method, path)


def test_admin_key_allows_everything(authed, engine):
    for method, path in _routes(authed.app):
        r = _call(authed, method, path, ADM)
        assert r.status_code not in (401, 403), (method, path)
    h = {"Authorization": f"Bearer {ADM}"}
    assert upload(authed, "pirate", headers=h).status_code == 201
    r = authed.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "model": "pirate"}, headers=h)
    assert r.status_code == 200


def test_single_key_mode_and_admin_only_mode(make_client):
    single = make_client(ServerSettings(api_key=API))
    assert upload(single, "a", headers={"Authorization": f"Bearer {API}"}).status_code == 201
    assert upload(single, "b").status_code == 401
    admin_only = make_client(ServerSettings(admin_key=ADM))
    assert admin_only.get("/v1/models").status_code == 401
    assert admin_only.get("/v1/models", headers={"Authorization": f"Bearer {ADM}"}).status_code == 200


def test_no_keys_everything_open(client):
    assert client.get("/v1/models").status_code == 200
    assert upload(client, "x").status_code == 201
