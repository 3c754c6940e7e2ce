"""The adapters one engine replica holds, keyed by (name, version), read on demand from the shared store.

The ingress owns the store (validate, atomic write, version ledger: adapters/manager.py); a replica
only reads it and never writes or "recovers" it (so `AdapterStore` is not constructed here: its
start-up recovery would delete an upload the ingress is writing). Data flow on a replica:
  Serve's multiplexed loader (model id "name@version") -> `load(name, version)`: read + fully
  validate the stored files, check the stored version and hash, mint a LOCAL ref (fresh id: device
  slots and the host cache key by it; ingress ids are not unique across ingress restarts)
  -> `acquire`/`release` around each request -> the slot pool's `fetch` is `weights(ref)`.
  Serve's LRU unload, or `sync()` seeing the store moved on (replaced or deleted), calls `drop()`;
  a dropped version retires (slot + host copy freed through the retire listeners) once its
  in-flight count is zero. So "held in host memory on this replica" == held here.
It offers what `build_llm_engine` needs of an adapter manager: `spec` and `registry` (itself) with
`weights` and `add_retire_listener`.
"""
from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from adapters.errors import AdapterError, AdapterNotFound
from adapters.ref import AdapterRef
from adapters.spec import BaseModelSpec
from adapters.store import META_FILE
from adapters.validate import LoadedAdapter, ValidationLimits, check_name, read_adapter_dir, validate_adapter

SEP = "@"


def model_id(ref: AdapterRef) -> str:
    """Serve's multiplexed model id of an adapter version: "name@version" (versions never repeat)."""
    return f"{ref.name}{SEP}{ref.version}"


def parse_model_id(mid: str) -> tuple[str, int]:
    name, sep, version = mid.rpartition(SEP)
    if not sep or not version.isdigit():
        raise ValueError(f"bad adapter model id {mid!r}")
    return name, int(version)


@dataclass
class _Held:
    ref: AdapterRef  # the local ref (local id)
    loaded: LoadedAdapter
    in_flight: int = 0
    dropped: bool = False


class ReplicaAdapters:
    def __init__(self, root: str | Path, spec: BaseModelSpec, limits: ValidationLimits):
        self.root, self.spec, self.limits = Path(root), spec, limits
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._held: dict[tuple[str, int], _Held] = {}
        self._by_id: dict[int, _Held] = {}
        self._listeners: list[Callable[[AdapterRef], None]] = []
        self.reads = 0  # store reads (cold loads into this replica)

    # --- what build_llm_engine needs of a manager -------------------------------------------------
    @property
    def registry(self) -> ReplicaAdapters:
        return self

    def add_retire_listener(self, fn: Callable[[AdapterRef], None]) -> None:
        self._listeners.append(fn)

    def weights(self, ref: AdapterRef) -> LoadedAdapter:
        with self._lock:
            held = self._by_id.get(ref.id)
        if held is None:
            raise AdapterNotFound(ref.name)
        return held.loaded

    # --- queries ----------------------------------------------------------------------------------
    def holding(self, name: str, version: int) -> AdapterRef | None:
        with self._lock:
            held = self._held.get((name, version))
            return held.ref if held is not None and not held.dropped else None

    def names(self) -> list[str]:
        with self._lock:
            return sorted({n for (n, _), h in self._held.items() if not h.dropped})

    # --- load / use / drop ------------------------------------------------------------------------
    def stored_meta(self, name: str) -> dict:
        path = self.root / check_name(name) / META_FILE
        try:
            meta = json.loads(path.read_bytes()[: 64 * 1024]) if path.is_file() and not path.is_symlink() else {}
        except (ValueError, OSError):
            return {}
        return meta if isinstance(meta, dict) else {}

    def load(self, name: str, version: int) -> AdapterRef:
        """The local ref of name@version, reading the store if not held (blocking: run in a thread).
        AdapterNotFound when the store no longer has that version (replaced or deleted since)."""
        with self._lock:
            held = self._held.get((name, version))
            if held is not None:
                held.dropped = False  # asked for again before it retired
                return held.ref
        meta = self.stored_meta(name)
        if meta.get("version") != version:
            raise AdapterNotFound(name)
        path = self.root / name
        config, weights = read_adapter_dir(path, self.limits.max_weights_bytes)
        loaded = validate_adapter(name, config, weights, self.spec, self.limits)
        if loaded.sha256 != meta.get("sha256") or self.stored_meta(name).get("version") != version:
            raise AdapterNotFound(name)  # replaced while we read it
        with self._lock:
            self.reads += 1
            held = self._held.get((name, version))
            if held is None:
                ref = AdapterRef(name=name, id=next(self._ids), version=version, sha256=loaded.sha256,
                                 ranks=tuple(loaded.ranks.items()), target_modules=loaded.target_modules,
                                 max_rank=loaded.max_rank, created_at=0.0)
                held = self._held[(name, version)] = self._by_id[ref.id] = _Held(ref, loaded)
            held.dropped = False
            return held.ref

    def local(self, ref: AdapterRef) -> AdapterRef:
        """This replica's ref for the ingress's `ref`: same version and content, local id."""
        local = self.holding(ref.name, ref.version)
        if local is None or local.sha256 != ref.sha256:
            raise AdapterError("not_found", f"adapter {ref.name!r} v{ref.version} is no longer stored")
        return local

    def acquire(self, ref: AdapterRef) -> None:
        with self._lock:
            held = self._by_id.get(ref.id)
            if held is None:
                raise AdapterNotFound(ref.name)
            held.in_flight += 1

    def release(self, ref: AdapterRef) -> None:
        with self._lock:
            held = self._by_id.get(ref.id)
            if held is None:
                return
            held.in_flight -= 1
            retired = self._maybe_retire(held)
        self._notify(retired)

    def drop(self, name: str, version: int) -> None:
        """Stop holding name@version: it retires now, or when its last running request ends."""
        with self._lock:
            held = self._held.get((name, version))
            if held is None:
                return
            held.dropped = True
            retired = self._maybe_retire(held)
        self._notify(retired)

    def sync(self) -> list[str]:
        """Drop every held version the store no longer has (deleted or replaced); returns them."""
        with self._lock:
            keys = [k for k, h in self._held.items() if not h.dropped]
        gone = []
        for name, version in keys:
            if self.stored_meta(name).get("version") != version:
                self.drop(name, version)
                gone.append(f"{name}{SEP}{version}")
        return gone

    def _maybe_retire(self, held: _Held) -> AdapterRef | None:
        if not held.dropped or held.in_flight > 0:
            return None
        key = (held.ref.name, held.ref.version)
        if self._held.get(key) is held:
            del self._held[key]
        self._by_id.pop(held.ref.id, None)
        return held.ref

    def _notify(self, ref: AdapterRef | None) -> None:
        if ref is not None:
            for fn in self._listeners:
                fn(ref)
