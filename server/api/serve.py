"""Runs the app under uvicorn with a draining SIGTERM and clean start-up errors.

SIGTERM / SIGINT (first one): `draining` is set at once, so /ready answers 503 and new inference
requests 503 while the listener is still open (a load balancer sees the flip instead of refused
connections); running requests get up to `--drain-timeout-s` to finish; then uvicorn's normal exit
runs (close listener, wait for connections, which by then are idle) and `shutdown(state)` stops the
engine. A second signal exits at once. Unlike plain uvicorn we do not re-raise the signal after the
graceful exit, so a drained server exits with status 0.
Start-up: uvicorn binds the port first, then the engine is built and started in the background
(`startup(state)`): meanwhile /health answers 200 and /ready and inference 503 with Retry-After.
A failure (model load, engine start) is kept in `startup_error` (one line) for the CLI to print,
never a traceback, and the server exits (the CLI exits non-zero).
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time

import uvicorn
from fastapi import FastAPI

from server.api.app import shutdown, startup
from server.api.state import ServerState

log = logging.getLogger("loramux.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state
        self.startup_error: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None
        self._engine_task: asyncio.Task | None = None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)  # the port is open from here on
        if self.should_exit:
            return  # could not bind
        self._engine_task = asyncio.ensure_future(self._start_engine())

    async def _start_engine(self) -> None:
        try:
            await startup(self.state)
        except Exception as exc:  # model load errors, bad engine settings...
            message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            self.startup_error = " ".join(str(message).split())  # one line; the operator may need the path
            self.should_exit = True

    async def shutdown(self, sockets=None) -> None:
        await super().shutdown(sockets)
        task = self._engine_task
        if task is not None and not task.done():
            # Signalled while the model loads: let the build finish (it runs in a thread), then stop it.
            await asyncio.gather(task, return_exceptions=True)
        await shutdown(self.state)

    def handle_exit(self, sig: int, frame) -> None:
        # Not appending to `_captured_signals`: uvicorn would re-raise it and exit with -SIGTERM.
        if self.state.draining or self._loop is None or not self.started:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            return
        self.state.draining = True
        log.info("signal %d: draining (up to %.0fs)", sig, self.state.settings.drain_timeout_s)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.state.settings.drain_timeout_s
        while self.state.inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.state.inflight > 0:
            log.warning("drain timeout: %d request(s) still running are cancelled", self.state.inflight)
        self.should_exit = True


def run(app: FastAPI, host: str, port: int, log_level: str) -> str | None:
    """Serves until drained; returns a one-line start-up error, or None after a clean exit."""
    state: ServerState = app.state.loramux
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off",
                            access_log=False, timeout_graceful_shutdown=1)
    server = DrainingServer(config, state)
    server.run()
    return server.startup_error
