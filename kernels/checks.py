"""Argument checks shared by every LoRA backend: user-input errors raise ValueError.

`check_buffers` runs once, when a LoRA layer binds its slot buffers (shapes, dtypes, slice table);
`check_call` runs on every call and only reads attributes (no device sync).

Shapes (the contract of kernels/reference.py): A_i [slots, r_max, in], B_i [slots, out_i, r_max],
scaling float32 [num_slices, slots], out_slices [(offset, size)] columns of y per slice.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_a(lora_a: Sequence[torch.Tensor]) -> None:
    if len(lora_a) == 0:
        raise ValueError("need at least one slice")
    s, r, k = lora_a[0].shape
    if any(a.shape != (s, r, k) or a.dtype != lora_a[0].dtype for a in lora_a):
        raise ValueError("every lora_a slice must be [num_slots, r_max, in] of one dtype")
    if lora_a[0].dtype not in DTYPES:
        raise ValueError(f"lora_a must be a float dtype, got {lora_a[0].dtype}")


def check_b(lora_b: Sequence[torch.Tensor], scaling: torch.Tensor, out_slices: Sequence[tuple[int, int]]) -> None:
    n = len(lora_b)
    if n == 0:
        raise ValueError("need at least one slice")
    if len(out_slices) != n:
        raise ValueError("lora_a, lora_b and out_slices need one entry per slice")
    s, _, r = lora_b[0].shape
    for b, (off, size) in zip(lora_b, out_slices, strict=True):
        if b.dim() != 3 or b.shape != (s, size, r) or b.dtype != lora_b[0].dtype:
            raise ValueError(f"lora_b slice {tuple(b.shape)} does not match [num_slots, {size}, {r}]")
        if off < 0:
            raise ValueError(f"out slice ({off}, {size}) has a negative offset")
    if tuple(scaling.shape) != (n, s) or scaling.dtype != torch.float32:
        raise ValueError(f"scaling must be float32 [{n}, {s}], got {scaling.dtype} {tuple(scaling.shape)}")


def check_buffers(lora_a, lora_b, scaling, out_slices) -> None:
    """A LoRA projection's buffers agree with each other (once, at bind time)."""
    check_a(lora_a)
    check_b(lora_b, scaling, out_slices)
    if len(lora_a) != len(lora_b):
        raise ValueError("lora_a, lora_b and out_slices need one entry per slice")
    if lora_a[0].shape[:2] != (lora_b[0].shape[0], lora_b[0].shape[2]) or lora_a[0].dtype != lora_b[0].dtype:
        raise ValueError("lora_a and lora_b must share num_slots, r_max and dtype")


def check_call(y: torch.Tensor, x: torch.Tensor, num_tokens: int, in_features: int, out_width: int,
               dtype: torch.dtype) -> None:
    """One call's activations against the bound buffers and the step's plan (cheap reads only)."""
    if x.dim() != 2 or x.shape[1] != in_features:
        raise ValueError(f"x must be [T, {in_features}], got {tuple(x.shape)}")
    if num_tokens != x.shape[0] or y.shape[0] != x.shape[0]:
        raise ValueError(f"batch ({num_tokens} rows), x ({x.shape[0]}) and y ({y.shape[0]}) must agree")
    if x.dtype != dtype:
        raise ValueError(f"x ({x.dtype}) and lora_a ({dtype}) must share a float dtype")
    if y.dim() != 2 or y.dtype != dtype:
        raise ValueError("y must be [T, out_total] with lora_b's dtype")
    if y.shape[1] < out_width:
        raise ValueError(f"out slices reach column {out_width}: outside y's {y.shape[1]} columns")
