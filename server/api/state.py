"""Per-app runtime state: the engine, the settings, the draining flag and the in-flight count.

One `ServerState` lives on `app.state.loramux`. The lifespan (or the CLI's uvicorn server) fills in
the engine at start-up; routes reach it only through the `Annotated` dependencies in `deps.py`,
which tests override. The SIGTERM handler flips `draining`; the generation path counts in-flight
HTTP requests so the drain knows when it may let uvicorn stop.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from server.engine.client import EngineClient
from server.settings import ServerSettings


@dataclass
class ServerState:
    settings: ServerSettings
    factory: Callable[[ServerSettings], EngineClient] | None = None
    engine: EngineClient | None = None
    metrics: Any = None  # server.api.metrics.Metrics, created with the app
    draining: bool = False
    started: bool = False
    inflight: int = 0  # generation requests between admission and their last byte
    started_at: float = field(default_factory=time.time)
