"""The app factory: `create_app(engine_or_factory, settings) -> FastAPI`.

Wiring: one `ServerState` on `app.state.loramux`; routers per resource (completions, chat, models,
adapters, health, metrics), each carrying its own auth dependency; OpenAI-shaped error handlers;
ASGI middleware (outermost first): access log + HTTP metrics, then the body size guard.
Lifecycle: `startup(state)` builds the engine if given a factory and starts it; `shutdown(state)`
flips draining and calls `engine.shutdown(drain_timeout_s)`. The FastAPI lifespan calls both
(TestClient, plain uvicorn); the CLI's uvicorn server calls them itself so it can report start-up
errors as one line (see `server/api/serve.py`).
"""
from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from server.api import adapters, chat, completions, health, metrics, models
from server.api.errors import install_error_handlers
from server.api.metrics import Metrics
from server.api.middleware import AccessLog, BodySizeGuard
from server.api.state import ServerState
from server.engine.client import EngineClient
from server.settings import ServerSettings

EngineOrFactory = EngineClient | Callable[[ServerSettings], EngineClient]


async def _call_maybe_async(fn: Callable, *args) -> object:
    """Awaits coroutine functions; runs plain blocking ones in a thread so the loop keeps serving."""
    if inspect.iscoroutinefunction(fn):
        return await fn(*args)
    result = await asyncio.to_thread(fn, *args)
    return await result if inspect.isawaitable(result) else result


async def startup(state: ServerState) -> None:
    """Builds (if needed) and starts the engine. Idempotent."""
    if state.started:
        return
    if state.engine is None:
        assert state.factory is not None, "ServerState needs an engine or a factory"
        state.engine = await asyncio.to_thread(state.factory, state.settings)
    start = getattr(state.engine, "start", None)
    if start is not None:
        # Called on the loop thread: an engine may bind its stream delivery to the running loop.
        result = start()
        if inspect.isawaitable(result):
            await result
    state.started = True


async def shutdown(state: ServerState) -> None:
    """Refuses new work, then lets the engine finish running requests within the drain timeout."""
    state.draining = True
    engine, state.started = state.engine, False
    stop = getattr(engine, "shutdown", None)
    if stop is not None:
        await _call_maybe_async(stop, state.settings.drain_timeout_s)


def create_app(engine_or_factory: EngineOrFactory, settings: ServerSettings | None = None,
               manage_lifecycle: bool = True) -> FastAPI:
    """`manage_lifecycle=False`: the caller runs `startup`/`shutdown` (the CLI server does)."""
    settings = settings or ServerSettings()
    state = ServerState(settings=settings)
    if hasattr(engine_or_factory, "generate"):
        state.engine = engine_or_factory  # type: ignore[assignment]
    else:
        state.factory = engine_or_factory  # type: ignore[assignment]
    state.metrics = Metrics(state)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if manage_lifecycle:
            await startup(state)
        try:
            yield
        finally:
            if manage_lifecycle:
                await shutdown(state)

    # With auth on, the schema pages would be routes outside the auth model: switch them off.
    open_docs = not settings.auth_enabled
    app = FastAPI(title="loramux", version="0.1.0", lifespan=lifespan,
                  docs_url="/docs" if open_docs else None, redoc_url=None,
                  openapi_url="/openapi.json" if open_docs else None)
    app.state.loramux = state
    install_error_handlers(app)
    for module in (completions, chat, models, adapters, health, metrics):
        app.include_router(module.router)
    app.add_middleware(BodySizeGuard, state=state)
    app.add_middleware(AccessLog, state=state)  # added last = outermost: sees 413s too
    return app
