"""The ingress deployment: owns HTTP with the single server's app (`server.api.app.create_app`), unchanged.

Serve builds the ASGI app on the replica (`__serve_build_asgi_app__`) over a `ClusterClient`, and runs
the app's lifespan: `startup` awaits `ClusterClient.start()` (one engine replica describes the model,
the shared adapter store is opened), so Serve reports the ingress healthy only once it can serve.
Same routes, auth, limits, validation, OpenAI error shapes and SSE streaming as `loramux serve`.
Engine replicas call `report(replica, stats)` through a handle about once a second.
"""
from __future__ import annotations

from typing import Any

from server.api.app import create_app
from server.cluster.client import ClusterClient
from server.settings import ServerSettings


class Ingress:
    def __init__(self, engine_handle: Any, settings: ServerSettings):
        self.settings = settings
        self.client = ClusterClient(engine_handle, settings)

    def __serve_build_asgi_app__(self):
        return create_app(self.client, self.settings)

    def report(self, replica: str, stats: dict) -> None:
        self.client.report(replica, stats)
