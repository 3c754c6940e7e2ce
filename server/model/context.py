"""One small per-step context object that carries everything attention and LoRA layers need.

The runner builds a `ForwardContext` per engine step (flattened batch `[num_tokens, hidden]`,
no padding) and passes it to `LlamaForCausalLM.forward(input_ids, ctx)`; the model installs it
with `use_context` so that deep modules (paged attention, LoRA-aware linears) read it through
`get_context()` without threading it through every signature.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from kernels.batch import LoRABatch


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
    lora: LoRABatch | None = None  # None: no row of this step uses an adapter

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def is_decode_only(self) -> bool:
        return all(q == 1 for q in self.query_lens)


_CURRENT: list[ForwardContext] = []


@contextlib.contextmanager
def use_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    """Install `ctx` for the duration of one forward pass."""
    _CURRENT.append(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.pop()


def get_context() -> ForwardContext:
    assert _CURRENT, "no ForwardContext installed: call the model through LlamaForCausalLM.forward"
    return _CURRENT[-1]
