"""Structured output at the HTTP edge: `response_format` / `structured_outputs` -> a compiled grammar.

`guide_spec(req)` reads the request (OpenAI's `response_format`: text, json_object, json_schema;
vLLM's `structured_outputs`: json, regex, grammar, choice, json_object; at most one constraint in all)
into a `GuideSpec`; `compile_guide(engine, spec)` compiles it in the thread pool -- never on the
engine thread, never on the event loop -- through the engine's cached `GrammarCompiler`, under a
wall-clock cap. Every problem is a 400 naming the field; the compiled grammar then rides in
`SamplingParams.guide` to the runner.
"""
from __future__ import annotations

import asyncio
import json

from starlette.concurrency import run_in_threadpool

from server.api.errors import APIError, bad_request
from server.api.schemas import SamplingFields
from server.engine.client import EngineClient
from server.engine.structured import CompiledGrammar, GrammarError, GuideSpec, compiler_for

COMPILE_TIMEOUT_S = 10.0


def guide_spec(req: SamplingFields) -> GuideSpec | None:
    """The one constraint the request asks for, or None."""
    specs: list[GuideSpec] = []
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        specs.append(GuideSpec("json_object", "", "response_format"))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise bad_request("response_format.json_schema.schema: required for type json_schema",
                              param="response_format.json_schema.schema")
        specs.append(_schema(rf.json_schema.schema_, "response_format.json_schema.schema"))
    elif rf is not None and rf.json_schema is not None:
        raise bad_request("response_format.json_schema: only with type json_schema",
                          param="response_format.json_schema")
    so = req.structured_outputs
    if so is not None:
        if so.json_ is not None:
            schema = so.json_
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError:
                    raise bad_request("structured_outputs.json: not valid JSON",
                                      param="structured_outputs.json") from None
            specs.append(_schema(schema, "structured_outputs.json"))
        if so.regex is not None:
            specs.append(GuideSpec("regex", so.regex, "structured_outputs.regex"))
        if so.grammar is not None:
            specs.append(GuideSpec("grammar", so.grammar, "structured_outputs.grammar"))
        if so.choice is not None:
            alts = " | ".join(json.dumps(c) for c in so.choice)  # Lark string literals (JSON escapes)
            specs.append(GuideSpec("grammar", f"start: {alts}", "structured_outputs.choice"))
        if so.json_object:
            specs.append(GuideSpec("json_object", "", "structured_outputs.json_object"))
        if not specs:
            raise bad_request("structured_outputs: set one of json, regex, grammar, choice, json_object",
                              param="structured_outputs")
    if len(specs) > 1:
        raise bad_request("structured output: set at most one constraint (response_format or one field "
                          "of structured_outputs)", param=specs[1].param)
    return specs[0] if specs else None


def _schema(schema, param: str) -> GuideSpec:
    try:
        return GuideSpec.json_schema(schema, param)
    except GrammarError as exc:
        raise bad_request(str(exc), param=exc.param, code="invalid_schema") from None


async def compile_guide(engine: EngineClient, spec: GuideSpec | None) -> CompiledGrammar | None:
    if spec is None:
        return None
    tok = engine.tokenizer
    if not hasattr(tok, "tok"):  # a tokenizer llguidance cannot read (tests' byte tokenizer)
        raise bad_request(f"{spec.param}: structured output is not available for this model",
                          param=spec.param, code="unsupported")
    def compile_() -> CompiledGrammar:  # the first call also builds the tokenizer's index (~1 s)
        return compiler_for(tok, tok.vocab_size).compile(spec)

    try:
        return await asyncio.wait_for(run_in_threadpool(compile_), COMPILE_TIMEOUT_S)
    except GrammarError as exc:
        raise bad_request(str(exc), param=exc.param, code="invalid_grammar") from None
    except asyncio.TimeoutError:  # TimeoutError itself from 3.11
        raise APIError(400, f"{spec.param}: took longer than {COMPILE_TIMEOUT_S:g} s to compile",
                       param=spec.param, code="grammar_too_complex") from None
