"""Decode protection (`SchedulerConfig.max_decode_stall`, `--max-decode-stall`): in a step that
carries decode rows, prefill chunks may add at most `stall` x the measured decode-only step time.

The engine reports each step's model time (`Scheduler.observe_step`); this keeps a running average of
a decode-only step and a fitted price of prefill (`PrefillPrice`), and the scheduler asks it, per
prefill chunk, how many of the tokens the budget allows fit what is left of the step's cap. Pure
arithmetic: no clock, no torch (tests/server/engine/test_decode_stall.py drives it on a virtual clock).

What a chunk of n tokens after `start` cached ones costs is modelled by what it does, three terms:
  tokens   n                              the linear layers (and LoRA) of its rows
  pairs    n x start + n (n + 1) / 2      query-key pairs its attention computes (per 1024)
  context  start                          the cached context it reads (a per-step cost whatever n)
The three prices are machine facts (a CPU's attention runs at a different FLOP rate than its GEMMs;
reading 8k cached tokens costs a fixed time per step), so they are fitted, not assumed.
"""
from __future__ import annotations

import itertools
import math

NFEAT = 3


def chunk_features(start: int, n: int) -> tuple[float, float, float]:
    """(tokens, query-key pairs / 1024, cached context tokens read) of a prefill chunk."""
    return float(n), (n * start + n * (n + 1) / 2) / 1024.0, float(start)


class DecodeProtection:
    # The decode-only estimate moves by EWMA of each new step; before any prefill was timed, a chunk
    # beside decode rows takes PROBE_TOKENS tokens: enough to time, too little to stall anyone.
    EWMA = 0.25
    PROBE_TOKENS = 16
    # Trust region: a capped chunk takes at most GROWTH x the tokens of the recent prefill steps the
    # price was fitted on (a decayed maximum). Deep into a long prompt the chunks are a few tokens at
    # an almost constant context, where tokens, pairs and context move together and the fit cannot
    # tell them apart; extrapolated to 100+ tokens it once predicted 0.4 s for a 3.7 s step.
    GROWTH = 2.0
    RECENT_DECAY = 0.05

    def __init__(self, stall: float | None) -> None:
        self.stall = stall  # None: off
        self.decode_step_s: float | None = None
        self.prefill_price = PrefillPrice()
        self.left_s = math.inf  # seconds prefill chunks may still add to this step
        self._price = (0.0, 0.0, 0.0)  # this step's seconds per token, per 1024 pairs, per context token
        self.recent_tokens = 0.0  # decayed maximum of the prefill tokens of the timed steps

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
        # Unpriced yet: a probe of PROBE_TOKENS tokens takes the whole cap.
        self._price = fit if fit is not None else (self.left_s / self.PROBE_TOKENS, 0.0, 0.0)

    def seconds(self, start: int, n: int) -> float:
        """This step's predicted time of a chunk of n tokens after `start` cached ones."""
        return sum(p * f for p, f in zip(self._price, chunk_features(start, n), strict=True))

    def chunk_len(self, start: int, n: int, first: bool) -> int:
        """Of the n tokens from `start` the budget allows, the most whose predicted time fits what is
        left of the cap, and at most GROWTH x the recent steps' prefill tokens. When the first prefill chunk of a step cannot fit even one token because
        reading its context alone costs more than the cap (deep into a long prompt on a slow
        machine), the context's part is not counted: the chunk gets the cap for its tokens, so the
        prompt keeps a useful pace (one token per step would take thousands of steps) and the
        streams' stall is bounded by the cap plus that context read."""
        left = self.left_s
        if left == math.inf:
            return n
        n = min(n, max(self.PROBE_TOKENS, int(self.GROWTH * self.recent_tokens)))
        if first and self.seconds(start, 1) > left:
            left += self._price[2] * start  # only the tokens' own time counts against the cap
        if self.seconds(start, n) > left:
            lo, hi = 0, n  # the largest n' < n that fits (time grows with n')
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if self.seconds(start, mid) <= left else (lo, mid)
            n = lo
        return 1 if n == 0 and first else n

    def charge(self, start: int, n: int) -> None:
        """A prefill chunk was scheduled: less of the step's cap is left."""
        if self.left_s != math.inf:
            self.left_s -= self.seconds(start, n)

    def observe(self, chunks: tuple[tuple[int, int], ...], num_decode_rows: int, seconds: float) -> None:
        """A step's model time; `chunks` are its prefill chunks as (start, n). Without prefill it
        updates the decode-only estimate; with prefill it gives the price model its time beyond a
        decode-only step (all of it when it has no decode row: the price then errs high, so the
        cap errs small)."""
        if self.stall is None or not seconds > 0:
            return
        if not chunks:
            a = self.EWMA
            self.decode_step_s = seconds if self.decode_step_s is None else (1 - a) * self.decode_step_s + a * seconds
            return
        base = self.decode_step_s if num_decode_rows and self.decode_step_s is not None else 0.0
        feats = [sum(col) for col in zip(*(chunk_features(s, n) for s, n in chunks), strict=True)]
        self.prefill_price.add(feats, seconds - base)
        self.recent_tokens = max(feats[0], (1 - self.RECENT_DECAY) * self.recent_tokens)


class PrefillPrice:
    """What prefill chunks add to a step's time: a non-negative linear model over the chunk features
    (`chunk_features`: tokens, query-key pairs, context read), fitted by least squares over
    exponentially decayed sums of the timed steps. Non-negative: every subset of the terms that
    holds the per-token term is solved and the best fit whose prices are all positive wins (terms
    the data cannot tell apart, or that fit negative, get price 0; no positive per-token price: no
    fit, and the step takes the unpriced probe)."""

    DECAY = 0.02  # share of the sums each new observation takes (a long memory: the prices vary slowly)

    def __init__(self) -> None:
        self.xx = [[0.0] * NFEAT for _ in range(NFEAT)]
        self.xy = [0.0] * NFEAT
        self.yy = 0.0

    def add(self, feats, seconds: float) -> None:
        d = 1 - self.DECAY
        for i in range(NFEAT):
            self.xy[i] = d * self.xy[i] + feats[i] * seconds
            for j in range(NFEAT):
                self.xx[i][j] = d * self.xx[i][j] + feats[i] * feats[j]
        self.yy = d * self.yy + seconds * seconds

    def fit(self) -> tuple[float, float, float] | None:
        """(seconds per token, per 1024 query-key pairs, per context token), or None before any
        observation with a positive price."""
        best, best_rss = None, math.inf
        for k in range(NFEAT - 1, -1, -1):
            # the per-token term is always in: every token costs its linear layers, and a fit without
            # it (context only) would price a chunk independently of its length and let any length through
            for rest in itertools.combinations(range(1, NFEAT), k):
                subset = (0, *rest)
                beta = _solve([[self.xx[i][j] for j in subset] for i in subset], [self.xy[i] for i in subset])
                if beta is None or any(b <= 0 for b in beta):
                    continue
                # residual sum of squares: yy - 2 b.Xy + b'XXb
                rss = self.yy - 2 * sum(b * self.xy[i] for b, i in zip(beta, subset, strict=True))
                rss += sum(bi * bj * self.xx[i][j] for bi, i in zip(beta, subset, strict=True)
                           for bj, j in zip(beta, subset, strict=True))
                if rss < best_rss - 1e-12 * max(self.yy, 1e-30):
                    full = [0.0] * NFEAT
                    for b, i in zip(beta, subset, strict=True):
                        full[i] = b
                    best, best_rss = tuple(full), rss
        return best


def _solve(a: list[list[float]], b: list[float]) -> list[float] | None:
    """a x = b by Gaussian elimination with partial pivoting; None when a is (nearly) singular
    relative to its diagonal (the terms cannot be told apart)."""
    n = len(b)
    scale = [math.sqrt(a[i][i]) if a[i][i] > 0 else 0.0 for i in range(n)]
    if any(s == 0 for s in scale):
        return None
    # normalize to a correlation-like matrix so that the singularity test is unit-free
    m = [[a[i][j] / (scale[i] * scale[j]) for j in range(n)] + [b[i] / scale[i]] for i in range(n)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(m[r][c]))
        if abs(m[p][c]) < 1e-3:  # 1 - r^2 of a term against the others, in the 2-term case
            return None
        m[c], m[p] = m[p], m[c]
        for r in range(n):
            if r != c:
                f = m[r][c] / m[c][c]
                for j in range(c, n + 1):
                    m[r][j] -= f * m[c][j]
    return [m[i][n] / m[i][i] / scale[i] for i in range(n)]
