"""`POST /v1/chat/completions`: messages -> the model's chat template -> the completions path.

Same admission, adapter resolution, limits and cleanup as completions (`generation.py`); only the
prompt source and the wire shapes differ: `chat.completion` with `message{role, content}`, or SSE
`chat.completion.chunk`s whose first delta carries the role, then content, then an empty delta with
the finish_reason, an optional usage chunk, and `data: [DONE]`.
"""
from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from server.api import generation as gen
from server.api import guided
from server.api.deps import EngineDep, InferenceAuth, SettingsDep, StateDep
from server.api.errors import bad_request, from_value_error
from server.api.openai_format import DONE, LogprobsBuilder, sse, usage
from server.api.schemas import ChatCompletionRequest
from server.engine.client import EngineClient

router = APIRouter(dependencies=[InferenceAuth], tags=["inference"])


def _render(engine: EngineClient, req: ChatCompletionRequest) -> list[int]:
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    try:
        text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except ValueError as exc:  # e.g. the template refuses the role order
        raise from_value_error(exc, "messages") from None
    except Exception as exc:  # jinja errors are not ValueErrors; never echo their internals
        raise bad_request(f"messages: the chat template rejected them ({type(exc).__name__})",
                          param="messages") from None
    # The template already holds the special tokens (BOS etc.).
    return engine.tokenizer.encode(text, add_special_tokens=False)


@router.post("/v1/chat/completions")
async def create_chat_completion(req: ChatCompletionRequest, request: Request, engine: EngineDep,
                                 settings: SettingsDep, state: StateDep):
    gen.admit(state, engine)
    if req.tools:
        raise bad_request("tools: not supported", param="tools", code="unsupported")
    adapter = gen.resolve_adapter(engine, settings, req.model, req.adapter)
    spec = guided.guide_spec(req)  # response_format / structured_outputs, checked before any work
    ids = await run_in_threadpool(_render, engine, req)
    gen.check_prompt(engine, ids, "messages")
    logprobs = None
    if req.logprobs:
        logprobs = req.top_logprobs or 0
    elif req.top_logprobs is not None:
        raise bad_request("top_logprobs: requires logprobs=true", param="top_logprobs")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is None:
        max_tokens = max(1, engine.max_model_len - len(ids))  # OpenAI default: up to the context
    guide = await guided.compile_guide(engine, spec)  # thread pool, cached by schema
    params = gen.build_params(req, settings, max_tokens=max_tokens, logprobs=logprobs,
                              logprobs_param="top_logprobs", vocab_size=engine.tokenizer.vocab_size, guide=guide)
    gen.check_length(engine, len(ids), params.max_tokens, "messages")
    ref = gen.acquire(engine, adapter, "adapter" if req.adapter is not None else "model")

    return await gen.respond(request, engine, state, req, prefix="chatcmpl",
                             objects=("chat.completion", "chat.completion.chunk"), prompts=[ids], params=params,
                             ref=ref, adapter=adapter, collect=_collect, sse=_sse)


async def _collect(runner: gen.ChoiceRunner, head: dict, decode) -> dict:
    n = len(runner.jobs)
    texts = [""] * n
    lps: list[list[dict] | None] = [None] * n
    builders = [LogprobsBuilder(decode) for _ in range(n)]
    reasons: list[str | None] = [None] * n
    async for index, delta in runner.stream():
        if delta.finish_reason == "error":
            raise gen.engine_error(delta.error)
        texts[index] += delta.text
        part = builders[index].chat(delta)
        if part is not None:
            lps[index] = (lps[index] or []) + part
        if delta.finished:
            reasons[index] = delta.finish_reason
    choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                "logprobs": None if lps[i] is None else {"content": lps[i]},
                "finish_reason": reasons[i]} for i in range(n)]
    return {**head, "choices": choices, "usage": usage(runner.prompt_tokens, runner.total_completion_tokens, runner.cached_tokens)}


async def _sse(runner: gen.ChoiceRunner, head: dict, decode, include_usage: bool):
    n = len(runner.jobs)
    builders = [LogprobsBuilder(decode) for _ in range(n)]
    for i in range(n):  # OpenAI sends the role first, in its own chunk
        yield sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}]})
    async for index, delta in runner.stream():
        if delta.finish_reason == "error":
            yield sse(gen.engine_error(delta.error).body())
            continue
        if delta.text or delta.logprobs:
            lp = builders[index].chat(delta)
            yield sse({**head, "choices": [{"index": index, "delta": {"content": delta.text},
                                            "logprobs": None if lp is None else {"content": lp},
                                            "finish_reason": None}]})
        if delta.finished:
            yield sse({**head, "choices": [{"index": index, "delta": {}, "logprobs": None,
                                            "finish_reason": delta.finish_reason}]})
    if include_usage:
        yield sse({**head, "choices": [], "usage": usage(runner.prompt_tokens, runner.total_completion_tokens, runner.cached_tokens)})
    yield DONE
