"""Summing engine replicas' `stats()` into the one dict the ingress's /metrics and /ready read.

Each replica pushes its stats about once a second (engine_replica.py); `ReplicaStats` keeps the last
report per replica. A report older than `STALE_S` counts as a replica gone (killed, restarting):
its gauges leave the sum at once, and its counters are folded into `retired`, so that a cluster
counter never goes backwards when a replica is replaced (Prometheus would read a reset).
Aggregation: counters and gauges sum (running, waiting, KV blocks, slots, loads...), adapter lists
are unions, the load-time histogram sums bucket by bucket, residency becomes name -> {level:
replicas}, arrivals (affinity) sum by level, `step_loop_alive` is true when any replica's loop is.
Plain Python: no Ray, no torch.
"""
from __future__ import annotations

import threading
import time
from typing import Any

STALE_S = 5.0
COUNTERS = ("adapter_loads", "adapter_evictions", "preemptions", "prompt_tokens", "generation_tokens",
            "steps", "scheduled_sequences")
GAUGES = ("running", "waiting", "kv_blocks_used", "kv_blocks_total", "slots_used", "slots_total")


class ReplicaStats:
    def __init__(self, stale_s: float = STALE_S):
        self.stale_s = stale_s
        self._lock = threading.Lock()
        self._reports: dict[str, tuple[float, dict]] = {}
        self._retired: dict[str, Any] = {}  # counters, arrivals, histogram of replicas gone

    def report(self, replica: str, stats: dict) -> None:
        with self._lock:
            self._reports[replica] = (time.monotonic(), stats)

    def live(self) -> list[dict]:
        """Fresh reports (retiring stale ones)."""
        now = time.monotonic()
        with self._lock:
            for replica, (t, stats) in list(self._reports.items()):
                if now - t > self.stale_s:
                    del self._reports[replica]
                    self._retired = _add_counters(self._retired, stats)
            return [s for _, s in self._reports.values()]

    def ready_replicas(self) -> int:
        return sum(1 for s in self.live() if s.get("ready") and s.get("step_loop_alive", True))

    def aggregate(self) -> dict[str, Any]:
        live = self.live()
        with self._lock:
            out: dict[str, Any] = _add_counters(dict(self._retired), *live)
        for key in GAUGES:
            out[key] = sum(s.get(key, 0) for s in live)
        out["running_adapters"] = sorted({a for s in live for a in s.get("running_adapters", [])})
        out["waiting_adapters"] = sorted({a for s in live for a in s.get("waiting_adapters", [])})
        residency: dict[str, dict[str, int]] = {}
        for s in live:
            for name, level in s.get("adapter_residency", {}).items():
                residency.setdefault(name, {})
                residency[name][level] = residency[name].get(level, 0) + 1
        out["adapter_residency"] = residency
        out["step_loop_alive"] = any(s.get("step_loop_alive", False) for s in live)
        out["replicas"] = len(live)
        return out


def _add_counters(base: dict, *reports: dict) -> dict:
    """base + every report's counters, arrivals by level and load-time histogram."""
    out = dict(base)
    for s in reports:
        for key in COUNTERS:
            out[key] = out.get(key, 0) + s.get(key, 0)
        arrivals = dict(out.get("adapter_arrivals", {}))
        for level, n in s.get("adapter_arrivals", {}).items():
            arrivals[level] = arrivals.get(level, 0) + n
        out["adapter_arrivals"] = arrivals
        out["adapter_load_seconds"] = _add_hist(out.get("adapter_load_seconds"), s.get("adapter_load_seconds"))
    return out


def _add_hist(a: dict | None, b: dict | None) -> dict | None:
    if not b:
        return a
    if not a:
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in b.items()}
    out = {"buckets": a["buckets"]}
    for source in ("host", "disk"):
        x, y = a[source], b[source]
        out[source] = {"cumulative": [i + j for i, j in zip(x["cumulative"], y["cumulative"], strict=True)],
                       "sum": x["sum"] + y["sum"], "count": x["count"] + y["count"]}
    return out
