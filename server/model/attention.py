"""Paged attention in plain torch, over a block-structured KV cache.

KV cache, one tensor per layer: `[2, num_blocks, block_size, num_kv_heads, head_dim]` (0 = K, 1 = V).
A token's flat slot is `block * block_size + offset`; a sequence's tokens live in the blocks of its
row of `ctx.block_tables`.

Per step the model builds one `AttentionPlan` from the `ForwardContext` (host lists only, one small
host->device copy), shared by all layers. Each layer then:
  1. writes the step's K/V at `ctx.slot_mapping`;
  2. decode rows (query_len 1), all at once: gather K/V of every decode sequence padded to the
     longest decode context -> `[B, kv_heads, L, D]`, mask by length, one SDPA call in which the
     query heads of a KV group ride as the "query length" axis (GQA without repeating K/V);
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
    slots: torch.Tensor | None  # [context_len] int64 KV slots, None when the step holds the whole context
    mask: torch.Tensor | None  # [query_len, context_len] bool causal mask (None: plain causal)


@dataclass
class AttentionPlan:
    """Per-step gather indices and masks, built once and shared by all layers."""

    all_decode: bool
    decode_rows: torch.Tensor | None  # [B] int64 rows of decode tokens (None: all rows, in order)
    decode_slots: torch.Tensor | None  # [B, L] int64 KV slots of each decode sequence, padded
    decode_mask: torch.Tensor | None  # [B, 1, 1, L] bool, True where the key is in the context
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
    decode_rows = decode_slots = decode_mask = None
    if dec:
        lens = [ctx.context_lens[i] for i in dec]
        max_len = max(lens)
        nblocks = -(-max_len // bs)
        seq_idx = None if all_decode else torch.tensor(dec, device=device)
        tables = ctx.block_tables[:, :nblocks] if seq_idx is None else ctx.block_tables[seq_idx, :nblocks]
        offsets = torch.arange(bs, device=device)
        # [B, nblocks, bs] -> [B, nblocks*bs] -> [B, L]
        decode_slots = (tables.long()[:, :, None] * bs + offsets).reshape(len(dec), -1)[:, :max_len]
        lens_t = ctx.context_lens_t if seq_idx is None else ctx.context_lens_t[seq_idx]
        decode_mask = (torch.arange(max_len, device=device)[None, :] < lens_t[:, None])[:, None, None, :]
        if not all_decode:
            decode_rows = torch.tensor([starts[i] for i in dec], device=device)
    prefills = []
    for i, (q, c) in enumerate(zip(ctx.query_lens, ctx.context_lens, strict=True)):
        if q == 1:
            continue
        slots = mask = None
        if c != q:  # chunked prefill: earlier tokens are already in the cache
            nblocks = -(-c // bs)
            table = ctx.block_tables[i, :nblocks].long()
            slots = (table[:, None] * bs + torch.arange(bs, device=device)).reshape(-1)[:c]
            q_pos = torch.arange(c - q, c, device=device)
            mask = torch.arange(c, device=device)[None, :] <= q_pos[:, None]
        prefills.append(PrefillSeq(starts[i], q, c, slots, mask))
    return AttentionPlan(all_decode, decode_rows, decode_slots, decode_mask, prefills)


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

    if plan.decode_slots is not None:
        qd = q if plan.decode_rows is None else q.index_select(0, plan.decode_rows)
        B = qd.shape[0]
        # [B, L, KV, D] -> [B, KV, L, D]
        kd = flat[0][plan.decode_slots].transpose(1, 2)
        vd = flat[1][plan.decode_slots].transpose(1, 2)
        # [B, H, D] -> [B, KV, G, D]: the G query heads of a group act as G "query positions".
        qd = qd.view(B, KV, G, D)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=plan.decode_mask, scale=scale)
        od = od.reshape(B, H, D)
        if plan.all_decode:
            return od
        out.index_copy_(0, plan.decode_rows, od)

    for p in plan.prefills:
        qs = q[p.start : p.start + p.query_len].transpose(0, 1)  # [H, q, D]
        if p.slots is None:
            ks, vs = k[p.start : p.start + p.query_len], v[p.start : p.start + p.query_len]
        else:
            ks, vs = flat[0][p.slots], flat[1][p.slots]  # [c, KV, D]
        # [c, KV, D] -> [KV, c, D] -> [H, c, D] (repeat each KV head for its G query heads)
        ks = ks.transpose(0, 1).repeat_interleave(G, dim=0)
        vs = vs.transpose(0, 1).repeat_interleave(G, dim=0)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=p.mask, is_causal=p.mask is None,
                                           scale=scale)
        out[p.start : p.start + p.query_len] = o.transpose(0, 1)
    return out
