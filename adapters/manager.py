"""The adapter admin flow in one place: validate -> store -> registry (and back), for the server.

upload:   bytes -> `validate_adapter` (nothing touched on failure) -> registry.register(persist=store.write)
unload:   registry.unregister (waits for in-flight requests) -> store.delete -> slot freed by the
          registry's retire listener
start-up: store.scan -> register every valid adapter; invalid ones are logged and reported.
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
            self.registry.register(loaded)
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

    def unload(self, name: str, timeout_s: float = 30.0) -> None:
        self.registry.unregister(name, timeout_s)
        self.store.delete(name)
