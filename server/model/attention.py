"""Paged attention in plain torch, over a block-structured KV cache.

KV cache, one tensor per layer: `[2, num_kv_heads, num_blocks, block_size, head_dim]` (0 = K, 1 = V).
A token's flat slot is `block * block_size + offset`; a sequence's tokens live in the blocks of its
row of `ctx.block_tables`. Heads lead, so gathered blocks are already `[kv_heads, tokens, D]` and the
batched matmuls read them in place (a blocks-first layout needs a transposing copy per layer). All
gathers and scatters are along dim 0 of a 2-D view, rows = (K|V, head, block[, offset]), with row
indices built once per step: the fastest `index_select` / `index_copy_` path on CPU.

Per step the model builds one `AttentionPlan` from the `ForwardContext` (host lists only, one small
host->device copy), shared by all layers. Each layer then:
  1. writes the step's K/V at `ctx.slot_mapping` (one `index_copy_` for K and V of all heads);
  2. decode rows (query_len 1), all at once: gather the KV blocks of every decode sequence with one
     `index_select` (whole blocks), padded to the longest decode context -> `[2, kv_heads, B, L, D]`,
     then batched matmul -> fp32 masked softmax -> matmul, with the G query heads of a KV group as
     the rows of one matmul (GQA without repeating K/V);
  3. prefill sequences (full or chunked), one at a time: query j of a sequence sits at position
     `context_len - query_len + j` and sees keys `<=` it; a fresh prefill uses the step's own K/V.
No host syncs (`.item()`, `.tolist()`) happen in the layer loop.

With `ops` (the fused CPU ops, inference only) steps 1 and 2 are one C++ call each: `kv_write`
copies the K/V rows into their slots, and `decode_attention` reads each decode sequence's blocks
in place (no gather copy, no padding), one task per (sequence, KV head), with the same numerics
(scores rounded to the dtype as a bmm output is, fp32 softmax, probabilities in the dtype, fp32
accumulation). Prefills keep the torch path below.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from server.model.config import ModelConfig
from server.model.context import ForwardContext


def allocate_kv_cache(cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: torch.device | str) -> list[torch.Tensor]:
    """One zeroed `[2, kv_heads, num_blocks, block_size, head_dim]` tensor per layer."""
    if num_blocks <= 0 or block_size <= 0:
        raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
    shape = (2, cfg.num_key_value_heads, num_blocks, block_size, cfg.head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]


@dataclass
class PrefillSeq:
    start: int  # first row of the sequence in the flattened batch
    query_len: int
    context_len: int
    block_rows: torch.Tensor | None  # [2*KV*nblocks] rows of its blocks (None: the step holds the whole context)
    mask: torch.Tensor | None  # [query_len, context_len] bool causal mask (None: plain causal)


@dataclass
class AttentionPlan:
    """Per-step gather/scatter row indices and masks, built once and shared by all layers."""

    all_decode: bool
    write_rows: torch.Tensor  # [2*KV*T] rows of the [2*KV*blocks*bs, D] view that get the step's K|V
    decode_rows: torch.Tensor | None  # [B] int64 rows of decode tokens (None: all rows, in order)
    decode_block_rows: torch.Tensor | None  # [2*KV*B*nblocks] rows of the [2*KV*blocks, bs*D] view
    decode_mask: torch.Tensor | None  # [B, 1, nblocks * bs] bool, True where the key is in the context
    prefills: list[PrefillSeq]
    # For the fused decode kernel: query row, block table and context length of each decode sequence
    decode_q_rows: torch.Tensor | None = None  # [B] int64
    decode_tables: torch.Tensor | None = None  # [B, nblocks] int32
    decode_lens: torch.Tensor | None = None  # [B] int64


def _head_rows(index: torch.Tensor, per_head: int, heads2: int) -> torch.Tensor:
    """[N] indices within one (K|V, head) plane -> [heads2 * N] rows of the flattened cache."""
    base = torch.arange(heads2, device=index.device, dtype=torch.long)[:, None] * per_head
    return (base + index.long()[None, :]).reshape(-1)


def build_attention_plan(ctx: ForwardContext, kv_cache: torch.Tensor) -> AttentionPlan:
    """Turn the step's host-side lists into gather indices (one device copy per tensor);
    `kv_cache` is any layer's cache (they share one geometry)."""
    device, bs = ctx.slot_mapping.device, ctx.block_size
    _, kv_heads, num_blocks, _, _ = kv_cache.shape
    heads2 = 2 * kv_heads
    starts, pos = [], 0
    for q in ctx.query_lens:
        starts.append(pos)
        pos += q
    dec = [i for i, q in enumerate(ctx.query_lens) if q == 1]
    all_decode = len(dec) == ctx.num_seqs
    write_rows = _head_rows(ctx.slot_mapping, num_blocks * bs, heads2)
    decode_rows = decode_block_rows = decode_mask = q_rows = None
    if dec:
        lens = [ctx.context_lens[i] for i in dec]
        max_len = max(lens)
        nblocks = -(-max_len // bs)
        seq_idx = None if all_decode else torch.tensor(dec, device=device)
        tables = ctx.block_tables[:, :nblocks] if seq_idx is None else ctx.block_tables[seq_idx, :nblocks]
        decode_block_rows = _head_rows(tables.reshape(-1), num_blocks, heads2)  # [B, nblocks] -> rows
        lens_t = ctx.context_lens_t if seq_idx is None else ctx.context_lens_t[seq_idx]
        decode_mask = (torch.arange(nblocks * bs, device=device)[None, :] < lens_t[:, None])[:, None, :]
        if not all_decode:
            decode_rows = torch.tensor([starts[i] for i in dec], device=device)
        q_rows = decode_rows if decode_rows is not None else torch.arange(len(dec), device=device)
    prefills = []
    for i, (q, c) in enumerate(zip(ctx.query_lens, ctx.context_lens, strict=True)):
        if q == 1:
            continue
        rows = mask = None
        if c != q:  # chunked prefill: earlier tokens are already in the cache
            rows = _head_rows(ctx.block_tables[i, : -(-c // bs)], num_blocks, heads2)
            q_pos = torch.arange(c - q, c, device=device)
            mask = torch.arange(c, device=device)[None, :] <= q_pos[:, None]
        prefills.append(PrefillSeq(starts[i], q, c, rows, mask))
    plan = AttentionPlan(all_decode, write_rows, decode_rows, decode_block_rows, decode_mask, prefills)
    if dec:
        plan.decode_q_rows, plan.decode_tables, plan.decode_lens = q_rows, tables.int(), lens_t.long()
    return plan


def paged_attention_fused(qkv: torch.Tensor, q_size: int, kv_size: int, kv_cache: torch.Tensor,
                          ctx: ForwardContext, plan: AttentionPlan, scale: float, ops, heads: int) -> torch.Tensor:
    """The fused-ops path: qkv [T, q|k|v] (rotated) -> out [T, H, D]. K/V are written with one
    `kv_write`, decode rows use the `decode_attention` kernel, prefills the torch path below."""
    T = qkv.shape[0]
    ops.kv_write(kv_cache, qkv[:, q_size : q_size + kv_size], qkv[:, q_size + kv_size :], ctx.slot_mapping)
    if plan.all_decode and plan.decode_q_rows is not None:
        out = qkv.new_empty(T, heads, kv_cache.shape[-1])
        ops.decode_attention(out, qkv[:, :q_size], plan.decode_q_rows, kv_cache, plan.decode_tables,
                             plan.decode_lens, heads, scale)
        return out
    D = kv_cache.shape[-1]
    q = qkv[:, :q_size].view(T, heads, D)
    k = qkv[:, q_size : q_size + kv_size].view(T, -1, D)
    v = qkv[:, q_size + kv_size :].view(T, -1, D)
    return paged_attention(q, k, v, kv_cache, ctx, plan, scale, ops, written=True)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    ctx: ForwardContext, plan: AttentionPlan, scale: float, ops=None,
                    written: bool = False) -> torch.Tensor:
    """q [T, H, D], k/v [T, KV, D] (rotated) -> out [T, H, D]; writes k/v into `kv_cache` (unless
    `written`: the caller already did)."""
    T, H, D = q.shape
    KV = k.shape[1]
    G = H // KV
    _, _, num_blocks, bs, _ = kv_cache.shape
    if written:
        pass
    elif ops is not None:
        ops.kv_write(kv_cache, k.view(T, KV * D), v.view(T, KV * D), ctx.slot_mapping)
    else:
        # K|V of the step, [2, T, KV, D] -> [2, KV, T, D] -> rows (K|V, head, token) of the flat view
        new = torch.stack((k, v)).transpose(1, 2).reshape(-1, D)
        kv_cache.view(-1, D).index_copy_(0, plan.write_rows, new)
    blocks_view = kv_cache.view(-1, bs * D)  # rows (K|V, head, block)
    out = q.new_empty(T, H, D) if not plan.all_decode else None

    if ops is not None and plan.decode_q_rows is not None:
        od = q.new_empty(plan.decode_q_rows.shape[0], H, D)
        ops.decode_attention(od, q.view(T, H * D), plan.decode_q_rows, kv_cache, plan.decode_tables,
                             plan.decode_lens, H, scale)
        if plan.all_decode:
            return od
        out.index_copy_(0, plan.decode_rows, od)
    elif plan.decode_block_rows is not None:
        qd = q if plan.decode_rows is None else q.index_select(0, plan.decode_rows)
        B = qd.shape[0]
        # [2*KV*B*nblocks, bs*D] -> [2, KV, B, L_pad, D]: contiguous, each (head, seq) one matrix
        kv = blocks_view.index_select(0, plan.decode_block_rows).view(2, KV, B, -1, D)
        # [B, H, D] -> [KV, B, G, D]: the G query heads of a group are the rows of one matmul.
        qd = qd.view(B, KV, G, D).transpose(0, 1)
        scores = torch.matmul(qd, kv[0].transpose(2, 3)).float() * scale  # [KV, B, G, L_pad]
        probs = scores.masked_fill_(~plan.decode_mask, float("-inf")).softmax(-1).to(q.dtype)
        od = torch.matmul(probs, kv[1]).transpose(0, 1).reshape(B, H, D)  # [KV, B, G, D] -> [B, H, D]
        if plan.all_decode:
            return od
        out.index_copy_(0, plan.decode_rows, od)

    for p in plan.prefills:
        qs = q[p.start : p.start + p.query_len].transpose(0, 1)  # [H, q, D]
        if p.block_rows is None:
            ks = k[p.start : p.start + p.query_len].transpose(0, 1)  # [KV, q, D]
            vs = v[p.start : p.start + p.query_len].transpose(0, 1)
        else:
            # rows -> [2, KV, nblocks*bs, D] -> first c tokens
            kv = blocks_view.index_select(0, p.block_rows).view(2, KV, -1, D)[:, :, : p.context_len]
            ks, vs = kv[0], kv[1]  # [KV, c, D]
        # [KV, c, D] -> [H, c, D] (repeat each KV head for its G query heads)
        ks = ks.repeat_interleave(G, dim=0)
        vs = vs.repeat_interleave(G, dim=0)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=p.mask, is_causal=p.mask is None,
                                           scale=scale)
        out[p.start : p.start + p.query_len] = o.transpose(0, 1)
    return out
