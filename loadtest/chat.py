"""`loramux-loadtest --chat N`: multi-turn conversations sharing one system prompt, for prefix caching.

Data flow: a `ChatConfig` -> `run_chat(cfg, owned)`:
  GET /v1/models -> adapter pool (named, existing, or synthetic uploads, as the sweep makes it) ->
  N conversations, conversation i on adapter i mod len(pool), `concurrency` of them in flight (each
  holds its place for all its turns) -> turn t of a conversation POSTs /v1/chat/completions (SSE,
  with `stream_options.include_usage`) with [system, user_1, assistant_1, ..., user_t], where
  assistant_k is the reply text actually streamed back for turn k: every prompt extends the last one,
  as a chat client's would -> one `ChatTurn` per request (TTFT, inter-token gaps, prompt and cached
  tokens from the usage chunk, output tokens, outcome) -> `summarize_chat` -> chat.json and a table.

The system prompt is the same text in every conversation; user turns are random words (about one
token per word), different per conversation and turn; replies are held to their drawn length with
`ignore_eos`. A failed turn ends its conversation: the turns after it are counted as skipped (their
history would be missing a reply). Whether a prompt prefix is reused is the server's business; the
tool reads what it reports (`usage.prompt_tokens_details.cached_tokens`) and, when /metrics has them,
Δ loramux_prefix_cache_hits_total / Δ loramux_prefix_cache_queries_total over the run.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

from loadtest import admin, metrics
from loadtest.client import DONE, _exception_reason, error_reason, iter_sse
from loadtest.runner import RunConfig, _setup_pool
from loadtest.stats import percentile, summary_ms
from loadtest.workload import make_prompt

HITS, QUERIES = "loramux_prefix_cache_hits_total", "loramux_prefix_cache_queries_total"
MAX_CONVERSATIONS, MAX_TURNS = 100_000, 1000


@dataclass(frozen=True)
class ChatConfig:
    """The chat workload; `common` carries what every mode shares (URL, keys, adapter pool, seed...)."""

    common: RunConfig
    conversations: int
    turns: int = 4
    system_tokens: int = 512
    concurrency: int = 16

    def __post_init__(self):
        if not 1 <= self.conversations <= MAX_CONVERSATIONS:
            raise ValueError(f"--chat must be in 1..{MAX_CONVERSATIONS}")
        if not 1 <= self.turns <= MAX_TURNS:
            raise ValueError(f"--turns must be in 1..{MAX_TURNS}")
        if self.system_tokens < 0:
            raise ValueError("--system-tokens must not be negative")
        if self.concurrency < 1:
            raise ValueError("--concurrency must be >= 1")


@dataclass(slots=True)
class ChatTurn:
    """What the client saw of one turn (times in seconds from `time.perf_counter`)."""

    conversation: int
    turn: int  # 1-based
    adapter: str | None
    ok: bool = False
    status: int | None = None
    reason: str = ""
    start: float = 0.0
    end: float = 0.0
    ttft: float | None = None  # first chunk with content (the role-only chunk does not count)
    itl: list[float] = field(default_factory=list)
    messages: int = 0  # messages sent (2t: system + t users + t-1 assistants)
    prompt_tokens: int = 0  # as the server counted them (usage)
    cached_tokens: int = 0  # usage.prompt_tokens_details.cached_tokens
    output_tokens: int = 0
    reply: str = ""


def system_prompt(n_words: int, seed: int) -> str:
    """The shared system prompt: `n_words` random words (about one token each), fixed by `seed`."""
    if n_words == 0:
        return ""
    rng = np.random.default_rng([seed, 0x5157])
    return make_prompt(rng, n_words, "words", (0, 1))


def user_turns(cfg: ChatConfig) -> list[list[tuple[str, int]]]:
    """(user text, reply length) per turn per conversation: deterministic in the seed."""
    c = cfg.common
    rng = np.random.default_rng([c.seed, 0xC4A7])
    plens = c.prompt_len.sample(rng, cfg.conversations * cfg.turns).reshape(cfg.conversations, cfg.turns)
    olens = c.output_len.sample(rng, cfg.conversations * cfg.turns).reshape(cfg.conversations, cfg.turns)
    return [[(make_prompt(rng, int(plens[i, t]), "words", (0, 1)), int(olens[i, t])) for t in range(cfg.turns)]
            for i in range(cfg.conversations)]


async def send_turn(client: httpx.AsyncClient, body: dict, rec: ChatTurn, cfg: ChatConfig) -> None:
    """POST one streamed chat turn and fill `rec`; never raises for network or server errors."""
    c = cfg.common
    headers = {"Authorization": f"Bearer {c.api_key}"} if c.api_key else {}
    rec.start = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers,
                                 timeout=c.timeout_s) as resp:
            rec.status = resp.status_code
            if resp.status_code != 200:
                rec.reason = error_reason(resp.status_code, await resp.aread())
            else:
                await _read_stream(resp, rec)
    except Exception as exc:  # every failure is a data point, never a crash of the run
        rec.ok, rec.reason = False, _exception_reason(exc)
    rec.end = time.perf_counter()


async def _read_stream(resp: httpx.Response, rec: ChatTurn) -> None:
    chunks, last, usage, done, parts = 0, 0.0, None, False, []
    async for data in iter_sse(resp.aiter_lines()):
        now = time.perf_counter()
        if data == DONE:
            done = True
            break
        event = json.loads(data)
        if "error" in event:
            rec.reason = error_reason(rec.status or 0, data.encode())
            return
        if event.get("usage"):
            usage = event["usage"]
        for choice in event.get("choices") or ():
            text = (choice.get("delta") or {}).get("content") or ""
            if not text:
                continue  # the role chunk and the finish chunk carry no token
            parts.append(text)
            if chunks == 0:
                rec.ttft = now - rec.start
            else:
                rec.itl.append(now - last)
            chunks, last = chunks + 1, now
    rec.reply = "".join(parts)
    if not done:
        rec.reason = "truncated_stream"
        return
    if not usage:
        rec.reason = "no_usage"  # include_usage was asked for: a server that omits it is misbehaving
        return
    rec.prompt_tokens = int(usage.get("prompt_tokens", 0))
    rec.output_tokens = int(usage.get("completion_tokens", chunks))
    rec.cached_tokens = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    rec.ok = chunks > 0
    rec.reason = "" if rec.ok else "empty_stream"


async def _conversation(client, cfg: ChatConfig, index: int, adapter: str | None, model: str, system: str,
                        turns: list[tuple[str, int]], out: list[ChatTurn], bar) -> None:
    """The turns of one conversation, in order; stops at the first failed turn."""
    c = cfg.common
    messages = [{"role": "system", "content": system}] if system else []
    for t, (user, max_tokens) in enumerate(turns, start=1):
        messages.append({"role": "user", "content": user})
        body = {"model": model, "messages": list(messages), "max_tokens": max_tokens, "temperature": c.temperature,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        if adapter is not None:
            body["adapter"] = adapter
        body["seed"] = c.seed + index * MAX_TURNS + t  # repeatable when --temperature > 0
        rec = ChatTurn(index, t, adapter, messages=len(messages))
        await send_turn(client, body, rec, cfg)
        out.append(rec)
        bar.update(1)
        if not rec.ok:
            return
        messages.append({"role": "assistant", "content": rec.reply})


async def run_chat(cfg: ChatConfig, owned: set[str]) -> dict:
    """Run every conversation; returns the report (see `summarize_chat`) with the raw turns."""
    c = cfg.common
    conc = min(cfg.concurrency, cfg.conversations)
    limits = httpx.Limits(max_connections=conc + 8, max_keepalive_connections=conc)
    async with httpx.AsyncClient(base_url=c.url, limits=limits, trust_env=False) as client:
        info = await admin.fetch_server_info(client, c.api_key)
        pool = await _setup_pool(client, c, info, owned, f"loadtest-{secrets.token_hex(3)}")
        system = system_prompt(cfg.system_tokens, c.seed)
        plan = user_turns(cfg)
        records: list[ChatTurn] = []
        bar = tqdm(total=cfg.conversations * cfg.turns, desc="chat", file=sys.stderr, disable=not c.progress,
                   leave=False, dynamic_ncols=True)
        todo = iter(range(cfg.conversations))

        async def worker():
            for i in todo:  # shared iterator: a free worker starts the next conversation
                adapter = pool[i % len(pool)] if pool else None
                await _conversation(client, cfg, i, adapter, info.base_id, system, plan[i], records, bar)

        if c.warmup:  # unmeasured: first requests pay one-off costs (kernels, allocator, shapes)
            await _warmup(client, cfg, info.base_id, plan)
        before = await metrics.scrape(client, c.api_key)
        t0 = time.perf_counter()
        try:
            await asyncio.gather(*(worker() for _ in range(conc)))
        finally:
            wall = time.perf_counter() - t0
            bar.close()
        after = await metrics.scrape(client, c.api_key)
    report = summarize_chat(records, max(wall, 1e-9), cfg, n_adapters=len(pool))
    report["server_hit_rate"] = _server_hit_rate(before, after)
    report["records"] = [_record_json(r, t0) for r in records]
    return report


async def _warmup(client, cfg: ChatConfig, model: str, plan: list[list[tuple[str, int]]]) -> None:
    """`--warmup` first turns on the base model, with a system prompt of the same length but other
    words, so they leave nothing in the prefix cache that the measured conversations could reuse."""
    c = cfg.common
    system = system_prompt(cfg.system_tokens, c.seed + 1)
    sem = asyncio.Semaphore(min(cfg.concurrency, c.warmup))

    async def one(k: int) -> None:
        user, max_tokens = plan[k % len(plan)][0]
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        async with sem:
            await send_turn(client, body, ChatTurn(-1, 0, None), cfg)

    await asyncio.gather(*(one(k) for k in range(c.warmup)))


def _server_hit_rate(before: dict | None, after: dict | None) -> float | None:
    """Δhits / Δqueries of the server's prefix-cache counters over the run (None when absent)."""
    if not before or not after or any(k not in after for k in (HITS, QUERIES)):
        return None
    queries = after[QUERIES] - before.get(QUERIES, 0.0)
    return (after[HITS] - before.get(HITS, 0.0)) / queries if queries > 0 else None


def _record_json(r: ChatTurn, t0: float) -> dict:
    d = asdict(r)
    d["start"], d["end"] = r.start - t0, r.end - t0  # seconds from the start of the run
    d["reply_chars"] = len(d.pop("reply"))
    return d


def _p50_ms(values: list[float]) -> float | None:
    return percentile(values, 50) * 1000 if values else None


def _fraction(turns: list[ChatTurn]) -> float | None:
    prompt = sum(r.prompt_tokens for r in turns)
    return sum(r.cached_tokens for r in turns) / prompt if prompt else None


def summarize_chat(records: list[ChatTurn], wall_s: float, cfg: ChatConfig, n_adapters: int = 0) -> dict:
    """The run's figures. `cached_fraction` is token-weighted: Σ cached_tokens / Σ prompt_tokens over
    the turns that succeeded (as the server reported both); per turn index likewise."""
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    tally: dict[str, int] = {}
    for r in failed:
        key = f"{r.status if r.status is not None else '-'} {r.reason}".strip()
        tally[key] = tally.get(key, 0) + 1
    per_turn = {}
    for t in range(1, cfg.turns + 1):
        turn = [r for r in ok if r.turn == t]
        ttfts = [r.ttft for r in turn if r.ttft is not None]
        per_turn[str(t)] = {
            "ok": len(turn),
            "ttft_p50_ms": _p50_ms(ttfts),
            "prompt_tokens_mean": sum(r.prompt_tokens for r in turn) / len(turn) if turn else None,
            "cached_fraction": _fraction(turn),
        }
    c = cfg.common
    return {
        "config": {"conversations": cfg.conversations, "turns": cfg.turns, "system_words": cfg.system_tokens,
                   "user_words": c.prompt_len.describe(), "max_tokens": c.output_len.describe(),
                   "concurrency": cfg.concurrency, "adapters": n_adapters, "seed": c.seed,
                   "temperature": c.temperature, "warmup": c.warmup},
        "requests": len(records),
        "ok": len(ok),
        "failed": len(failed),
        "failed_by_reason": dict(sorted(tally.items())),
        "skipped_turns": cfg.conversations * cfg.turns - len(records),
        "duration_s": wall_s,
        "requests_per_s": len(ok) / wall_s,
        "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / wall_s,
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "cached_tokens": sum(r.cached_tokens for r in ok),
        "cached_fraction": _fraction(ok),
        "ttft_ms": summary_ms([r.ttft for r in ok if r.ttft is not None]),
        # Turn 1 can only reuse what another conversation on the same adapter left; later turns extend their own.
        "ttft_p50_ms_turn1": _p50_ms([r.ttft for r in ok if r.turn == 1 and r.ttft is not None]),
        "ttft_p50_ms_later_turns": _p50_ms([r.ttft for r in ok if r.turn > 1 and r.ttft is not None]),
        "itl_ms": summary_ms([g for r in ok for g in r.itl]),
        "per_turn": per_turn,
    }


def format_chat(r: dict) -> str:
    """A short fixed-width table for stdout."""
    def num(v, fmt="{:.0f}"):
        return "-" if v is None else fmt.format(v)

    cfg = r["config"]
    lines = [f"chat: {cfg['conversations']} conversations x {cfg['turns']} turns, concurrency {cfg['concurrency']}, "
             f"{cfg['adapters']} adapters, system {cfg['system_words']} words, user {cfg['user_words']} words, "
             f"replies {cfg['max_tokens']} tokens",
             f"requests {r['requests']}  ok {r['ok']}  failed {r['failed']} {r['failed_by_reason'] or ''}  "
             f"skipped {r['skipped_turns']}",
             f"TTFT ms p50/p90/p99: {num(r['ttft_ms']['p50'])}/{num(r['ttft_ms']['p90'])}/{num(r['ttft_ms']['p99'])}"
             f"  ITL p50 ms: {num(r['itl_ms']['p50'])}  TTFT p50 turn 1 / later turns: "
             f"{num(r['ttft_p50_ms_turn1'])}/{num(r['ttft_p50_ms_later_turns'])}",
             f"throughput: {r['output_tokens_per_s']:.1f} out tok/s, {r['requests_per_s']:.2f} req/s "
             f"over {r['duration_s']:.1f} s",
             f"cached fraction: {num(r['cached_fraction'], '{:.3f}')}  (server hit rate "
             f"{num(r.get('server_hit_rate'), '{:.3f}')})",
             f"{'turn':>4} {'ok':>5} {'prompt tok':>10} {'cached':>7} {'TTFT p50 ms':>12}"]
    for t, row in r["per_turn"].items():
        lines.append(f"{t:>4} {row['ok']:>5} {num(row['prompt_tokens_mean']):>10} "
                     f"{num(row['cached_fraction'], '{:.3f}'):>7} {num(row['ttft_p50_ms']):>12}")
    return "\n".join(lines)


def write_chat(r: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "chat.json"
    path.write_text(json.dumps(r, indent=2, allow_nan=False) + "\n")
    return path
