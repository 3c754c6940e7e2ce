"""One engine replica of the Serve application: a loramux engine with its own slots and host cache.

`make_engine_class(max_adapters)` returns the deployment class (the multiplexed loader's LRU size is
fixed when the class is made, so it is made from the settings). Per request (`generate`):
  the ingress's handle call carries the multiplexed model id "name@version" (none: base model) ->
  count where the adapter was held on arrival (device slot | host memory | cold) -> Serve's
  multiplexed loader `_adapter(model_id)` (LRU over `max_adapters` ids per replica; reads the
  shared store on a miss: replica_adapters.py) -> acquire the local ref -> `AsyncEngine.submit` ->
  stream `CompletionDelta`s back (Serve streams a generator's items to the caller; the deltas of
  steps within STREAM_INTERVAL_S are merged into one) -> release.
A structured-output grammar travels as its `GuideSpec` (the compiled matcher is not picklable) and
is compiled here again (cached per spec). Housekeeping, every 0.5 s: versions the store no longer
has are dropped (delete / replace reach every replica), and the replica's `engine.stats()` are
pushed to the ingress (`report`), which sums them for /metrics and /ready.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from ray import serve

from adapters.ref import AdapterRef
from adapters.validate import ValidationLimits
from server.cluster.replica_adapters import ReplicaAdapters, model_id, parse_model_id
from server.engine.async_engine import AsyncEngine
from server.engine.builder import auto_adapter_slots, base_spec, build_llm_engine, engine_configs, model_info
from server.engine.engine_thread import EngineThread
from server.engine.sampling_params import SamplingParams
from server.engine.structured import compiler_for
from server.model.loader import load_model
from server.model.tokenizer import Tokenizer
from server.settings import ServerSettings

log = logging.getLogger("loramux.cluster")
HOUSEKEEPING_S = 0.5
# After sending a delta, the replica waits this long before taking the next: the engine's one-slot
# collector merges the tokens of the steps in between, so a fast engine sends one Ray object per
# interval instead of one per step (each costs a hop's overhead). The first token is never delayed.
STREAM_INTERVAL_S = 0.02


class ReplicaEngine(AsyncEngine):
    """An AsyncEngine whose host tier is the replica's held adapters (Serve's multiplexed LRU)."""

    held: ReplicaAdapters

    def adapter_level(self, ref: AdapterRef) -> str | None:
        return None  # counted by the replica before its loader runs (EngineReplica.generate)

    def adapter_levels(self) -> dict[str, str]:
        levels = dict.fromkeys(self.held.names(), "host")
        levels.update({n: lv for n, lv in super().adapter_levels().items() if lv == "device"})
        return levels


def build_replica_engine(settings: ServerSettings) -> ReplicaEngine:
    """build_async_engine's wiring, with ReplicaAdapters (read-only store) in place of the manager."""
    worker = EngineThread()
    try:
        return worker.call(lambda: _build(settings, worker))
    except BaseException:
        worker.stop()
        raise


def _build(settings: ServerSettings, worker: EngineThread) -> ReplicaEngine:
    from server.engine.builder import _memory_bytes  # noqa: PLC0415 - same sizing as the single server

    loaded = load_model(settings.model, settings.dtype, settings.device, settings.quantize)
    spec = base_spec(loaded)
    root = settings.adapter_dir or str(Path(tempfile.gettempdir()) / "loramux-adapters")
    Path(root).mkdir(parents=True, exist_ok=True)
    held = ReplicaAdapters(root, spec, ValidationLimits(max_rank=settings.max_lora_rank))
    auto = None
    if settings.max_adapters_per_batch is None:
        auto = auto_adapter_slots(spec, settings.max_lora_rank, loaded.dtype.itemsize,
                                  _memory_bytes(loaded.device), settings.max_batch_size)
    sched, cache, lora = engine_configs(settings, auto)
    engine = build_llm_engine(loaded, held, scheduler=sched, cache=cache, lora=lora,
                              kv_cache_tokens=settings.kv_cache_tokens)
    replica = ReplicaEngine(engine, held, model_name=loaded.name,  # type: ignore[arg-type]
                            info=model_info(loaded, settings.max_lora_rank),
                            max_model_len=engine.scheduler.cfg.max_model_len, max_waiting=settings.max_waiting,
                            step_stall_s=settings.step_stall_s, worker=worker)
    replica.held = held
    return replica


def make_engine_class(max_adapters: int) -> type:
    """The engine deployment class; Serve keeps at most `max_adapters` adapter ids per replica."""

    class EngineReplica:
        async def __init__(self, settings: ServerSettings, app_name: str, ingress_name: str):
            self.settings = settings
            self.engine = await asyncio.to_thread(build_replica_engine, settings)
            self.engine.start()
            self.held = self.engine.held
            ctx = serve.get_replica_context()
            rid = getattr(ctx, "replica_id", None)
            self.replica = getattr(rid, "unique_id", None) or str(rid or ctx.replica_tag)
            self._ingress = (ingress_name, app_name)
            self._housekeeping = asyncio.get_running_loop().create_task(self._housekeep())

        # --- adapters: Serve's model multiplexing ----------------------------------------------------
        @serve.multiplexed(max_num_models_per_replica=max_adapters)
        async def _adapter(self, mid: str) -> _Lease:
            name, version = parse_model_id(mid)
            ref = await asyncio.to_thread(self.held.load, name, version)
            return _Lease(self.held, ref)

        def _arrival_level(self, ref: AdapterRef) -> str:
            local = self.held.holding(ref.name, ref.version)
            if local is None:
                return "cold"
            pool = self.engine.engine.runner.slot_pool
            return "device" if pool is not None and pool.level(local.id) == "device" else "host"

        # --- requests ----------------------------------------------------------------------------
        async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                           ref: AdapterRef | None, guide_spec: Any = None):
            local = None
            if ref is not None:
                self.engine.arrivals[self._arrival_level(ref)] += 1
                await self._adapter(model_id(ref))
                local = self.held.local(ref)
                self.held.acquire(local)
            try:
                if guide_spec is not None:
                    tok = self.engine.tokenizer
                    guide = await asyncio.to_thread(compiler_for(tok, tok.vocab_size).compile, guide_spec)
                    params = dataclasses.replace(params, guide=guide)
                [stream] = self.engine.submit([(request_id, prompt_ids, params)], local)
                try:
                    async for delta in stream:
                        yield delta
                        if not delta.finished:
                            await asyncio.sleep(STREAM_INTERVAL_S)
                finally:
                    await stream.aclose()  # aborts the request if it did not finish (caller gone)
            finally:
                if local is not None:
                    self.held.release(local)

        def describe(self) -> dict[str, Any]:
            tok = self.engine.tokenizer
            return {"model_name": self.engine.model_name, "max_model_len": self.engine.max_model_len,
                    "info": self.engine.model_info(),
                    "tokenizer": Tokenizer(tok.tok, eos_token_ids=tok.eos_token_ids, bos_token_id=tok.bos_token_id,
                                           chat_template=tok.chat_template)}

        def stats(self) -> dict[str, Any]:
            return {**self.engine.stats(), "ready": self.engine.is_ready(), "replica": self.replica}

        def check_health(self) -> None:
            """Serve's health check: a dead step loop makes Serve replace this replica."""
            if not self.engine.is_ready():
                raise RuntimeError("engine step loop is not running")

        # --- housekeeping ----------------------------------------------------------------------------
        async def _housekeep(self) -> None:
            ingress = None
            last_push = 0.0
            while True:
                await asyncio.sleep(HOUSEKEEPING_S)
                try:
                    gone = await asyncio.to_thread(self.held.sync)
                    if gone:
                        log.info("replica %s dropped %s (no longer stored)", self.replica, gone)
                    if time.monotonic() - last_push >= 1.0:
                        if ingress is None:
                            ingress = serve.get_deployment_handle(*self._ingress)
                        await ingress.report.remote(self.replica, self.stats())
                        last_push = time.monotonic()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the ingress may be (re)starting: try again
                    log.debug("housekeeping: %s", exc)

        def __del__(self) -> None:
            with contextlib.suppress(Exception):
                self._housekeeping.cancel()
                self.engine.shutdown(0.0)

    return EngineReplica


class _Lease:
    """What Serve's multiplexed cache holds per model id; Serve calls `__del__` when its LRU unloads it
    (and Python may call it again at collection: idempotent)."""

    def __init__(self, held: ReplicaAdapters, ref: AdapterRef):
        self.held, self.ref, self.done = held, ref, False

    def __del__(self) -> None:
        if not self.done:
            self.done = True
            self.held.drop(self.ref.name, self.ref.version)
