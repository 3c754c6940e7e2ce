"""Pure-ASGI middleware: request body size guard, and per-request access log + HTTP metrics.

`BodySizeGuard` answers 413 from `Content-Length` before reading a byte, and counts streamed bytes
(chunked bodies, or a lying Content-Length) cutting the request at the limit: once over, whatever
the app tries to send is replaced by the 413. The limit is `max_upload_bytes` for the adapter
upload route and `max_body_bytes` everywhere else.

`AccessLog` writes one JSON line per request (id, route, status, latency, plus the fields the
generation path leaves in `scope["loramux.log"]`: adapter, token counts) and counts
`loramux_http_requests_total{route,status}` by route template (never the raw path: bounded labels).
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import APIError

log = logging.getLogger("loramux.requests")
UPLOAD_PATH = "/v1/adapters"


class _BodyTooLarge(Exception):
    pass


class BodySizeGuard:
    def __init__(self, app: ASGIApp, state: Any):
        self.app = app
        self.state = state

    def _limit(self, scope: Scope) -> int:
        s = self.state.settings
        upload = scope["method"] == "POST" and scope["path"].rstrip("/") == UPLOAD_PATH
        return s.max_upload_bytes if upload else s.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope)
        error = APIError(413, f"request body exceeds the {limit}-byte limit", code="request_too_large")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > limit
            except ValueError:
                too_big = False  # h11 rejects malformed lengths before we get here
            if too_big:
                await error.response()(scope, receive, send)
                return
        seen = 0
        over = False
        started = False

        async def guarded_receive() -> Message:
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    over = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if over:
                return  # the app's own answer to the cut body (often a 400) is dropped for our 413
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except _BodyTooLarge:
            pass
        except Exception:
            if not over:
                raise
        if over and not started:
            await error.response()(scope, receive, send)


class AccessLog:
    def __init__(self, app: ASGIApp, state: Any):
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.monotonic()
        fields: dict[str, Any] = {}
        scope["loramux.log"] = fields
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            if self.state.metrics is not None:
                self.state.metrics.count_http(template, status)
            line = {"id": fields.pop("id", None) or f"http-{uuid.uuid4().hex[:12]}",
                    "method": scope["method"], "route": template, "status": status,
                    "latency_s": round(time.monotonic() - t0, 4), **fields}
            log.info(json.dumps(line, separators=(",", ":")))
