"""Continuous-batching scheduler: which requests run this step, on how many tokens, and the
bookkeeping after the step. It plans; it never touches tensors, the model or the device.

Data flow, once per engine step (schedule -> execute -> update):
- `add_request` queues a `Request` (FCFS) after failing fast what can never be served.
- `schedule()` lets each request's computed tokens catch up with its known tokens under a token
  budget: running requests first, oldest first (decodes never stall behind a long prompt), then
  waiting ones (FCFS, skipping a request whose adapter finds no slot). A long prompt is simply
  split over steps (chunked prefill). KV blocks grow here; when they run out the newest running
  request is preempted (recompute: KV freed, requeued at the front, generated tokens kept).
  `num_computed_tokens` advances here, as in vLLM.
  Prefix caching: a request being admitted first takes the cached blocks of its longest cached
  block-aligned prefix (`BlockManager.match_prefix`: keyed by the adapter version's content hash),
  and starts computing after them.
  The budget (`max_num_batched_tokens`) counts cost, not tokens, when `attention_cost_len` is set:
  a chunk's tokens also attend over everything before them, so a chunk deep into a long prompt
  gets fewer tokens than one at its start (`chunk_cost`). Decode rows are charged but never
  refused, so a long prompt's chunks take only what the decodes leave.
  Decode protection (`max_decode_stall`): in a step that carries decode rows, prefill chunks may
  add at most that multiple of a decode-only step's time. The engine reports each step's model time
  (`observe_step`); `DecodeProtection` (decode_protection.py) keeps a running estimate of the
  decode-only step and a fitted price of prefill and turns the multiple into a chunk length. A prompt with no decode row beside it is not capped.
- The runner executes the `SchedulerOutput` and samples one token per `do_sample` row.
- `update_from_output()` registers the full blocks the step computed in the prefix cache, appends
  the sampled tokens, applies token-level stop rules, frees finished requests and returns one
  `RequestOutput` per request that got a token or finished.

Adapter cap: the distinct adapters (`adapter_key`, None = base, which is free) among RUNNING
requests never exceed `max_adapters_per_batch`, so every step's batch fits the device slots.
Anti-starvation: a waiting request skipped `starvation_steps` times for want of a slot stops
the admission of everything queued behind it until it gets in; running requests drain in
bounded time (max_tokens), so its wait is bounded.

Errors: `add_request` raises `ValueError` for a request that can never fit (prompt +
max_tokens > max_model_len, or more KV blocks than the whole pool) and `QueueFullError` when
`max_waiting` requests already wait (HTTP 503). `add_requests` admits one HTTP request's fan-out
(prompts x n) whole or not at all, so two requests racing for the last places never half-enter. A token-level stop (EOS or stop_token_ids) keeps
the stop token as the last id of `new_token_ids` (as vLLM does); detokenizers drop it when
`finish_reason == "stop"`.
"""
from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Iterable, Mapping

from server.engine.block_manager import BlockManager
from server.engine.config import CacheConfig, SchedulerConfig
from server.engine.decode_protection import DecodeProtection
from server.engine.outputs import RequestOutput, TokenLogprob
from server.engine.request import Request, RequestStatus
from server.engine.schedule_plan import QueueFullError, ScheduledRequest, SchedulerOutput


class Scheduler:
    def __init__(self, sched_cfg: SchedulerConfig, cache_cfg: CacheConfig) -> None:
        if cache_cfg.num_blocks is None:
            raise ValueError("num_blocks: resolve the cache config (cache_cfg.resolved(n)) first")
        if sched_cfg.max_model_len is None:  # no limit given: what the whole KV pool holds
            sched_cfg = dataclasses.replace(sched_cfg, max_model_len=cache_cfg.max_tokens())
        self.cfg = sched_cfg
        self.block_manager = BlockManager(cache_cfg.num_blocks, cache_cfg.block_size,
                                          enable_caching=cache_cfg.enable_prefix_caching)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order: the newest is last
        self.requests: dict[str, Request] = {}  # every unfinished request by id
        self.num_preemptions = 0  # total since start (a metric)
        # prefix cache, in prompt tokens since start (metrics): looked up at admission, found cached
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.step = 0
        self._finished_ids: list[str] = []  # for the next SchedulerOutput
        self._pending_outputs: list[RequestOutput] = []  # aborts, for the next update
        # decode protection (observe_step): seconds of a decode-only step, fitted prices of prefill chunks
        self.protection = DecodeProtection(sched_cfg.max_decode_stall)

    # --- queries ------------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.requests) or bool(self._pending_outputs)

    def get_request(self, request_id: str) -> Request | None:
        return self.requests.get(request_id)

    # --- entering and leaving ------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue a new request, or fail at once if it can never be served."""
        self.add_requests([request])

    def add_requests(self, requests: list[Request]) -> None:
        """Queue a group (one HTTP request's prompts x n) whole, or none of it: ValueError when one
        can never be served or the group is larger than the queue cap, QueueFullError when the
        queue has no room for all of them now."""
        ids = [r.request_id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError("request_id: duplicate ids in one group")
        for request in requests:
            self._check_new(request)
        if len(requests) > self.cfg.max_waiting:
            raise ValueError(f"n: this request fans out to {len(requests)} sequences (prompts x n); the "
                             f"server queues at most {self.cfg.max_waiting} (--max-waiting)")
        if len(self.waiting) + len(requests) > self.cfg.max_waiting:
            raise QueueFullError(f"{len(self.waiting)} requests waiting (max_waiting)")
        for request in requests:
            self.requests[request.request_id] = request
            self.waiting.append(request)

    def _check_new(self, request: Request) -> None:
        rid = request.request_id
        if rid in self.requests:
            raise ValueError(f"request_id: {rid!r} is already in flight")
        if request.status != RequestStatus.WAITING or request.output_token_ids:
            raise ValueError(f"request {rid!r}: must be new (status WAITING, no output yet)")
        if not request.prompt_token_ids:
            raise ValueError("prompt: must contain at least one token")
        if request.max_total_tokens > self.cfg.max_model_len:
            raise ValueError(
                f"prompt ({request.num_prompt_tokens} tokens) + max_tokens "
                f"({request.sampling_params.max_tokens}) exceeds max_model_len ({self.cfg.max_model_len})"
            )
        # The last sampled token is never fed back, so the KV holds at most max_total - 1 tokens.
        bm = self.block_manager
        need = bm.blocks_for_tokens(request.max_total_tokens - 1)
        if need > bm.num_blocks:
            raise ValueError(f"request {rid!r} needs {need} KV blocks, the whole pool has {bm.num_blocks}")

    def abort(self, request_ids: str | Iterable[str]) -> None:
        """Abort requests (unknown or finished ids are ignored); each yields an "abort" output
        at the next `update_from_output`."""
        for req in self._lookup(request_ids):
            self._finish(req, RequestStatus.FINISHED_ABORTED)
            self._pending_outputs.append(
                RequestOutput(req.request_id, [], None, finished=True, finish_reason="abort")
            )

    def finish_requests(
        self, request_ids: str | Iterable[str], status: RequestStatus, error: str | None = None
    ) -> None:
        """Finish requests the engine decided are done (stop strings, errors). The engine already
        knows, so no output is queued for them."""
        if not status.is_finished:
            raise ValueError(f"status: {status.name} is not a finished status")
        for req in self._lookup(request_ids):
            req.error = error
            self._finish(req, status)

    def requeue(self, request_ids: str | Iterable[str]) -> None:
        """Undo the current step for these running requests (the engine could not run it): they
        are preempted, i.e. recomputed later, since their KV for this step was never written."""
        for req in self._lookup(request_ids):
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
                self._preempt(req)

    # --- one step ------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        self.step += 1
        bm = self.block_manager
        budget = float(self.cfg.max_num_batched_tokens)
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []
        self.protection.start_step(any(r.num_tokens - r.num_computed_tokens == 1 for r in self.running))

        # 1. Running requests, oldest first. When KV runs out, the newest running one yields.
        i = 0
        while i < len(self.running):
            req = self.running[i]
            remaining = req.num_tokens - req.num_computed_tokens
            # A prefill chunk may use only what the younger running requests' decodes leave.
            left = budget if remaining <= 1 else budget - self._decode_cost(self.running[i + 1 :])
            n = self._prefill_len(req.num_computed_tokens, remaining, left, scheduled)
            if n == 0:  # waiting for the token of an un-updated step, or no budget left for a chunk
                i += 1
                continue
            while not bm.can_allocate_for(req, n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            if req.status != RequestStatus.RUNNING:
                break  # req preempted itself: it was the newest, nothing runs after it
            budget -= self._schedule_chunk(req, n, scheduled)
            i += 1

        # 2. Waiting requests, FCFS with skipping; none when memory is short (we just preempted).
        if not preempted:
            budget = self._admit(budget, scheduled)

        finished, self._finished_ids = self._finished_ids, []
        keys = frozenset(s.request.adapter_key for s in scheduled if s.request.adapter_key is not None)
        assert len(keys) <= self.cfg.max_adapters_per_batch
        return SchedulerOutput(
            scheduled=scheduled,
            num_batched_tokens=sum(s.num_new_tokens for s in scheduled),
            preempted_ids=preempted,
            finished_ids=finished,
            adapter_keys=keys,
            step=self.step,
            cost=self.cfg.max_num_batched_tokens - budget,
            prefill_cost=sum(self.chunk_cost(s.start, s.num_new_tokens) for s in scheduled if not s.is_decode),
            num_decode_rows=sum(1 for s in scheduled if s.is_decode),
            prefill_chunks=tuple((s.start, s.num_new_tokens) for s in scheduled if not s.is_decode),
        )

    # --- the cost model ------------------------------------------------------------------------
    def chunk_cost(self, start: int, n: int) -> float:
        """Budget units of computing tokens [start, start + n): n, plus each token's attention over
        the context before it, sum_{p=start}^{start+n-1} (p + 1) / attention_cost_len."""
        cost_len = self.cfg.attention_cost_len
        if cost_len is None:
            return float(n)
        return n + n * (2 * start + n + 1) / (2 * cost_len)

    def _decode_cost(self, requests: list[Request]) -> float:
        """What the decode rows among `requests` will charge this step."""
        return sum(self.chunk_cost(r.num_computed_tokens, 1) for r in requests
                   if r.num_tokens - r.num_computed_tokens == 1)

    def _chunk_len(self, start: int, remaining: int, budget: float) -> int:
        """How many of `remaining` tokens from `start` to run this step. A decode row (one token
        left) always runs: decodes come first and are never refused. A prefill chunk takes the most
        tokens whose cost fits the budget left (0 when not even one token fits)."""
        if remaining <= 1:
            return remaining
        if budget <= 0:
            return 0
        cost_len = self.cfg.attention_cost_len
        if cost_len is None:
            return min(remaining, int(budget))
        # n^2 / (2L) + n (1 + (2 start + 1) / (2L)) <= budget: the positive root, then fix rounding.
        a, b = 1 / (2 * cost_len), 1 + (2 * start + 1) / (2 * cost_len)
        n = min(remaining, int((-b + math.sqrt(b * b + 4 * a * budget)) / (2 * a)))
        while n > 0 and self.chunk_cost(start, n) > budget + 1e-9:
            n -= 1
        return max(0, n)

    def _prefill_len(self, start: int, remaining: int, budget: float, scheduled: list[ScheduledRequest]) -> int:
        """`_chunk_len` under the step's decode-protection cap as well (decode_protection.py)."""
        n = self._chunk_len(start, remaining, budget)
        if remaining <= 1 or n == 0:
            return n
        return self.protection.chunk_len(start, n, first=all(s.is_decode for s in scheduled))

    def observe_step(self, sched_out: SchedulerOutput, seconds: float) -> None:
        """The model time of a step this scheduler planned (the engine measures it)."""
        if sched_out.scheduled:
            self.protection.observe(sched_out.prefill_chunks, sched_out.num_decode_rows, seconds)

    def update_from_output(
        self,
        sched_out: SchedulerOutput,
        sampled: Mapping[str, int],
        logprobs: Mapping[str, TokenLogprob] | None = None,
    ) -> list[RequestOutput]:
        """Append each sampling row's token, finish what must stop, return the step's outputs."""
        outputs, self._pending_outputs = self._pending_outputs, []
        bm = self.block_manager
        for sr in sched_out.scheduled:
            # The step ran: the KV of its full blocks is written, so they may serve later requests.
            if not sr.request.is_finished:
                bm.cache_full_blocks(sr.request)
        for sr in sched_out.scheduled:
            req = sr.request
            # Aborted between schedule() and now: its blocks are already freed, skip it.
            if not sr.do_sample or req.is_finished:
                continue
            if req.request_id not in sampled:
                raise ValueError(f"sampled: no token for request {req.request_id!r}")
            token = int(sampled[req.request_id])
            req.append_token(token)
            stop = self._stop_status(req, token)
            if stop is not None:
                self._finish(req, stop)
            lp = logprobs.get(req.request_id) if logprobs is not None else None
            reason = stop.finish_reason if stop is not None else None
            outputs.append(RequestOutput(req.request_id, [token], None if lp is None else [lp], reason is not None, reason))
        return outputs

    # --- helpers -------------------------------------------------------------------------------
    def _schedule_chunk(self, req: Request, n: int, scheduled: list[ScheduledRequest]) -> float:
        """Grow the KV table, record the chunk and advance num_computed_tokens; returns its cost."""
        self.block_manager.allocate_for(req, n)
        start = req.num_computed_tokens
        req.num_computed_tokens += n
        do_sample = req.num_computed_tokens == req.num_tokens
        scheduled.append(ScheduledRequest(req, n, start, tuple(req.block_ids), do_sample))
        if n > 1 or not do_sample:  # a prefill chunk: less of the step's cap is left
            self.protection.charge(start, n)
        return self.chunk_cost(start, n)

    def _admit(self, budget: float, scheduled: list[ScheduledRequest]) -> float:
        cfg, bm = self.cfg, self.block_manager
        adapters = {r.adapter_key for r in self.running if r.adapter_key is not None}
        kept: deque[Request] = deque()
        blocked = False  # once set, everything behind stays queued (FCFS)
        for req in self.waiting:
            if blocked or budget <= 0 or len(self.running) >= cfg.max_num_seqs:
                blocked = True
                kept.append(req)
                continue
            key = req.adapter_key
            if key is not None and key not in adapters and len(adapters) >= cfg.max_adapters_per_batch:
                # No slot for this adapter: skip it and keep scanning (vLLM #15422), unless it has
                # been skipped too often, in which case nobody behind it may overtake it.
                req.num_skipped_steps += 1
                blocked = req.num_skipped_steps >= cfg.starvation_steps
                kept.append(req)
                continue
            # A waiting request holds no KV (new or preempted): start after its cached prefix.
            assert req.num_computed_tokens == 0 and not req.block_ids
            hits = bm.match_prefix(req)
            start = len(hits) * bm.block_size
            n = self._prefill_len(start, req.num_tokens - start, budget, scheduled)
            need = bm.blocks_for_tokens(start + n) - len(hits)
            # Sharing a cached block nobody holds takes it out of the free pool too.
            if n == 0 or need + bm.num_evictable(hits) > bm.num_free_blocks:
                blocked = True
                kept.append(req)
                continue
            bm.share(req, hits)
            req.num_computed_tokens = start
            req.num_cached_blocks = len(hits)
            self.prefix_cache_queries += req.num_tokens
            self.prefix_cache_hits += start
            if req.num_preemptions == 0:
                req.num_cached_tokens = start
            req.status = RequestStatus.RUNNING
            req.num_skipped_steps = 0
            self.running.append(req)
            if key is not None:
                adapters.add(key)
            budget -= self._schedule_chunk(req, n, scheduled)
        self.waiting = kept
        return budget

    def _preempt(self, req: Request) -> None:
        """Recompute-style preemption: free the KV, keep the tokens, requeue at the front."""
        self.block_manager.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _stop_status(self, req: Request, token: int) -> RequestStatus | None:
        sp = req.sampling_params
        # The sampler bans EOS / stop ids while the output is shorter than min_tokens, so a stop
        # token only counts once it was sampled past that point (index >= min_tokens).
        if req.num_output_tokens > sp.min_tokens and (
            token in sp.stop_token_ids or (not sp.ignore_eos and token in req.eos_token_ids)
        ):
            return RequestStatus.FINISHED_STOPPED
        if req.num_output_tokens >= sp.max_tokens or req.num_tokens >= self.cfg.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _lookup(self, request_ids: str | Iterable[str]) -> list[Request]:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        return [self.requests[i] for i in ids if i in self.requests]

    def _finish(self, req: Request, status: RequestStatus) -> None:
        """Remove a live request from the queues, free its KV once, record it as finished."""
        assert not req.is_finished, f"{req.request_id} finished twice"
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self.block_manager.free(req)
        req.status = status
        del self.requests[req.request_id]
        self._finished_ids.append(req.request_id)
