"""Slot-buffer layouts: allocation helpers and the detection of the fast "row-table" layout.

The contract shapes are `A[S, r, in]` and `B[S, out, r]` per slice. Any strides work everywhere,
but one storage layout makes the CPU path much cheaper (see docs/kernels.md) and is as good for
the Triton kernels:

    A of all n slices of a projection: one storage [S, in, n*r]; slice i = storage[:, :, i*r:(i+1)*r]
        viewed as [S, r, in]. Row (slot, k) of the 2-D table [S*in, n*r] holds x-coefficient k of every
        rank of every slice, so a shrink is one `embedding_bag` (weights = x) with no weight copy.
    B of slice i: its own storage [S, r, out_i], viewed as [S, out_i, r]. Row (slot, j) of the table
        [S*r, out_i] is rank j's output vector, so an expand is one `embedding_bag` (weights = v).

`alloc_lora_a` / `alloc_lora_b` return buffers in that layout (zero-filled); `a_table` / `b_table`
return the 2-D table views, or None when a tensor is not laid out that way.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def alloc_lora_a(
    num_slots: int, r_max: int, in_features: int, num_slices: int = 1, *, dtype=torch.float32, device="cpu"
) -> list[torch.Tensor]:
    """num_slices views [num_slots, r_max, in_features] of one zeroed [num_slots, in, n*r] storage."""
    if min(num_slots, r_max, in_features, num_slices) <= 0:
        raise ValueError("alloc_lora_a: all sizes must be positive")
    store = torch.zeros(num_slots, in_features, num_slices * r_max, dtype=dtype, device=device)
    return [store[:, :, i * r_max : (i + 1) * r_max].transpose(1, 2) for i in range(num_slices)]


def alloc_lora_b(
    num_slots: int, out_sizes: Sequence[int], r_max: int, *, dtype=torch.float32, device="cpu"
) -> list[torch.Tensor]:
    """One zeroed [num_slots, r, out_i] storage per slice, each viewed as [num_slots, out_i, r]."""
    if min(num_slots, r_max, *out_sizes) <= 0:
        raise ValueError("alloc_lora_b: all sizes must be positive")
    return [
        torch.zeros(num_slots, r_max, out, dtype=dtype, device=device).transpose(1, 2) for out in out_sizes
    ]


def a_table(lora_a: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The [S*in, n*r] table behind all slices of A, or None if they are not one row-table storage."""
    a0 = lora_a[0]
    s, r, k = a0.shape
    n = len(lora_a)
    # storage [S, in, n*r] seen through slice 0: strides (in*n*r, 1, n*r)
    if a0.stride() != (k * n * r, 1, n * r):
        return None
    for i, a in enumerate(lora_a):
        same = a.untyped_storage().data_ptr() == a0.untyped_storage().data_ptr()
        if not same or a.stride() != a0.stride() or a.storage_offset() != a0.storage_offset() + i * r:
            return None
    return torch.as_strided(a0, (s * k, n * r), (n * r, 1), a0.storage_offset())


def b_table(b: torch.Tensor) -> torch.Tensor | None:
    """The [S*r, out] table behind one slice of B, or None if it is not a row-table storage."""
    s, out, r = b.shape
    if b.stride() != (r * out, 1, out):
        return None
    return torch.as_strided(b, (s * r, out), (out, 1), b.storage_offset())
