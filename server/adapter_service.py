"""The adapter lifecycle as the HTTP layer sees it (`AdapterManagerLike` in engine_client.py).

A thin facade over `adapters.manager.AdapterManager` (validate -> store -> registry) that turns
registry refs into `AdapterInfo` for responses. The slot pool hangs off the registry's retire
listener (wired in engine_builder), so a deleted or replaced version leaves its device slot as
soon as its last in-flight request ends. All calls may block (disk, waiting for in-flight
requests): async routes run them in a thread.
"""
from __future__ import annotations

from adapters.manager import AdapterManager
from adapters.registry import AdapterRef
from server.engine_client import AdapterInfo


def to_info(ref: AdapterRef) -> AdapterInfo:
    return AdapterInfo(
        name=ref.name,
        id=ref.id,
        version=ref.version,
        rank=ref.max_rank,
        target_modules=tuple(ref.target_modules),
        sha256=ref.sha256,
        created_at=ref.created_at,
    )


class AdapterService:
    def __init__(self, manager: AdapterManager) -> None:
        self.manager = manager
        self.registry = manager.registry

    def list(self) -> list[AdapterInfo]:
        return [to_info(r) for r in self.registry.list()]

    def get(self, name: str) -> AdapterInfo:
        return to_info(self.registry.get(name))

    def acquire(self, name: str) -> AdapterRef:
        return self.registry.acquire(name)

    def release(self, ref: AdapterRef) -> None:
        self.registry.release(ref)

    def info(self, ref: AdapterRef) -> AdapterInfo:
        return to_info(ref)

    def upload(self, name: str, config_bytes: bytes, weights_bytes: bytes, replace: bool = False,
               weights_filename: str = "adapter_model.safetensors") -> AdapterInfo:
        return to_info(self.manager.upload(name, config_bytes, weights_bytes, replace=replace,
                                           weights_filename=weights_filename))

    def delete(self, name: str, timeout_s: float) -> None:
        self.manager.unload(name, timeout_s)
