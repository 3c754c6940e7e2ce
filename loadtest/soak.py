"""`loramux-loadtest --soak SECONDS`: traffic, adapter churn, disconnects and bad uploads for a long
time, then a report on whether the server kept its promises and leaked nothing.

Data flow: upload `adapters` synthetic adapters (`<prefix>-soak-<k>`) -> read the idle KV level from
/metrics -> `concurrency` closed-loop clients send completions for those adapters (streamed; a share
disconnects at a random token) while one churner replaces and deletes adapters *in use* (a deleted
one is uploaded again a moment later) and sends bad uploads -> snapshots of the server's own
metrics (RSS, open descriptors, OS threads) after the warm-up and at the end, with the client-side
p99 latency of the minute before each -> traffic stops, the server drains, and the KV blocks in use
are read again. Every outcome is classified: completed, disconnected on purpose, adapter gone (404)
or busy (409) because churn got there first, overloaded (503 with Retry-After); anything else (a
500, a 503 without Retry-After, a timeout, a bad upload accepted, a refused good one) is unexpected.
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from loadtest.admin import _auth, delete_adapter, fetch_server_info, upload_adapter
from loadtest.client import iter_sse
from loadtest.metrics import parse_prometheus
from loadtest.stats import percentile
from loadtest.synthetic import make_adapter

GAUGES = {"rss_bytes": "process_resident_memory_bytes", "open_fds": "process_open_fds",
          "threads": "loramux_process_threads", "kv_blocks_used": "loramux_kv_blocks_used",
          "running": "loramux_requests_running", "waiting": "loramux_requests_waiting"}
# Pass criteria (issue #16): resources within 5% of their post-warm-up level, p99 within 20%.
RESOURCE_TOLERANCE, P99_TOLERANCE = 0.05, 0.20


@dataclass
class SoakConfig:
    url: str
    seconds: float
    warmup_s: float = 60.0
    window_s: float = 60.0  # p99 over the requests that finished in the last window_s before a snapshot
    concurrency: int = 8
    adapters: int = 8
    rank: int = 8
    prompt_tokens: int = 32
    max_tokens: int = 32
    token_range: tuple[int, int] = (1000, 10000)  # prompt token ids: [lo, hi)
    disconnect_fraction: float = 0.1
    churn_per_s: float = 0.5
    seed: int = 0
    api_key: str | None = None
    admin_key: str | None = None
    timeout_s: float = 120.0
    prefix: str = field(default_factory=lambda: f"lt{random.randrange(1 << 20):05x}")


@dataclass
class _Tally:
    traffic: Counter = field(default_factory=Counter)
    churn: Counter = field(default_factory=Counter)
    unexpected: Counter = field(default_factory=Counter)
    done: list[tuple[float, float]] = field(default_factory=list)  # (finish time, latency s) of completed


async def _scrape(client: httpx.AsyncClient, key: str | None) -> dict[str, float]:
    resp = await client.get("/metrics", headers=_auth(key), timeout=30.0)
    resp.raise_for_status()
    values = parse_prometheus(resp.text)
    return {k: values[m] for k, m in GAUGES.items() if m in values}


def _is_overload(resp: httpx.Response) -> bool:
    return resp.status_code == 503 and bool(resp.headers.get("retry-after"))


async def _one_request(client: httpx.AsyncClient, cfg: SoakConfig, rng: random.Random, tally: _Tally) -> None:
    name = f"{cfg.prefix}-soak-{rng.randrange(cfg.adapters)}"
    prompt = [rng.randrange(*cfg.token_range) for _ in range(cfg.prompt_tokens)]
    body = {"prompt": prompt, "adapter": name, "max_tokens": cfg.max_tokens, "ignore_eos": True,
            "temperature": 0.0, "stream": True}
    drop_at = rng.randrange(1, cfg.max_tokens) if rng.random() < cfg.disconnect_fraction else None
    t0 = time.monotonic()
    try:
        async with client.stream("POST", "/v1/completions", json=body, headers=_auth(cfg.api_key),
                                 timeout=cfg.timeout_s) as resp:
            if resp.status_code != 200:
                await resp.aread()
                code = _error_code(resp)
                if resp.status_code == 404 and code == "adapter_not_found":
                    tally.traffic["adapter_gone_404"] += 1
                elif resp.status_code == 409:
                    tally.traffic["adapter_busy_409"] += 1
                elif _is_overload(resp):
                    tally.traffic["overloaded_503"] += 1
                else:
                    tally.unexpected[f"traffic {resp.status_code} {code}"] += 1
                return
            tokens, finished = 0, False
            async for event in iter_sse(resp.aiter_lines()):
                if event == "[DONE]":
                    finished = True
                    continue
                data = json.loads(event)
                if "error" in data:
                    tally.unexpected[f"stream error {data['error'].get('code')}"] += 1
                    return
                tokens += len(data.get("choices", []))
                if drop_at is not None and tokens >= drop_at:
                    tally.traffic["disconnected"] += 1
                    return  # leaving the block closes the connection mid-stream
            if finished:
                tally.traffic["completed"] += 1
                tally.done.append((time.monotonic(), time.monotonic() - t0))
            else:
                tally.unexpected["stream ended without [DONE]"] += 1
    except httpx.TimeoutException:
        tally.unexpected["timeout"] += 1
    except httpx.HTTPError as exc:
        tally.unexpected[f"transport {type(exc).__name__}"] += 1


def _error_code(resp: httpx.Response) -> str:
    try:
        return str(resp.json()["error"].get("code"))
    except (ValueError, KeyError, TypeError, AttributeError):
        return "-"


async def _traffic(client, cfg: SoakConfig, worker: int, stop: asyncio.Event, tally: _Tally) -> None:
    rng = random.Random(cfg.seed * 1000 + worker)
    while not stop.is_set():
        await _one_request(client, cfg, rng, tally)


async def _churn(client, cfg: SoakConfig, blobs, stop: asyncio.Event, tally: _Tally) -> None:
    """Replace and delete adapters the traffic is using; re-upload deleted ones; send bad uploads."""
    rng = random.Random(cfg.seed + 7)
    bad = (b'{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}', b"\x80\x04pickle-not-safetensors")
    while not stop.is_set():
        await asyncio.sleep(rng.expovariate(cfg.churn_per_s))
        name = f"{cfg.prefix}-soak-{rng.randrange(cfg.adapters)}"
        roll = rng.random()
        if roll < 0.5:
            status, reason = await upload_adapter(client, name, *blobs[rng.randrange(len(blobs))], cfg.admin_key,
                                                  replace=True)
            _churn_outcome(tally, "replace", status, reason, ok=(201,), expected=(409,))
        elif roll < 0.8:
            status, reason = await delete_adapter(client, name, cfg.admin_key)
            _churn_outcome(tally, "delete", status, reason, ok=(200,), expected=(409,))
            await asyncio.sleep(rng.uniform(0.2, 2.0))  # traffic meets the gap: 404s
            status, reason = await upload_adapter(client, name, *blobs[0], cfg.admin_key)
            _churn_outcome(tally, "reupload", status, reason, ok=(201,), expected=(409,))
        else:
            status, reason = await upload_adapter(client, f"{cfg.prefix}-bad", *bad, cfg.admin_key)
            _churn_outcome(tally, "bad_upload", status, reason, ok=(400,), expected=())


def _churn_outcome(tally: _Tally, op: str, status, reason: str, ok: tuple, expected: tuple) -> None:
    if status in ok:
        tally.churn[f"{op} {status}"] += 1
    elif status in expected or (op == "reupload" and "exists" in reason):
        tally.churn[f"{op} {status} (expected: {reason[:40]})"] += 1
    else:
        tally.unexpected[f"churn {op} {status} {reason[:60]}"] += 1


def _snapshot(gauges: dict[str, float], tally: _Tally, window_s: float) -> dict:
    now = time.monotonic()
    recent = [lat for t, lat in tally.done if now - t <= window_s]
    return {**gauges, "p99_ms": percentile(recent, 99) * 1000 if recent else None, "p99_requests": len(recent)}


def _within(a, b, tol: float) -> bool | None:
    if a is None or b is None:
        return None
    return abs(b - a) <= tol * max(abs(a), 1e-9)


async def run_soak(cfg: SoakConfig, owned: set[str], progress: bool = True) -> dict:
    """The soak; `owned` collects the adapter names to delete afterwards."""
    async with httpx.AsyncClient(base_url=cfg.url, timeout=cfg.timeout_s,
                                 limits=httpx.Limits(max_connections=cfg.concurrency + 8)) as client:
        info = await fetch_server_info(client, cfg.api_key)
        blobs = [make_adapter(info.base_info, cfg.rank, cfg.seed + k) for k in range(2)]
        for k in range(cfg.adapters):
            name = f"{cfg.prefix}-soak-{k}"
            owned.add(name)
            status, reason = await upload_adapter(client, name, *blobs[k % 2], cfg.admin_key)
            if status != 201:
                raise RuntimeError(f"could not upload {name}: {status} {reason}")
        idle = await _scrape(client, cfg.api_key)
        tally, stop = _Tally(), asyncio.Event()
        tasks = [asyncio.create_task(_traffic(client, cfg, w, stop, tally)) for w in range(cfg.concurrency)]
        tasks.append(asyncio.create_task(_churn(client, cfg, blobs, stop, tally)))
        t0 = time.monotonic()
        await asyncio.sleep(cfg.warmup_s)
        after_warmup = _snapshot(await _scrape(client, cfg.api_key), tally, cfg.window_s)
        if progress:
            print(f"soak: warm-up done: {after_warmup}", flush=True)
        while time.monotonic() - t0 < cfg.seconds:
            await asyncio.sleep(min(30.0, max(0.0, cfg.seconds - (time.monotonic() - t0))))
            if progress:
                print(f"soak: {time.monotonic() - t0:.0f}s {dict(tally.traffic)} unexpected={dict(tally.unexpected)}",
                      flush=True)
        end = _snapshot(await _scrape(client, cfg.api_key), tally, cfg.window_s)
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        deadline = time.monotonic() + 60
        drained = await _scrape(client, cfg.api_key)
        while (drained.get("running", 0) or drained.get("waiting", 0)) and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            drained = await _scrape(client, cfg.api_key)
        await asyncio.sleep(1.0)  # aborted requests free their blocks at the next step
        drained = await _scrape(client, cfg.api_key)
    checks = {
        "rss_within_5pct": _within(after_warmup.get("rss_bytes"), end.get("rss_bytes"), RESOURCE_TOLERANCE),
        "open_fds_within_5pct": _within(after_warmup.get("open_fds"), end.get("open_fds"), RESOURCE_TOLERANCE),
        "threads_within_5pct": _within(after_warmup.get("threads"), end.get("threads"), RESOURCE_TOLERANCE),
        "p99_within_20pct": _within(after_warmup.get("p99_ms"), end.get("p99_ms"), P99_TOLERANCE),
        "kv_blocks_back_to_idle": drained.get("kv_blocks_used") == idle.get("kv_blocks_used"),
        "no_unexpected_failures": not tally.unexpected,
    }
    return {"config": {k: v for k, v in vars(cfg).items()}, "seconds_run": time.monotonic() - t0,
            "idle": idle, "after_warmup": after_warmup, "end": end, "drained": drained,
            "traffic": dict(tally.traffic), "churn": dict(tally.churn), "unexpected": dict(tally.unexpected),
            "checks": checks, "passed": all(v is not False for v in checks.values())}


def format_report(report: dict) -> str:
    rows = [("", "after warm-up", "end")]
    for key, scale, unit in (("rss_bytes", 1 / 2**20, "MiB"), ("open_fds", 1, ""), ("threads", 1, ""),
                             ("p99_ms", 1, "ms")):
        a, b = report["after_warmup"].get(key), report["end"].get(key)
        rows.append((f"{key} {unit}".strip(), "-" if a is None else f"{a * scale:.1f}",
                     "-" if b is None else f"{b * scale:.1f}"))
    rows.append(("kv_blocks_used (idle / drained)", f"{report['idle'].get('kv_blocks_used')}",
                 f"{report['drained'].get('kv_blocks_used')}"))
    width = max(len(r[0]) for r in rows)
    lines = [f"{r[0]:<{width}}  {r[1]:>14}  {r[2]:>14}" for r in rows]
    lines.append(f"traffic: {report['traffic']}")
    lines.append(f"churn: {report['churn']}")
    lines.append(f"unexpected: {report['unexpected'] or 0}")
    lines.append("checks: " + ", ".join(f"{k}={v}" for k, v in report["checks"].items()))
    lines.append("PASS" if report["passed"] else "FAIL")
    return "\n".join(lines)


def write_report(report: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "soak.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    return path
