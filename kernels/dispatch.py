"""Public LoRA ops and the backend switch: checks the call, then routes it to one implementation.

    add_lora(y, x, lora_a, lora_b, scaling, batch, out_slices)   y += LoRA delta, in place
    lora_shrink(x, lora_a, batch) -> v [n, T, r] float32
    lora_expand(y, v, lora_b, scaling, batch, out_slices)

Backends: "triton" (kernels/triton_sgmv.py; CUDA, or CPU tensors under TRITON_INTERPRET=1),
"torch" (the CPU path, kernels/cpu.py), "reference" (kernels/reference.py), and "auto" (the
default): Triton for CUDA tensors, the CPU path otherwise. The default comes from the
LORAMUX_LORA_BACKEND environment variable; `set_backend` / `use_backend` change it.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import torch

from kernels import cpu, reference
from kernels.batch import LoRABatch

BACKENDS = ("auto", "triton", "torch", "reference")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _checked_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown LoRA backend {name!r} (expected one of {', '.join(BACKENDS)})")
    return name


_backend = [_checked_backend(os.environ.get("LORAMUX_LORA_BACKEND", "auto"))]


def set_backend(name: str) -> None:
    """Select "auto" | "triton" | "torch" | "reference" for every later call."""
    _backend[0] = _checked_backend(name)


def get_backend() -> str:
    return _backend[0]


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend inside a `with` block (tests use it to pin a path)."""
    old = _backend[0]
    set_backend(name)
    try:
        yield
    finally:
        _backend[0] = old


def _resolve(device: torch.device) -> str:
    name = _backend[0]
    if name == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return name


def _triton():
    from kernels import triton_sgmv  # imported on first use: keeps triton out of CPU-only runs

    return triton_sgmv


def _check(t: int, lora_a, lora_b, scaling, batch: LoRABatch, out_slices, y=None, x=None) -> None:
    """User-input checks (ValueError); cheap attribute reads only, no device sync."""
    n = len(lora_a) if lora_a is not None else len(lora_b)
    if n == 0:
        raise ValueError("need at least one slice")
    if batch.num_tokens != t:
        raise ValueError(f"batch has {batch.num_tokens} rows but the activations have {t}")
    if lora_a is not None:
        s, r, k = lora_a[0].shape
        if x is not None and (x.dim() != 2 or x.shape[1] != k):
            raise ValueError(f"x must be [T, {k}], got {tuple(x.shape)}")
        if any(a.shape != (s, r, k) or a.dtype != lora_a[0].dtype for a in lora_a):
            raise ValueError("every lora_a slice must be [num_slots, r_max, in] of one dtype")
        if x is not None and (x.dtype != lora_a[0].dtype or x.dtype not in _DTYPES):
            raise ValueError(f"x ({x.dtype}) and lora_a ({lora_a[0].dtype}) must share a float dtype")
    if lora_b is not None:
        if len(lora_b) != n or len(out_slices) != n:
            raise ValueError("lora_a, lora_b and out_slices need one entry per slice")
        s, _, r = lora_b[0].shape
        if y is None or y.dim() != 2 or y.dtype != lora_b[0].dtype:
            raise ValueError("y must be [T, out_total] with lora_b's dtype")
        for b, (off, size) in zip(lora_b, out_slices, strict=True):
            if b.dim() != 3 or b.shape != (s, size, r) or b.dtype != lora_b[0].dtype:
                raise ValueError(f"lora_b slice {tuple(b.shape)} does not match [num_slots, {size}, {r}]")
            if off < 0 or off + size > y.shape[1]:
                raise ValueError(f"out slice ({off}, {size}) outside y's {y.shape[1]} columns")
        if tuple(scaling.shape) != (n, s) or scaling.dtype != torch.float32:
            raise ValueError(f"scaling must be float32 [{n}, {s}], got {scaling.dtype} {tuple(scaling.shape)}")


_checked: dict[tuple, tuple] = {}  # validated (lora_a, lora_b, scaling, out_slices) combinations


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    scaling: torch.Tensor,
    batch: LoRABatch,
    out_slices: Sequence[tuple[int, int]],
) -> None:
    """In place: y[t, off_i:off_i+n_i] += scaling[i, s] * (x[t] @ lora_a[i][s].T) @ lora_b[i][s].T
    for every row t with slot s = batch.token_slots[t] >= 0 and every slice i."""
    if batch.num_tokens != x.shape[0] or y.shape[0] != x.shape[0]:
        raise ValueError(f"batch ({batch.num_tokens} rows), x ({x.shape[0]}) and y ({y.shape[0]}) must agree")
    # The LoRA layers pass the same buffer lists every call: check each combination once.
    key = (id(lora_a), id(lora_b), id(scaling), id(out_slices), x.dtype, x.shape[1], y.dtype, y.shape[1])
    hit = _checked.get(key)
    if hit is None or hit[0] is not lora_a or hit[1] is not lora_b or hit[2] is not scaling or hit[3] is not out_slices:
        _check(x.shape[0], lora_a, lora_b, scaling, batch, out_slices, y=y, x=x)
        if len(_checked) > 4096:
            _checked.clear()
        _checked[key] = (lora_a, lora_b, scaling, out_slices)
    if not batch.has_lora:
        return
    name = _resolve(x.device)
    if name == "torch":
        cpu.add_lora(y, x, lora_a, lora_b, scaling, batch, out_slices)
    elif name == "triton":
        tri = _triton()
        tri.expand(y, tri.shrink(x, lora_a, batch, zero=False), lora_b, scaling, batch, out_slices)
    else:
        reference.add_lora(y, x, lora_a, lora_b, scaling, batch, out_slices)


class BoundLoRA:
    """`add_lora` for one projection whose buffers never change (a LoRA layer's slot-pool views):
    `bound(y, x, batch)`. The first call goes through `add_lora` (which validates the buffers);
    after that, on the CPU path with the fused kernel built, each call skips the per-call checks and
    dispatch and hands the step's rows straight to the kernel (about 15 us less per call, 120 calls
    per step for a 30-layer model). Anything else still goes through `add_lora`."""

    def __init__(self, lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor], scaling: torch.Tensor,
                 out_slices: Sequence[tuple[int, int]]) -> None:
        self.lora_a, self.lora_b, self.scaling, self.out_slices = lora_a, lora_b, scaling, out_slices
        self.in_features = lora_a[0].shape[2]
        self.out_width = max(off + size for off, size in out_slices)
        self._kernel: tuple | None = None
        self._validated = False

    def __call__(self, y: torch.Tensor, x: torch.Tensor, batch: LoRABatch) -> None:
        k = self._kernel
        if (k is not None and x.device.type == "cpu" and _backend[0] in ("auto", "torch")
                and batch.num_tokens == x.shape[0] == y.shape[0] and x.dtype == y.dtype == k[0].dtype
                and x.shape[1] == self.in_features and y.shape[1] >= self.out_width
                and (not batch.has_lora or cpu.run_bound_kernel(y, x, k, self.scaling, batch))):
            return
        add_lora(y, x, self.lora_a, self.lora_b, self.scaling, batch, self.out_slices)
        if not self._validated and x.device.type == "cpu":  # add_lora has checked the buffers
            self._validated = True
            self._kernel = cpu.bind_kernel(self.lora_a, self.lora_b, self.out_slices)


def lora_shrink(x: torch.Tensor, lora_a: Sequence[torch.Tensor], batch: LoRABatch) -> torch.Tensor:
    """v [num_slices, T, r_max] float32: v[i, t] = x[t] @ lora_a[i][slot_t].T, zeros on -1 rows."""
    _check(x.shape[0], lora_a, None, None, batch, None, x=x)
    name = _resolve(x.device)
    if name == "torch":
        if not batch.has_lora:
            return torch.zeros(len(lora_a), x.shape[0], lora_a[0].shape[1], dtype=torch.float32)
        plan = cpu.plan_for(batch)
        return cpu.shrink(x, lora_a, plan, cpu.choose(plan, lora_a=lora_a)).float()
    if name == "triton":
        return _triton().shrink(x, lora_a, batch, zero=True)
    return reference.shrink_segments(x, lora_a, batch.seg_indptr, batch.seg_slots)


def lora_expand(
    y: torch.Tensor,
    v: torch.Tensor,
    lora_b: Sequence[torch.Tensor],
    scaling: torch.Tensor,
    batch: LoRABatch,
    out_slices: Sequence[tuple[int, int]],
) -> None:
    """In place: y[t, off_i:off_i+n_i] += scaling[i, slot_t] * v[i, t] @ lora_b[i][slot_t].T."""
    _check(y.shape[0], None, lora_b, scaling, batch, out_slices, y=y)
    n, r = len(lora_b), lora_b[0].shape[2]
    if tuple(v.shape) != (n, y.shape[0], r):
        raise ValueError(f"v must be [{n}, {y.shape[0]}, {r}], got {tuple(v.shape)}")
    if not batch.has_lora:
        return
    name = _resolve(y.device)
    if name == "torch":
        plan = cpu.plan_for(batch)
        cpu.expand(y, v, lora_b, scaling, plan, out_slices, cpu.choose(plan, lora_b=lora_b))
    elif name == "triton":
        _triton().expand(y, v.float().contiguous(), lora_b, scaling, batch, out_slices)
    else:
        reference.expand_segments(y, v, lora_b, scaling, batch.seg_indptr, batch.seg_slots, out_slices)
