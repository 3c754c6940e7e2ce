"""The client: SSE parsing, and TTFT / ITL measured against a stub server with known delays."""
from __future__ import annotations

import asyncio
import statistics
import time

import httpx
import pytest

from loadtest.client import CompletionOptions, SSEParser, iter_sse, send_completion
from loadtest.workload import RequestSpec


def _events(lines):
    parser, out = SSEParser(), []
    for line in lines:
        data = parser.feed(line)
        if data is not None:
            out.append(data)
    last = parser.flush()
    return out + ([last] if last is not None else [])


def test_sse_parser_framing():
    lines = [": keep-alive", "", "data: {\"a\": 1}", "", "event: x", "data:line1", "data: line2", "",
             "id: 3", "data: [DONE]"]
    assert _events(lines) == ['{"a": 1}', "line1\nline2", "[DONE]"]


def test_iter_sse_strips_carriage_returns():
    async def lines():
        for line in ["data: one\r", "\r", "data: two\r", "\r"]:
            yield line

    async def collect():
        return [d async for d in iter_sse(lines())]

    assert asyncio.run(collect()) == ["one", "two"]


def _send(url, spec, **kw):
    async def go():
        async with httpx.AsyncClient(base_url=url, trust_env=False) as client:
            return await send_completion(client, spec, CompletionOptions(model="stub-base", **kw))

    return asyncio.run(go())


def test_stream_ttft_and_itl_match_known_delays(make_stub):
    stub = make_stub(ttft_s=0.15, itl_s=0.05)
    rec = _send(stub.url, RequestSpec(0, [1, 2, 3], 3, 6, None), stream=True)
    assert rec.ok and rec.status == 200 and rec.reason == ""
    assert rec.output_tokens == 6 and rec.prompt_tokens == 3  # from the usage chunk
    assert 0.15 <= rec.ttft < 0.15 + 0.1
    assert len(rec.itl) == 5
    assert abs(statistics.median(rec.itl) - 0.05) < 0.02
    assert all(g > 0.03 for g in rec.itl)
    assert rec.e2e == pytest.approx(0.15 + 5 * 0.05, abs=0.1)
    body = stub.completions[-1]
    assert body["ignore_eos"] is True and body["max_tokens"] == 6 and "adapter" not in body
    assert body["stream_options"] == {"include_usage": True}


def test_non_stream_counts_from_usage(make_stub):
    stub = make_stub(ttft_s=0.0, itl_s=0.01)
    rec = _send(stub.url, RequestSpec(0, [5] * 7, 7, 4, None))
    assert rec.ok and rec.output_tokens == 4 and rec.prompt_tokens == 7
    assert rec.ttft is None and rec.itl == []
    assert rec.e2e >= 0.03


def test_errors_become_reasons(make_stub):
    stub = make_stub(api_key="k1")
    rec = _send(stub.url, RequestSpec(0, [1], 1, 2, None), api_key="wrong")
    assert not rec.ok and rec.status == 401 and rec.reason == "invalid_api_key"
    rec = _send(stub.url, RequestSpec(0, [1], 1, 2, "nope"), api_key="k1", stream=True)
    assert not rec.ok and rec.status == 404 and rec.reason == "adapter_not_found"
    assert stub.completions[-1]["adapter"] == "nope"
    rec = _send("http://127.0.0.1:9", RequestSpec(0, [1], 1, 2, None))
    assert not rec.ok and rec.status is None and rec.reason == "connect"


def test_disconnect_drops_the_stream_mid_way(make_stub):
    stub = make_stub(ttft_s=0.0, itl_s=0.02)
    rec = _send(stub.url, RequestSpec(0, [1], 1, 40, None, disconnect_after=3))  # streams even without --stream
    assert rec.disconnected and not rec.ok and rec.output_tokens == 3
    assert rec.e2e < 40 * 0.02  # left long before the last token
    deadline = time.monotonic() + 3
    while stub.disconnects == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert stub.disconnects == 1  # the server saw the client go
