"""Prometheus metrics: `GET /metrics` on a per-app registry (several apps can share one process).

Two sources: a custom Collector that reads `engine.stats()` at scrape time (gauges and counters the
engine owns), and histograms / counters the HTTP layer observes itself (TTFT, inter-token and
end-to-end latency labelled by adapter, HTTP requests by route and status). Metric names are a
contract: the load-test tool reads them.

Label cardinality: the adapter label takes at most `MAX_ADAPTER_SERIES` adapter names (plus "base"
and "other"); when full, the least recently observed name gives its series up (removed) to the
new one only if it has been idle for `SERIES_IDLE_S`, otherwise the new adapter is counted under
"other". So busy adapters keep their own series and idle ones make room. A deleted adapter's
series are removed (`forget_adapter`).
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                    20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                2.5, 5.0)

MAX_ADAPTER_SERIES = 32  # adapter label values with their own series (besides "base" and "other")
SERIES_IDLE_S = 300.0  # an adapter series idle this long may be given up to a new adapter
OTHER, BASE = "other", "base"

# stats() key -> (metric name, help) for monotonic counters the engine keeps.
_COUNTERS = {
    "adapter_loads": ("loramux_adapter_loads", "Adapter loads into device slots"),
    "adapter_evictions": ("loramux_adapter_evictions", "Adapters evicted from device slots"),
    "prompt_tokens": ("loramux_prompt_tokens", "Prompt tokens processed"),
    "generation_tokens": ("loramux_generation_tokens", "Tokens generated"),
    "preemptions": ("loramux_preemptions", "Requests preempted (recompute)"),
    "steps": ("loramux_engine_steps", "Engine steps run"),
    "scheduled_sequences": ("loramux_scheduled_sequences",
                            "Sum over steps of sequences in the step (mean batch = delta / delta steps)"),
    "prefix_cache_queries": ("loramux_prefix_cache_queries", "Prompt tokens looked up in the prefix cache"),
    "prefix_cache_hits": ("loramux_prefix_cache_hits", "Prompt tokens whose KV the prefix cache held"),
    "prefix_cache_evictions": ("loramux_prefix_cache_evictions", "Cached KV blocks given up for new ones"),
}
_GAUGES = {
    "running": ("loramux_requests_running", "Requests in the running batch"),
    "waiting": ("loramux_requests_waiting", "Requests waiting to be scheduled"),
    "slots_used": ("loramux_adapter_slots_used", "Device adapter slots holding an adapter"),
    "slots_total": ("loramux_adapter_slots_total", "Device adapter slots"),
}


class EngineCollector:
    """Reads engine.stats() on every scrape; missing keys are skipped, never invented."""

    def __init__(self, state: Any):
        self.state = state

    def describe(self) -> list:
        return []  # dynamic: skip registration-time collection

    def collect(self):
        engine = self.state.engine
        if engine is None:
            return
        stats = engine.stats()
        for key, (name, doc) in _GAUGES.items():
            if key in stats:
                yield GaugeMetricFamily(name, doc, value=float(stats[key]))
        used, total = stats.get("kv_blocks_used"), stats.get("kv_blocks_total")
        if used is not None:
            yield GaugeMetricFamily("loramux_kv_blocks_used", "KV cache blocks in use", value=float(used))
        queries = stats.get("prefix_cache_queries")
        if queries is not None:
            yield GaugeMetricFamily("loramux_prefix_cache_hit_rate",
                                    "Prompt tokens found cached / looked up, since start (0 before any)",
                                    value=float(stats.get("prefix_cache_hits", 0)) / queries if queries else 0.0)
            yield GaugeMetricFamily("loramux_prefix_cache_blocks", "KV blocks registered in the prefix cache",
                                    value=float(stats.get("prefix_cache_blocks", 0)))
        threads = _os_threads()
        if threads is not None:
            yield GaugeMetricFamily("loramux_process_threads", "OS threads of the server process", value=threads)
        if used is not None and total:
            yield GaugeMetricFamily("loramux_kv_cache_usage_ratio", "Fraction of KV blocks in use",
                                    value=float(used) / float(total))
        for key, (name, doc) in _COUNTERS.items():
            if key in stats:
                yield CounterMetricFamily(name, doc, value=float(stats[key]))
        loads = stats.get("adapter_load_seconds")
        if loads:  # cold loads (disk) vs host-cache loads into device slots
            hist = HistogramMetricFamily("loramux_adapter_load_seconds",
                                         "Seconds to load an adapter into a device slot, by source (host cache | disk)",
                                         labels=["source"])
            bounds = [str(b) for b in loads["buckets"]] + ["+Inf"]
            for source in ("host", "disk"):
                h = loads[source]
                hist.add_metric([source], buckets=list(zip(bounds, h["cumulative"], strict=True)), sum_value=h["sum"])
            yield hist
        info = GaugeMetricFamily(
            "loramux_lora_requests_info", "Running and waiting adapters (value: scrape time)",
            labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
        info.add_metric([",".join(sorted(set(stats.get("running_adapters", [])))),
                         ",".join(sorted(set(stats.get("waiting_adapters", [])))),
                         str(stats.get("slots_total", self.state.settings.max_adapters_per_batch or 0))],
                        time.time())
        yield info
        yield from lora_affinity_metrics(stats, self.state.settings.max_adapters_per_batch or 0)


def _bounded(names) -> list[str]:
    """At most MAX_ADAPTER_SERIES names (sorted), the rest folded into "other"."""
    names = sorted(set(names))
    return names if len(names) <= MAX_ADAPTER_SERIES else [*names[:MAX_ADAPTER_SERIES], OTHER]


def lora_affinity_metrics(stats: dict, default_slots: int):
    """What routers outside us read for LoRA affinity (docs/ray.md), from engine.stats():
    - `lora_requests_info` (unprefixed; vLLM's `vllm:lora_requests_info` label set, read by the Gateway
      API inference extension's endpoint picker): running / waiting adapter names comma-joined,
      `max_lora` = device slots, value = scrape time;
    - `loramux_adapter_resident{adapter, level}`: replicas holding the adapter in a device slot or
      only in the host cache (stats "adapter_residency": name -> level, or name -> {level: count});
    - `loramux_adapter_requests_total{resident}`: adapter requests by where their adapter was held
      when they arrived (device | host | cold): the affinity fraction is (device + host) / all.
    Every per-adapter label stays within MAX_ADAPTER_SERIES names (the rest count as "other")."""
    info = GaugeMetricFamily("lora_requests_info", "Running and waiting LoRA adapters (value: scrape time)",
                             labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
    info.add_metric([str(stats.get("slots_total", default_slots)),
                     ",".join(_bounded(stats.get("running_adapters", []))),
                     ",".join(_bounded(stats.get("waiting_adapters", [])))], time.time())
    yield info
    residency = stats.get("adapter_residency")
    if residency is not None:
        counts: dict[tuple[str, str], float] = {}
        # Device-resident names first, so that the bounded series go to the adapters routers care most about.
        order = sorted(residency, key=lambda n: (0 if "device" in _levels(residency[n]) else 1, n))
        keep = set(order[:MAX_ADAPTER_SERIES])
        for name in order:
            for level, n in _levels(residency[name]).items():
                key = (name if name in keep else OTHER, level)
                counts[key] = counts.get(key, 0.0) + n
        gauge = GaugeMetricFamily("loramux_adapter_resident",
                                  "Replicas holding the adapter, by level (device slot | host cache)",
                                  labels=["adapter", "level"])
        for (name, level), n in sorted(counts.items()):
            gauge.add_metric([name, level], n)
        yield gauge
    arrivals = stats.get("adapter_arrivals")
    if arrivals is not None:
        counter = CounterMetricFamily("loramux_adapter_requests",
                                      "Adapter requests by where the adapter was held when they arrived",
                                      labels=["resident"])
        for level in ("device", "host", "cold"):
            counter.add_metric([level], float(arrivals.get(level, 0)))
        yield counter


def _levels(value) -> dict[str, float]:
    return {value: 1.0} if isinstance(value, str) else {k: float(v) for k, v in value.items()}


def _os_threads() -> float | None:
    """OS threads of this process (Linux /proc; OpenMP workers included), or None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Threads:"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


class Metrics:
    """Owns the per-app registry and the histograms routes observe."""

    def __init__(self, state: Any):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(EngineCollector(state))
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, process_open_fds (soak checks)
        self.ttft = Histogram("loramux_time_to_first_token_seconds", "Time to first token", ["adapter"],
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("loramux_inter_token_latency_seconds", "Time between streamed tokens",
                             ["adapter"], buckets=_ITL_BUCKETS, registry=self.registry)
        self.e2e = Histogram("loramux_e2e_request_latency_seconds", "Request latency, arrival to finish",
                             ["adapter"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.http = Counter("loramux_http_requests", "HTTP requests by route template and status",
                            ["route", "status"], registry=self.registry)
        # Prefix cache per adapter (engine-wide totals come from engine.stats()): prompt tokens looked
        # up and found, and their ratio since the series started.
        self.cache_queries = Counter("loramux_adapter_prefix_cache_queries",
                                     "Prompt tokens looked up in the prefix cache, by adapter", ["adapter"],
                                     registry=self.registry)
        self.cache_hits = Counter("loramux_adapter_prefix_cache_hits",
                                  "Prompt tokens found in the prefix cache, by adapter", ["adapter"],
                                  registry=self.registry)
        self.cache_hit_rate = Gauge("loramux_adapter_prefix_cache_hit_rate",
                                    "Prompt tokens found / looked up in the prefix cache, by adapter", ["adapter"],
                                    registry=self.registry)
        self._cache_totals: dict[str, list[float]] = {}  # adapter label -> [queries, hits]

        self._series: OrderedDict[str, float] = OrderedDict()  # adapter label -> last observed (LRU order)
        self._lock = threading.Lock()
        self.max_series, self.idle_s = MAX_ADAPTER_SERIES, SERIES_IDLE_S

    def label(self, adapter: str) -> str:
        """The label value an adapter's observations go under (bounded, see the module docstring)."""
        if adapter in (BASE, OTHER):
            return adapter
        now = time.monotonic()
        with self._lock:
            if adapter in self._series:
                self._series.move_to_end(adapter)
            elif len(self._series) >= self.max_series:
                oldest, seen = next(iter(self._series.items()))
                if now - seen < self.idle_s:
                    return OTHER
                self._remove(oldest)
            self._series[adapter] = now
            return adapter

    def forget_adapter(self, adapter: str) -> None:
        """Drop a (deleted) adapter's series."""
        with self._lock:
            if adapter in self._series:
                self._remove(adapter)

    def _remove(self, adapter: str) -> None:
        self._series.pop(adapter, None)
        self._cache_totals.pop(adapter, None)
        for hist in (self.ttft, self.itl, self.e2e, self.cache_queries, self.cache_hits, self.cache_hit_rate):
            with contextlib.suppress(KeyError):  # never observed in this histogram
                hist.remove(adapter)

    def observe_ttft(self, adapter: str, seconds: float) -> None:
        self.ttft.labels(self.label(adapter)).observe(seconds)

    def observe_itl(self, adapter: str, seconds: float) -> None:
        self.itl.labels(self.label(adapter)).observe(seconds)

    def observe_e2e(self, adapter: str, seconds: float) -> None:
        self.e2e.labels(self.label(adapter)).observe(seconds)

    def observe_prefix_cache(self, adapter: str, prompt_tokens: int, cached_tokens: int) -> None:
        label = self.label(adapter)
        self.cache_queries.labels(label).inc(prompt_tokens)
        self.cache_hits.labels(label).inc(cached_tokens)
        with self._lock:
            totals = self._cache_totals.setdefault(label, [0.0, 0.0])
            totals[0] += prompt_tokens
            totals[1] += cached_tokens
            rate = totals[1] / totals[0] if totals[0] else 0.0
        self.cache_hit_rate.labels(label).set(rate)

    def count_http(self, route: str, status: int) -> None:
        self.http.labels(route, str(status)).inc()


router = APIRouter(tags=["metrics"])


@router.get("/metrics")
def metrics(request: Request) -> Response:
    registry = request.app.state.loramux.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
