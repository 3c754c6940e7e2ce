"""One completion request over HTTP, timed: SSE parsing, TTFT, inter-token gaps, outcome.

Data flow: a `RequestSpec` -> `send_completion(client, spec, ...)` -> POST /v1/completions
(JSON or SSE) -> a `RequestRecord` (ok / status / reason, TTFT, ITL gaps, token counts).
Nothing raises out of `send_completion`: every failure becomes a record with a reason, so a
level always completes and its failures are tallied by status and reason.
"""
from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx

from loadtest.stats import RequestRecord
from loadtest.workload import RequestSpec

DONE = "[DONE]"


class SSEParser:
    """Incremental Server-Sent Events parser: feed lines, get each event's `data` payload.

    Multi-line `data:` fields are joined with "\\n"; comments (`:`) and other fields are ignored.
    """

    def __init__(self):
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        """Consume one line (without its newline); return an event's data when it completes."""
        if line == "":
            if not self._data:
                return None
            data, self._data = "\n".join(self._data), []
            return data
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        if field == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> str | None:
        """The last event when the stream ended without a blank line."""
        return self.feed("")


async def iter_sse(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The data payloads of an SSE line stream, in order."""
    parser = SSEParser()
    async for line in lines:
        data = parser.feed(line.rstrip("\r"))
        if data is not None:
            yield data
    data = parser.flush()
    if data is not None:
        yield data


@dataclass(frozen=True)
class CompletionOptions:
    """Request fields shared by every request of a run."""

    model: str | None = None
    stream: bool = False
    temperature: float = 0.0
    seed: int | None = None
    api_key: str | None = None
    timeout_s: float = 300.0


def build_body(spec: RequestSpec, opts: CompletionOptions, stream: bool) -> dict:
    """The OpenAI completions body (+ loramux's `adapter` and `ignore_eos`) for one request."""
    body: dict = {
        "prompt": spec.prompt,
        "max_tokens": spec.max_tokens,
        "temperature": opts.temperature,
        # Output lengths are part of the workload: hold each request to exactly max_tokens.
        "ignore_eos": True,
        "stream": stream,
    }
    if opts.model is not None:
        body["model"] = opts.model
    if spec.adapter is not None:
        body["adapter"] = spec.adapter
    if opts.seed is not None:
        body["seed"] = opts.seed + spec.index
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def error_reason(status: int, payload: bytes) -> str:
    """A short reason from an OpenAI-shaped error body (`error.code` or `error.type`)."""
    try:
        err = json.loads(payload).get("error") or {}
        return str(err.get("code") or err.get("type") or f"http_{status}")
    except (ValueError, AttributeError):
        return f"http_{status}"


def _exception_reason(exc: Exception) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.ConnectError):
        return "connect"
    if isinstance(exc, httpx.RemoteProtocolError):
        return "protocol"
    if isinstance(exc, httpx.ReadError):
        return "read"
    if isinstance(exc, ValueError):
        return "bad_response"
    return type(exc).__name__


async def send_completion(client: httpx.AsyncClient, spec: RequestSpec, opts: CompletionOptions) -> RequestRecord:
    """Send one request and time it; never raises for network or server errors."""
    # A client that drops mid-stream has to stream, whatever --stream says.
    stream = opts.stream or spec.disconnect_after is not None
    headers = {"Authorization": f"Bearer {opts.api_key}"} if opts.api_key else {}
    rec = RequestRecord(prompt_tokens=spec.prompt_tokens, start=time.perf_counter())
    try:
        async with client.stream(
            "POST", "/v1/completions", json=build_body(spec, opts, stream), headers=headers, timeout=opts.timeout_s
        ) as resp:
            rec.status = resp.status_code
            if resp.status_code != 200:
                rec.reason = error_reason(resp.status_code, await resp.aread())
            elif stream:
                await _read_stream(resp, spec, rec)
            else:
                _read_json(json.loads(await resp.aread()), rec)
    except Exception as exc:  # every failure is a data point, never a crash of the run
        rec.ok, rec.reason = False, _exception_reason(exc)
    rec.end = time.perf_counter()
    return rec


def _read_json(payload: dict, rec: RequestRecord) -> None:
    """A non-streamed completion: counts come from `usage`."""
    if "error" in payload:
        rec.reason = error_reason(rec.status or 0, json.dumps(payload).encode())
        return
    usage = payload.get("usage") or {}
    rec.output_tokens = int(usage.get("completion_tokens", 0))
    rec.prompt_tokens = int(usage.get("prompt_tokens", rec.prompt_tokens))
    rec.ok = bool(payload.get("choices"))
    rec.reason = "" if rec.ok else "no_choices"


async def _read_stream(resp: httpx.Response, spec: RequestSpec, rec: RequestRecord) -> None:
    """Read SSE chunks, stamping the first one (TTFT) and each gap after it (ITL)."""
    chunks, last, usage, done = 0, 0.0, None, False
    async for data in iter_sse(resp.aiter_lines()):
        now = time.perf_counter()
        if data == DONE:
            done = True
            break
        event = json.loads(data)
        if "error" in event:
            rec.reason = error_reason(rec.status or 0, data.encode())
            return
        if event.get("usage"):
            usage = event["usage"]
        if not event.get("choices"):
            continue  # the usage-only chunk carries no token
        if chunks == 0:
            rec.ttft = now - rec.start
        else:
            rec.itl.append(now - last)
        chunks, last = chunks + 1, now
        if spec.disconnect_after is not None and chunks >= spec.disconnect_after:
            # Leaving the `async with` closes the connection mid-stream: the server sees a disconnect.
            rec.disconnected, rec.reason, rec.output_tokens = True, "disconnected", chunks
            return
    if not done:
        rec.reason = "truncated_stream"
        return
    rec.output_tokens = int(usage["completion_tokens"]) if usage else chunks
    if usage and "prompt_tokens" in usage:
        rec.prompt_tokens = int(usage["prompt_tokens"])
    rec.ok = chunks > 0
    rec.reason = "" if rec.ok else "empty_stream"
