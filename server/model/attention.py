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

`PagedAttention` (rotary + the steps above) is the module each `LlamaAttention` calls; faster
implementations replace it at build time (server/model/cpu_ops.py: steps 1 and 2 as one C++ call
each, reading the blocks in place, same numerics; a chunk after cached tokens reads its context in
place too) and reuse `prefill_one` for the other prefills.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from server.model.config import ModelConfig
from server.model.context import ForwardContext
from server.model.rope import apply_rotary


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
    table: torch.Tensor | None = None  # [nblocks] int32 block table (with block_rows: for kernels reading in place)


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
    # Per-step values an attention substitution derives once and shares across layers (by its own key)
    extras: dict = field(default_factory=dict)


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
        rows = mask = table = None
        if c != q:  # chunked prefill: earlier tokens are already in the cache
            table = ctx.block_tables[i, : -(-c // bs)]
            rows = _head_rows(table, num_blocks, heads2)
            q_pos = torch.arange(c - q, c, device=device)
            mask = torch.arange(c, device=device)[None, :] <= q_pos[:, None]
        prefills.append(PrefillSeq(starts[i], q, c, rows, mask, table))
    plan = AttentionPlan(all_decode, write_rows, decode_rows, decode_block_rows, decode_mask, prefills)
    if dec:
        plan.decode_q_rows, plan.decode_tables, plan.decode_lens = q_rows, tables.int(), lens_t.long()
    return plan


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, plan: AttentionPlan) -> None:
    """Scatter the step's k/v [T, KV, D] into their slots (one `index_copy_` for K and V of all heads)."""
    D = k.shape[-1]
    # K|V of the step, [2, T, KV, D] -> [2, KV, T, D] -> rows (K|V, head, token) of the flat view
    new = torch.stack((k, v)).transpose(1, 2).reshape(-1, D)
    kv_cache.view(-1, D).index_copy_(0, plan.write_rows, new)


def decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, plan: AttentionPlan, scale: float) -> torch.Tensor:
    """The decode rows of q [T, H, D] (all rows when the step is all-decode) -> [B, H, D]: gather
    every decode sequence's blocks with one `index_select`, padded to the longest context."""
    T, H, D = q.shape
    KV = kv_cache.shape[1]
    G = H // KV
    bs = kv_cache.shape[3]
    qd = q if plan.decode_rows is None else q.index_select(0, plan.decode_rows)
    B = qd.shape[0]
    # [2*KV*B*nblocks, bs*D] -> [2, KV, B, L_pad, D]: contiguous, each (head, seq) one matrix
    kv = kv_cache.view(-1, bs * D).index_select(0, plan.decode_block_rows).view(2, KV, B, -1, D)
    # [B, H, D] -> [KV, B, G, D]: the G query heads of a group are the rows of one matmul.
    qd = qd.view(B, KV, G, D).transpose(0, 1)
    scores = torch.matmul(qd, kv[0].transpose(2, 3)).float() * scale  # [KV, B, G, L_pad]
    probs = scores.masked_fill_(~plan.decode_mask, float("-inf")).softmax(-1).to(q.dtype)
    return torch.matmul(probs, kv[1]).transpose(0, 1).reshape(B, H, D)  # [KV, B, G, D] -> [B, H, D]


def prefill_attention(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      kv_cache: torch.Tensor, plan: AttentionPlan, scale: float) -> None:
    """Each prefill sequence (full or chunked) in turn, written into its rows of out [T, H, D]."""
    for p in plan.prefills:
        prefill_one(out, q, k, v, kv_cache, p, scale)


def prefill_one(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, p: PrefillSeq, scale: float) -> None:
    """One prefill sequence's attention (SDPA), written into its rows of out [T, H, D]."""
    H, D = q.shape[1], q.shape[2]
    KV = k.shape[1]
    G = H // KV
    qs = q[p.start : p.start + p.query_len].transpose(0, 1)  # [H, q, D]
    if p.block_rows is None:
        ks = k[p.start : p.start + p.query_len].transpose(0, 1)  # [KV, q, D]
        vs = v[p.start : p.start + p.query_len].transpose(0, 1)
    else:
        # rows (K|V, head, block) -> [2, KV, nblocks*bs, D] -> first c tokens
        blocks_view = kv_cache.view(-1, kv_cache.shape[3] * D)
        kv = blocks_view.index_select(0, p.block_rows).view(2, KV, -1, D)[:, :, : p.context_len]
        ks, vs = kv[0], kv[1]  # [KV, c, D]
    # GQA inside SDPA (each KV head serves its G query heads): repeating K/V to H heads first
    # copied 2 x G x the context every layer, which dominated a small chunk deep into a long
    # prompt (8k context, 8 tokens: 15 -> 8 ms per layer on the 2-core CPU).
    # A leading batch dim: with 3-D inputs torch's CPU SDPA takes its "math" path, which builds the
    # whole [H, q, c] score matrix (measured 7.2 s vs 0.53 s for one 8k-token layer, 4 heads).
    o = F.scaled_dot_product_attention(qs[None], ks[None], vs[None], attn_mask=p.mask,
                                       is_causal=p.mask is None, scale=scale, enable_gqa=G > 1)[0]
    out[p.start : p.start + p.query_len] = o.transpose(0, 1)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    ctx: ForwardContext, plan: AttentionPlan, scale: float) -> torch.Tensor:
    """q [T, H, D], k/v [T, KV, D] (rotated) -> out [T, H, D]; writes k/v into `kv_cache`."""
    write_kv(k, v, kv_cache, plan)
    if plan.decode_block_rows is not None:
        od = decode_attention(q, kv_cache, plan, scale)
        if plan.all_decode:
            return od
        out = q.new_empty(q.shape)
        out.index_copy_(0, plan.decode_rows, od)
    else:
        out = q.new_empty(q.shape)
    prefill_attention(out, q, k, v, kv_cache, plan, scale)
    return out


class PagedAttention(nn.Module):
    """Rotary on q|k, then paged attention of the step: qkv [T, q|k|v] -> o [T, H, D].

    A module (no parameters) so that the attention implementation is a substitution chosen when the
    engine is built: the fused CPU ops (server/model/cpu_ops.py) subclass it."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim

    def forward(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                ctx: ForwardContext, plan: AttentionPlan) -> torch.Tensor:
        T = qkv.shape[0]
        H, KV, D = self.num_heads, self.num_kv_heads, self.head_dim
        # q|k rotated in one go: [T, (H + KV) * D] -> [T, H + KV, D] (half the elementwise ops)
        qk = apply_rotary(qkv[:, : self.q_size + self.kv_size].view(T, H + KV, D), cos, sin)
        q, k = qk[:, :H], qk[:, H:]  # views [T, H, D], [T, KV, D]
        v = qkv[:, self.q_size + self.kv_size :].view(T, KV, D)
        return paged_attention(q, k, v, kv_cache, ctx, plan, self.scale)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}"
