"""The server's own view of a level, read from its Prometheus /metrics endpoint.

Data flow: scrape before a level -> scrape after -> `mean_batch_size(before, after)` =
Δ loramux_scheduled_sequences_total / Δ loramux_engine_steps_total, i.e. the mean number of
sequences the engine actually ran per step during the level (the batch size a closed-loop
concurrency of C really achieved), and `affinity(before, after)` from
loramux_adapter_requests_total{resident} (docs/ray.md). A server without these counters gives
None, not an error.
"""
from __future__ import annotations

import math

import httpx

STEPS = "loramux_engine_steps_total"
SCHEDULED = "loramux_scheduled_sequences_total"
# Adapter requests by where their adapter was held when they arrived (each engine replica counts its
# own; a Ray Serve ingress sums them): resident="device" | "host" | "cold".
ARRIVALS = "loramux_adapter_requests_total"
LEVELS = ("device", "host", "cold")


def parse_prometheus(text: str) -> dict[str, float]:
    """{metric name: value summed over its label sets} from the Prometheus text format."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        # `name{labels} value [timestamp]`: label values may hold spaces, so split after the `}`.
        if "{" in line:
            name, _, rest = line.partition("{")
            rest = rest.rpartition("}")[2]
        else:
            name, _, rest = line.partition(" ")
        parts = rest.split()
        if not parts:
            continue
        try:
            value = float(parts[0])
        except ValueError:
            continue
        if math.isfinite(value):
            values[name.strip()] = values.get(name.strip(), 0.0) + value
            if name.strip() == ARRIVALS:  # kept per label too: affinity() needs each level
                series = line.partition(" ")[0] if "}" not in line else line[: line.rindex("}") + 1]
                values[series] = values.get(series, 0.0) + value
    return values


async def scrape(client: httpx.AsyncClient, api_key: str | None) -> dict[str, float] | None:
    """GET /metrics; None when the endpoint is missing or unreadable."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = await client.get("/metrics", headers=headers, timeout=15.0)
    except httpx.HTTPError:
        return None
    return parse_prometheus(resp.text) if resp.status_code == 200 else None


def mean_batch_size(before: dict[str, float] | None, after: dict[str, float] | None) -> float | None:
    """Δscheduled / Δsteps between two scrapes; None when either scrape or the counters are missing."""
    if not before or not after:
        return None
    if any(k not in before or k not in after for k in (STEPS, SCHEDULED)):
        return None
    steps = after[STEPS] - before[STEPS]
    return (after[SCHEDULED] - before[SCHEDULED]) / steps if steps > 0 else None


def affinity(before: dict[str, float] | None, after: dict[str, float] | None) -> float | None:
    """The fraction of adapter requests served by a replica that held the adapter (device slot or host
    cache) when the request arrived, as the server counts it: Δ(device + host) / Δ(all levels).
    None when either scrape, or the counter, is missing, or no adapter request arrived."""
    if not before or not after:
        return None
    delta = {}
    for level in LEVELS:
        key = f'{ARRIVALS}{{resident="{level}"}}'
        if key not in after:
            return None
        delta[level] = after[key] - before.get(key, 0.0)
    total = sum(delta.values())
    return (delta["device"] + delta["host"]) / total if total > 0 else None
