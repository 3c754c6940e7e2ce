"""`POST /v1/completions`: OpenAI text completions with an `adapter` field, JSON or SSE.

Flow: pydantic body -> admit -> refuse unsupported fields -> resolve adapter -> tokenize each prompt
(str, [str], [int], [[int]]: each prompt is one group of n choices) -> limits -> acquire adapter ->
`ChoiceRunner` -> either one JSON body (cancelled if the client disconnects first) or SSE chunks
ending in `data: [DONE]`. The adapter ref is released and unfinished choices aborted on every exit.
"""
from __future__ import annotations

import functools
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from server.api import generation as gen
from server.api import guided
from server.api.deps import EngineDep, InferenceAuth, SettingsDep, StateDep
from server.api.errors import bad_request
from server.api.openai_format import DONE, LogprobsBuilder, merge_completion_logprobs, sse, usage
from server.api.schemas import CompletionRequest
from server.engine.client import EngineClient
from server.settings import ServerSettings

router = APIRouter(dependencies=[InferenceAuth], tags=["inference"])
_THREAD_TOKENIZE_CHARS = 8192  # longer prompts are tokenized off the event loop


def _tokenize(engine: EngineClient, settings: ServerSettings, prompt: Any) -> list[list[int]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise bad_request("prompt: empty prompt", param="prompt", code="empty_prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]  # one prompt given as token ids
    if len(prompt) > settings.max_batch_size:
        raise bad_request(f"prompt: at most {settings.max_batch_size} prompts per request", param="prompt")
    out = []
    for p in prompt:
        if isinstance(p, str):
            if not p:
                raise bad_request("prompt: empty prompt", param="prompt", code="empty_prompt")
            p = engine.tokenizer.encode(p, add_special_tokens=True)
        gen.check_prompt(engine, p, "prompt")
        out.append(list(p))
    return out


def _refuse_unsupported(req: CompletionRequest) -> None:
    if req.echo and req.logprobs is not None:  # prompt logprobs are not computed
        raise bad_request("echo: not supported together with logprobs", param="echo", code="unsupported")
    if req.best_of not in (None, 1):
        raise bad_request("best_of: only 1 is supported", param="best_of", code="unsupported")
    if req.suffix:
        raise bad_request("suffix: not supported", param="suffix", code="unsupported")


@router.post("/v1/completions")
async def create_completion(req: CompletionRequest, request: Request, engine: EngineDep,
                            settings: SettingsDep, state: StateDep):
    gen.admit(state, engine)
    _refuse_unsupported(req)
    adapter = gen.resolve_adapter(engine, settings, req.model, req.adapter)
    spec = guided.guide_spec(req)
    chars = len(req.prompt) if isinstance(req.prompt, str) else 0
    if chars > _THREAD_TOKENIZE_CHARS:
        prompts = await run_in_threadpool(_tokenize, engine, settings, req.prompt)
    else:
        prompts = _tokenize(engine, settings, req.prompt)
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    guide = await guided.compile_guide(engine, spec)  # thread pool, cached by schema
    params = gen.build_params(req, settings, max_tokens=max_tokens, logprobs=req.logprobs,
                              logprobs_param="logprobs", vocab_size=engine.tokenizer.vocab_size, guide=guide)
    for ids in prompts:
        gen.check_length(engine, len(ids), params.max_tokens, "prompt")
    # echo: each choice's text starts with its prompt (the string as sent, or the decoded token ids)
    echo = None
    if req.echo:
        raw = req.prompt
        sent = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw)
        echo = [p if isinstance(p, str) else engine.tokenizer.decode(p, skip_special_tokens=False) for p in sent]
    ref = gen.acquire(engine, adapter, "adapter" if req.adapter is not None else "model")

    return await gen.respond(request, engine, state, req, prefix="cmpl",
                             objects=("text_completion", "text_completion"), prompts=prompts, params=params,
                             ref=ref, adapter=adapter, collect=functools.partial(_collect, echo=echo),
                             sse=functools.partial(_sse, echo=echo))


def _echo_prefix(runner: gen.ChoiceRunner, echo: list[str] | None, index: int) -> str:
    if echo is None:
        return ""
    per_prompt = len(runner.jobs) // len(echo)  # n choices per prompt, prompt-major
    return echo[index // per_prompt]


async def _collect(runner: gen.ChoiceRunner, head: dict, decode, echo: list[str] | None = None) -> dict:
    n = len(runner.jobs)
    texts = [_echo_prefix(runner, echo, i) for i in range(n)]
    lp_parts: list[list[dict]] = [[] for _ in range(n)]
    builders = [LogprobsBuilder(decode) for _ in range(n)]
    reasons: list[str | None] = [None] * n
    async for index, delta in runner.stream():
        if delta.finish_reason == "error":
            raise gen.engine_error(delta.error)
        texts[index] += delta.text
        part = builders[index].completion(delta)
        if part is not None:
            lp_parts[index].append(part)
        if delta.finished:
            reasons[index] = delta.finish_reason
    choices = [{"text": texts[i], "index": i, "logprobs": merge_completion_logprobs(lp_parts[i]),
                "finish_reason": reasons[i]} for i in range(n)]
    return {**head, "choices": choices, "usage": usage(runner.prompt_tokens, runner.total_completion_tokens, runner.cached_tokens)}


async def _sse(runner: gen.ChoiceRunner, head: dict, decode, include_usage: bool, echo: list[str] | None = None):
    builders = [LogprobsBuilder(decode) for _ in range(len(runner.jobs))]
    for i in range(len(runner.jobs) if echo is not None else 0):  # echo: the prompt first, its own chunk
        yield sse({**head, "choices": [{"index": i, "text": _echo_prefix(runner, echo, i), "logprobs": None,
                                        "finish_reason": None}]})
    async for index, delta in runner.stream():
        if delta.finish_reason == "error":
            yield sse(gen.engine_error(delta.error).body())
            continue
        if not (delta.text or delta.finished or delta.logprobs):
            continue
        choice = {"index": index, "text": delta.text, "logprobs": builders[index].completion(delta),
                  "finish_reason": delta.finish_reason if delta.finished else None}
        yield sse({**head, "choices": [choice]})
    if include_usage:
        yield sse({**head, "choices": [], "usage": usage(runner.prompt_tokens, runner.total_completion_tokens, runner.cached_tokens)})
    yield DONE
