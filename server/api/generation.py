"""The path shared by completions and chat: admit, resolve the adapter, check limits, run choices.

Data flow for one HTTP request:
  `admit()` (draining / queue full -> 503)  ->  `resolve_adapter()` (model vs adapter field)
  -> `check_prompt()` / `build_params()` (every limit, a 400 naming the field; nothing is enqueued
  before all checks pass)  ->  `acquire()` the adapter ref (unknown -> 404)  ->  `ChoiceRunner`
  queues the prompts x n choices in the engine all or none (`engine.submit`: no room for all -> 503
  with Retry-After, more than --max-waiting -> 400), merges their deltas into one ordered
  stream of (choice index, delta), and on close (finished, error, or client gone) aborts every
  unfinished choice and releases the adapter ref -- in a detached task, so cleanup never depends on
  awaiting inside a cancelled scope.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from fastapi import Request

from adapters.errors import AdapterError
from adapters.ref import AdapterRef
from server.api.errors import APIError, bad_request, from_adapter_error, from_value_error, service_unavailable
from server.api.openai_format import ClosingStreamingResponse
from server.api.schemas import SamplingFields
from server.api.state import ServerState
from server.engine.client import EngineClient
from server.engine.outputs import CompletionDelta
from server.engine.sampling_params import SamplingParams
from server.engine.schedule_plan import QueueFullError
from server.settings import ServerSettings

_CLEANUPS: set[asyncio.Task] = set()  # strong refs to detached cleanup tasks


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def admit(state: ServerState, engine: EngineClient) -> None:
    """503 (with Retry-After) while draining or when the engine's queue is full."""
    if state.draining:
        raise service_unavailable("server is shutting down", code="server_draining", retry_after_s=5)
    if engine.queue_full():
        raise service_unavailable("too many requests waiting; retry shortly", code="queue_full")


def base_names(engine: EngineClient, settings: ServerSettings) -> set[str]:
    return {engine.model_name, settings.model}


def resolve_adapter(engine: EngineClient, settings: ServerSettings, model: str | None,
                    adapter: str | None) -> str | None:
    """Adapter name to use, or None for the base model. `model` may name an adapter (vLLM style)."""
    from_model = model if model is not None and model not in base_names(engine, settings) else None
    if adapter is not None and from_model is not None and adapter != from_model:
        raise bad_request(f"adapter: {adapter!r} disagrees with model {model!r}", param="adapter",
                          code="adapter_model_mismatch")
    return adapter if adapter is not None else from_model


def acquire(engine: EngineClient, name: str | None, param: str) -> AdapterRef | None:
    """Takes the in-flight reference (atomic resolve+count in the registry); unknown -> 404."""
    if name is None:
        return None
    try:
        return engine.adapters.acquire(name)
    except AdapterError as exc:
        raise from_adapter_error(exc, param=param) from None
    except ValueError as exc:
        raise from_value_error(exc, param) from None


def check_prompt(engine: EngineClient, ids: Sequence[int], param: str) -> None:
    if not ids:
        raise bad_request(f"{param}: empty prompt", param=param, code="empty_prompt")
    vocab = engine.tokenizer.vocab_size
    bad = next((t for t in ids if t < 0 or t >= vocab), None)
    if bad is not None:
        raise bad_request(f"{param}: token id {bad} is outside the vocabulary [0, {vocab})", param=param,
                          code="token_out_of_vocab")


def check_length(engine: EngineClient, prompt_len: int, max_tokens: int, param: str) -> None:
    limit = engine.max_model_len
    if prompt_len >= limit:
        raise bad_request(f"{param}: {prompt_len} prompt tokens; the model takes at most {limit - 1}",
                          param=param, code="context_length_exceeded")
    if prompt_len + max_tokens > limit:
        raise bad_request(f"max_tokens: {prompt_len} prompt + {max_tokens} new tokens exceed the model "
                          f"length {limit}", param="max_tokens", code="context_length_exceeded")


def parse_logit_bias(bias: dict[str, float] | None, vocab: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} -> sorted (id, bias) pairs; ids in the vocabulary, at most 300."""
    if not bias:
        return ()
    out = []
    for key, value in bias.items():
        try:
            tid = int(key)
        except ValueError:
            raise bad_request(f"logit_bias: key {key[:20]!r} is not a token id", param="logit_bias") from None
        if not (0 <= tid < vocab):
            raise bad_request(f"logit_bias: token id {tid} is outside the vocabulary [0, {vocab})",
                              param="logit_bias", code="token_out_of_vocab")
        out.append((tid, float(value)))
    return tuple(sorted(out))


def build_params(req: SamplingFields, settings: ServerSettings, *, max_tokens: int,
                 logprobs: int | None, logprobs_param: str, vocab_size: int | None = None,
                 guide=None) -> SamplingParams:
    """Server caps first (n, logprobs, stop), then SamplingParams' own range checks -> 400 naming the field.
    `guide`: the compiled structured-output grammar (server/api/guided.py) or None."""
    n = 1 if req.n is None else req.n
    if not (1 <= n <= settings.max_n):
        raise bad_request(f"n: must be in [1, {settings.max_n}]", param="n")
    if logprobs is not None and not (0 <= logprobs <= settings.max_logprobs):
        raise bad_request(f"{logprobs_param}: must be in [0, {settings.max_logprobs}]", param=logprobs_param)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > settings.max_stop:
        raise bad_request(f"stop: at most {settings.max_stop} stop strings", param="stop")
    if any(len(s) > settings.max_stop_len for s in stop):
        raise bad_request(f"stop: each stop string must be at most {settings.max_stop_len} characters",
                          param="stop")
    if max_tokens < 1:
        raise bad_request("max_tokens: must be >= 1", param="max_tokens")
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else float(req.temperature),
            top_p=1.0 if req.top_p is None else float(req.top_p),
            top_k=-1 if req.top_k is None else req.top_k,
            seed=req.seed,
            min_tokens=req.min_tokens or 0,
            ignore_eos=bool(req.ignore_eos),
            stop=tuple(stop),
            logprobs=logprobs,
            n=n,
            presence_penalty=0.0 if req.presence_penalty is None else float(req.presence_penalty),
            frequency_penalty=0.0 if req.frequency_penalty is None else float(req.frequency_penalty),
            repetition_penalty=1.0 if req.repetition_penalty is None else float(req.repetition_penalty),
            logit_bias=parse_logit_bias(req.logit_bias, vocab_size if vocab_size is not None else 2**31),
            guide=guide,
        )
    except ValueError as exc:
        raise from_value_error(exc) from None


@dataclass
class ChoiceResult:
    """Accumulated output of one choice (non-streamed responses and usage)."""

    text: str = ""
    deltas: list[CompletionDelta] | None = None
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None


class ChoiceRunner:
    """Runs prompts x n choices through the engine and yields (choice index, delta) as they come."""

    def __init__(self, engine: EngineClient, request_id: str, prompts: list[list[int]],
                 params: SamplingParams, ref: AdapterRef | None, adapter_label: str, metrics: Any):
        self.engine = engine
        self.ref = ref
        self.adapter_label = adapter_label
        self.metrics = metrics
        self.arrival = time.monotonic()
        self.n = n = params.n
        self.jobs = []  # (choice index, engine request id, prompt ids, per-choice params)
        for p, ids in enumerate(prompts):
            for j in range(n):
                index = p * n + j
                seed = None if params.seed is None else params.seed + j  # n distinct, reproducible samples
                self.jobs.append((index, f"{request_id}-{index}", ids, replace(params, n=1, seed=seed)))
        self.prompt_tokens = sum(len(ids) for ids in prompts)
        self.finished: set[int] = set()
        self.completion_tokens: dict[int, int] = {}
        self.cached: dict[int, int] = {}  # choice index -> prompt tokens its request found in the prefix cache
        self._queue: asyncio.Queue = asyncio.Queue(maxsize=len(self.jobs))  # one slot per producer
        self._tasks: list[asyncio.Task] = []
        self._streams: list | None = None
        self._closed = False

    def start(self) -> None:
        """Queues every choice in the engine at once, all or none (an engine with `submit`): 503 with
        Retry-After when the queue has no room for all of them, 400 when the fan-out can never fit."""
        submit = getattr(self.engine, "submit", None)
        if submit is None:
            return  # engines without group submission queue each choice in its own generate()
        try:
            self._streams = submit([(rid, ids, params) for _, rid, ids, params in self.jobs], self.ref)
        except QueueFullError:
            raise service_unavailable("too many requests waiting; retry shortly", code="queue_full") from None
        except RuntimeError:
            raise service_unavailable("engine is not running", code="not_ready") from None
        except ValueError as exc:
            raise from_value_error(exc) from None

    async def _pump(self, index: int, rid: str, ids: list[int], params: SamplingParams) -> None:
        stream = self._streams[index] if self._streams is not None else self.engine.generate(rid, ids, params, self.ref)
        try:
            async for delta in stream:
                await self._queue.put((index, delta))
                if delta.finished:
                    return
            await self._queue.put((index, CompletionDelta(rid, "", finished=True, finish_reason="error",
                                                          error="engine stream ended early")))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # engine failure: becomes this choice's error, never a traceback
            await self._queue.put((index, CompletionDelta(rid, "", finished=True, finish_reason="error",
                                                          error=type(exc).__name__)))
        finally:
            # Close the engine stream now, not whenever the loop finalizes the abandoned generator:
            # its own `finally` drops the engine's per-request collector (deterministic cleanup).
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    async def stream(self) -> AsyncIterator[tuple[int, CompletionDelta]]:
        self._tasks = [asyncio.create_task(self._pump(*job)) for job in self.jobs]
        last: dict[int, float] = {}
        while len(self.finished) < len(self.jobs):
            index, delta = await self._queue.get()
            now = time.monotonic()
            if delta.token_ids:
                if index in last:
                    self.metrics.observe_itl(self.adapter_label, now - last[index])
                else:
                    self.metrics.observe_ttft(self.adapter_label, now - self.arrival)
                last[index] = now
            self.completion_tokens[index] = max(self.completion_tokens.get(index, 0), delta.completion_tokens)
            self.cached[index] = max(self.cached.get(index, 0), delta.cached_tokens)
            if delta.finished:
                self.finished.add(index)
                self.metrics.observe_e2e(self.adapter_label, now - self.arrival)
                if delta.finish_reason != "error":
                    self.metrics.observe_prefix_cache(self.adapter_label, len(self.jobs[index][2]),
                                                      self.cached[index])
            yield index, delta

    @property
    def total_completion_tokens(self) -> int:
        return sum(self.completion_tokens.values())

    @property
    def cached_tokens(self) -> int:
        """Cached prompt tokens for usage: per prompt (counted once, like prompt_tokens), the most any
        of its n choices found cached."""
        per_prompt: dict[int, int] = {}
        for index, *_ in self.jobs:
            p = index // self.n  # choices are prompt-major: index = prompt * n + j
            per_prompt[p] = max(per_prompt.get(p, 0), self.cached.get(index, 0))
        return sum(per_prompt.values())

    def close(self) -> None:
        """Synchronous and idempotent: safe in any `finally`, even inside a cancelled scope."""
        if self._closed:
            return
        self._closed = True
        unfinished = [rid for index, rid, _, _ in self.jobs if index not in self.finished]
        if not unfinished and all(t.done() for t in self._tasks):
            self._release()
            return
        for t in self._tasks:
            t.cancel()  # cancels engine.generate -> the engine aborts the request
        task = asyncio.get_running_loop().create_task(self._cleanup(unfinished))
        _CLEANUPS.add(task)
        task.add_done_callback(_CLEANUPS.discard)

    async def _cleanup(self, unfinished: list[str]) -> None:
        try:
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for rid in unfinished:  # explicit abort too: KV is freed even if cancellation was swallowed
                with contextlib.suppress(Exception):
                    await self.engine.abort(rid)
        finally:
            self._release()

    def _release(self) -> None:
        if self.ref is not None:
            ref, self.ref = self.ref, None
            self.engine.adapters.release(ref)


async def respond(request: Request, engine: EngineClient, state: ServerState, req: Any, *, prefix: str,
                  objects: tuple[str, str], prompts: list[list[int]], params: SamplingParams,
                  ref: AdapterRef | None, adapter: str | None, collect, sse):
    """The tail both routes share: start the choices, log, count in-flight, then answer with one JSON
    body (`collect(runner, head, decode)`) or an SSE stream (`sse(runner, head, decode, include_usage)`);
    `objects` = (the body's "object", a chunk's "object"). Cleanup runs on every exit."""
    rid = new_id(prefix)
    label = adapter or "base"
    runner = ChoiceRunner(engine, rid, prompts, params, ref, label, state.metrics)
    try:
        runner.start()  # admitted whole or refused whole (503 / 400): nothing half-queued
    except APIError:
        runner._release()
        raise
    log_fields = request.scope.setdefault("loramux.log", {})
    log_fields.update(id=rid, adapter=label, prompt_tokens=runner.prompt_tokens, stream=bool(req.stream))
    state.inflight += 1

    def finish() -> None:
        runner.close()
        state.inflight -= 1
        log_fields["completion_tokens"] = runner.total_completion_tokens

    model = adapter or engine.model_name
    decode = engine.tokenizer.decode
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        head = {"id": rid, "object": objects[1], "created": int(time.time()), "model": model}
        return ClosingStreamingResponse(sse(runner, head, decode, include_usage), on_close=finish)
    head = {"id": rid, "object": objects[0], "created": int(time.time()), "model": model}
    try:
        return await unless_disconnected(request, collect(runner, head, decode))
    finally:
        finish()


async def wait_disconnect(request: Request) -> None:
    """Returns when the client has gone (the body is already read, so receive() only reports that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Any) -> Any:
    """Runs `work` (a coroutine) but cancels it when the client disconnects (vLLM's with_cancellation)."""
    job = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({job, watch}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        job.cancel()
        watch.cancel()
        raise
    watch.cancel()
    if job in done:
        return job.result()
    job.cancel()  # its `finally` closes the ChoiceRunner, which aborts the engine requests
    raise APIError(499, "client disconnected", code="client_closed")


def engine_error(message: str | None) -> APIError:
    return APIError(500, f"generation failed: {message or 'engine error'}", code="engine_error")
