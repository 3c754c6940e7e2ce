"""A tiny stand-in for the loramux HTTP surface, with known delays, for the load-test tests.

Data flow: `StubServer(ttft_s, itl_s).start()` runs a Starlette app under uvicorn on
127.0.0.1:<free port> in a background thread. POST /v1/completions sleeps `ttft_s`, then emits
`max_tokens` chunks `itl_s` apart (SSE or one JSON); /v1/models describes a 2-layer base model;
/v1/adapters validates uploads with the `safetensors` library (shapes against the description)
and records every operation in `events`; POST /v1/chat/completions counts one token per word of the
messages' contents, streams `max_tokens` words unique to the request, and reports as cached_tokens the
longest word prefix shared with an earlier chat prompt on the same adapter (`chats` logs body, reply and
usage; turns listed in `fail_chat_turns` answer 503); /metrics exposes step counters from a 5 ms ticker
(steps += 1, scheduled += requests in flight, whenever any is in flight).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time

import uvicorn
from safetensors.numpy import load as load_safetensors
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

PROJECTIONS = {"q_proj": [16, 16], "k_proj": [16, 8], "v_proj": [16, 8], "o_proj": [16, 16],
               "gate_proj": [16, 32], "up_proj": [16, 32], "down_proj": [32, 16]}
BASE_INFO = {"architecture": "LlamaForCausalLM", "num_layers": 2, "hidden_size": 16, "projections": PROJECTIONS,
             "max_lora_rank": 16, "dtype": "float32", "device": "cpu"}


def _error(status: int, message: str, code: str) -> JSONResponse:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    return JSONResponse(body, status_code=status)


def _common_prefix(a: list[str], b: list[str]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class StubServer:
    """The stub app plus its state (adapters, events, counters) and a uvicorn thread."""

    def __init__(self, ttft_s: float = 0.0, itl_s: float = 0.0, api_key: str | None = None):
        self.ttft_s, self.itl_s, self.api_key = ttft_s, itl_s, api_key
        self.adapters: dict[str, dict] = {}
        self.events: list[tuple[str, str, int]] = []  # (op, name, status)
        self.reject_uploads_after: int | None = None  # fail uploads once this many exist
        self.completions: list[dict] = []
        self.chats: list[dict] = []  # {"body", "reply", "usage"} per chat request, in arrival order
        self.fail_chat_turns: set[int] = set()  # turn = number of user messages
        self._chat_prompts: list[tuple[str | None, list[str]]] = []
        self.disconnects = 0
        self.running = 0
        self.steps = self.scheduled = 0
        self.app = Starlette(routes=[
            Route("/v1/models", self.models),
            Route("/v1/completions", self.complete, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/adapters", self.upload, methods=["POST"]),
            Route("/v1/adapters/{name}", self.delete, methods=["DELETE"]),
            Route("/metrics", self.metrics),
        ], lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        task = asyncio.create_task(self._tick())
        yield
        task.cancel()

    async def _tick(self):
        while True:
            await asyncio.sleep(0.005)
            if self.running:
                self.steps += 1
                self.scheduled += self.running

    async def models(self, request: Request):
        data = [{"id": "stub-base", "object": "model", "parent": None, "loramux": BASE_INFO}]
        data += [{"id": n, "object": "model", "parent": "stub-base"} for n in self.adapters]
        return JSONResponse({"object": "list", "data": data})

    async def complete(self, request: Request):
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            return _error(401, "bad key", "invalid_api_key")
        body = await request.json()
        self.completions.append(body)
        if body.get("adapter") is not None and body["adapter"] not in self.adapters:
            return _error(404, f"adapter {body['adapter']} not found", "adapter_not_found")
        n = int(body["max_tokens"])
        prompt_tokens = len(body["prompt"]) if isinstance(body["prompt"], list) else len(body["prompt"].split())
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
        if not body.get("stream"):
            self.running += 1
            try:
                await asyncio.sleep(self.ttft_s + (n - 1) * self.itl_s)
            finally:
                self.running -= 1
            choice = {"index": 0, "text": " tok" * n, "finish_reason": "length"}
            return JSONResponse({"object": "text_completion", "choices": [choice], "usage": usage})
        return StreamingResponse(self._stream(n, usage), media_type="text/event-stream")

    async def _stream(self, n: int, usage: dict):
        self.running += 1
        try:
            await asyncio.sleep(self.ttft_s)
            for i in range(n):
                if i:
                    await asyncio.sleep(self.itl_s)
                choice = {"index": 0, "text": f" t{i}", "finish_reason": "length" if i == n - 1 else None}
                yield f"data: {json.dumps({'object': 'text_completion', 'choices': [choice]})}\n\n"
            yield f"data: {json.dumps({'object': 'text_completion', 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            self.disconnects += 1
            raise
        finally:
            self.running -= 1

    async def chat(self, request: Request):
        body = await request.json()
        turn = sum(m["role"] == "user" for m in body["messages"])
        if turn in self.fail_chat_turns:
            return _error(503, "the stub fails this turn", "overloaded")
        words = [w for m in body["messages"] for w in m["content"].split()]
        adapter = body.get("adapter")
        cached = max((_common_prefix(words, seen) for a, seen in self._chat_prompts if a == adapter), default=0)
        self._chat_prompts.append((adapter, words))
        n = int(body["max_tokens"])
        reply = [f" r{len(self.chats)}w{i}" for i in range(n)]
        usage = {"prompt_tokens": len(words), "completion_tokens": n, "total_tokens": len(words) + n,
                 "prompt_tokens_details": {"cached_tokens": cached}}
        self.chats.append({"body": body, "reply": "".join(reply), "usage": usage})
        return StreamingResponse(self._chat_stream(reply, usage), media_type="text/event-stream")

    async def _chat_stream(self, reply: list[str], usage: dict):
        def chunk(choices, **extra):
            return f"data: {json.dumps({'object': 'chat.completion.chunk', 'choices': choices, **extra})}\n\n"

        yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        await asyncio.sleep(self.ttft_s)
        for i, word in enumerate(reply):
            if i:
                await asyncio.sleep(self.itl_s)
            yield chunk([{"index": 0, "delta": {"content": word}, "finish_reason": None}])
        yield chunk([{"index": 0, "delta": {}, "finish_reason": "length"}])
        yield chunk([], usage=usage)
        yield "data: [DONE]\n\n"

    async def upload(self, request: Request):
        form = await request.form()
        name = str(form["name"])
        replace = form.get("replace") == "true"
        if name in self.adapters and not replace:
            self.events.append(("upload", name, 409))
            return _error(409, "exists", "adapter_exists")
        if self.reject_uploads_after is not None and len(self.adapters) >= self.reject_uploads_after:
            self.events.append(("upload", name, 400))
            return _error(400, "rejected by the stub", "invalid_adapter")
        config = json.loads(await form["config"].read())
        tensors = load_safetensors(await form["weights"].read())
        for key, arr in tensors.items():  # shapes against the description, as the real server validates
            module, which = key.split(".")[-3], key.split(".")[-2]
            d_in, d_out = PROJECTIONS[module]
            want = (config["r"], d_in) if which == "lora_A" else (d_out, config["r"])
            if arr.shape != want:
                return _error(400, f"{key}: shape {arr.shape} != {want}", "invalid_adapter")
        self.adapters[name] = {"config": config, "tensors": tensors}
        self.events.append(("replace" if replace else "upload", name, 201))
        return JSONResponse({"name": name}, status_code=201)

    async def delete(self, request: Request):
        name = request.path_params["name"]
        if name not in self.adapters:
            self.events.append(("delete", name, 404))
            return _error(404, "not found", "adapter_not_found")
        del self.adapters[name]
        self.events.append(("delete", name, 204))
        return Response(status_code=204)

    async def metrics(self, request: Request):
        text = (
            "# TYPE loramux_engine_steps_total counter\n"
            f"loramux_engine_steps_total {self.steps}\n"
            "# TYPE loramux_scheduled_sequences_total counter\n"
            f'loramux_scheduled_sequences_total{{kind="decode"}} {self.scheduled}\n'
            f"loramux_requests_running {self.running}\n"
        )
        return PlainTextResponse(text)

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> StubServer:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("stub server did not start")
            time.sleep(0.01)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
