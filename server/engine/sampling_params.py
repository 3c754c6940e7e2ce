"""Per-request sampling settings: plain, validated, immutable.

Built at the HTTP edge from the OpenAI request (after pydantic validation) and carried by the
`Request` through the scheduler to the sampler. Invalid values raise `ValueError` naming the
field, which the API maps to a 400.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.engine.structured import CompiledGrammar

MAX_LOGIT_BIAS = 300  # entries, as OpenAI


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
    # OpenAI's penalties over the generated tokens: logit -= count * frequency + (count > 0) * presence
    presence_penalty: float = 0.0  # [-2, 2]
    frequency_penalty: float = 0.0  # [-2, 2]
    # vLLM's: over prompt + generated tokens, logit / p if logit > 0 else logit * p; 1 = off
    repetition_penalty: float = 1.0  # (0, 2]
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100]), added to the logits
    # structured output: the compiled grammar (server/engine/structured.py); None = unconstrained
    guide: CompiledGrammar | None = field(default=None, compare=False)

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
        if not (-2.0 <= self.presence_penalty <= 2.0):
            raise ValueError("presence_penalty: must be in [-2, 2]")
        if not (-2.0 <= self.frequency_penalty <= 2.0):
            raise ValueError("frequency_penalty: must be in [-2, 2]")
        if not (0.0 < self.repetition_penalty <= 2.0):
            raise ValueError("repetition_penalty: must be in (0, 2]")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias: at most {MAX_LOGIT_BIAS} entries")
        if any(not (-100.0 <= b <= 100.0) for _, b in self.logit_bias):
            raise ValueError("logit_bias: each bias must be in [-100, 100]")
        if any(t < 0 for t, _ in self.logit_bias):
            raise ValueError("logit_bias: token ids must be >= 0")

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
