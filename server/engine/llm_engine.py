"""The synchronous engine: `step()` = schedule -> execute -> update, plus output processing.

`LLMEngine` owns the scheduler, the model runner and one output processor per live request
(incremental detokenizer + stop strings). Callers (the async wrapper's background thread, the
in-process benchmark, tests) `add_request(...)`, then call `step()` until `has_unfinished()` is
false; each step returns the text deltas (`CompletionDelta`) of the requests that moved.

Stop strings are matched on the detokenized text: the text is cut before the stop string and the
request is finished through `Scheduler.finish_requests`. While a request may still stop, the last
`len(longest stop) - 1` characters are held back so a stream never shows part of a stop string.
An exception while executing a step fails that step's requests (finish_reason "error") instead of
killing the engine.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field

from adapters.ref import AdapterRef
from adapters.slots import SlotLoadError
from server.engine.outputs import CompletionDelta, RequestOutput, TokenLogprob
from server.engine.request import Request, RequestStatus
from server.engine.runner import ModelRunner
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import Scheduler
from server.model.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger("loramux.engine")


@dataclass(slots=True)
class _Live:
    """Engine-side state of one request: the request (with its adapter ref), detokenizer and emitted text."""

    request: Request
    detok: IncrementalDetokenizer
    text: str = ""  # all text so far (stop strings cut)
    emitted: int = 0  # characters of `text` already sent
    completion_tokens: int = 0
    first_token_time: float | None = None
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(slots=True)
class EngineCounters:
    steps: int = 0
    scheduled_sequences: int = 0
    batched_tokens: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    step_errors: int = 0


class LLMEngine:
    def __init__(self, scheduler: Scheduler, runner: ModelRunner, tokenizer: Tokenizer) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.tokenizer = tokenizer
        self.live: dict[str, _Live] = {}
        self.counters = EngineCounters()

    # --- requests ------------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        adapter: AdapterRef | None = None,
    ) -> None:
        """Queue a request; raises ValueError (never fits) or QueueFullError (queue cap)."""
        self.add_requests([(request_id, prompt_token_ids, params)], adapter)

    def add_requests(self, jobs: list[tuple[str, list[int], SamplingParams]], adapter: AdapterRef | None = None) -> None:
        """Queue (request_id, prompt ids, params) jobs all on one adapter, all or none (see
        `Scheduler.add_requests`)."""
        reqs = []
        for request_id, prompt_token_ids, params in jobs:
            bad = [t for t in prompt_token_ids if not (0 <= t < self.runner.model.config.vocab_size)]
            if bad:
                raise ValueError(f"prompt: token ids outside the vocabulary: {bad[:5]}")
            reqs.append(Request(request_id, prompt_token_ids, params, adapter=adapter,
                                eos_token_ids=self.tokenizer.eos_token_ids))
        self.scheduler.add_requests(reqs)
        for req in reqs:
            self.live[req.request_id] = _Live(req, IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids))
            self.counters.prompt_tokens += len(req.prompt_token_ids)

    def abort(self, request_id: str) -> None:
        self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # --- one step --------------------------------------------------------------------------------
    def step(self, lock: threading.Lock | None = None) -> list[CompletionDelta]:
        """One engine step. With `lock`, only schedule and update hold it: the model runs unlocked,
        so other threads can queue and abort requests meanwhile (aborts take effect next step)."""
        guard = lock if lock is not None else contextlib.nullcontext()
        with guard:
            sched_out = self.scheduler.schedule()
            for rid in sched_out.finished_ids:
                self.runner.forget(rid)
            if sched_out.is_empty:
                return self._process(self.scheduler.update_from_output(sched_out, {}))
        try:
            t0 = time.perf_counter()
            result = self.runner.execute(sched_out)
            elapsed = time.perf_counter() - t0
        except SlotLoadError as exc:  # one adapter cannot be loaded: fail its requests only
            log.warning("adapter load failed: %s", exc)
            with guard:
                key = exc.ref.id
                live = [sr for sr in sched_out.scheduled if not sr.request.is_finished]
                bad = [sr.request_id for sr in live if sr.request.adapter_key == key]
                self.scheduler.finish_requests(bad, RequestStatus.FINISHED_ERROR, error=str(exc))
                self.scheduler.requeue([sr.request_id for sr in live if sr.request.adapter_key != key])
                outs = self.scheduler.update_from_output(dataclasses.replace(sched_out, scheduled=[]), {})
                outs += [RequestOutput(i, [], None, True, "error", f"adapter {exc.ref.name!r} could not be loaded")
                         for i in bad]
                return self._process(outs)
        except Exception as exc:  # a failed step fails its requests, never the engine
            log.exception("engine step failed")
            with guard:
                self.counters.step_errors += 1
                ids = [sr.request_id for sr in sched_out.scheduled if not sr.request.is_finished]
                self.scheduler.finish_requests(ids, RequestStatus.FINISHED_ERROR, error=str(exc))
                outs = self.scheduler.update_from_output(sched_out, {})
                outs += [RequestOutput(i, [], None, True, "error", "internal error while running the step")
                         for i in ids]
                return self._process(outs)
        with guard:
            c = self.counters
            c.steps += 1
            c.scheduled_sequences += len(sched_out.scheduled)
            c.batched_tokens += result.num_tokens
            self.scheduler.observe_step(sched_out, elapsed)  # decode protection's step-time estimates
            outs = self.scheduler.update_from_output(sched_out, result.sampled, result.logprobs)
            return self._process(outs, result.grammar_done)

    # --- output processing -------------------------------------------------------------------------
    def _process(self, outs: list[RequestOutput], grammar_done: frozenset[str] = frozenset()) -> list[CompletionDelta]:
        deltas = []
        for out in outs:
            live = self.live.get(out.request_id)
            if live is None:
                continue
            delta = self._apply(live, out, out.request_id in grammar_done)
            if delta.finished:
                del self.live[out.request_id]
                self.runner.forget(out.request_id)
            if delta.finished or delta.text or delta.token_ids:
                deltas.append(delta)
        return deltas

    def _apply(self, live: _Live, out: RequestOutput, grammar_done: bool = False) -> CompletionDelta:
        req, sp = live.request, live.request.sampling_params
        finished, reason = out.finished, out.finish_reason
        tokens = list(out.new_token_ids)
        if tokens and live.first_token_time is None:
            live.first_token_time = time.monotonic()
        live.completion_tokens += len(tokens)
        self.counters.generation_tokens += len(tokens)
        # The stop token of an EOS / stop_token_ids stop is not text.
        text_tokens = tokens[:-1] if (finished and reason == "stop") else tokens
        live.text += live.detok.add(text_tokens) if text_tokens else ""
        if sp.stop and not finished:
            cut = _find_stop(live.text, sp.stop, live.emitted)
            if cut is not None:
                live.text = live.text[:cut]
                finished, reason = True, "stop"
                self.scheduler.finish_requests(req.request_id, RequestStatus.FINISHED_STOPPED)
        if grammar_done and not finished:  # structured output: the grammar is complete, so is the request
            finished, reason = True, "stop"
            self.scheduler.finish_requests(req.request_id, RequestStatus.FINISHED_STOPPED)
        if finished:
            end = len(live.text)
        else:
            hold = max((len(s) for s in sp.stop), default=1) - 1
            end = max(live.emitted, len(live.text) - hold)
        new_text = live.text[live.emitted : end]
        live.emitted = end
        lps = out.new_logprobs
        lp_tokens = top_tokens = None
        if lps:
            lp_tokens = [self.tokenizer.id_to_token_str(lp.token_id) for lp in lps]
            top_tokens = [[self.tokenizer.id_to_token_str(t) for t, _ in lp.top] for lp in lps]
        return CompletionDelta(
            request_id=req.request_id,
            text=new_text,
            token_ids=tokens,
            logprobs=lps,
            logprob_tokens=lp_tokens,
            top_logprob_tokens=top_tokens,
            finished=finished,
            finish_reason=reason,
            error=out.error,
            prompt_tokens=req.num_prompt_tokens,
            completion_tokens=live.completion_tokens,
            cached_tokens=min(req.num_cached_tokens, req.num_prompt_tokens),
        )


def _find_stop(text: str, stops: tuple[str, ...], emitted: int) -> int | None:
    """Earliest index where a stop string starts, searching only text that could hold a new match."""
    best = None
    for s in stops:
        i = text.find(s, max(0, emitted - len(s) + 1))
        if i != -1 and (best is None or i < best):
            best = i
    return best
