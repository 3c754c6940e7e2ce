"""The adapter service the server uses: validate -> store -> registry (and back), and the request path.

The HTTP layer calls it directly (`EngineClient.adapters`, the `AdapterService` protocol of
server/engine/client.py): `list` / `get` return `AdapterRef`s, `acquire` / `release` count in-flight
requests, `upload` / `delete` change the store; errors are `adapters.errors.AdapterError`.

upload:   bytes -> `validate_adapter` (nothing touched on failure) -> registry.register(persist=store.write)
unload:   registry.unregister (waits for in-flight requests of that name only) -> store.delete (run
          by the registry while the name is marked as being deleted) -> slot freed by the retire listener
start-up: store.scan -> register every valid adapter at its stored version (versions are monotonic
          across restarts: the store's ledger issues them); invalid ones are logged and reported.
The slot pool's `fetch` is `manager.registry.weights`.
"""
from __future__ import annotations

from pathlib import Path

from adapters.errors import AdapterError, AdapterExists
from adapters.registry import AdapterRef, AdapterRegistry
from adapters.spec import BaseModelSpec
from adapters.store import AdapterStore
from adapters.validate import WEIGHTS_FILE, ValidationLimits, validate_adapter


class AdapterManager:
    def __init__(self, root: str | Path, spec: BaseModelSpec, limits: ValidationLimits | None = None):
        self.spec = spec
        self.limits = limits or ValidationLimits()
        self.store = AdapterStore(root)
        self.registry = AdapterRegistry(loader=lambda name: self.store.load(name, spec, self.limits))

    def load_all(self) -> list[tuple[str, AdapterError]]:
        """Register every valid stored adapter; return the invalid ones with their errors."""
        valid, invalid = self.store.scan(self.spec, self.limits)
        for loaded in valid:
            self.registry.register(loaded, version=self.store.last_version(loaded.name) or None)
        return invalid

    def upload(
        self, name: str, config_bytes: bytes, weights_bytes: bytes, replace: bool = False,
        weights_filename: str = WEIGHTS_FILE,
    ) -> AdapterRef:
        """Validate fully, then persist and publish; raises AdapterError with nothing changed on failure."""
        loaded = validate_adapter(name, config_bytes, weights_bytes, self.spec, self.limits, weights_filename)
        if name in self.registry and not replace:
            raise AdapterExists(name)  # cheap early answer; register() re-checks under its lock
        return self.registry.register(
            loaded,
            replace=replace,
            persist=lambda: self.store.write(name, config_bytes, weights_bytes, loaded.sha256, replace=replace),
        )

    def delete(self, name: str, timeout_s: float = 30.0) -> None:
        """Unregister (waits up to `timeout_s` for in-flight requests, else AdapterBusy), then remove
        the files; the slot pool frees the device slot through the registry's retire listener."""
        self.registry.unregister(name, timeout_s, remove=lambda: self.store.delete(name))

    # --- the request path and queries (the registry's, re-exported for the HTTP layer) ----------------
    def list(self) -> list[AdapterRef]:
        return self.registry.list()

    def get(self, name: str) -> AdapterRef:
        return self.registry.get(name)

    def acquire(self, name: str) -> AdapterRef:
        return self.registry.acquire(name)

    def release(self, ref: AdapterRef) -> None:
        self.registry.release(ref)
