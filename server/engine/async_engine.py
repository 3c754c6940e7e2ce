"""The async engine: `LLMEngine.step()` in one background thread, streams for the asyncio side.

Threads and data flow:
  asyncio (HTTP) thread: `generate()` validates and adds the request under the engine lock, then
    awaits its `_Collector` (one slot + asyncio.Event, never an unbounded queue: deltas that
    arrive faster than the client reads are merged into the slot).
  engine thread: loop { with lock: schedule; execute (no lock: the model runs while new requests
    queue); with lock: update } and hands each delta to its collector with
    `loop.call_soon_threadsafe`. It sleeps on a condition when there is nothing to do.
Cancelling `generate()` (client gone) aborts the request: its KV blocks are freed at the next step.
The CLI builds one with `server.engine.builder.build_async_engine(settings)`.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future
from typing import Any

from adapters.ref import AdapterRef
from server.engine.client import AdapterService
from server.engine.engine_thread import EngineThread
from server.engine.llm_engine import LLMEngine
from server.engine.outputs import CompletionDelta
from server.engine.sampling_params import SamplingParams

log = logging.getLogger("loramux.engine")
RESIDENCY_LEVELS = ("device", "host", "cold")  # device slot | host cache | neither (read from the store)


class _Collector:
    """One-slot mailbox for a request's deltas; merges when the reader lags behind."""

    def __init__(self) -> None:
        self.delta: CompletionDelta | None = None
        self.event = asyncio.Event()

    def put(self, d: CompletionDelta) -> None:
        cur = self.delta
        if cur is None:
            self.delta = d
        else:  # merge: append text/tokens/logprobs, keep the newest status and counts
            cur.text += d.text
            cur.token_ids += d.token_ids
            if d.logprobs:
                cur.logprobs = (cur.logprobs or []) + d.logprobs
                cur.logprob_tokens = (cur.logprob_tokens or []) + (d.logprob_tokens or [])
                cur.top_logprob_tokens = (cur.top_logprob_tokens or []) + (d.top_logprob_tokens or [])
            cur.finished, cur.finish_reason, cur.error = d.finished, d.finish_reason, d.error
            cur.completion_tokens = d.completion_tokens
        self.event.set()

    async def get(self) -> CompletionDelta:
        await self.event.wait()
        self.event.clear()
        d, self.delta = self.delta, None
        assert d is not None
        return d


class AsyncEngine:
    """Implements `server.engine.client.EngineClient` around an `LLMEngine`."""

    def __init__(self, engine: LLMEngine, adapters: AdapterService, model_name: str, info: dict[str, Any],
                 max_model_len: int, max_waiting: int, step_stall_s: float = 60.0,
                 worker: EngineThread | None = None) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.adapters = adapters
        self.model_name = model_name
        self._info = info
        self.max_model_len = max_model_len
        self.max_waiting = max_waiting
        self.step_stall_s = step_stall_s  # a step running longer than this counts as a stalled loop
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._collectors: dict[str, tuple[asyncio.AbstractEventLoop, _Collector]] = {}
        # The step loop runs on `worker` (the thread that loaded the model, see engine_thread.py).
        self._worker = worker
        self._loop_future: Future | None = None
        self._stop = False
        self._ready = False
        self.last_step_time = time.monotonic()
        self.step_error: str | None = None
        # Adapter requests by where their adapter was held when they arrived (the affinity metric).
        self.arrivals = dict.fromkeys(RESIDENCY_LEVELS, 0)

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._loop_future is not None:
            return
        self._stop = False
        if self._worker is None or not self._worker.is_alive():
            self._worker = EngineThread()
        self._loop_future = self._worker.submit(self._loop)
        self._ready = True

    def shutdown(self, drain_timeout_s: float = 0.0) -> None:
        """Let running requests finish for up to `drain_timeout_s`, abort the rest, stop the thread."""
        self._ready = False
        deadline = time.monotonic() + drain_timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self.engine.has_unfinished():
                    break
            time.sleep(0.05)
        with self._lock:
            for rid in list(self.engine.live):
                self.engine.abort(rid)
            self._stop = True
            self._wake.notify_all()
        if self._loop_future is not None:
            with contextlib.suppress(Exception):
                self._loop_future.result(timeout=30)
            self._loop_future = None
        if self._worker is not None:
            self._worker.stop()
            self._worker = None

    def is_ready(self) -> bool:
        return self._ready and self._loop_running()

    def _loop_running(self) -> bool:
        return self._loop_future is not None and not self._loop_future.done()

    def queue_full(self) -> bool:
        return self.engine.scheduler.num_waiting >= self.max_waiting

    def model_info(self) -> dict[str, Any]:
        return dict(self._info)

    # --- requests --------------------------------------------------------------------------------
    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       adapter: AdapterRef | None = None) -> AsyncIterator[CompletionDelta]:
        if not self.is_ready():
            raise RuntimeError("engine is not running")
        [stream] = self.submit([(request_id, prompt_token_ids, params)], adapter)
        try:
            async for delta in stream:
                yield delta
        finally:
            await stream.aclose()  # aborts the request if it did not finish (client gone)

    def submit(self, jobs: list[tuple[str, list[int], SamplingParams]],
               adapter: AdapterRef | None = None) -> list[AsyncIterator[CompletionDelta]]:
        """Queue one HTTP request's sequences (request_id, prompt ids, params) all or none, on the
        running event loop; returns one delta stream per job. Raises QueueFullError (no room for all
        of them now: 503) or ValueError (can never be served, e.g. more than --max-waiting: 400)."""
        if not self.is_ready():
            raise RuntimeError("engine is not running")
        loop = asyncio.get_running_loop()
        collectors = [_Collector() for _ in jobs]
        level = self.adapter_level(adapter) if adapter is not None else None
        if level is not None:
            self.arrivals[level] += 1
        with self._lock:
            self.engine.add_requests(jobs, adapter)
            for (rid, _, _), collector in zip(jobs, collectors, strict=True):
                self._collectors[rid] = (loop, collector)
            self._wake.notify_all()
        return [self._stream(rid, c) for (rid, _, _), c in zip(jobs, collectors, strict=True)]

    async def _stream(self, request_id: str, collector: _Collector) -> AsyncIterator[CompletionDelta]:
        finished = False
        try:
            while not finished:
                delta = await collector.get()
                finished = delta.finished
                yield delta
        finally:
            with self._lock:
                self._collectors.pop(request_id, None)
                if not finished:  # client went away (cancelled) or the consumer stopped early
                    self.engine.abort(request_id)
                    self._wake.notify_all()

    async def abort(self, request_id: str) -> None:
        with self._lock:
            self._collectors.pop(request_id, None)  # a stream that was never iterated leaves no entry
            self.engine.abort(request_id)
            self._wake.notify_all()

    def adapter_level(self, ref: AdapterRef) -> str | None:
        """Where `ref` is held now (device | host | cold), counted at each arrival; None: not counted
        here (a cluster replica counts before its own loader runs, server/cluster/engine_replica.py)."""
        pool = self.engine.runner.slot_pool
        return (pool.level(ref.id) if pool is not None else None) or "cold"

    def adapter_levels(self) -> dict[str, str]:
        """Adapter name -> "device" | "host" for every adapter held now (the residency gauge)."""
        pool = self.engine.runner.slot_pool
        return pool.levels() if pool is not None else {}

    def stats(self) -> dict[str, Any]:
        eng = self.engine
        with self._lock:
            sched = eng.scheduler
            bm = sched.block_manager
            running = sorted({r.adapter.name for r in sched.running if r.adapter is not None})
            waiting = sorted({r.adapter.name for r in sched.waiting if r.adapter is not None})
            pool = eng.runner.slot_pool
            c = eng.counters
            return {
                "running": sched.num_running,
                "waiting": sched.num_waiting,
                "kv_blocks_used": bm.num_blocks - bm.num_free_blocks,
                "kv_blocks_total": bm.num_blocks,
                "slots_used": len(pool.resident()) if pool is not None else 0,
                "slots_total": pool.num_slots if pool is not None else 0,
                "adapter_loads": pool.loads if pool is not None else 0,
                "adapter_evictions": pool.evictions if pool is not None else 0,
                "adapter_load_seconds": pool.load_times.snapshot() if pool is not None else None,
                "preemptions": sched.num_preemptions,
                "prefix_cache_queries": sched.prefix_cache_queries,  # prompt tokens looked up
                "prefix_cache_hits": sched.prefix_cache_hits,  # of which found cached
                "prefix_cache_blocks": bm.num_cached_blocks,
                "prefix_cache_evictions": bm.num_evictions,
                "prompt_tokens": c.prompt_tokens,
                "generation_tokens": c.generation_tokens,
                "steps": c.steps,
                "scheduled_sequences": c.scheduled_sequences,
                "running_adapters": running,
                "waiting_adapters": waiting,
                "adapter_residency": self.adapter_levels(),
                "adapter_arrivals": dict(self.arrivals),
                "step_loop_alive": self._loop_alive(),
                "last_step_age_s": time.monotonic() - self.last_step_time,
            }

    def _loop_alive(self) -> bool:
        """The thread runs and its last step (or idle tick) is recent: /ready turns 503 otherwise."""
        return self._loop_running() and (self.step_stall_s <= 0 or time.monotonic() - self.last_step_time < self.step_stall_s)

    # --- the engine thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        eng = self.engine
        while True:
            with self._lock:
                while not self._stop and not eng.has_unfinished():
                    self.last_step_time = time.monotonic()  # idle is not stalled
                    self._wake.wait(timeout=1.0)
                if self._stop:
                    return
            try:
                deltas = self._locked_step()
            except Exception as exc:  # noqa: BLE001 - the loop must survive anything
                log.exception("engine loop error")
                self.step_error = str(exc)
                time.sleep(0.1)
                continue
            self.last_step_time = time.monotonic()
            # One wake-up per event loop per step (not one per request): at batch 32 that is 31 fewer
            # cross-thread hand-offs competing with the next step for the CPU.
            by_loop: dict[asyncio.AbstractEventLoop, list] = {}
            for d in deltas:
                entry = self._collectors.get(d.request_id)
                if entry is not None:
                    by_loop.setdefault(entry[0], []).append((entry[1], d))
            for loop, items in by_loop.items():
                with contextlib.suppress(RuntimeError):  # the client's loop is closed
                    loop.call_soon_threadsafe(_deliver, items)

    def _locked_step(self) -> list[CompletionDelta]:
        """schedule (locked) -> execute (unlocked) -> update (locked)."""
        return self.engine.step(self._lock)


def _deliver(items: list) -> None:
    """On the event loop: hand each request's delta to its collector, in step order."""
    for coll, d in items:
        coll.put(d)
