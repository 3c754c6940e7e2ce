"""What the engine hands back: per-step token deltas (scheduler) and text deltas (async engine).

`RequestOutput` is produced by `Scheduler.update_from_output` once per step for each request
that got a token or finished. The engine's output processor detokenizes it, applies stop
strings and turns it into a `CompletionDelta`, which is what the HTTP layer streams.
Plain dataclasses, no torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token_id, logprob) of the top-k alternatives, best first


@dataclass(slots=True)
class RequestOutput:
    """Token-level delta of one request after one engine step."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob] | None = None
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None  # human message when finish_reason == "error"


@dataclass(slots=True)
class CompletionDelta:
    """Text-level delta of one request: what `EngineClient.generate` yields to the HTTP layer."""

    request_id: str
    text: str  # new text since the previous delta (stop strings already cut out)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    # token strings for logprobs (same length as logprobs), and for each top alternative
    logprob_tokens: list[str] | None = None
    top_logprob_tokens: list[list[str]] | None = None
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # cumulative
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (first admission)
