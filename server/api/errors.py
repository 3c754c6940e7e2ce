"""Every HTTP error the server sends, in OpenAI's shape: `{"error": {message, type, param, code}}`.

Routes raise `APIError` (or helpers below build one); `install_error_handlers` maps FastAPI's own
errors (validation -> 400 naming the field, unknown route -> 404, wrong method -> 405) and any
unexpected exception (-> 500 with a fixed message) into the same shape. Messages that come from
exceptions pass through `scrub()` so no filesystem path or traceback ever reaches a client.
"""
from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters.errors import AdapterError

log = logging.getLogger("loramux.api")

# Default OpenAI-style `type` per status code.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}
# Absolute POSIX paths of two or more components, and Windows drive paths.
_PATH_RE = re.compile(r"(?:[A-Za-z]:\\|(?<![\w.])/)[^\s'\"():,]+(?:[/\\][^\s'\"():,]+)+")


def scrub(message: str, limit: int = 500) -> str:
    """One line, no filesystem paths, bounded length: safe to show a client."""
    line = " ".join(str(message).split())
    line = _PATH_RE.sub("<path>", line)
    return line if len(line) <= limit else line[: limit - 3] + "..."


class APIError(Exception):
    """An error response. `param` names the offending request field (OpenAI convention)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = scrub(message)
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_value_error(exc: ValueError, default_param: str | None = None) -> APIError:
    """ValueError("field: reason") (the SamplingParams convention) -> 400 with param=field."""
    text = str(exc)
    head, sep, _ = text.partition(":")
    param = head.strip() if sep and re.fullmatch(r"[A-Za-z_][\w.]*", head.strip()) else default_param
    return bad_request(text, param=param)


def from_adapter_error(exc: AdapterError, param: str | None = None) -> APIError:
    """adapters.errors.AdapterError -> its `http_status` (404 / 409 / 400), keeping its stable `.code`."""
    api_code = "adapter_not_found" if exc.code == "not_found" else exc.code
    return APIError(exc.http_status, exc.message, param=param, code=api_code)


def service_unavailable(message: str, code: str, retry_after_s: int = 1) -> APIError:
    return APIError(503, message, code=code, headers={"Retry-After": str(retry_after_s)})


def _is_type_tag(part: str) -> bool:
    """pydantic puts union members in `loc` ("str", "list[int]", "function-after[...]"): not fields."""
    return part in ("str", "int", "float", "bool", "list", "dict") or any(c in part for c in "[-(")


def _loc_to_param(loc: tuple[Any, ...]) -> str | None:
    # ("body", "messages", 0, "content") -> "messages[0].content"
    parts = [p for p in loc if p not in ("body", "query", "path", "header", "form", "file")
             and not (isinstance(p, str) and _is_type_tag(p))]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        param = _loc_to_param(tuple(first.get("loc", ())))
        msg = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            param, msg = None, "request body is not valid JSON"
        text = f"{param}: {msg}" if param else msg
        return APIError(400, text, param=param, code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        detail = exc.detail if isinstance(exc.detail, str) else "error"
        if status == 404:
            detail = "route not found"
        elif status == 405:
            detail = "method not allowed"
        headers = getattr(exc, "headers", None)
        return APIError(status, detail, code=None, headers=headers).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Logged server-side with its traceback; the client only learns that it failed.
        log.error("unhandled error: %s", type(exc).__name__, exc_info=exc)
        return APIError(500, "internal server error", code="internal_error").response()
