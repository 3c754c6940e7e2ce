"""Adapter management: `POST /v1/adapters` (multipart upload), list, get, `DELETE /v1/adapters/{name}`.

Upload: form field `name`, files `config` (adapter_config.json) and `weights`
(adapter_model.safetensors), optional `replace=true` for a new version. The body size is capped by
`BodySizeGuard` (413) before parsing; validation, storing and registering happen in
`engine.adapters.upload`, which blocks, so it runs in a worker thread: other streams keep producing
tokens meanwhile. Errors keep the registry's stable code (`exists` / `in_use` -> 409, `not_found`
-> 404, validation codes -> 400). Delete waits up to `--unload-timeout-s` for in-flight requests
(of that name only: other uploads and deletes go on meanwhile) and drops the adapter's metric series.
Upload and delete need the admin scope; list and get the inference scope.
"""
from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, UploadFile
from starlette.concurrency import run_in_threadpool

from adapters.errors import AdapterError
from adapters.ref import AdapterRef
from server.api.deps import AdminAuth, EngineDep, InferenceAuth, SettingsDep, StateDep
from server.api.errors import from_adapter_error, from_value_error, service_unavailable

router = APIRouter(tags=["adapters"])
_CONFIG_CODES = {"bad_config", "config_too_large", "unsupported_feature", "rank_too_large"}
_NAME_CODES = {"bad_name", "exists", "not_found", "in_use"}


def _upload_param(code: str | None) -> str:
    """Which form field an upload error is about."""
    return "name" if code in _NAME_CODES else "config" if code in _CONFIG_CODES else "weights"


def adapter_json(info: AdapterRef) -> dict[str, Any]:
    return {"object": "adapter", "name": info.name, "id": info.id, "version": info.version, "rank": info.rank,
            "target_modules": list(info.target_modules), "sha256": info.sha256,
            "created_at": info.created_at}


async def _call(param: str | None, fn, *args):
    try:
        return await run_in_threadpool(fn, *args)
    except AdapterError as exc:
        raise from_adapter_error(exc, param=param or _upload_param(exc.code)) from None
    except ValueError as exc:
        raise from_value_error(exc, param or "weights") from None


@router.post("/v1/adapters", status_code=201, dependencies=[AdminAuth])
async def upload_adapter(
    name: Annotated[str, Form()],
    config: Annotated[UploadFile, File()],
    weights: Annotated[UploadFile, File()],
    engine: EngineDep,
    state: StateDep,
    replace: Annotated[bool, Form()] = False,
) -> dict[str, Any]:
    if state.draining:
        raise service_unavailable("server is shutting down", code="server_draining", retry_after_s=5)
    config_bytes = await config.read()
    weights_bytes = await weights.read()
    # The client's file name is only looked at, never used as a path: a pickle-style name
    # (.bin/.pt/.pth/.ckpt) is refused without its bytes being parsed.
    filename = (weights.filename or "adapter_model.safetensors").rsplit("/", 1)[-1][:255]
    info = await _call(None, engine.adapters.upload, name, config_bytes, weights_bytes, replace, filename)
    return adapter_json(info)


@router.get("/v1/adapters", dependencies=[InferenceAuth])
async def list_adapters(engine: EngineDep) -> dict[str, Any]:
    infos = await _call("name", engine.adapters.list)
    return {"object": "list", "data": [adapter_json(i) for i in sorted(infos, key=lambda i: i.name)]}


@router.get("/v1/adapters/{name}", dependencies=[InferenceAuth])
async def get_adapter(name: str, engine: EngineDep) -> dict[str, Any]:
    return adapter_json(await _call("name", engine.adapters.get, name))


@router.delete("/v1/adapters/{name}", dependencies=[AdminAuth])
async def delete_adapter(name: str, engine: EngineDep, settings: SettingsDep, state: StateDep) -> dict[str, Any]:
    await _call("name", engine.adapters.delete, name, settings.unload_timeout_s)
    if state.metrics is not None:
        state.metrics.forget_adapter(name)  # its latency series go with it
    return {"object": "adapter", "id": name, "name": name, "deleted": True}
