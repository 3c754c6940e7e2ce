"""The plan of one engine step, as the scheduler hands it to the runner (scheduler.py decides it):
`SchedulerOutput` (the step) of `ScheduledRequest`s (each request's share), and `QueueFullError`
(`add_request` when `max_waiting` requests already wait: HTTP 503)."""
from __future__ import annotations

from dataclasses import dataclass

from server.engine.request import Request


class QueueFullError(RuntimeError):
    """The waiting queue holds `max_waiting` requests already (map to HTTP 503)."""


@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step: tokens [start, start + num_new_tokens) of all_token_ids."""

    request: Request
    num_new_tokens: int
    start: int  # num_computed_tokens before this step (position of the first new token)
    block_ids: tuple[int, ...]  # KV block table snapshot covering start + num_new_tokens tokens
    do_sample: bool  # the chunk reaches the last known token: sample the next one

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def is_decode(self) -> bool:
        """One token that samples: a decode row (a one-token prefill chunk mid-prompt is not)."""
        return self.num_new_tokens == 1 and self.do_sample

    @property
    def token_ids(self) -> list[int]:
        return self.request.all_token_ids[self.start : self.start + self.num_new_tokens]


@dataclass(slots=True)
class SchedulerOutput:
    """The plan of one step, in batch order (running requests first, then newly admitted)."""

    scheduled: list[ScheduledRequest]
    num_batched_tokens: int
    preempted_ids: list[str]  # preempted during this schedule() call (their KV is gone)
    finished_ids: list[str]  # finished or aborted since the previous schedule() call
    adapter_keys: frozenset[int]  # distinct adapters in this step (base excluded)
    step: int
    cost: float = 0.0  # budget units charged (== num_batched_tokens without attention_cost_len)
    prefill_cost: float = 0.0  # the part of `cost` charged to prefill chunks (rows that are not decodes)
    num_decode_rows: int = 0  # rows computing one token and sampling (ScheduledRequest.is_decode)
    prefill_chunks: tuple[tuple[int, int], ...] = ()  # (start, n) of each prefill chunk (decode protection's input)

    @property
    def prefill_context(self) -> int:
        """Cached tokens the step's prefill chunks read (the sum of their starts)."""
        return sum(start for start, _ in self.prefill_chunks)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled
