"""`AdapterRef`: one registered adapter version, as plain immutable data (no torch anywhere).

The registry (adapters/registry.py) mints a ref per version; the HTTP layer shows it
(`GET /v1/adapters`, `/v1/models`), a `Request` carries it whole through the engine, and the slot
pool keys device slots by its `id`. Nothing here refers to weights: those are looked up by ref.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AdapterRef:
    name: str
    id: int  # unique per version, never reused: the device-slot / cache identity
    version: int  # 1, 2, ... per name within this registry's life
    sha256: str
    ranks: tuple[tuple[str, int], ...]  # (hf module name, rank), in module order
    target_modules: tuple[str, ...]
    max_rank: int
    created_at: float  # unix seconds

    @property
    def rank(self) -> int:
        """The largest rank over its modules (what `GET /v1/adapters` shows as `rank`)."""
        return self.max_rank
