"""Triton SGMV shrink and expand: one launch per op for a whole mixed batch and all fused slices.

One segmented kernel pair serves both prefill and decode: a program owns BLOCK_M rows of one
segment (rows sharing a slot), so it reads that slot's weights once for all of them; decode rows
are segments of length 1 (BGMV is the special case), and a segment shared by many decode rows
(identical adapters) reads its weights once per BLOCK_M rows instead of once per row.

Grids: (segments, row-blocks of the longest segment, slices x splits). Never sized by the number
of slots. Empty segments, -1 segments and the tail of short segments exit early; ragged loads and
stores are masked. Accumulation is fp32; v is fp32 [n, T, r].

Slices of a fused projection (q|k|v, gate|up) are a grid dimension. Their (possibly different)
buffers, strides and output columns come from a small int64 table on the device
(see `slice_table`), built once when a LoRA layer binds its buffers, so a call does no host->device copy.

The @triton.jit decoration is done lazily (`_kernels()`), so whether the interpreter is used
(TRITON_INTERPRET=1) is read when the kernels are first needed, not when this module is imported.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from kernels.batch import LoRABatch

# Columns of the per-slice table: element offset of the slice's weight tensor from slice 0's, its
# three strides (slot, dim 1, dim 2), then the slice's output columns in y (expand only).
# (tl.constexpr: jitted code may only read constexpr globals.)
W_OFF, W_S0, W_S1, W_S2, Y_OFF, Y_SIZE = (tl.constexpr(i) for i in range(6))
TABLE_COLS = tl.constexpr(6)


def _shrink_kernel(
    x_ptr, a_ptr, v_ptr, table_ptr, seg_indptr_ptr, seg_slots_ptr,
    stride_xt, stride_xk,  # x [T, in]
    stride_vi, stride_vt,  # v [n, T, r] fp32, r contiguous
    in_features, rank,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, K_STEPS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """v[i, rows of segment] (+)= x[rows] @ A_i[slot].T over one K split; SPLIT_K > 1 adds atomically."""
    seg, mblk, pid2 = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    sl, ks = pid2 // SPLIT_K, pid2 % SPLIT_K
    slot = tl.load(seg_slots_ptr + seg)
    start = tl.load(seg_indptr_ptr + seg) + mblk * BLOCK_M
    end = tl.load(seg_indptr_ptr + seg + 1)
    if slot < 0 or start >= end:  # base-model segment, or past this segment's rows
        return
    tbl = table_ptr + sl * TABLE_COLS  # A_i [S, r, in]
    a_base = a_ptr + tl.load(tbl + W_OFF) + slot.to(tl.int64) * tl.load(tbl + W_S0)
    sa_r, sa_k = tl.load(tbl + W_S1), tl.load(tbl + W_S2)
    row = start + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    acc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)  # tl.full, not tl.zeros: see _jitted()
    # Split ks owns K_STEPS * BLOCK_K columns (the last one masked at in_features). The trip count is
    # a constexpr, not range(k_lo, k_lo + k_per_split, BLOCK_K): triton 3.6's interpreter turns a
    # runtime bound into an int with int(<1-element array>), which numpy 2.4 rejects ("only
    # 0-dimensional arrays can be converted to Python scalars"); 3.9's interpreter squeezes first.
    # Compiled triton (3.6 included) accepts runtime bounds: the old form compiles to the same scf.for.
    # SPLIT_K is already a constexpr, so K_STEPS only adds one variant per distinct in_features.
    k_lo = ks * (K_STEPS * BLOCK_K)
    for step in range(K_STEPS):
        kk = k_lo + step * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = kk < in_features
        xt = tl.load(x_ptr + row[:, None] * stride_xt + kk[None, :] * stride_xk,
                     mask=(row[:, None] < end) & kmask[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        at = tl.load(a_base + rr[None, :] * sa_r + kk[:, None] * sa_k,
                     mask=(rr[None, :] < rank) & kmask[:, None], other=0.0)  # [BLOCK_K, BLOCK_R] = A.T
        if UPCAST:  # interpreter only: its bf16 tl.dot is wrong (triton 3.9), fp32 is exact
            acc += tl.dot(xt.to(tl.float32), at.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(xt, at.to(xt.dtype), input_precision=PRECISION)
    v_ptrs = v_ptr + sl * stride_vi + row[:, None] * stride_vt + rr[None, :]
    vmask = (row[:, None] < end) & (rr[None, :] < rank)
    if SPLIT_K == 1:
        tl.store(v_ptrs, acc, mask=vmask)
    else:
        tl.atomic_add(v_ptrs, acc, mask=vmask)


def _expand_kernel(
    v_ptr, b_ptr, y_ptr, scale_ptr, table_ptr, seg_indptr_ptr, seg_slots_ptr,
    stride_vi, stride_vt,  # v [n, T, r] fp32
    stride_yt, stride_yn,  # y [T, out_total]
    stride_si,  # scaling [n, S] float32, slot stride 1
    rank, n_blocks,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    """y[rows, cols of slice i] += scale[i, slot] * v[i, rows] @ B_i[slot].T for one column block."""
    seg, mblk, pid2 = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    sl, nb = pid2 // n_blocks, pid2 % n_blocks
    slot = tl.load(seg_slots_ptr + seg)
    start = tl.load(seg_indptr_ptr + seg) + mblk * BLOCK_M
    end = tl.load(seg_indptr_ptr + seg + 1)
    tbl = table_ptr + sl * TABLE_COLS  # B_i [S, out_i, r]
    size = tl.load(tbl + Y_SIZE)
    if slot < 0 or start >= end or nb * BLOCK_N >= size:  # nothing to add here
        return
    b_base = b_ptr + tl.load(tbl + W_OFF) + slot.to(tl.int64) * tl.load(tbl + W_S0)
    sb_n, sb_r = tl.load(tbl + W_S1), tl.load(tbl + W_S2)
    row = start + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    nn = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask, nmask = row < end, nn < size
    vt = tl.load(v_ptr + sl * stride_vi + row[:, None] * stride_vt + rr[None, :],
                 mask=rmask[:, None] & (rr[None, :] < rank), other=0.0)  # [BLOCK_M, BLOCK_R] fp32
    bt = tl.load(b_base + rr[:, None] * sb_r + nn[None, :] * sb_n,
                 mask=(rr[:, None] < rank) & nmask[None, :], other=0.0)  # [BLOCK_R, BLOCK_N] = B.T
    delta = tl.dot(vt, bt.to(tl.float32), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
    delta = delta * tl.load(scale_ptr + sl * stride_si + slot)
    y_ptrs = y_ptr + row[:, None] * stride_yt + (tl.load(tbl + Y_OFF) + nn)[None, :] * stride_yn
    ymask = rmask[:, None] & nmask[None, :]
    y_old = tl.load(y_ptrs, mask=ymask, other=0.0)
    tl.store(y_ptrs, (y_old.to(tl.float32) + delta).to(y_old.dtype), mask=ymask)


@functools.cache
def _jitted(interpret: bool):
    # `interpret` is only the cache key: triton.jit reads TRITON_INTERPRET itself at decoration.
    # The kernels use builtins only (no tl.zeros/tl.sum, which are jitted once at triton import),
    # so they run under the interpreter even when TRITON_INTERPRET was set after that import.
    return triton.jit(_shrink_kernel), triton.jit(_expand_kernel)


def _kernels():
    return _jitted(os.environ.get("TRITON_INTERPRET", "0") == "1")


def slice_table(weights: Sequence[torch.Tensor], out_slices: Sequence[tuple[int, int]]) -> torch.Tensor:
    """int64 [n, TABLE_COLS] on the device (see W_OFF...). A LoRA layer builds it once when it binds its
    slot buffers (kernels/backend.py) and passes it to every call, so no step copies it to the device."""
    rows = []
    for w, (off, size) in zip(weights, out_slices, strict=True):
        # Offsets between separate allocations are plain address arithmetic on the device.
        delta = w.data_ptr() - weights[0].data_ptr()
        assert delta % w.element_size() == 0
        rows.append([delta // w.element_size(), *w.stride(), off, size])
    return torch.tensor(rows, dtype=torch.int64).view(-1, int(TABLE_COLS.value)).to(weights[0].device)


def _block_m(batch: LoRABatch) -> int:
    # tl.dot needs >= 16 rows; longer blocks reuse weights across more rows of long segments.
    return 16 if batch.max_seg_len <= 16 else (32 if batch.max_seg_len <= 32 else 64)


def _precision(dtype: torch.dtype) -> str:
    # fp32 models get exact fp32 products (matches the reference); the fp32 v x B product of
    # bf16/fp16 models may use tf32, still finer than the output's own rounding.
    return "ieee" if dtype == torch.float32 else "tf32"


def shrink(x: torch.Tensor, lora_a: Sequence[torch.Tensor], batch: LoRABatch, zero: bool,
           table: torch.Tensor | None = None) -> torch.Tensor:
    """v [n, T, r] float32. zero=False leaves -1 rows undefined (the expand skips them anyway).
    `table`: `slice_table(lora_a, [(0, 0)] * n)`, made once by the caller (built here when None)."""
    shrink_k, _ = _kernels()
    n, (_, r, k) = len(lora_a), lora_a[0].shape
    t, num_segs = x.shape[0], batch.seg_slots.shape[0]
    block_m, block_k = _block_m(batch), 64 if k >= 64 else 16
    m_blocks = triton.cdiv(batch.max_seg_len, block_m)
    # Split K until the grid has ~2 waves of a large GPU, each split keeping >= 2 BLOCK_K steps.
    progs = max(1, num_segs * m_blocks * n)
    split = 1 if x.device.type != "cuda" else max(1, min(triton.cdiv(264, progs), k // (2 * block_k)))
    per_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    split = triton.cdiv(k, per_split)
    alloc = torch.zeros if (zero or split > 1) else torch.empty
    v = alloc(n, t, r, dtype=torch.float32, device=x.device)
    if num_segs == 0 or t == 0 or not batch.has_lora:
        return v
    shrink_k[(num_segs, m_blocks, n * split)](
        x, lora_a[0], v, slice_table(lora_a, [(0, 0)] * n) if table is None else table, batch.seg_indptr, batch.seg_slots,
        x.stride(0), x.stride(1), v.stride(0), v.stride(1), k, r,
        BLOCK_M=block_m, BLOCK_R=max(16, triton.next_power_of_2(r)), BLOCK_K=block_k,
        SPLIT_K=split, K_STEPS=per_split // block_k, PRECISION=_precision(x.dtype),
        UPCAST=x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1",
    )
    return v


def expand(y, v, lora_b, scaling, batch: LoRABatch, out_slices, table: torch.Tensor | None = None) -> None:
    """y += scaling * v @ B.T per slice, one launch. `table`: `slice_table(lora_b, out_slices)`."""
    _, expand_k = _kernels()
    n, r = len(lora_b), lora_b[0].shape[2]
    num_segs = batch.seg_slots.shape[0]
    if num_segs == 0 or y.shape[0] == 0 or not batch.has_lora:
        return
    block_m = _block_m(batch)
    block_n = 64 if max(s for _, s in out_slices) >= 64 else 16
    n_blocks = triton.cdiv(max(s for _, s in out_slices), block_n)
    scaling = scaling.contiguous()
    expand_k[(num_segs, triton.cdiv(batch.max_seg_len, block_m), n * n_blocks)](
        v, lora_b[0], y, scaling, slice_table(lora_b, out_slices) if table is None else table, batch.seg_indptr, batch.seg_slots,
        v.stride(0), v.stride(1), y.stride(0), y.stride(1), scaling.stride(0), r, n_blocks,
        BLOCK_M=block_m, BLOCK_R=max(16, triton.next_power_of_2(r)), BLOCK_N=block_n,
        PRECISION=_precision(y.dtype),
    )
