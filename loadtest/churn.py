"""Adapter churn alongside the traffic: upload -> replace -> delete synthetic adapters, tallied apart.

Data flow: the runner starts `Churner.run()` as a task when a level starts and cancels it when
the level's traffic ends; each operation goes through `admin.upload_adapter` /
`admin.delete_adapter` at `rate` operations per second, on names owned by the churner only
(`<prefix>-churn-<k>`), so the measured traffic never targets an adapter that churn deletes.
`Churner.drain()` deletes what a cancelled cycle left (not counted); `Churner.take_tally()`
returns the level's counts and latencies, and resets them.
"""
from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict

import httpx

from loadtest.admin import delete_adapter, upload_adapter
from loadtest.stats import summary_ms

OPS = ("upload", "replace", "delete")


class Churner:
    """Cycles upload/replace/delete on its own adapter names at a fixed operation rate."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        prefix: str,
        blobs: list[tuple[bytes, bytes]],
        rate: float,
        admin_key: str | None,
        owned: set[str],
    ):
        if rate <= 0:
            raise ValueError("--churn must be > 0 operations per second")
        if len(blobs) < 2:
            raise ValueError("churn needs two adapter versions (one to upload, one to replace with)")
        self.client, self.prefix, self.blobs, self.rate, self.admin_key = client, prefix, blobs, rate, admin_key
        self.owned = owned  # shared with the run: names to delete at the end, whatever happens
        self.cycle = 0
        self._reset()

    def _reset(self) -> None:
        self.ok: Counter[str] = Counter()
        self.failed: dict[str, Counter[str]] = defaultdict(Counter)
        self.latency: dict[str, list[float]] = defaultdict(list)

    async def _op(self, op: str, name: str) -> bool:
        t0 = time.perf_counter()
        if op == "delete":
            status, reason = await delete_adapter(self.client, name, self.admin_key)
        else:
            config, weights = self.blobs[0 if op == "upload" else 1]
            status, reason = await upload_adapter(
                self.client, name, config, weights, self.admin_key, replace=(op == "replace")
            )
        self.latency[op].append(time.perf_counter() - t0)
        if reason:
            self.failed[op][f"{status if status is not None else '-'} {reason}"] += 1
            return False
        self.ok[op] += 1
        return True

    async def run(self) -> None:
        """Loop until cancelled: one operation every 1/rate seconds (never overlapping)."""
        gap = 1.0 / self.rate
        while True:
            self.cycle += 1
            name = f"{self.prefix}-churn-{self.cycle}"
            for op in OPS:
                t0 = time.perf_counter()
                if op == "upload":
                    self.owned.add(name)  # before the call: a cancelled upload may still land
                ok = await self._op(op, name)
                if op == "delete" and ok:
                    self.owned.discard(name)
                await asyncio.sleep(max(0.0, gap - (time.perf_counter() - t0)))
                if op == "upload" and not ok:
                    break  # nothing to replace or delete this cycle

    async def drain(self) -> None:
        """Delete the churn adapters a cancelled cycle left behind, so no level inherits them."""
        for name in sorted(n for n in self.owned if n.startswith(f"{self.prefix}-churn-")):
            status, _ = await delete_adapter(self.client, name, self.admin_key)
            if status in (200, 202, 204, 404):
                self.owned.discard(name)

    def take_tally(self) -> dict:
        """{op: {ok, failed: {reason: n}, latency_ms}} for the operations since the last call."""
        tally = {
            op: {
                "ok": self.ok[op],
                "failed": dict(self.failed[op]),
                "latency_ms": summary_ms(self.latency[op]),
            }
            for op in OPS
        }
        self._reset()
        return tally
