"""Pydantic request models for the OpenAI-compatible routes (the HTTP edge; dataclasses inside).

Only types and OpenAI's documented shapes are checked here; server limits (n cap, stop counts, model
length, vocabulary) are checked in `generation.py` against the settings and the engine, so every
violation names its field in the same error shape. Unknown extra fields are ignored, as vLLM does,
but fields we cannot honour (best_of > 1, echo, suffix, logit_bias, penalties) are refused there.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class SamplingFields(BaseModel):
    """Fields shared by completions and chat."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    adapter: StrictStr | None = None  # loramux: the adapter to apply (or name it in `model`)
    n: StrictInt | None = None  # None: 1
    temperature: float | None = None  # None: 1.0
    top_p: float | None = None  # None: 1.0
    top_k: StrictInt | None = None  # vLLM extension; None: off
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    ignore_eos: StrictBool | None = None  # vLLM extension (benchmarks use it)
    min_tokens: StrictInt | None = None  # vLLM extension
    # accepted for compatibility, refused unless neutral
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class CompletionRequest(SamplingFields):
    # str | list[str] | list[int] | list[list[int]]
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: StrictInt | None = 16
    logprobs: StrictInt | None = None
    echo: StrictBool = False
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = None  # None: up to the model length
    max_completion_tokens: StrictInt | None = None  # OpenAI's newer name; wins when both are given
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    tools: list[Any] | None = None


def neutral_extras(req: SamplingFields) -> list[tuple[str, str]]:
    """(field, reason) for accepted-but-unsupported fields set to a non-neutral value."""
    bad = []
    if req.presence_penalty:
        bad.append(("presence_penalty", "presence_penalty is not supported"))
    if req.frequency_penalty:
        bad.append(("frequency_penalty", "frequency_penalty is not supported"))
    if req.logit_bias:
        bad.append(("logit_bias", "logit_bias is not supported"))
    return bad
