"""OpenAI wire shapes built from engine deltas: logprobs (completions and chat), usage, SSE framing.

Routes feed each `CompletionDelta` of a choice through a per-choice `LogprobsBuilder`, which keeps
the running text offset, and get back the fragment OpenAI expects in that position. Token strings
come from the delta when the engine supplies them, else from `tokenizer.decode([id])`.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fastapi.responses import StreamingResponse

from server.engine.outputs import CompletionDelta

DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; `prompt_tokens_details.cached_tokens`: prompt tokens served from the
    prefix cache (always present, 0 when none, as OpenAI reports it)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


class LogprobsBuilder:
    """Turns deltas of one choice into completions-style or chat-style logprobs fragments."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.offset = 0  # characters of completion text before the current delta

    def _strings(self, delta: CompletionDelta) -> tuple[list[str], list[list[str]]]:
        lps = delta.logprobs or []
        tokens = delta.logprob_tokens or [self.decode([lp.token_id]) for lp in lps]
        tops = delta.top_logprob_tokens or [[self.decode([t]) for t, _ in lp.top] for lp in lps]
        return tokens, tops

    def completion(self, delta: CompletionDelta) -> dict[str, Any] | None:
        """{tokens, token_logprobs, top_logprobs, text_offset} for this delta, or None."""
        if delta.logprobs is None:
            self.offset += len(delta.text)
            return None
        tokens, tops = self._strings(delta)
        offsets = []
        for tok in tokens:
            offsets.append(self.offset)
            self.offset += len(tok)
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for lp in delta.logprobs],
            "top_logprobs": [
                {s: v for s, (_, v) in zip(top_s, lp.top, strict=False)} for lp, top_s in zip(delta.logprobs, tops, strict=False)
            ],
            "text_offset": offsets,
        }

    def chat(self, delta: CompletionDelta) -> list[dict[str, Any]] | None:
        """The `content` list of chat logprobs for this delta, or None."""
        if delta.logprobs is None:
            return None
        tokens, tops = self._strings(delta)
        out = []
        for lp, tok, top_s in zip(delta.logprobs, tokens, tops, strict=False):
            out.append({
                "token": tok,
                "logprob": lp.logprob,
                "bytes": list(tok.encode("utf-8")),
                "top_logprobs": [{"token": s, "logprob": v, "bytes": list(s.encode("utf-8"))}
                                 for s, (_, v) in zip(top_s, lp.top, strict=False)],
            })
        return out


def merge_completion_logprobs(parts: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not parts:
        return None
    merged: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for p in parts:
        for k in merged:
            merged[k].extend(p[k])
    return merged


class ClosingStreamingResponse(StreamingResponse):
    """StreamingResponse that always runs `on_close` (sync), even when cancelled before the first chunk."""

    def __init__(self, content: Any, on_close: Callable[[], None], **kwargs: Any):
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()
