"""The LoRA spec in plain torch: shrink, expand and add_lora, per row (BGMV) and per segment (SGMV).

Every other implementation (the CPU path in `kernels/cpu.py`, the Triton kernels in
`kernels/triton_sgmv.py`) is tested against these functions. They favour clarity over speed and
accumulate in fp32 on any device.

Shapes (T rows, n slices of one fused projection, S slots, r = r_max):
    x        [T, in]                 activations, rows = flattened tokens
    lora_a   n tensors [S, r, in]    stacked slot buffers, zero-padded beyond each adapter's rank
    lora_b   n tensors [S, out_i, r]
    scaling  [n, S] float32          0 for a slot/slice the adapter does not target
    v        [n, T, r] float32       shrink output: v[i, t] = x[t] @ lora_a[i][slot_t].T, 0 on -1 rows
    y        [T, out_total]          expand: y[t, off_i:off_i+n_i] += scaling[i, slot_t] * v[i, t] @ lora_b[i][slot_t].T
Rows whose slot is -1 are left untouched (bit for bit).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels.batch import LoRABatch


def shrink_rows(x: torch.Tensor, lora_a: Sequence[torch.Tensor], token_slots: torch.Tensor) -> torch.Tensor:
    """BGMV shrink: one slot per row. Returns v [n, T, r] float32 (zeros on -1 rows)."""
    slots = token_slots.long()
    active = slots >= 0
    safe = slots.clamp(min=0)
    out = []
    for a in lora_a:
        a_rows = a.float()[safe]  # [T, r, in]: each row's own A
        v = torch.einsum("tri,ti->tr", a_rows, x.float())
        out.append(v * active[:, None])
    return torch.stack(out) if out else x.new_zeros(0, x.shape[0], 0, dtype=torch.float32)


def expand_rows(
    y: torch.Tensor,
    v: torch.Tensor,
    lora_b: Sequence[torch.Tensor],
    scaling: torch.Tensor,
    token_slots: torch.Tensor,
    out_slices: Sequence[tuple[int, int]],
) -> None:
    """BGMV expand, in place on y; rows with slot -1 are not written."""
    slots = token_slots.long()
    rows = (slots >= 0).nonzero().flatten()
    if rows.numel() == 0:
        return
    row_slots = slots[rows]
    for i, (b, (off, size)) in enumerate(zip(lora_b, out_slices, strict=True)):
        b_rows = b.float()[row_slots]  # [Ta, out_i, r]
        delta = torch.einsum("tor,tr->to", b_rows, v[i].float()[rows])
        delta = delta * scaling[i].float()[row_slots][:, None]
        cols = slice(off, off + size)
        y[rows, cols] = (y[rows, cols].float() + delta).to(y.dtype)


def _segments(seg_indptr: torch.Tensor, seg_slots: torch.Tensor) -> list[tuple[int, int, int]]:
    """(slot, start, end) for every segment, read on the host (the reference may sync)."""
    ptr = seg_indptr.tolist()
    return [(int(s), ptr[k], ptr[k + 1]) for k, s in enumerate(seg_slots.tolist())]


def shrink_segments(
    x: torch.Tensor, lora_a: Sequence[torch.Tensor], seg_indptr: torch.Tensor, seg_slots: torch.Tensor
) -> torch.Tensor:
    """SGMV shrink: one matmul per segment of rows sharing a slot. Returns v [n, T, r] float32."""
    r = lora_a[0].shape[1] if lora_a else 0
    v = torch.zeros(len(lora_a), x.shape[0], r, dtype=torch.float32, device=x.device)
    for slot, start, end in _segments(seg_indptr, seg_slots):
        if slot < 0 or end <= start:
            continue
        for i, a in enumerate(lora_a):
            v[i, start:end] = x[start:end].float() @ a[slot].float().T
    return v


def expand_segments(
    y: torch.Tensor,
    v: torch.Tensor,
    lora_b: Sequence[torch.Tensor],
    scaling: torch.Tensor,
    seg_indptr: torch.Tensor,
    seg_slots: torch.Tensor,
    out_slices: Sequence[tuple[int, int]],
) -> None:
    """SGMV expand, in place on y; segments with slot -1 are not written."""
    for slot, start, end in _segments(seg_indptr, seg_slots):
        if slot < 0 or end <= start:
            continue
        for i, (b, (off, size)) in enumerate(zip(lora_b, out_slices, strict=True)):
            delta = (v[i, start:end].float() @ b[slot].float().T) * scaling[i, slot].float()
            cols = slice(off, off + size)
            y[start:end, cols] = (y[start:end, cols].float() + delta).to(y.dtype)


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    scaling: torch.Tensor,
    batch: LoRABatch,
    out_slices: Sequence[tuple[int, int]],
) -> None:
    """The whole LoRA add-on for a batch, segment form (rows of one segment share a slot)."""
    v = shrink_segments(x, lora_a, batch.seg_indptr, batch.seg_slots)
    expand_segments(y, v, lora_b, scaling, batch.seg_indptr, batch.seg_slots, out_slices)


def paged_attention_reference(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention of new query tokens over a paged KV cache, per sequence; the attention spec.

    q [T, H, D] (sequence i's q_i = query_start_loc[i+1] - query_start_loc[i] tokens, flattened);
    kv_cache [2, KVH, num_blocks, block_size, D] (0 = K, 1 = V) already holding the new tokens' K/V;
    block_tables [S, max_blocks] int32; context_lens [S]: sequence i's keys are its first
    context_lens[i] positions, its queries sit at positions context_lens[i] - q_i .. context_lens[i] - 1
    and see every key up to their own position. Query head h reads KV head h // (H // KVH).
    Decode is the case q_i = 1 (query_start_loc = arange(S + 1)). Softmax in fp32; out [T, H, D] in q's dtype.
    """
    t, h, d = q.shape
    kvh, bs = kv_cache.shape[1], kv_cache.shape[3]
    group = h // kvh
    out = torch.zeros_like(q)
    starts, ctxs = query_start_loc.tolist(), context_lens.tolist()
    for i, ctx in enumerate(ctxs):
        q0, q1 = starts[i], starts[i + 1]
        if q1 == q0:
            continue
        n_blocks = -(-ctx // bs)
        blocks = block_tables[i, :n_blocks].long()
        # [KVH, n_blocks, bs, D] -> [KVH, ctx, D] -> [H, ctx, D] (each KV head serves `group` query heads)
        k = kv_cache[0][:, blocks].reshape(kvh, n_blocks * bs, d)[:, :ctx].float().repeat_interleave(group, 0)
        v = kv_cache[1][:, blocks].reshape(kvh, n_blocks * bs, d)[:, :ctx].float().repeat_interleave(group, 0)
        qi = q[q0:q1].float().transpose(0, 1)  # [H, q_i, D]
        scores = (qi @ k.transpose(1, 2)) * scale  # [H, q_i, ctx]
        pos = torch.arange(ctx - (q1 - q0), ctx, device=q.device)  # absolute position of each query
        visible = torch.arange(ctx, device=q.device)[None, :] <= pos[:, None]  # [q_i, ctx]
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        out[q0:q1] = (probs @ v).transpose(0, 1).to(q.dtype)  # [q_i, H, D]
    return out
