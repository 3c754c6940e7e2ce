"""Paged attention in plain torch, over a block-structured KV cache.

KV cache, one tensor per layer: `[2, num_blocks, block_size, num_kv_heads, head_dim]` (0 = K, 1 = V).
A token's flat slot is `block * block_size + offset`; a sequence's tokens live in the blocks of its
row of `ctx.block_tables`.

Per step the model builds one `AttentionPlan` from the `ForwardContext` (host lists only, one small
host->device copy), shared by all layers. Each layer then:
  1. writes the step's K/V at `ctx.slot_mapping`;
  2. decode rows (query_len 1), all at once: gather the KV blocks of every decode sequence with one
     `index_select` (whole blocks: far faster on CPU than per-token advanced indexing), padded to
     the longest decode context -> `[B, L, kv_heads, D]`, then batched matmul -> fp32 masked
     softmax -> matmul, with the G query heads of a KV group as the rows of one matmul (GQA
     without repeating K/V);
  3. prefill sequences (full or chunked), one at a time: query j of a sequence sits at position
     `context_len - query_len + j` and sees keys `<=` it; a fresh prefill uses the step's own K/V.
No host syncs (`.item()`, `.tolist()`) happen in the layer loop.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from server.model.config import ModelConfig
from server.model.context import ForwardContext


def allocate_kv_cache(cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: torch.device | str) -> list[torch.Tensor]:
    """One zeroed `[2, num_blocks, block_size, kv_heads, head_dim]` tensor per layer."""
    if num_blocks <= 0 or block_size <= 0:
        raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
    shape = (2, num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]


@dataclass
class PrefillSeq:
    start: int  # first row of the sequence in the flattened batch
    query_len: int
    context_len: int
    blocks: torch.Tensor | None  # [ceil(context_len / bs)] int64 block ids, None: the step holds the whole context
    mask: torch.Tensor | None  # [query_len, context_len] bool causal mask (None: plain causal)


@dataclass
class AttentionPlan:
    """Per-step gather indices and masks, built once and shared by all layers."""

    all_decode: bool
    decode_rows: torch.Tensor | None  # [B] int64 rows of decode tokens (None: all rows, in order)
    decode_blocks: torch.Tensor | None  # [B * nblocks] int64 block ids of the decode sequences, padded
    decode_mask: torch.Tensor | None  # [B, 1, 1, nblocks * bs] bool, True where the key is in the context
    prefills: list[PrefillSeq]


def build_attention_plan(ctx: ForwardContext) -> AttentionPlan:
    """Turn the step's host-side lists into gather indices (one device copy per tensor)."""
    device, bs = ctx.slot_mapping.device, ctx.block_size
    starts, pos = [], 0
    for q in ctx.query_lens:
        starts.append(pos)
        pos += q
    dec = [i for i, q in enumerate(ctx.query_lens) if q == 1]
    all_decode = len(dec) == ctx.num_seqs
    decode_rows = decode_blocks = decode_mask = None
    if dec:
        lens = [ctx.context_lens[i] for i in dec]
        max_len = max(lens)
        nblocks = -(-max_len // bs)
        seq_idx = None if all_decode else torch.tensor(dec, device=device)
        tables = ctx.block_tables[:, :nblocks] if seq_idx is None else ctx.block_tables[seq_idx, :nblocks]
        decode_blocks = tables.long().reshape(-1)  # [B, nblocks] -> [B * nblocks]
        lens_t = ctx.context_lens_t if seq_idx is None else ctx.context_lens_t[seq_idx]
        decode_mask = (torch.arange(nblocks * bs, device=device)[None, :] < lens_t[:, None])[:, None, None, :]
        if not all_decode:
            decode_rows = torch.tensor([starts[i] for i in dec], device=device)
    prefills = []
    for i, (q, c) in enumerate(zip(ctx.query_lens, ctx.context_lens, strict=True)):
        if q == 1:
            continue
        blocks = mask = None
        if c != q:  # chunked prefill: earlier tokens are already in the cache
            blocks = ctx.block_tables[i, : -(-c // bs)].long()
            q_pos = torch.arange(c - q, c, device=device)
            mask = torch.arange(c, device=device)[None, :] <= q_pos[:, None]
        prefills.append(PrefillSeq(starts[i], q, c, blocks, mask))
    return AttentionPlan(all_decode, decode_rows, decode_blocks, decode_mask, prefills)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    ctx: ForwardContext, plan: AttentionPlan, scale: float) -> torch.Tensor:
    """q [T, H, D], k/v [T, KV, D] (rotated) -> out [T, H, D]; writes k/v into `kv_cache`."""
    T, H, D = q.shape
    KV = k.shape[1]
    G = H // KV
    # [2, blocks, bs, KV, D] -> [2, blocks*bs, KV, D]: flat slots index dim 1
    flat = kv_cache.view(2, -1, KV, D)
    flat[0].index_copy_(0, ctx.slot_mapping, k)
    flat[1].index_copy_(0, ctx.slot_mapping, v)
    out = q.new_empty(T, H, D) if not plan.all_decode else None

    if plan.decode_blocks is not None:
        qd = q if plan.decode_rows is None else q.index_select(0, plan.decode_rows)
        B = qd.shape[0]
        # [2, B*nblocks, bs, KV, D] -> [2, B, L_pad, KV, D]
        kv = kv_cache.index_select(1, plan.decode_blocks).view(2, B, -1, KV, D)
        # [B, H, D] -> [B, KV, G, D]: the G query heads of a group are the rows of one matmul.
        qd = qd.view(B, KV, G, D)
        scores = torch.matmul(qd, kv[0].permute(0, 2, 3, 1)).float() * scale  # [B, KV, G, L_pad]
        probs = scores.masked_fill_(~plan.decode_mask, float("-inf")).softmax(-1).to(q.dtype)
        od = torch.matmul(probs, kv[1].transpose(1, 2)).reshape(B, H, D)  # [B, KV, G, D] -> [B, H, D]
        if plan.all_decode:
            return od
        out.index_copy_(0, plan.decode_rows, od)

    for p in plan.prefills:
        qs = q[p.start : p.start + p.query_len].transpose(0, 1)  # [H, q, D]
        if p.blocks is None:
            ks, vs = k[p.start : p.start + p.query_len], v[p.start : p.start + p.query_len]
        else:
            # [2, nblocks, bs, KV, D] -> [2, nblocks*bs, KV, D] -> first c tokens
            kv = kv_cache.index_select(1, p.blocks).view(2, -1, KV, D)[:, : p.context_len]
            ks, vs = kv[0], kv[1]  # [c, KV, D]
        # [c, KV, D] -> [KV, c, D] -> [H, c, D] (repeat each KV head for its G query heads)
        ks = ks.transpose(0, 1).repeat_interleave(G, dim=0)
        vs = vs.transpose(0, 1).repeat_interleave(G, dim=0)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=p.mask, is_causal=p.mask is None,
                                           scale=scale)
        out[p.start : p.start + p.query_len] = o.transpose(0, 1)
    return out
