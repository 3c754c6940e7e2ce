"""Pydantic request models for the OpenAI-compatible routes (the HTTP edge; dataclasses inside).

Only types and OpenAI's documented shapes are checked here; server limits (n cap, stop counts, model
length, vocabulary, logit_bias ids) are checked in `generation.py` against the settings and the engine,
so every violation names its field in the same error shape.

Unknown fields are refused with a 400 naming the field, as OpenAI does (`extra="forbid"` on every
model, both routes): a misspelt or unsupported option must never be silently dropped. Fields we accept
but cannot honour (best_of > 1, suffix, tools) are refused in the routes.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

_STRICT = ConfigDict(extra="forbid")


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: StrictBool = False


class JsonSchemaFormat(BaseModel):
    """`response_format.json_schema` (OpenAI): `schema` is the JSON schema itself."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: StrictStr = Field(max_length=64)
    description: StrictStr | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(BaseModel):
    model_config = _STRICT
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` (set exactly one): a JSON schema, a regex, a Lark grammar
    (llguidance's dialect), a list of choices, or any JSON object."""

    model_config = _STRICT
    json_: dict[str, Any] | StrictStr | None = Field(default=None, alias="json")
    regex: StrictStr | None = None
    grammar: StrictStr | None = None
    choice: list[StrictStr] | None = Field(default=None, min_length=1, max_length=256)
    json_object: StrictBool | None = None


class SamplingFields(BaseModel):
    """Fields shared by completions and chat."""

    model_config = _STRICT

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
    presence_penalty: float | None = None  # OpenAI, [-2, 2], over generated tokens
    frequency_penalty: float | None = None  # OpenAI, [-2, 2], over generated tokens
    repetition_penalty: float | None = None  # vLLM extension, (0, 2], over prompt + generated tokens
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None  # vLLM extension: regex / grammar / choice / json
    # OpenAI fields that change nothing about the output here: accepted
    metadata: dict[str, StrictStr] | None = None
    store: StrictBool | None = None
    service_tier: StrictStr | None = None


class CompletionRequest(SamplingFields):
    # str | list[str] | list[int] | list[list[int]]
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: StrictInt | None = 16
    logprobs: StrictInt | None = None
    echo: StrictBool = False
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = _STRICT
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
    tool_choice: Literal["none", "auto"] | None = None  # without tools both mean plain text
    parallel_tool_calls: StrictBool | None = None
