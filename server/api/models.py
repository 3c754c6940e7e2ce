"""`GET /v1/models` and `GET /v1/models/{id}`: the base model (with its shape, so clients can build
adapters that fit) and one entry per registered adapter (`parent` = the base model's id).

Reads `engine.model_info()` and `engine.adapters.list()/get()`; the adapter listing goes through
a thread because the registry may hold its lock while an upload is being validated.
"""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from adapters.errors import AdapterError, AdapterNotFound
from adapters.ref import AdapterRef
from server.api.deps import EngineDep, InferenceAuth, SettingsDep, StateDep
from server.api.errors import APIError, from_adapter_error
from server.api.generation import base_names
from server.engine.client import EngineClient

router = APIRouter(dependencies=[InferenceAuth], tags=["models"])


def base_entry(engine: EngineClient, created: int) -> dict[str, Any]:
    return {"id": engine.model_name, "object": "model", "created": created, "owned_by": "loramux",
            "parent": None, "root": engine.model_name, "max_model_len": engine.max_model_len,
            "loramux": engine.model_info()}


def adapter_entry(engine: EngineClient, info: AdapterRef) -> dict[str, Any]:
    return {"id": info.name, "object": "model", "created": int(info.created_at), "owned_by": "loramux",
            "parent": engine.model_name, "root": engine.model_name,
            "loramux": {"version": info.version, "adapter_id": info.id, "rank": info.rank,
                        "target_modules": list(info.target_modules), "sha256": info.sha256}}


@router.get("/v1/models")
async def list_models(engine: EngineDep, state: StateDep) -> dict[str, Any]:
    infos = await run_in_threadpool(engine.adapters.list)
    data = [base_entry(engine, int(state.started_at))]
    data += [adapter_entry(engine, info) for info in sorted(infos, key=lambda i: i.name)]
    return {"object": "list", "data": data}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, engine: EngineDep, settings: SettingsDep, state: StateDep) -> dict[str, Any]:
    if model_id in base_names(engine, settings):
        return base_entry(engine, int(state.started_at))
    try:
        info = await run_in_threadpool(engine.adapters.get, model_id)
    except AdapterNotFound:
        raise APIError(404, f"model {model_id!r} not found", param="model", code="model_not_found") from None
    except AdapterError as exc:
        raise from_adapter_error(exc, param="model") from None
    return adapter_entry(engine, info)
