"""Engine settings: one frozen dataclass per concern, validated once, never mutated.

The CLI (or a test) builds these from flags; the engine hands `SchedulerConfig` and a resolved
`CacheConfig` to the `Scheduler`, and `LoRASettings` to the adapter slots. The number of KV
blocks is discovered at run time (from free device memory), so `CacheConfig.num_blocks` may be
left `None` by the user; the engine then builds a resolved copy with `cache_cfg.resolved(n)`.
Invalid values raise `ValueError` naming the field. Plain Python: no torch here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


def _require(cond: bool, field: str, why: str) -> None:
    if not cond:
        raise ValueError(f"{field}: {why}")


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Paged KV cache: `num_blocks` blocks of `block_size` token slots each."""

    block_size: int = 16
    num_blocks: int | None = None  # None: sized at run time from `memory_fraction`
    memory_fraction: float = 0.85  # share of free device memory (CUDA) the KV pool may take when sizing
    enable_prefix_caching: bool = True  # keep finished requests' full blocks for reuse (block_manager.py)

    def __post_init__(self) -> None:
        _require(self.block_size >= 1, "block_size", "must be >= 1")
        _require(self.num_blocks is None or self.num_blocks >= 1, "num_blocks", "must be >= 1 or None")
        _require(0.0 < self.memory_fraction <= 1.0, "memory_fraction", "must be in (0, 1]")

    def resolved(self, num_blocks: int) -> CacheConfig:
        """A copy with the run-time number of blocks filled in (the original stays untouched)."""
        return dataclasses.replace(self, num_blocks=num_blocks)

    def max_tokens(self) -> int:
        """Token slots in the whole pool (needs a resolved config)."""
        if self.num_blocks is None:
            raise ValueError("num_blocks: not resolved yet")
        return self.num_blocks * self.block_size


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Continuous-batching limits for one engine step and for the waiting queue."""

    max_num_seqs: int = 64  # max requests running at once (= max batch rows)
    max_num_batched_tokens: int = 2048  # per-step token budget (prefill chunks + decodes)
    # distinct adapters among running requests; the engine builder sets it to LoRASettings.max_slots
    max_adapters_per_batch: int = 8
    # prompt + max_tokens of one request; None: the model's context, capped by what the KV pool holds
    # (the builder resolves it; a Scheduler given None uses the pool's capacity)
    max_model_len: int | None = None
    max_waiting: int = 1024  # waiting-queue cap; add_request past it raises QueueFullError (HTTP 503)
    # A waiting request skipped this many steps because its adapter found no slot stops the
    # admission of every request queued behind it until it is admitted (bounded wait).
    starvation_steps: int = 16
    # The budget counts what a chunk costs, not only its tokens: a token at position p also attends
    # over p cached tokens. This is the context length at which that attention costs as much as the
    # token's own linear layers (FLOPs; the builder derives it from the model's shapes). A token at
    # position p costs 1 + (p + 1) / attention_cost_len budget units. None: count tokens only.
    attention_cost_len: float | None = None
    # Decode protection: in a step that carries decode rows, prefill chunks may add at most this many
    # times the measured decode-only step time (the engine reports each step's time to
    # Scheduler.observe_step; chunk cost is converted to seconds by a running estimate). A long prompt
    # then cannot multiply the inter-token latency of the streams it shares steps with; alone, it
    # prefills at the full budget. None: the budget alone limits chunks.
    max_decode_stall: float | None = None

    def __post_init__(self) -> None:
        _require(self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1")
        _require(self.max_num_batched_tokens >= 1, "max_num_batched_tokens", "must be >= 1")
        # Every running request must be able to decode in the same step (as vLLM requires).
        _require(
            self.max_num_batched_tokens >= self.max_num_seqs,
            "max_num_batched_tokens",
            f"must be >= max_num_seqs ({self.max_num_seqs})",
        )
        _require(self.max_adapters_per_batch >= 1, "max_adapters_per_batch", "must be >= 1")
        _require(self.max_model_len is None or self.max_model_len >= 2, "max_model_len", "must be >= 2")
        _require(self.max_waiting >= 1, "max_waiting", "must be >= 1")
        _require(self.starvation_steps >= 1, "starvation_steps", "must be >= 1")
        _require(self.attention_cost_len is None or self.attention_cost_len > 0, "attention_cost_len",
                 "must be > 0 or None")
        _require(self.max_decode_stall is None or self.max_decode_stall > 0, "max_decode_stall",
                 "must be > 0 or None")


@dataclass(frozen=True, slots=True)
class LoRASettings:
    """Adapter memory tiers: device slots (per-batch cap) and the host-side LRU cache."""

    max_slots: int = 8  # adapters resident on the device at once
    max_lora_rank: int = 16  # slot buffers are padded to this rank; larger adapters are rejected (vLLM's default)
    host_cache_size: int = 64  # adapters kept in host memory (LRU), >= max_slots

    def __post_init__(self) -> None:
        _require(self.max_slots >= 1, "max_slots", "must be >= 1")
        _require(1 <= self.max_lora_rank <= 1024, "max_lora_rank", "must be in [1, 1024]")
        _require(self.host_cache_size >= self.max_slots, "host_cache_size", "must be >= max_slots")


def check_compatible(sched: SchedulerConfig, lora: LoRASettings) -> None:
    """The scheduler may never put more adapters in a batch than there are device slots."""
    _require(
        sched.max_adapters_per_batch <= lora.max_slots,
        "max_adapters_per_batch",
        f"must be <= LoRA max_slots ({lora.max_slots})",
    )
