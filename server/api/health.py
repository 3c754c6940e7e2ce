"""`GET /health` (liveness: the process answers) and `GET /ready` (readiness for a load balancer).

/ready is 200 only when the engine is built and reports ready, the server is not draining, and the
engine's step loop is alive (engine.stats()["step_loop_alive"], which the engine computes against
`--step-stall-s`); otherwise 503 with the reason and Retry-After (every 503 carries one). No auth
on either.
"""
from __future__ import annotations

from fastapi import APIRouter

from server.api.deps import StateDep
from server.api.errors import APIError

router = APIRouter(tags=["health"])


@router.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
def ready(state: StateDep) -> dict[str, str]:
    engine = state.engine
    if state.draining:
        raise APIError(503, "draining", code="server_draining", headers={"Retry-After": "5"})
    if engine is None or not state.started or not engine.is_ready():
        raise APIError(503, "loading", code="not_ready", headers={"Retry-After": "1"})
    if not engine.stats().get("step_loop_alive", True):
        raise APIError(503, "engine step loop stalled", code="engine_stalled", headers={"Retry-After": "1"})
    return {"status": "ready"}
