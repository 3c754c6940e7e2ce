"""The adapter registry: the single source of truth for which adapters exist and who uses them.

name -> current immutable `AdapterRef`; per-version in-flight counts; weights of versions that
were replaced or unregistered but still serve running requests. Shared by the asyncio thread
(acquire on request admission, release on finish) and the engine thread (weights lookups), so
every read-modify-write happens under one lock; slow work (loading from disk, waiting for
requests to drain) happens outside it. Protocol (after SGLang's lora_registry):
- `acquire(name)` looks up and counts in one atomic step; unknown -> AdapterNotFound (404).
- `register(loaded, replace)`: a new version gets a fresh id (ids are never reused); requests
  already running keep their old ref, and its weights stay pinned until they finish.
- `unregister(name, timeout_s, remove=)`: removes the name first (new acquires fail), then waits for
  the in-flight count of all its versions to reach zero, then runs `remove()` (the store delete);
  on timeout the name is restored and AdapterBusy (409) raised. Only that name waits: the admin
  lock is not held meanwhile (the name is marked as being deleted, so an upload of the same name
  gets a 409 instead of racing the delete).
- Versions: `persist()` may return the version the store issued (monotonic across restarts);
  `register(..., version=)` takes the stored version at start-up.
- When a version is retired (not current and no request in flight), listeners are told, so the
  slot pool frees its device slot and host copy.
Torch-free (weights are opaque objects here), so the HTTP layer may import it and its refs.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from adapters.errors import AdapterBusy, AdapterError, AdapterExists, AdapterNotFound
from adapters.ref import AdapterRef

if TYPE_CHECKING:  # the weights type holds tensors; the registry itself never touches torch
    from adapters.validate import LoadedAdapter

__all__ = ["AdapterRef", "AdapterRegistry"]


class AdapterRegistry:
    """Thread-safe name -> AdapterRef map with in-flight accounting.

    `loader(name)` re-reads the current weights of a name (e.g. from the AdapterStore); without a
    loader the registry keeps every registered LoadedAdapter in memory (tests, small deployments).
    """

    def __init__(self, loader: Callable[[str], LoadedAdapter] | None = None):
        self._loader = loader
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._admin = threading.Lock()  # serialises register / unregister (they do slow work)
        self._ids = itertools.count(1)
        self._current: dict[str, AdapterRef] = {}
        self._versions: dict[str, int] = {}
        self._in_flight: dict[int, int] = {}  # ref id -> running requests
        self._live: dict[int, AdapterRef] = {}  # every version not yet retired
        self._pinned: dict[int, LoadedAdapter] = {}  # weights held in memory, by ref id
        self._listeners: list[Callable[[AdapterRef], None]] = []
        self._deleting: set[str] = set()  # names whose unregister is waiting for requests to drain

    # --- queries ------------------------------------------------------------------------------
    def get(self, name: str) -> AdapterRef:
        with self._lock:
            ref = self._current.get(name)
        if ref is None:
            raise AdapterNotFound(name)
        return ref

    def list(self) -> list[AdapterRef]:
        with self._lock:
            return sorted(self._current.values(), key=lambda r: r.name)

    def in_flight(self, ref: AdapterRef) -> int:
        with self._lock:
            return self._in_flight.get(ref.id, 0)

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._current

    def add_retire_listener(self, fn: Callable[[AdapterRef], None]) -> None:
        """fn(ref) runs (outside the lock, on whichever thread retired it) when a version retires."""
        self._listeners.append(fn)

    # --- request path -------------------------------------------------------------------------
    def acquire(self, name: str) -> AdapterRef:
        with self._lock:
            ref = self._current.get(name)
            if ref is None:
                raise AdapterNotFound(name)
            self._in_flight[ref.id] = self._in_flight.get(ref.id, 0) + 1
            return ref

    def release(self, ref: AdapterRef) -> None:
        with self._lock:
            count = self._in_flight.get(ref.id, 0)
            if count <= 0:
                raise ValueError(f"release of adapter {ref.name!r} v{ref.version} without a matching acquire")
            self._in_flight[ref.id] = count - 1
            retired = self._maybe_retire(ref)
            self._drained.notify_all()
        self._notify(retired)

    def weights(self, ref: AdapterRef) -> LoadedAdapter:
        """The LoadedAdapter of exactly this version (slot pool `fetch`)."""
        with self._lock:
            pinned = self._pinned.get(ref.id)
            current = self._current.get(ref.name)
        if pinned is not None:
            return pinned
        if self._loader is None or current is None or current.id != ref.id:
            raise AdapterNotFound(ref.name)
        loaded = self._loader(ref.name)
        if loaded.sha256 != ref.sha256:  # the store moved on under us: never serve other weights
            raise AdapterError("corrupt", f"stored adapter {ref.name!r} no longer matches v{ref.version}")
        return loaded

    # --- admin path ---------------------------------------------------------------------------
    def register(
        self, loaded: LoadedAdapter, replace: bool = False, persist: Callable[[], object] | None = None,
        version: int | None = None,
    ) -> AdapterRef:
        """Make `loaded` the current version of its name. `persist()` (e.g. the store write) runs
        after the old version's weights are safe in memory and before the new ref is published; an
        int it returns is the new version (else, or without it, `version` or the next in memory)."""
        with self._admin:
            with self._lock:
                old = self._current.get(loaded.name)
                deleting = loaded.name in self._deleting
            if deleting:
                raise AdapterBusy(loaded.name, 0, 0.0, deleting=True)
            if old is not None and not replace:
                raise AdapterExists(loaded.name)
            # Keep the old weights: running requests may still need them after persist() overwrote disk.
            old_weights = self.weights(old) if old is not None else None
            stored = persist() if persist is not None else None
            with self._lock:
                version = stored if isinstance(stored, int) else version
                if version is None:
                    version = self._versions.get(loaded.name, 0) + 1
                ref = AdapterRef(
                    name=loaded.name, id=next(self._ids), version=version, sha256=loaded.sha256,
                    ranks=tuple(loaded.ranks.items()), target_modules=loaded.target_modules,
                    max_rank=loaded.max_rank, created_at=time.time(),
                )
                self._versions[loaded.name] = version
                self._current[loaded.name] = ref
                self._live[ref.id] = ref
                if self._loader is None:
                    self._pinned[ref.id] = loaded
                retired = None
                if old is not None:
                    self._pinned[old.id] = old_weights
                    retired = self._maybe_retire(old)
            self._notify(retired)
            return ref

    def unregister(self, name: str, timeout_s: float = 30.0, remove: Callable[[], object] | None = None) -> None:
        """Remove `name`; wait (up to timeout_s) for its in-flight requests, run `remove()`, then retire
        its versions. Other names' uploads and deletes proceed meanwhile."""
        deadline = time.monotonic() + timeout_s
        with self._admin:
            with self._lock:
                ref = self._current.get(name)
            if ref is None:
                raise AdapterNotFound(name)
            # Requests already running (or acquiring right now) may still need the weights for a slot
            # load after the name is gone: keep them in memory until the version retires, as a replace does.
            try:
                weights = self.weights(ref)
            except AdapterError:
                weights = None  # unreadable: running requests fail their slot load, nothing else breaks
            with self._lock:
                self._current.pop(name, None)
                if weights is not None:
                    self._pinned.setdefault(ref.id, weights)
                self._deleting.add(name)
        try:
            with self._lock:
                versions = [r for r in self._live.values() if r.name == name]
                while (busy := sum(self._in_flight.get(r.id, 0) for r in versions)) > 0:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self._current[name] = ref  # keep serving it: the caller may retry later
                        raise AdapterBusy(name, busy, timeout_s)
                    self._drained.wait(left)
            if remove is not None:
                try:
                    remove()
                except BaseException:
                    with self._lock:
                        self._current[name] = ref  # the files are still there: keep serving them
                    raise
            with self._lock:
                retired = [r for r in versions if self._maybe_retire(r) is not None]
        finally:
            with self._lock:
                self._deleting.discard(name)
        for r in retired:
            self._notify(r)

    # --- internals (lock held) ----------------------------------------------------------------
    def _maybe_retire(self, ref: AdapterRef) -> AdapterRef | None:
        if self._in_flight.get(ref.id, 0) > 0 or self._current.get(ref.name) == ref or ref.id not in self._live:
            return None
        del self._live[ref.id]
        self._in_flight.pop(ref.id, None)
        self._pinned.pop(ref.id, None)
        return ref

    def _notify(self, ref: AdapterRef | None) -> None:
        if ref is not None:
            for fn in self._listeners:
                fn(ref)
