"""One generation request as the scheduler sees it: token ids, progress, status, KV blocks.

The engine builds a `Request` from the HTTP submission (token ids, `SamplingParams`, the acquired
`AdapterRef`, carried whole: the scheduler counts adapters by its id, the runner loads it) and hands it to `Scheduler.add_request`. From then on only the scheduler mutates it:
it advances `num_computed_tokens` as steps run, appends sampled tokens, grows `block_ids` through
the `BlockManager`, and moves `status` along the ordered `RequestStatus`. The runner only reads
it (through `ScheduledRequest`). Plain Python: no torch here.
"""
from __future__ import annotations

import enum
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from server.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from adapters.ref import AdapterRef


class RequestStatus(enum.IntEnum):
    """Ordered life cycle: every status after PREEMPTED is final."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2  # back in the waiting queue, its KV freed, to be recomputed
    FINISHED_STOPPED = 3  # EOS or a stop token / stop string
    FINISHED_LENGTH = 4  # max_tokens or max_model_len reached
    FINISHED_ABORTED = 5  # the client went away or the engine aborted it
    FINISHED_ERROR = 6

    @property
    def is_finished(self) -> bool:
        return self > RequestStatus.PREEMPTED

    @property
    def finish_reason(self) -> str | None:
        """OpenAI `finish_reason` for a final status, None while the request is alive."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


class Request:
    """A request's tokens and progress.

    `all_token_ids` = prompt + generated tokens (the "known" tokens); `num_computed_tokens` of them
    have their KV in `block_ids`. Each step the scheduler lets computed catch up with known; when
    they meet, the model samples the next token. Preemption resets `num_computed_tokens` to 0 and
    keeps the generated tokens, which are then recomputed like prompt tokens.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling_params: SamplingParams,
        adapter: AdapterRef | None = None,  # the acquired adapter version; None = base model
        eos_token_ids: Sequence[int] = (),
        arrival_time: float | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids: list[int] = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.adapter = adapter
        self.adapter_key: int | None = None if adapter is None else adapter.id  # the scheduler's adapter identity
        self.eos_token_ids: tuple[int, ...] = tuple(eos_token_ids)
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time

        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(self.prompt_token_ids)
        self.num_computed_tokens = 0
        self.status = RequestStatus.WAITING
        self.error: str | None = None  # message when status == FINISHED_ERROR
        self.block_ids: list[int] = []  # KV block table, owned by the BlockManager
        # Prefix caching (BlockManager): chained hashes of full blocks of all_token_ids (memo), how
        # many leading blocks of the table are registered in the cache, and how many prompt tokens
        # the first admission found cached (reported as usage.prompt_tokens_details.cached_tokens).
        self.block_hashes: list[bytes] = []
        self.num_cached_blocks = 0
        self.num_cached_tokens = 0
        # Fairness bookkeeping: steps this request was passed over because its adapter found no
        # slot (reset when it is admitted) and how often it was preempted.
        self.num_skipped_steps = 0
        self.num_preemptions = 0

    # --- token counts -------------------------------------------------------------------------
    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Known tokens: prompt + generated."""
        return len(self.all_token_ids)

    @property
    def max_total_tokens(self) -> int:
        """The most tokens this request can ever hold: prompt + max_tokens."""
        return self.num_prompt_tokens + self.sampling_params.max_tokens

    # --- status -------------------------------------------------------------------------------
    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.finish_reason

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, adapter={self.adapter_key}, status={self.status.name}, "
            f"computed={self.num_computed_tokens}/{self.num_tokens}, blocks={len(self.block_ids)})"
        )
