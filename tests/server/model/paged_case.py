"""Test helper: one attention step over a random paged KV cache, and the torch path's answer.

`paged_case(dtype, num_blocks, bs, positions, tables, seed)` -> a namespace with the cache (random
earlier K/V), ctx, plan, q/k/v of the step's tokens, and `ref` / `ref_cache`: what
`server.model.attention.paged_attention` (the torch formulation) returns and leaves in a copy of
the cache. D 64, 2 KV heads, 2 query heads per KV head."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from server.model.attention import allocate_kv_cache, build_attention_plan, paged_attention
from server.model.context import make_context

D, KV, G = 64, 2, 2


def paged_case(dtype, num_blocks: int, bs: int, positions, tables, seed: int) -> SimpleNamespace:
    g = torch.Generator().manual_seed(seed)

    class Cfg:
        num_key_value_heads, head_dim, num_hidden_layers = KV, D, 1

    cache = allocate_kv_cache(Cfg, num_blocks, bs, dtype, "cpu")[0]
    cache.copy_(torch.randn(cache.shape, generator=g))
    ctx = make_context(positions, tables, bs, torch.device("cpu"))
    T = sum(len(p) for p in positions)
    q = torch.randn(T, KV * G, D, generator=g).to(dtype)
    k = torch.randn(T, KV, D, generator=g).to(dtype)
    v = torch.randn(T, KV, D, generator=g).to(dtype)
    plan = build_attention_plan(ctx, cache)
    ref_cache = cache.clone()
    ref = paged_attention(q, k, v, ref_cache, ctx, plan, D**-0.5)
    return SimpleNamespace(cache=cache, ctx=ctx, plan=plan, q=q, k=k, v=v, T=T, ref=ref, ref_cache=ref_cache)
