"""`POST /v1/completions`: OpenAI text completions with an `adapter` field, JSON or SSE.

Flow: pydantic body -> admit -> refuse unsupported fields -> resolve adapter -> tokenize each prompt
(str, [str], [int], [[int]]: each prompt is one group of n choices) -> limits -> acquire adapter ->
`ChoiceRunner` -> either one JSON body (cancelled if the client disconnects first) or SSE chunks
ending in `data: [DONE]`. The adapter ref is released and unfinished choices aborted on every exit.
"""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from server.api import generation as gen
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
    if req.echo:
        raise bad_request("echo: not supported", param="echo", code="unsupported")
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
    chars = len(req.prompt) if isinstance(req.prompt, str) else 0
    if chars > _THREAD_TOKENIZE_CHARS:
        prompts = await run_in_threadpool(_tokenize, engine, settings, req.prompt)
    else:
        prompts = _tokenize(engine, settings, req.prompt)
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    params = gen.build_params(req, settings, max_tokens=max_tokens, logprobs=req.logprobs,
                              logprobs_param="logprobs")
    for ids in prompts:
        gen.check_length(engine, len(ids), params.max_tokens, "prompt")
    ref = gen.acquire(engine, adapter, "adapter" if req.adapter is not None else "model")

    return await gen.respond(request, engine, state, req, prefix="cmpl",
                             objects=("text_completion", "text_completion"), prompts=prompts, params=params,
                             ref=ref, adapter=adapter, collect=_collect, sse=_sse)


async def _collect(runner: gen.ChoiceRunner, head: dict, decode) -> dict:
    n = len(runner.jobs)
    texts = [""] * n
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
    return {**head, "choices": choices, "usage": usage(runner.prompt_tokens, runner.total_completion_tokens)}


async def _sse(runner: gen.ChoiceRunner, head: dict, decode, include_usage: bool):
    builders = [LogprobsBuilder(decode) for _ in range(len(runner.jobs))]
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
        yield sse({**head, "choices": [], "usage": usage(runner.prompt_tokens, runner.total_completion_tokens)})
    yield DONE
