"""Deterministic request generation: which adapter, prompt and output length each request gets.

Data flow: CLI flags -> `LengthDist.parse` / `Workload` -> `make_requests(...)` -> a list of
`RequestSpec` that the runner sends in order; `arrival_offsets(...)` gives open-loop send times.
Everything is drawn from a `numpy.random.Generator` seeded by the caller, so one seed always
yields the same requests (the same adapters, prompts, lengths and disconnect points).

Adapter popularity follows the Punica paper (arXiv 2310.18547, section 7) for a batch of n requests:
- distinct:  every request its own adapter (the pool is cycled, so any window of len(pool)
             consecutive requests is all-distinct);
- uniform:   ceil(sqrt(n)) adapters, equally popular;
- skewed:    Zipf over the pool, P(k) proportional to k^-alpha (alpha 1.5 by default);
- identical: one adapter for every request;
- base:      no adapter (the base model).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

WORKLOADS = ("distinct", "uniform", "skewed", "identical", "base")
# Token ids sampled for prompts: clear of the special/byte tokens at the low end and inside the
# vocabulary of every Llama-family tokenizer we target (SmolLM2 49152, Llama-2 32000).
DEFAULT_TOKEN_RANGE = (1000, 10000)
_WORDS = (
    "river", "stone", "light", "market", "garden", "paper", "window", "silver", "engine", "quiet",
    "morning", "winter", "orange", "planet", "music", "story", "forest", "bridge", "candle",
    "ocean", "letter", "yellow", "basket", "thunder", "valley",
)


@dataclass(frozen=True)
class LengthDist:
    """A token-length distribution: fixed `N`, normal `MEAN:STD` or uniform `LO-HI` (inclusive)."""

    kind: str  # "fixed" | "normal" | "uniform"
    a: float
    b: float = 0.0

    def __post_init__(self):
        if self.kind not in ("fixed", "normal", "uniform"):
            raise ValueError(f"unknown length distribution {self.kind!r}")
        if self.a < 1 or (self.kind == "uniform" and self.b < self.a) or self.b < 0:
            raise ValueError(f"bad length distribution {self.describe()}")

    @classmethod
    def parse(cls, text: str) -> LengthDist:
        """Parse `32`, `32:8` (mean:stddev) or `16-64` (uniform range)."""
        s = str(text).strip()
        try:
            if re.fullmatch(r"\d+", s):
                return cls("fixed", float(s))
            if m := re.fullmatch(r"(\d+(?:\.\d+)?):(\d+(?:\.\d+)?)", s):
                return cls("normal", float(m[1]), float(m[2]))
            if m := re.fullmatch(r"(\d+)-(\d+)", s):
                return cls("uniform", float(m[1]), float(m[2]))
        except ValueError as e:
            raise ValueError(f"bad length {text!r}: {e}") from None
        raise ValueError(f"bad length {text!r}: use N, MEAN:STD or LO-HI")

    def describe(self) -> str:
        if self.kind == "fixed":
            return f"{int(self.a)}"
        sep = ":" if self.kind == "normal" else "-"
        return f"{self.a:g}{sep}{self.b:g}"

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n integer lengths >= 1 (normal draws are rounded and clamped at 1)."""
        if self.kind == "fixed":
            return np.full(n, int(self.a), dtype=np.int64)
        if self.kind == "uniform":
            return rng.integers(int(self.a), int(self.b) + 1, size=n)
        return np.maximum(1, np.rint(rng.normal(self.a, self.b, size=n))).astype(np.int64)


@dataclass(frozen=True)
class RequestSpec:
    """One request to send: prompt (token ids or text), output length, adapter (None = base)."""

    index: int
    prompt: list[int] | str
    prompt_tokens: int  # intended prompt length (exact for token-id prompts)
    max_tokens: int
    adapter: str | None
    disconnect_after: int | None = None  # drop the stream after this many chunks


def uniform_subset_size(batch_size: int) -> int:
    """Punica's uniform workload: ceil(sqrt(n)) adapters for a batch of n."""
    return max(1, math.isqrt(max(1, batch_size) - 1) + 1)


def zipf_probabilities(n_adapters: int, alpha: float) -> np.ndarray:
    """P(k) proportional to k^-alpha for ranks k = 1..n_adapters."""
    weights = np.arange(1, n_adapters + 1, dtype=np.float64) ** -alpha
    return weights / weights.sum()


def assign_adapters(
    workload: str, n: int, pool: list[str], batch_size: int, rng: np.random.Generator, zipf_alpha: float = 1.5
) -> list[str | None]:
    """The adapter of each of n requests under `workload`; `batch_size` sizes the uniform subset."""
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r} (choose from {', '.join(WORKLOADS)})")
    if workload == "base":
        return [None] * n
    if not pool:
        raise ValueError(f"workload {workload!r} needs adapters: pass --upload-synthetic N or --adapter-names")
    if zipf_alpha <= 0:
        raise ValueError("--zipf-alpha must be > 0")
    # A seeded shuffle so that "adapter 0" is not always the same name across seeds.
    order = [pool[i] for i in rng.permutation(len(pool))]
    if workload == "identical":
        return [order[0]] * n
    if workload == "distinct":
        start = int(rng.integers(len(order)))
        return [order[(start + i) % len(order)] for i in range(n)]
    if workload == "uniform":
        subset = order[: min(len(order), uniform_subset_size(batch_size))]
        return [subset[i] for i in rng.integers(len(subset), size=n)]
    probs = zipf_probabilities(len(order), zipf_alpha)  # skewed
    return [order[i] for i in rng.choice(len(order), size=n, p=probs)]


def make_prompt(rng: np.random.Generator, n_tokens: int, mode: str, token_range: tuple[int, int]) -> list[int] | str:
    """Random token ids in [lo, hi) or random words (about one token per word)."""
    if mode == "ids":
        return rng.integers(token_range[0], token_range[1], size=n_tokens).tolist()
    if mode == "words":
        return " ".join(_WORDS[i] for i in rng.integers(len(_WORDS), size=n_tokens))
    raise ValueError(f"unknown prompt mode {mode!r} (ids or words)")


def make_requests(
    workload: str,
    n: int,
    pool: list[str],
    *,
    seed: int,
    batch_size: int,
    prompt_len: LengthDist,
    output_len: LengthDist,
    zipf_alpha: float = 1.5,
    prompt_mode: str = "ids",
    token_range: tuple[int, int] = DEFAULT_TOKEN_RANGE,
    disconnect_fraction: float = 0.0,
) -> list[RequestSpec]:
    """n requests for one level, fully determined by the arguments (including `seed`)."""
    if n < 1:
        raise ValueError("the number of requests must be >= 1")
    if not 0.0 <= disconnect_fraction <= 1.0:
        raise ValueError("--disconnect-fraction must be in [0, 1]")
    if not 0 <= token_range[0] < token_range[1]:
        raise ValueError(f"bad token id range {token_range}")
    # Independent streams: the same seed gives the same prompts and lengths whatever the workload,
    # so levels and workloads of one run differ only in adapters and concurrency.
    adapter_rng, length_rng, prompt_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    adapters = assign_adapters(workload, n, pool, batch_size, adapter_rng, zipf_alpha)
    plens = prompt_len.sample(length_rng, n)
    olens = output_len.sample(length_rng, n)
    drops = length_rng.random(n) < disconnect_fraction
    specs = []
    for i in range(n):
        out = int(olens[i])
        # A dropping client leaves after a random chunk strictly before the last one.
        cut = int(length_rng.integers(1, out)) if drops[i] and out > 1 else None
        prompt = make_prompt(prompt_rng, int(plens[i]), prompt_mode, token_range)
        specs.append(RequestSpec(i, prompt, int(plens[i]), out, adapters[i], cut))
    return specs


def arrival_offsets(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Open-loop send times (seconds from start) with gamma inter-arrivals.

    Mean gap is 1/rate; shape = burstiness (1.0 = Poisson; < 1 burstier, > 1 smoother), as in
    `vllm bench serve --burstiness` and S-LoRA's gamma trace (shape 1/cv^2).
    """
    if rate <= 0 or burstiness <= 0:
        raise ValueError("--rate and --burstiness must be > 0")
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    gaps[0] = 0.0  # the first request leaves at once
    return np.cumsum(gaps)
