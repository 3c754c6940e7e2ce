"""`loramux-loadtest --burst N`: an overload burst on top of steady traffic, and what it cost.

Data flow: `concurrency` closed-loop clients send the same kind of request for `phase_s` seconds
(phase 1: the baseline), then again while N extra requests arrive at once (phase 2: the burst; run
the server with a small `--max-waiting` so N is many times what its queue admits). Reported: the
status counts of the burst (only 200 and 503 with Retry-After are acceptable), the p50/p99 latency
of the steady clients' admitted requests in both phases and their ratio, and the server's RSS
(from /metrics) before the burst and once it has drained.
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx

from loadtest.admin import _auth
from loadtest.metrics import parse_prometheus
from loadtest.stats import percentile


@dataclass
class BurstConfig:
    url: str
    burst: int
    concurrency: int = 4
    phase_s: float = 30.0
    prompt_tokens: int = 32
    max_tokens: int = 32
    token_range: tuple[int, int] = (1000, 10000)
    api_key: str | None = None
    timeout_s: float = 300.0
    seed: int = 0


async def _post(client: httpx.AsyncClient, cfg: BurstConfig, rng: random.Random) -> tuple[int, bool, float]:
    body = {"prompt": [rng.randrange(*cfg.token_range) for _ in range(cfg.prompt_tokens)],
            "max_tokens": cfg.max_tokens, "ignore_eos": True, "temperature": 0.0}
    t0 = time.monotonic()
    try:
        resp = await client.post("/v1/completions", json=body, headers=_auth(cfg.api_key), timeout=cfg.timeout_s)
    except httpx.HTTPError:
        return -1, False, time.monotonic() - t0
    return resp.status_code, bool(resp.headers.get("retry-after")), time.monotonic() - t0


async def _steady(client, cfg: BurstConfig, seconds: float, worker: int) -> list[tuple[int, bool, float]]:
    rng, out = random.Random(cfg.seed * 100 + worker), []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        out.append(await _post(client, cfg, rng))
    return out


async def _rss(client, cfg: BurstConfig) -> float | None:
    resp = await client.get("/metrics", headers=_auth(cfg.api_key))
    return parse_prometheus(resp.text).get("process_resident_memory_bytes")


def _lat(results) -> dict:
    ok = [t for s, _, t in results if s == 200]
    return {"requests": len(ok), "p50_ms": percentile(ok, 50) * 1000 if ok else None,
            "p99_ms": percentile(ok, 99) * 1000 if ok else None}


async def run_burst(cfg: BurstConfig) -> dict:
    limits = httpx.Limits(max_connections=cfg.burst + cfg.concurrency + 4)
    async with httpx.AsyncClient(base_url=cfg.url, timeout=cfg.timeout_s, limits=limits) as client:
        await _steady(client, cfg, min(5.0, cfg.phase_s), 0)  # warm-up
        rss_before = await _rss(client, cfg)
        base = await asyncio.gather(*(_steady(client, cfg, cfg.phase_s, w) for w in range(cfg.concurrency)))
        rng = random.Random(cfg.seed + 1)
        steady = [asyncio.create_task(_steady(client, cfg, cfg.phase_s, w)) for w in range(cfg.concurrency)]
        await asyncio.sleep(min(2.0, cfg.phase_s / 4))
        burst = await asyncio.gather(*(_post(client, cfg, rng) for _ in range(cfg.burst)))
        during = await asyncio.gather(*steady)
        await asyncio.sleep(2.0)
        rss_after = await _rss(client, cfg)
    statuses = Counter(str(s) for s, _, _ in burst + [r for w in during for r in w])
    bad = sum(1 for s, retry, _ in burst + [r for w in during for r in w]
              if not (s == 200 or (s == 503 and retry)))
    baseline, loaded = _lat([r for w in base for r in w]), _lat([r for w in during for r in w])
    ratio = loaded["p99_ms"] / baseline["p99_ms"] if loaded["p99_ms"] and baseline["p99_ms"] else None
    rss_change = (rss_after - rss_before) / rss_before if rss_before and rss_after else None
    return {"config": vars(cfg), "statuses": dict(statuses), "unacceptable": bad, "baseline": baseline,
            "during_burst": loaded, "p99_ratio": ratio, "rss_before": rss_before, "rss_after": rss_after,
            "rss_change": rss_change,
            "passed": bad == 0 and (ratio is None or ratio <= 2.0) and (rss_change is None or abs(rss_change) <= 0.10)}


def format_burst(r: dict) -> str:
    def ms(v):
        return "-" if v is None else f"{v:.0f}"
    lines = [f"burst of {r['config']['burst']} on {r['config']['concurrency']} steady clients",
             f"statuses: {r['statuses']} (unacceptable: {r['unacceptable']})",
             f"steady p50/p99 ms: baseline {ms(r['baseline']['p50_ms'])}/{ms(r['baseline']['p99_ms'])}, "
             f"during burst {ms(r['during_burst']['p50_ms'])}/{ms(r['during_burst']['p99_ms'])}, "
             f"p99 ratio {r['p99_ratio'] and round(r['p99_ratio'], 2)}",
             f"RSS MiB: before {ms((r['rss_before'] or 0) / 2**20)}, after {ms((r['rss_after'] or 0) / 2**20)} "
             f"({r['rss_change'] and round(100 * r['rss_change'], 1)}%)",
             "PASS" if r["passed"] else "FAIL"]
    return "\n".join(lines)


def write_burst(r: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "burst.json"
    path.write_text(json.dumps(r, indent=2, default=str))
    return path
