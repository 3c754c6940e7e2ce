"""Per-request sampling settings: plain, validated, immutable.

Built at the HTTP edge from the OpenAI request (after pydantic validation) and carried by the
`Request` through the scheduler to the sampler. Invalid values raise `ValueError` naming the
field, which the API maps to a 400.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # (0, 1]
    top_k: int = -1  # -1 or 0 = off, else >= 1
    seed: int | None = None  # per-request generator: same seed -> same tokens, batched or alone
    min_tokens: int = 0  # EOS and stop_token_ids are banned until this many tokens exist
    ignore_eos: bool = False  # keep generating past EOS (benchmarks use it for fixed lengths)
    stop: tuple[str, ...] = ()  # stop strings (matched on the detokenized text, excluded from it)
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # None: no logprobs; k: chosen token's logprob + top-k alternatives
    n: int = 1

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens: must be >= 1")
        if not (0.0 <= self.temperature <= 2.0):
            raise ValueError("temperature: must be in [0, 2]")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError("top_p: must be in (0, 1]")
        if self.top_k < -1:
            raise ValueError("top_k: must be -1, 0 (off) or >= 1")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens: must be in [0, max_tokens]")
        if self.logprobs is not None and not (0 <= self.logprobs <= 20):
            raise ValueError("logprobs: must be in [0, 20]")
        if self.n < 1:
            raise ValueError("n: must be >= 1")
        if any(not s for s in self.stop):
            raise ValueError("stop: empty stop string")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
