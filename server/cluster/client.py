"""`ClusterClient`: the EngineClient (server/engine/client.py) the ingress hands to `server/api`.

The HTTP layer runs unchanged on top of it: it tokenizes with `tokenizer`, validates, acquires the
adapter from `adapters` (an AdapterManager over the ONE shared store: the ingress validates and
writes it, and its registry counts in-flight requests cluster-wide, so a delete waits for them all
or answers 409), then iterates one stream per choice. Each stream is one call to the engine
deployment through a DeploymentHandle:
  adapter requests: `multiplexed_model_id="name@version"` (Serve routes to a replica that holds that
  id, else loads it on one; a replaced adapter has a new id, so it is never served stale);
  base-model requests: no id (Serve's power-of-two-choices over the least loaded replicas).
Faults: a call that fails before its first delta (replica died, restarting, its queue full) is
retried on another replica (`RETRIES`, short backoff); one that fails after output began ends with
a clear error delta (`finish_reason="error"`), which the API sends as its error event. Nothing
waits forever: a replica's death fails its calls at once.
stats(): the replicas' pushed reports, summed (server/cluster/stats.py); is_ready(): at least one
replica ready.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import Any

from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from adapters.manager import AdapterManager
from adapters.ref import AdapterRef
from adapters.spec import BaseModelSpec
from adapters.validate import ValidationLimits
from server.cluster.replica_adapters import model_id
from server.cluster.stats import ReplicaStats
from server.engine.outputs import CompletionDelta
from server.engine.sampling_params import SamplingParams
from server.engine.schedule_plan import QueueFullError
from server.settings import ServerSettings

log = logging.getLogger("loramux.cluster")
RETRIES = 3
BACKOFF_S = 0.2
DESCRIBE_TIMEOUT_S = 600.0
# Failures after which another replica may serve the call (if it has produced nothing yet).
RETRYABLE = (RayActorError, WorkerCrashedError, BackPressureError, ReplicaUnavailableError,
             DeploymentUnavailableError, QueueFullError)


class ClusterClient:
    def __init__(self, engine_handle: Any, settings: ServerSettings):
        self.handle = engine_handle
        self.settings = settings
        self.replicas = ReplicaStats()
        self.tokenizer: Any = None
        self.adapters: AdapterManager | None = None
        self.model_name = settings.model
        self.max_model_len = 0
        self._info: dict[str, Any] = {}
        self._calls: dict[str, Any] = {}  # engine request id -> its running handle call
        self._started = False

    # --- lifecycle (server/api/app.py startup/shutdown) ----------------------------------------------
    async def start(self) -> None:
        """Waits for one engine replica to describe the model, then opens the shared adapter store."""
        desc = await asyncio.wait_for(self.handle.describe.remote(), DESCRIBE_TIMEOUT_S)
        self.tokenizer, self.model_name = desc["tokenizer"], desc["model_name"]
        self.max_model_len, self._info = desc["max_model_len"], desc["info"]
        info = self._info
        spec = BaseModelSpec(info["num_layers"], {m: tuple(d) for m, d in info["projections"].items()},
                             info["architecture"])
        manager = AdapterManager(self.settings.adapter_dir or _default_dir(), spec,
                                 ValidationLimits(max_rank=self.settings.max_lora_rank))
        for name, err in await asyncio.to_thread(manager.load_all):
            log.warning("skipping adapter %r: %s", name, err)
        self.adapters = manager
        self._started = True

    def shutdown(self, drain_timeout_s: float = 0.0) -> None:
        self._started = False

    def is_ready(self) -> bool:
        return self._started and self.replicas.ready_replicas() > 0

    def queue_full(self) -> bool:
        live = self.replicas.live()
        return bool(live) and sum(s.get("waiting", 0) for s in live) >= self.settings.max_waiting * len(live)

    def model_info(self) -> dict[str, Any]:
        return {**self._info, "replicas": self.replicas.ready_replicas()}

    def stats(self) -> dict[str, Any]:
        return self.replicas.aggregate()

    def report(self, replica: str, stats: dict) -> None:
        self.replicas.report(replica, stats)

    # --- requests ------------------------------------------------------------------------------------
    def submit(self, jobs: list[tuple[str, list[int], SamplingParams]],
               adapter: AdapterRef | None = None) -> list[AsyncIterator[CompletionDelta]]:
        if not self._started:
            raise RuntimeError("engine is not running")
        return [self._stream(rid, ids, params, adapter) for rid, ids, params in jobs]

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       adapter: AdapterRef | None = None) -> AsyncIterator[CompletionDelta]:
        [stream] = self.submit([(request_id, prompt_token_ids, params)], adapter)
        try:
            async for delta in stream:
                yield delta
        finally:
            await stream.aclose()

    async def abort(self, request_id: str) -> None:
        call = self._calls.pop(request_id, None)
        if call is not None:
            call.cancel()

    async def _stream(self, rid: str, ids: list[int], params: SamplingParams,
                      adapter: AdapterRef | None) -> AsyncIterator[CompletionDelta]:
        guide = params.guide.spec if params.guide is not None else None  # the matcher does not pickle
        params = dataclasses.replace(params, guide=None)
        handle = self.handle.options(stream=True, **({"multiplexed_model_id": model_id(adapter)} if adapter else {}))
        attempt, produced, finished = 0, False, False
        try:
            while True:
                call = handle.generate.remote(rid, ids, params, adapter, guide)
                self._calls[rid] = call
                try:
                    async for delta in call:
                        produced = True
                        finished = delta.finished
                        yield delta
                        if finished:
                            return
                    finished = True
                    yield _error(rid, "engine replica ended the stream early")
                    return
                except RETRYABLE as exc:
                    retry = not produced and attempt < RETRIES
                    log.warning("engine call %s failed (%s)%s", rid, type(exc).__name__,
                                "; retrying" if retry else "")
                    if not retry:
                        finished = True
                        yield _error(rid, f"engine replica failed {'mid-stream' if produced else 'repeatedly'} "
                                          f"({type(exc).__name__}); retry the request")
                        return
                    attempt += 1
                    await asyncio.sleep(BACKOFF_S * attempt)
                except RayTaskError as exc:  # the replica raised (bad adapter, value error): no retry
                    finished = True
                    cause = getattr(exc, "cause", None) or exc
                    first = (str(cause).splitlines() or [""])[0][:200]
                    yield _error(rid, f"{type(cause).__name__}: {first}")
                    return
        finally:
            call = self._calls.pop(rid, None)
            if call is not None and not finished:
                call.cancel()  # the client went away: the replica's generator is cancelled, aborting it


def _error(rid: str, message: str) -> CompletionDelta:
    return CompletionDelta(rid, "", finished=True, finish_reason="error", error=message)


def _default_dir() -> str:
    import tempfile
    from pathlib import Path

    return str(Path(tempfile.gettempdir()) / "loramux-adapters")
