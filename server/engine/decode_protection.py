"""Decode protection (`SchedulerConfig.max_decode_stall`, `--max-decode-stall`): in a step that
carries decode rows, prefill chunks may add at most `stall` x the measured decode-only step time.

The engine reports each step's model time (`Scheduler.observe_step`); this keeps a running average of
a decode-only step and a fitted price of prefill (`PrefillPrice`), and the scheduler asks it, per
prefill chunk, how many of the tokens the budget allows fit what is left of the step's cap. Pure
arithmetic: no clock, no torch (tests/server/engine/test_decode_stall.py drives it on a virtual clock).
"""
from __future__ import annotations

import math
from collections.abc import Callable


class DecodeProtection:
    # The decode-only estimate moves by EWMA of each new step; before any prefill was timed, a chunk
    # beside decode rows takes PROBE_COST units: enough to time, too little to stall anyone.
    EWMA = 0.25
    PROBE_COST = 16.0

    def __init__(self, stall: float | None) -> None:
        self.stall = stall  # None: off
        self.decode_step_s: float | None = None
        self.prefill_price = PrefillPrice()
        self.left_s = math.inf  # seconds prefill chunks may still add to this step
        self._price = (0.0, 0.0)  # this step's (seconds per cost unit, per cached context token)

    def cap_s(self, has_decodes: bool) -> float:
        """Seconds the prefill chunks of a step may add: stall x the decode-only step time; inf when
        nothing limits them (off, no decode row in the step, or no decode-only step timed yet)."""
        if self.stall is None or self.decode_step_s is None or not has_decodes:
            return math.inf
        return self.stall * self.decode_step_s

    def start_step(self, has_decodes: bool) -> None:
        self.left_s = self.cap_s(has_decodes)
        if self.left_s == math.inf:
            return
        fit = self.prefill_price.fit()
        # Unpriced yet: a probe of PROBE_COST units takes the whole cap.
        self._price = fit if fit is not None else (self.left_s / self.PROBE_COST, 0.0)

    def _seconds(self, start: int, cost: float) -> float:
        per_unit, per_ctx = self._price
        return per_unit * cost + per_ctx * start

    def chunk_len(self, start: int, n: int, chunk_cost: Callable[[int, int], float], first: bool) -> int:
        """Of the n tokens from `start` the budget allows, the most whose predicted time fits what is
        left of the cap. When the first prefill chunk of a step cannot fit even one token because
        reading its context alone costs more than the cap (deep into a long prompt on a slow
        machine), the context's part is not counted: the chunk gets the cap for its tokens, so the
        prompt keeps a useful pace (one token per step would take thousands of steps) and the
        streams' stall is bounded by the cap plus that context read."""
        left = self.left_s
        if left == math.inf:
            return n
        if first and self._seconds(start, chunk_cost(start, 1)) > left:
            left += self._price[1] * start  # only the tokens' own time counts against the cap
        if self._seconds(start, chunk_cost(start, n)) > left:
            lo, hi = 0, n  # the largest n' < n that fits (time grows with n')
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if self._seconds(start, chunk_cost(start, mid)) <= left else (lo, mid)
            n = lo
        return 1 if n == 0 and first else n

    def charge(self, start: int, cost: float) -> None:
        """A prefill chunk was scheduled: less of the step's cap is left."""
        if self.left_s != math.inf:
            self.left_s -= self._seconds(start, cost)

    def observe(self, prefill_cost: float, prefill_context: int, num_decode_rows: int, seconds: float) -> None:
        """A step's model time. Without prefill it updates the decode-only estimate; with prefill it
        gives the price model its time beyond a decode-only step (all of it when it has no decode
        row: the price then errs high, so the cap errs small)."""
        if self.stall is None or not seconds > 0:
            return
        if prefill_cost == 0:
            a = self.EWMA
            self.decode_step_s = seconds if self.decode_step_s is None else (1 - a) * self.decode_step_s + a * seconds
            return
        base = self.decode_step_s if num_decode_rows and self.decode_step_s is not None else 0.0
        self.prefill_price.add(prefill_cost, prefill_context, seconds - base)


class PrefillPrice:
    """What prefill chunks add to a step's time: `per_unit x cost + per_ctx x context`, where cost
    is the chunk cost (`Scheduler.chunk_cost`: tokens plus their attention FLOPs) and context the
    cached tokens the chunks read (each chunk gathers and attends over everything before it: a cost
    per step, whatever its length, that dominates a small chunk deep into a long prompt). Least
    squares over exponentially decayed sums of the timed steps; while the two terms cannot be told
    apart (every observation with the same context share) or one fits negative, one price per unit
    of cost, the ratio of the sums."""

    DECAY = 0.02  # share of the sums each new observation takes (a long memory: the two terms vary slowly)

    def __init__(self) -> None:
        self.uu = self.uc = self.cc = self.uy = self.cy = 0.0

    def add(self, units: float, context: float, seconds: float) -> None:
        d = 1 - self.DECAY
        self.uu = d * self.uu + units * units
        self.uc = d * self.uc + units * context
        self.cc = d * self.cc + context * context
        self.uy = d * self.uy + units * seconds
        self.cy = d * self.cy + context * seconds

    def fit(self) -> tuple[float, float] | None:
        """(seconds per cost unit, seconds per context token), or None before any observation."""
        if self.uu <= 0:
            return None
        det = self.uu * self.cc - self.uc * self.uc
        if det > 1e-3 * self.uu * self.cc:
            per_unit = (self.uy * self.cc - self.uc * self.cy) / det
            per_ctx = (self.uu * self.cy - self.uc * self.uy) / det
            if per_unit > 0 and per_ctx >= 0:
                return per_unit, per_ctx
        per_unit = max(self.uy, 0.0) / self.uu
        return (per_unit, 0.0) if per_unit > 0 else None

