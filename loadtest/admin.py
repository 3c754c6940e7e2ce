"""The server's non-completion surface as the load test uses it: models, adapter upload/delete.

Data flow: `fetch_server_info` (GET /v1/models) -> base model id, its `loramux` description
(shapes for synthetic adapters) and the adapters already registered; `upload_adapter` /
`delete_adapter` (POST / DELETE /v1/adapters, admin key) return an (HTTP status, reason) pair so
that churn can tally outcomes; `delete_adapters_sync` is the cleanup path that also runs after
Ctrl-C, outside any event loop.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import httpx

from loadtest.client import error_reason


class LoadTestError(Exception):
    """A condition that stops the run with a one-line message (unreachable server, bad setup)."""


@dataclass(frozen=True)
class ServerInfo:
    """What GET /v1/models says: the base model and the adapters registered on it."""

    base_id: str
    base_info: dict = field(default_factory=dict)  # the `loramux` block (may be empty)
    adapters: tuple[str, ...] = ()


def _auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


async def fetch_server_info(client: httpx.AsyncClient, api_key: str | None) -> ServerInfo:
    """GET /v1/models; raises LoadTestError when the server cannot be reached or answers oddly."""
    try:
        resp = await client.get("/v1/models", headers=_auth(api_key), timeout=15.0)
    except httpx.HTTPError as e:
        raise LoadTestError(f"cannot reach the server at {client.base_url}: {type(e).__name__}: {e}") from None
    if resp.status_code != 200:
        raise LoadTestError(f"GET /v1/models answered {resp.status_code}: {error_reason(resp.status_code, resp.content)}")
    try:
        data = resp.json()["data"]
        bases = [m for m in data if m.get("parent") is None]
        base = bases[0]
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise LoadTestError("GET /v1/models did not list a base model (is this a loramux server?)") from None
    adapters = tuple(str(m["id"]) for m in data if m.get("parent") == base["id"])
    return ServerInfo(str(base["id"]), dict(base.get("loramux") or {}), adapters)


async def upload_adapter(
    client: httpx.AsyncClient, name: str, config: bytes, weights: bytes, admin_key: str | None, replace: bool = False
) -> tuple[int | None, str]:
    """POST /v1/adapters (multipart); (status, "") on success, (status or None, reason) otherwise."""
    data = {"name": name}
    if replace:
        data["replace"] = "true"
    files = {
        "config": ("adapter_config.json", config, "application/json"),
        "weights": ("adapter_model.safetensors", weights, "application/octet-stream"),
    }
    try:
        resp = await client.post("/v1/adapters", data=data, files=files, headers=_auth(admin_key), timeout=120.0)
    except httpx.HTTPError as e:
        return None, type(e).__name__
    if resp.status_code in (200, 201):
        return resp.status_code, ""
    return resp.status_code, error_reason(resp.status_code, resp.content)


async def delete_adapter(client: httpx.AsyncClient, name: str, admin_key: str | None) -> tuple[int | None, str]:
    """DELETE /v1/adapters/{name}; same result shape as `upload_adapter`."""
    try:
        resp = await client.delete(f"/v1/adapters/{name}", headers=_auth(admin_key), timeout=120.0)
    except httpx.HTTPError as e:
        return None, type(e).__name__
    if resp.status_code in (200, 202, 204):
        return resp.status_code, ""
    return resp.status_code, error_reason(resp.status_code, resp.content)


def delete_adapters_sync(url: str, names: list[str], admin_key: str | None) -> list[str]:
    """Delete `names` with a fresh blocking client; returns the names that could not be deleted."""
    left = []
    with httpx.Client(base_url=url, timeout=60.0) as client:
        for name in names:
            try:
                resp = client.delete(f"/v1/adapters/{name}", headers=_auth(admin_key))
                # 404: already gone (e.g. deleted by churn or by hand) counts as cleaned up.
                if resp.status_code not in (200, 202, 204, 404):
                    left.append(name)
            except httpx.HTTPError:
                left.append(name)
    return left
