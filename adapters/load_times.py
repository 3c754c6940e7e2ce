"""A fixed-bucket histogram of adapter load times into device slots, by where the weights came from.

The slot pool (adapters/slots.py) records one observation per load: "host" when the weights were in
its host LRU, "disk" when they had to be fetched (read and validated from the store: a cold load).
`snapshot()` is plain data (cumulative bucket counts, sum, count) that the engine's stats hand to
the HTTP layer, which exports it as the Prometheus histogram `loramux_adapter_load_seconds{source}`.
Thread-safe; no torch.
"""
from __future__ import annotations

import bisect
import threading

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SOURCES = ("host", "disk")


class LoadTimes:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = {s: [0] * (len(BUCKETS) + 1) for s in SOURCES}  # last: above the top bucket
        self._sum = dict.fromkeys(SOURCES, 0.0)

    def observe(self, source: str, seconds: float) -> None:
        if source not in self._counts:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        with self._lock:
            self._counts[source][bisect.bisect_left(BUCKETS, seconds)] += 1
            self._sum[source] += seconds

    def snapshot(self) -> dict:
        """{"buckets": BUCKETS, source: {"cumulative": [count <= each bucket..., total], "sum": s, "count": n}}"""
        with self._lock:
            out: dict = {"buckets": list(BUCKETS)}
            for s in SOURCES:
                cum, run = [], 0
                for c in self._counts[s]:
                    run += c
                    cum.append(run)
                out[s] = {"cumulative": cum, "sum": self._sum[s], "count": run}
            return out

    def quantile(self, source: str, q: float) -> float | None:
        """The upper bound of the bucket holding the q-quantile (None: no observation; inf: above the top)."""
        snap = self.snapshot()[source]
        if snap["count"] == 0:
            return None
        target = q * snap["count"]
        for bound, c in zip([*BUCKETS, float("inf")], snap["cumulative"], strict=True):
            if c >= target:
                return bound
        return float("inf")
