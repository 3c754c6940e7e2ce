"""LoRA backends: one object per device kind, chosen once; plus the functional ops for tests and benches.

Contract (every backend):
    plan = backend.prepare(batch)                          once per engine step (the runner)
    bound = backend.bind(lora_a, lora_b, scaling, out_slices)   once per LoRA layer; checks the buffers
    bound(y, x, plan)                                      y += each row's LoRA delta, in place
    backend.shrink(x, lora_a, plan) -> v [n, T, r] fp32;  backend.expand(y, v, lora_b, scaling, plan, out_slices)

Backends: "cpu" (kernels/cpu.py: the fused C++ kernel and its torch fallbacks), "triton"
(kernels/triton_sgmv.py: CUDA, or CPU tensors under TRITON_INTERPRET=1), "reference"
(kernels/reference.py, the spec). `make_backend(device, "auto")` picks Triton for CUDA and the CPU
backend otherwise; "torch" is accepted as the CPU backend's older name. The engine builds one
backend when it is built; nothing here keeps module-level state.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels import reference
from kernels.batch import LoRABatch
from kernels.checks import check_a, check_b, check_buffers, check_call
from kernels.cpu import CPUBackend

BACKENDS = ("auto", "cpu", "torch", "triton", "reference")


class _Bound:
    """A projection's buffers, checked once, for the backends that run per call on the LoRABatch."""

    def __init__(self, run, lora_a, lora_b, scaling, out_slices) -> None:
        check_buffers(lora_a, lora_b, scaling, out_slices)
        self.run = run
        self.lora_a, self.lora_b, self.scaling = list(lora_a), list(lora_b), scaling
        self.out_slices = [tuple(s) for s in out_slices]
        self.in_features, self.dtype = lora_a[0].shape[2], lora_a[0].dtype
        self.out_width = max(off + size for off, size in out_slices)
        self.kernel_args = None  # only the CPU backend's kernel is driven by the C++ decode loop

    def __call__(self, y: torch.Tensor, x: torch.Tensor, plan: LoRABatch) -> None:
        check_call(y, x, plan.num_tokens, self.in_features, self.out_width, self.dtype)
        if plan.has_lora:
            self.run(y, x, self.lora_a, self.lora_b, self.scaling, plan, self.out_slices)


class ReferenceBackend:
    """Plain torch, fp32 accumulation, segment by segment: the spec, on any device."""

    name = "reference"

    def prepare(self, batch: LoRABatch) -> LoRABatch:
        return batch

    def bind(self, lora_a, lora_b, scaling, out_slices) -> _Bound:
        return _Bound(reference.add_lora, lora_a, lora_b, scaling, out_slices)

    def shrink(self, x, lora_a, plan: LoRABatch) -> torch.Tensor:
        return reference.shrink_segments(x, lora_a, plan.seg_indptr, plan.seg_slots)

    def expand(self, y, v, lora_b, scaling, plan: LoRABatch, out_slices) -> None:
        reference.expand_segments(y, v, lora_b, scaling, plan.seg_indptr, plan.seg_slots, out_slices)


def _triton():
    from kernels import triton_sgmv  # imported on first use: keeps triton out of CPU-only runs

    return triton_sgmv


class _TritonBound(_Bound):
    """The Triton binding: the per-slice tables (offsets, strides, output columns) go to the device
    once, here, instead of on every call."""

    def __init__(self, lora_a, lora_b, scaling, out_slices) -> None:
        super().__init__(None, lora_a, lora_b, scaling, out_slices)
        tri = _triton()
        self.tri = tri
        self.a_table = tri.slice_table(self.lora_a, [(0, 0)] * len(self.lora_a))
        self.b_table = tri.slice_table(self.lora_b, self.out_slices)

    def __call__(self, y: torch.Tensor, x: torch.Tensor, plan: LoRABatch) -> None:
        check_call(y, x, plan.num_tokens, self.in_features, self.out_width, self.dtype)
        if plan.has_lora:
            v = self.tri.shrink(x, self.lora_a, plan, zero=False, table=self.a_table)
            self.tri.expand(y, v, self.lora_b, self.scaling, plan, self.out_slices, table=self.b_table)


class TritonBackend:
    """Segmented shrink and expand, one launch each per projection (kernels/triton_sgmv.py)."""

    name = "triton"

    def prepare(self, batch: LoRABatch) -> LoRABatch:
        return batch

    def bind(self, lora_a, lora_b, scaling, out_slices) -> _TritonBound:
        return _TritonBound(lora_a, lora_b, scaling, out_slices)

    def shrink(self, x, lora_a, plan: LoRABatch) -> torch.Tensor:
        return _triton().shrink(x, lora_a, plan, zero=True)

    def expand(self, y, v, lora_b, scaling, plan: LoRABatch, out_slices) -> None:
        _triton().expand(y, v.float().contiguous(), lora_b, scaling, plan, out_slices)


def make_backend(device: torch.device | str, name: str = "auto", cpu_impl: str = "auto"):
    """The backend for tensors on `device`: "auto" = Triton on CUDA, the CPU backend elsewhere."""
    if name not in BACKENDS:
        raise ValueError(f"unknown LoRA backend {name!r} (expected one of {', '.join(BACKENDS)})")
    if name == "auto":
        name = "triton" if torch.device(device).type == "cuda" else "cpu"
    if name in ("cpu", "torch"):
        return CPUBackend(cpu_impl)
    return TritonBackend() if name == "triton" else ReferenceBackend()


# --- functional ops: one call, buffers bound and checked on the spot (tests, benchmarks) ----------------

def _backend(backend, device):
    return make_backend(device, backend) if isinstance(backend, str) else backend


def add_lora(y: torch.Tensor, x: torch.Tensor, lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor],
             scaling: torch.Tensor, batch: LoRABatch, out_slices: Sequence[tuple[int, int]],
             backend="auto") -> None:
    """In place: y[t, off_i:off_i+n_i] += scaling[i, s] * (x[t] @ lora_a[i][s].T) @ lora_b[i][s].T
    for every row t with slot s = batch.token_slots[t] >= 0 and every slice i."""
    be = _backend(backend, x.device)
    be.bind(lora_a, lora_b, scaling, out_slices)(y, x, be.prepare(batch))


def lora_shrink(x: torch.Tensor, lora_a: Sequence[torch.Tensor], batch: LoRABatch, backend="auto") -> torch.Tensor:
    """v [num_slices, T, r_max] float32: v[i, t] = x[t] @ lora_a[i][slot_t].T, zeros on -1 rows."""
    check_a(lora_a)
    if batch.num_tokens != x.shape[0]:
        raise ValueError(f"batch has {batch.num_tokens} rows but the activations have {x.shape[0]}")
    if x.dim() != 2 or x.shape[1] != lora_a[0].shape[2] or x.dtype != lora_a[0].dtype:
        raise ValueError(f"x must be [T, {lora_a[0].shape[2]}] of lora_a's dtype, got {tuple(x.shape)} {x.dtype}")
    if not batch.has_lora:
        return torch.zeros(len(lora_a), x.shape[0], lora_a[0].shape[1], dtype=torch.float32, device=x.device)
    be = _backend(backend, x.device)
    return be.shrink(x, lora_a, be.prepare(batch))


def lora_expand(y: torch.Tensor, v: torch.Tensor, lora_b: Sequence[torch.Tensor], scaling: torch.Tensor,
                batch: LoRABatch, out_slices: Sequence[tuple[int, int]], backend="auto") -> None:
    """In place: y[t, off_i:off_i+n_i] += scaling[i, slot_t] * v[i, t] @ lora_b[i][slot_t].T."""
    check_b(lora_b, scaling, out_slices)
    if batch.num_tokens != y.shape[0]:
        raise ValueError(f"batch has {batch.num_tokens} rows but y has {y.shape[0]}")
    if y.dim() != 2 or y.dtype != lora_b[0].dtype:
        raise ValueError("y must be [T, out_total] with lora_b's dtype")
    if any(off + size > y.shape[1] for off, size in out_slices):
        raise ValueError(f"an out slice lies outside y's {y.shape[1]} columns")
    n, r = len(lora_b), lora_b[0].shape[2]
    if tuple(v.shape) != (n, y.shape[0], r):
        raise ValueError(f"v must be [{n}, {y.shape[0]}, {r}], got {tuple(v.shape)}")
    if not batch.has_lora:
        return
    be = _backend(backend, y.device)
    be.expand(y, v, lora_b, scaling, be.prepare(batch), out_slices)
