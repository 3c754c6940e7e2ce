"""Greedy generation through the paged KV cache: a test utility and a reference for the engine.

`greedy_generate` allocates a small KV cache, hands each sequence blocks from a trivial allocator
(a free list, deliberately handed out in reverse so tables are non-contiguous), builds the
`ForwardContext` of each step (one prefill step, optionally in chunks, then one decode step per
token) and takes the argmax of the last row's logits. Used by tests and scripts, never by the engine.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from server.model.attention import allocate_kv_cache
from server.model.context import make_context
from server.model.llama import LlamaForCausalLM


@torch.inference_mode()
def greedy_generate(loaded_or_model, prompt_ids: Sequence[int], max_new_tokens: int, *,
                    block_size: int = 16, prefill_chunk: int | None = None,
                    eos_token_ids: Sequence[int] = ()) -> list[int]:
    """Generated ids (prompt excluded), stopping at `max_new_tokens` or an eos id (included)."""
    model: LlamaForCausalLM = getattr(loaded_or_model, "model", loaded_or_model)
    if not prompt_ids:
        raise ValueError("prompt_ids must not be empty")
    weight = model.lm_head.weight
    total = len(prompt_ids) + max_new_tokens
    num_blocks = -(-total // block_size) + 1
    model.bind_kv_cache(allocate_kv_cache(model.config, num_blocks, block_size, weight.dtype, weight.device))
    table = list(range(num_blocks - 1, -1, -1))[: -(-total // block_size)]  # reversed: non-contiguous
    ids = list(prompt_ids)
    out: list[int] = []
    chunk = prefill_chunk or len(ids)
    done = 0
    while len(out) < max_new_tokens:
        # Prefill in chunks of `chunk` tokens, then one token per step.
        step = ids[done : done + chunk] if done < len(prompt_ids) else ids[done:]
        pos = list(range(done, done + len(step)))
        ctx = make_context([pos], [table], block_size, weight.device)
        hidden = model(torch.tensor(step, device=weight.device), ctx)
        done += len(step)
        if done < len(prompt_ids):
            continue
        token = int(model.compute_logits(hidden[-1:]).argmax(-1)[0])
        ids.append(token)
        out.append(token)
        if token in eos_token_ids:
            break
    return out
