"""Statistics for one level: percentiles, throughput and the outcome tally of its requests.

Data flow: the client yields one `RequestRecord` per request -> `summarize_level(records, ...)`
-> a flat dict (one row of results.json / results.csv). Percentiles use linear interpolation
between closest ranks (numpy's default "linear" method), so they can be checked by hand.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

PERCENTILES = (50, 90, 99)


@dataclass(slots=True)
class RequestRecord:
    """What the client saw of one request (times in seconds, from `time.perf_counter`)."""

    ok: bool = False
    status: int | None = None  # HTTP status; None when no response arrived
    reason: str = ""  # "" when ok; error type/code, "timeout", "connect", "disconnected", ...
    disconnected: bool = False  # the client dropped the stream on purpose
    start: float = 0.0
    end: float = 0.0
    ttft: float | None = None  # first content chunk (streaming only)
    itl: list[float] = field(default_factory=list)  # gaps between content chunks (streaming only)
    prompt_tokens: int = 0
    output_tokens: int = 0

    @property
    def e2e(self) -> float:
        return self.end - self.start


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError("q must be in [0, 100]")
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100.0  # fractional rank in the sorted list
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    """{p50, p90, p99, mean} in milliseconds; None entries when there are no samples."""
    if not values_s:
        return {f"p{q}": None for q in PERCENTILES} | {"mean": None}
    out = {f"p{q}": percentile(values_s, q) * 1000.0 for q in PERCENTILES}
    out["mean"] = sum(values_s) / len(values_s) * 1000.0
    return out


def failure_tally(records: Sequence[RequestRecord]) -> dict[str, int]:
    """Failed requests keyed by "status reason" (e.g. "503 queue_full", "- connect")."""
    tally = Counter(
        f"{r.status if r.status is not None else '-'} {r.reason}".strip()
        for r in records
        if not r.ok and not r.disconnected
    )
    return dict(sorted(tally.items()))


def summarize_level(records: Sequence[RequestRecord], wall_s: float) -> dict:
    """Aggregate one level's records measured over `wall_s` seconds of wall time.

    Throughput counts every token a client received (finished and deliberately dropped
    streams alike: the server generated them) over the level's wall time.
    """
    if wall_s <= 0:
        raise ValueError("wall time must be > 0")
    ok = [r for r in records if r.ok]
    dropped = [r for r in records if r.disconnected]
    failed = [r for r in records if not r.ok and not r.disconnected]
    out_tokens = sum(r.output_tokens for r in ok + dropped)
    in_tokens = sum(r.prompt_tokens for r in ok + dropped)
    itl = [g for r in ok for g in r.itl]
    # Time per output token after the first, per finished streamed request (vLLM's TPOT).
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.ttft is not None and r.output_tokens > 1]
    return {
        "requests": len(records),
        "ok": len(ok),
        "failed": len(failed),
        "disconnected": len(dropped),
        "failed_by_reason": failure_tally(records),
        "duration_s": wall_s,
        "requests_per_s": len(ok) / wall_s,
        "output_tokens": out_tokens,
        "prompt_tokens": in_tokens,
        "output_tokens_per_s": out_tokens / wall_s,
        "total_tokens_per_s": (out_tokens + in_tokens) / wall_s,
        "ttft_ms": summary_ms([r.ttft for r in ok if r.ttft is not None]),
        "itl_ms": summary_ms(itl),
        "tpot_ms": summary_ms(tpot),
        "e2e_ms": summary_ms([r.e2e for r in ok]),
    }
