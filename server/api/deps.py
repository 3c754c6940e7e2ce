"""FastAPI dependencies as `Annotated` aliases: state, engine, settings, and the two auth scopes.

Auth is a dependency attached to every router (never path-prefix middleware: routing and auth must
see the same path, cf. CVE-2026-48746). Policy, decided once here:
- no key configured: every route is open;
- any key configured: deny by default. Inference routes (completions, chat, models, adapter
  listing) accept the inference key or the admin key; admin routes (adapter upload/delete) accept
  only the admin key, or the inference key when no admin key is set (single-key mode, like vLLM).
  With only an admin key, inference needs the admin key too.
Keys are compared as sha256 digests with `secrets.compare_digest`, every configured key checked
(no early exit), so timing reveals neither the key nor which one matched.
/health, /ready and /metrics carry no auth dependency.
"""
from __future__ import annotations

import hashlib
import secrets
from typing import Annotated

from fastapi import Depends, Request

from server.api.errors import APIError
from server.api.state import ServerState
from server.engine.client import EngineClient
from server.settings import ServerSettings


def get_state(request: Request) -> ServerState:
    return request.app.state.loramux


def get_settings(request: Request) -> ServerSettings:
    return request.app.state.loramux.settings


def get_engine(request: Request) -> EngineClient:
    engine = request.app.state.loramux.engine
    if engine is None:
        raise APIError(503, "engine is not loaded yet", code="not_ready", headers={"Retry-After": "1"})
    return engine


StateDep = Annotated[ServerState, Depends(get_state)]
SettingsDep = Annotated[ServerSettings, Depends(get_settings)]
EngineDep = Annotated[EngineClient, Depends(get_engine)]


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def _matches(presented: bytes, key: str | None) -> bool:
    # Always runs the comparison (against a dummy when the key is unset) to keep timing flat.
    expected = _digest(key) if key else _digest("\0unset\0")
    return secrets.compare_digest(presented, expected) and key is not None


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def _scope_of(request: Request, settings: ServerSettings) -> str | None:
    """'admin', 'inference' or None for the presented bearer token."""
    token = _bearer(request)
    if token is None:
        raise _unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    presented = _digest(token)
    is_admin = _matches(presented, settings.admin_key)
    is_inference = _matches(presented, settings.api_key)
    if is_admin:
        return "admin"
    if is_inference:
        return "inference"
    raise _unauthorized("invalid API key")


def require_inference(request: Request, settings: SettingsDep) -> None:
    if not settings.auth_enabled:
        return
    _scope_of(request, settings)


def require_admin(request: Request, settings: SettingsDep) -> None:
    if not settings.auth_enabled:
        return
    scope = _scope_of(request, settings)
    if scope == "admin" or (scope == "inference" and settings.admin_key is None):
        return
    raise APIError(403, "this route needs the admin key", code="insufficient_permissions")


InferenceAuth = Depends(require_inference)
AdminAuth = Depends(require_admin)
