"""One small per-step context object that carries everything attention and LoRA layers need.

The runner builds a `ForwardContext` per engine step (flattened batch `[num_tokens, hidden]`,
no padding; `make_context` from per-sequence positions and block tables) and passes it to
`LlamaForCausalLM.forward(input_ids, ctx)`; the model installs it with `use_context` so that deep
modules (paged attention, LoRA-aware linears) read it through `get_context()` without threading it
through every signature. `lora` is the step's LoRA plan, made by the engine's LoRA backend
(`backend.prepare(LoRABatch)`); the model's math never looks inside it.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class ForwardContext:
    # Per token (flattened over all sequences of the step) ------------------------------
    positions: torch.Tensor  # [num_tokens] int64, absolute position of each token in its sequence
    slot_mapping: torch.Tensor  # [num_tokens] int64, flat KV slot (block * block_size + offset) to write
    # Per sequence (in the order their tokens appear in the flattened batch) ------------------
    query_lens: list[int]  # new tokens of each sequence this step (1 for decode)
    context_lens: list[int]  # tokens in KV for each sequence after this step (incl. the new ones)
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, padded with 0 beyond each table's length
    query_start_loc: torch.Tensor  # [num_seqs + 1] int64, cumulative query_lens
    context_lens_t: torch.Tensor  # [num_seqs] int64, context_lens on the device
    block_size: int
    lora: Any = None  # the LoRA backend's plan for this step; None: no row uses an adapter

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def is_decode_only(self) -> bool:
        return all(q == 1 for q in self.query_lens)


def make_context(positions: list[list[int]], tables: list[list[int]], block_size: int,
                 device: torch.device) -> ForwardContext:
    """One step: `positions[i]` are the new tokens' positions of sequence i (contiguous, ending at
    its context length - 1), `tables[i]` its block table."""
    query_lens = [len(p) for p in positions]
    context_lens = [p[-1] + 1 for p in positions]
    flat_pos = [x for p in positions for x in p]
    slots = [tables[i][x // block_size] * block_size + x % block_size
             for i, p in enumerate(positions) for x in p]
    width = max(len(t) for t in tables)
    padded = [t + [0] * (width - len(t)) for t in tables]
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    return ForwardContext(
        positions=torch.tensor(flat_pos, dtype=torch.int64, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_lens=query_lens,
        context_lens=context_lens,
        block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int64, device=device),
        context_lens_t=torch.tensor(context_lens, dtype=torch.int64, device=device),
        block_size=block_size,
    )


# Per thread: two models running forward in two threads of one process (the engine thread and a
# reference model in a test, or two engines) must never read each other's step context.
_LOCAL = threading.local()


def _stack() -> list[ForwardContext]:
    stack = getattr(_LOCAL, "stack", None)
    if stack is None:
        stack = _LOCAL.stack = []
    return stack


@contextlib.contextmanager
def use_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    """Install `ctx` for the duration of one forward pass (in the calling thread)."""
    stack = _stack()
    stack.append(ctx)
    try:
        yield ctx
    finally:
        stack.pop()


def get_context() -> ForwardContext:
    stack = _stack()
    assert stack, "no ForwardContext installed: call the model through LlamaForCausalLM.forward"
    return stack[-1]
