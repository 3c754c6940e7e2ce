"""The sweep: for each workload and each level, send the level's requests and summarize them.

Data flow: `RunConfig` -> `run(config, owned)`:
  GET /v1/models -> adapter pool (named, existing, or synthetic uploads) ->
  for workload, for level (closed-loop concurrency C or open-loop rate R):
      specs = workload.make_requests(...); scrape /metrics; [start churn]
      closed loop: C workers, each sends its next request as soon as its last one ends;
      open loop:   requests leave at gamma-distributed times (Poisson when burstiness = 1);
      scrape /metrics -> stats.summarize_level(...) + mean_batch_size -> one record (dict).
`owned` collects the adapter names this run created; the caller deletes them in a `finally`,
so they go away after a failure or Ctrl-C too.
"""
from __future__ import annotations

import asyncio
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import numpy as np
from tqdm import tqdm

from loadtest import admin, metrics
from loadtest.churn import Churner
from loadtest.client import CompletionOptions, send_completion
from loadtest.stats import RequestRecord, summarize_level
from loadtest.synthetic import ALL_MODULES, make_adapter
from loadtest.workload import (
    DEFAULT_TOKEN_RANGE,
    WORKLOADS,
    LengthDist,
    RequestSpec,
    arrival_offsets,
    make_requests,
)

MAX_REQUESTS_PER_LEVEL = 100_000
MAX_CONCURRENCY = 4096
DURATION_DEFAULT_CAP = 10_000  # requests generated per level when only --duration bounds it


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs; validated here so that the CLI can report one-line errors."""

    url: str
    workloads: tuple[str, ...] = ("distinct",)
    concurrency: tuple[int, ...] = (1,)
    rates: tuple[float, ...] = ()  # non-empty: open loop, one level per rate
    burstiness: float = 1.0
    max_concurrency: int | None = None  # open loop only: cap on requests in flight
    requests: int | None = 32
    duration_s: float | None = None
    prompt_len: LengthDist = LengthDist("fixed", 32)
    output_len: LengthDist = LengthDist("fixed", 32)
    prompt_mode: str = "ids"
    token_range: tuple[int, int] = DEFAULT_TOKEN_RANGE
    seed: int = 0
    stream: bool = False
    temperature: float = 0.0
    disconnect_fraction: float = 0.0
    zipf_alpha: float = 1.5
    api_key: str | None = None
    admin_key: str | None = None
    adapter_names: tuple[str, ...] = ()
    adapters: int | None = None  # pool size taken from the server's registered adapters
    upload_synthetic: int = 0
    rank: int = 8
    target_modules: tuple[str, ...] = ALL_MODULES
    churn: float = 0.0  # adapter operations per second, 0 = off
    warmup: int = 0
    timeout_s: float = 300.0
    progress: bool = True

    def __post_init__(self):
        bad = [w for w in self.workloads if w not in WORKLOADS]
        if bad or not self.workloads:
            raise ValueError(f"unknown workload {bad or '(none)'}: choose from {', '.join(WORKLOADS)}")
        if not self.rates and (not self.concurrency or any(not 1 <= c <= MAX_CONCURRENCY for c in self.concurrency)):
            raise ValueError(f"--concurrency values must be in 1..{MAX_CONCURRENCY}")
        if any(r <= 0 for r in self.rates) or self.burstiness <= 0:
            raise ValueError("--rate and --burstiness must be > 0")
        if self.requests is None and self.duration_s is None:
            raise ValueError("give --requests or --duration")
        if self.requests is not None and not 1 <= self.requests <= MAX_REQUESTS_PER_LEVEL:
            raise ValueError(f"--requests must be in 1..{MAX_REQUESTS_PER_LEVEL}")
        if self.duration_s is not None and not 0 < self.duration_s <= 24 * 3600:
            raise ValueError("--duration must be in (0, 86400] seconds")
        if self.timeout_s <= 0 or self.warmup < 0 or self.upload_synthetic < 0 or self.churn < 0:
            raise ValueError("--timeout, --warmup, --upload-synthetic and --churn must not be negative")
        if self.adapter_names and self.upload_synthetic:
            raise ValueError("--adapter-names and --upload-synthetic are exclusive")


def _levels(cfg: RunConfig) -> list[tuple[str, float]]:
    """("closed", C) per concurrency or ("open", R) per rate."""
    return [("open", r) for r in cfg.rates] if cfg.rates else [("closed", c) for c in cfg.concurrency]


async def _setup_pool(client: httpx.AsyncClient, cfg: RunConfig, info: admin.ServerInfo, owned: set[str], prefix: str):
    """The adapter names traffic may use; uploads synthetic ones when asked."""
    if cfg.adapter_names:
        missing = [n for n in cfg.adapter_names if n not in info.adapters]
        if missing:
            raise admin.LoadTestError(f"adapters not registered on the server: {', '.join(missing)}")
        return list(cfg.adapter_names)
    if not cfg.upload_synthetic:
        pool = list(info.adapters)
        return pool[: cfg.adapters] if cfg.adapters is not None else pool
    sem = asyncio.Semaphore(4)  # a few uploads at a time: each is validated and stored by the server

    async def one(i: int) -> str:
        name = f"{prefix}-{i}"
        async with sem:
            config, weights = await asyncio.to_thread(
                make_adapter, info.base_info, cfg.rank, cfg.seed * 1_000_003 + i,
                target_modules=cfg.target_modules, base_model_name=info.base_id,
            )
            owned.add(name)
            status, reason = await admin.upload_adapter(client, name, config, weights, cfg.admin_key)
        if reason:
            raise admin.LoadTestError(f"uploading synthetic adapter {name} failed: {status} {reason}")
        return name

    return list(await asyncio.gather(*(one(i) for i in range(cfg.upload_synthetic))))


async def _closed_loop(send: Callable, specs: list[RequestSpec], concurrency: int, deadline: float | None):
    it = iter(specs)  # shared by the workers: each takes the next spec when it becomes free

    async def worker():
        for spec in it:
            if deadline is not None and time.perf_counter() >= deadline:
                return
            await send(spec)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _open_loop(send: Callable, specs, offsets: np.ndarray, cap: int | None, deadline: float | None):
    sem = asyncio.Semaphore(cap) if cap else None
    t0, tasks = time.perf_counter(), []

    async def one(spec):
        if sem is None:
            return await send(spec)
        async with sem:
            return await send(spec)

    for spec, offset in zip(specs, offsets, strict=True):
        if deadline is not None and t0 + offset >= deadline:
            break
        await asyncio.sleep(max(0.0, t0 + offset - time.perf_counter()))
        tasks.append(asyncio.create_task(one(spec)))
    await asyncio.gather(*tasks)


async def _run_level(client, cfg, opts, pool, workload, mode, level, level_seed, churner) -> dict:
    batch = int(level) if mode == "closed" else (cfg.max_concurrency or len(pool) or 1)
    n = cfg.requests or DURATION_DEFAULT_CAP
    specs = make_requests(
        workload, n + cfg.warmup, pool, seed=level_seed, batch_size=batch, prompt_len=cfg.prompt_len,
        output_len=cfg.output_len, zipf_alpha=cfg.zipf_alpha, prompt_mode=cfg.prompt_mode,
        token_range=cfg.token_range, disconnect_fraction=cfg.disconnect_fraction,
    )
    warm, specs = specs[: cfg.warmup], specs[cfg.warmup :]
    if warm:  # not measured: first use of an adapter may load it into a device slot
        await _closed_loop(lambda s: send_completion(client, s, opts), warm, min(len(warm), batch), None)
    records: list[RequestRecord] = []
    label = f"{workload} {'c' if mode == 'closed' else 'rate'}={level:g}"
    bar = tqdm(total=None if cfg.requests is None else n, desc=label, file=sys.stderr, disable=not cfg.progress,
               leave=False, dynamic_ncols=True)

    async def send(spec):
        rec = await send_completion(client, spec, opts)
        records.append(rec)
        bar.update(1)

    before = await metrics.scrape(client, cfg.api_key)
    churn_task = asyncio.create_task(churner.run()) if churner else None
    t0 = time.perf_counter()
    deadline = t0 + cfg.duration_s if cfg.duration_s is not None else None
    try:
        if mode == "closed":
            await _closed_loop(send, specs, int(level), deadline)
        else:
            rng = np.random.default_rng(level_seed)
            await _open_loop(send, specs, arrival_offsets(len(specs), level, cfg.burstiness, rng),
                             cfg.max_concurrency, deadline)
    finally:
        wall = time.perf_counter() - t0
        bar.close()
        if churn_task:
            churn_task.cancel()
            await asyncio.gather(churn_task, return_exceptions=True)
            await churner.drain()
    after = await metrics.scrape(client, cfg.api_key)
    record = {
        "workload": workload, "mode": mode,
        "concurrency": int(level) if mode == "closed" else cfg.max_concurrency,
        "rate": float(level) if mode == "open" else None,
        "burstiness": cfg.burstiness if mode == "open" else None,
        "adapters_in_pool": len(pool) if workload != "base" else 0,
        "distinct_adapters": len({s.adapter for s in specs if s.adapter is not None}),
        "stream": cfg.stream, "prompt_len": cfg.prompt_len.describe(), "output_len": cfg.output_len.describe(),
        "seed": level_seed,
    }
    record |= summarize_level(records, max(wall, 1e-9))
    record["mean_batch_size"] = metrics.mean_batch_size(before, after)
    record["affinity"] = metrics.affinity(before, after)
    if churner:
        record["churn"] = churner.take_tally()
    return record



async def run(cfg: RunConfig, owned: set[str], on_record: Callable[[dict], None] | None = None) -> list[dict]:
    """Run the whole sweep; returns one record per (workload, level)."""
    max_conn = (cfg.max_concurrency if cfg.rates else max(cfg.concurrency)) or None
    limits = httpx.Limits(max_connections=max_conn + 8 if max_conn else None, max_keepalive_connections=max_conn)
    # trust_env=False: only the URL given is ever contacted (no proxy from the environment).
    async with httpx.AsyncClient(base_url=cfg.url, limits=limits, trust_env=False) as client:
        info = await admin.fetch_server_info(client, cfg.api_key)
        vocab = info.base_info.get("vocab_size")
        if cfg.prompt_mode == "ids" and vocab and cfg.token_range[1] > int(vocab):
            raise admin.LoadTestError(f"--token-id-range {cfg.token_range} exceeds the model's vocabulary ({vocab})")
        prefix = f"loadtest-{secrets.token_hex(3)}"
        pool = await _setup_pool(client, cfg, info, owned, prefix)
        if not pool and any(w != "base" for w in cfg.workloads):
            raise admin.LoadTestError("no adapters to use: pass --upload-synthetic N (or upload some first)")
        churner = None
        if cfg.churn:
            blobs = [
                await asyncio.to_thread(make_adapter, info.base_info, cfg.rank, cfg.seed + k,
                                        target_modules=cfg.target_modules, base_model_name=info.base_id)
                for k in (7_000_001, 7_000_002)
            ]
            churner = Churner(client, prefix, blobs, cfg.churn, cfg.admin_key, owned)
        opts = CompletionOptions(model=info.base_id, stream=cfg.stream, temperature=cfg.temperature,
                                 seed=cfg.seed, api_key=cfg.api_key, timeout_s=cfg.timeout_s)
        records = []
        for workload in cfg.workloads:
            for mode, level in _levels(cfg):
                # Same seed for every level and workload: the prompts and lengths stay the same.
                rec = await _run_level(client, cfg, opts, pool, workload, mode, level, cfg.seed, churner)
                records.append(rec)
                if on_record:
                    on_record(rec)
        return records
