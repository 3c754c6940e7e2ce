"""Triton paged attention on CUDA as a module substitution for `PagedAttention`, chosen at build time.

`enable_triton_attention(model)` swaps every `PagedAttention` of a CUDA model for
`TritonPagedAttention`: rotary and the KV write stay the torch path's (server/model/attention.py);
the attention itself reads K/V in place from the paged cache (kernels/triton_attention.py: no gather
copy, no padding). An all-decode step runs the split-context decode kernel; any step with a prefill
(full or chunked; its decode rows are one-query sequences) runs the varlen prefill kernel once for the
whole step. The int32 views the kernels read (context lengths, query starts) and the host-side
maxima are made once per step and kept on the step's `AttentionPlan`. While an autograd graph is
recorded the torch parent runs (the kernels record none).
"""
from __future__ import annotations

import torch
from torch import nn

from kernels.triton_attention import paged_decode_attention, paged_prefill_attention
from server.model.attention import AttentionPlan, PagedAttention, write_kv
from server.model.context import ForwardContext
from server.model.rope import apply_rotary


class TritonPagedAttention(PagedAttention):
    def __init__(self, attn: PagedAttention) -> None:
        super().__init__(attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.scale)

    def forward(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                ctx: ForwardContext, plan: AttentionPlan) -> torch.Tensor:
        if torch.is_grad_enabled():
            return super().forward(qkv, cos, sin, kv_cache, ctx, plan)
        T = qkv.shape[0]
        H, KV, D = self.num_heads, self.num_kv_heads, self.head_dim
        qk = apply_rotary(qkv[:, : self.q_size + self.kv_size].view(T, H + KV, D), cos, sin)
        q, k = qk[:, :H], qk[:, H:]  # views [T, H, D], [T, KV, D]
        v = qkv[:, self.q_size + self.kv_size :].view(T, KV, D)
        write_kv(k, v, kv_cache, plan)
        meta = plan.extras.get("triton")
        if meta is None:  # once per step, shared by every layer
            meta = plan.extras["triton"] = (ctx.context_lens_t.int(), ctx.query_start_loc.int(),
                                            ctx.block_tables.int(), max(ctx.context_lens), max(ctx.query_lens))
        lens, starts, tables, max_ctx, max_q = meta
        if plan.all_decode:
            return paged_decode_attention(q, kv_cache, tables, lens, self.scale, max_context_len=max_ctx)
        return paged_prefill_attention(q, kv_cache, tables, lens, starts, self.scale, max_query_len=max_q,
                                       max_context_len=max_ctx)

    def unfused(self) -> PagedAttention:
        return PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, self.scale)


def enable_triton_attention(model: nn.Module) -> int:
    """Swap every `PagedAttention` for the Triton one; returns how many (idempotent)."""
    swaps = [(parent, name, TritonPagedAttention(child)) for parent in list(model.modules())
             for name, child in list(parent.named_children()) if type(child) is PagedAttention]
    for parent, name, new in swaps:
        setattr(parent, name, new)
    return len(swaps)
