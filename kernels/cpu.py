"""The CPU LoRA backend: the fused C++ kernel, two torch fallbacks, and the rule that picks one.

Data flow: the runner calls `CPUBackend.prepare(batch)` once per step -> a `CPUPlan` (host-side
row/segment lists, the kernel's row->slot tensor, the choice of formulation for the step); each LoRA
layer binds its slot-pool buffers once (`CPUBackend.bind` -> `CPULoRA`, which finds the row-table
views and the kernel's fixed arguments) and calls `bound(y, x, plan)` per step.

Formulations (all give the reference's result; measured in docs/kernels.md):
  kernel     kernels/csrc/bgmv_cpu.cpp (via kernels/cpu_ext.py): shrink + scaling + expand of all
             slices in one call per projection, fp32 accumulation. Needs the row-table layout of
             kernels/layout.py and a C++ toolchain (built once, cached). The choice whenever it is
             built and segments average fewer than KERNEL_MAX_SEG_ROWS rows.
  fused      with the row-table layout but no kernel (or long segments): per-segment GEMMs once
             segments average SEG_FUSED_ROWS rows (bf16; fp32 switches earlier), else one
             embedding_bag shrink for all slices and one embedding_bag expand per slice.
  segments   any layout: one matmul per (segment, slice). `impl="segments"` forces it.
Formulations that only the benchmark compares (unfused embedding_bag, gather, dense) live in
kernels/bench_formulations.py.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kernels import cpu_ext
from kernels.batch import LoRABatch
from kernels.checks import check_buffers, check_call
from kernels.layout import a_table, b_table

IMPLS = ("auto", "kernel", "segments")
# With the row-table layout and no kernel: per-segment fused GEMMs once segments average this many
# rows, else the fused embedding_bag path. Measured in the engine at batch 32 (docs/kernels.md):
# bf16 small GEMMs carry more fixed cost than fp32 ones, so bf16 switches later.
SEG_FUSED_ROWS = 48
SEG_FUSED_ROWS_FP32 = 16
# The fused kernel beats per-segment GEMMs up to at least 256 rows per segment (bf16 and fp32,
# docs/kernels.md); past this many rows per segment the GEMMs take over.
KERNEL_MAX_SEG_ROWS = 512
KERNEL_MAX_NR = 256  # slices x r_max the kernel's per-row buffer holds (kMaxNR in bgmv_cpu.cpp)


class CPUPlan:
    """Host-side view of one step's LoRABatch, built once by `CPUBackend.prepare` and read by every
    LoRA layer of the step (and by the C++ decode loop: `token_slots`, `use_kernel`)."""

    def __init__(self, batch: LoRABatch):
        self.batch = batch
        slots = batch.token_slots.tolist()  # CPU tensor: no device sync
        ptr = batch.seg_indptr.tolist()
        segs = [(int(s), ptr[k], ptr[k + 1]) for k, s in enumerate(batch.seg_slots.tolist())]
        self.segs = [(s, a, b) for s, a, b in segs if s >= 0 and b > a]  # (slot, first row, end row)
        act = [t for t, s in enumerate(slots) if s >= 0]
        self.num_tokens = len(slots)
        self.has_lora = batch.has_lora
        self.all_active = len(act) == len(slots)
        self.rows = torch.tensor(act, dtype=torch.long)  # active rows
        self.row_slots = torch.tensor([slots[t] for t in act], dtype=torch.long)  # their slots
        self.token_slots = torch.tensor(slots, dtype=torch.long)  # every row's slot, -1 = base
        self.slot_list = list(batch.slot_list)
        # The fused kernel suits this step: segments shorter than KERNEL_MAX_SEG_ROWS on average.
        self.use_kernel = len(act) < KERNEL_MAX_SEG_ROWS * len(self.segs)
        self._bags: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._scaling: dict[tuple[int, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def row_scaling(self, scaling: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[Ta, n, 1] scaling of each active row's slot, per slice (kept for the step: slot
        contents change only between steps). When `scaling` is a block of rows of a larger
        per-slot table (the slot pool's [layers, modules, slots]), the whole table is gathered once
        per step and every projection gets a view of it."""
        base = scaling._base
        if base is not None and scaling.dim() == 2 and scaling.stride() == (scaling.shape[1], 1) \
                and base.is_contiguous() and base.shape[-1] == scaling.shape[1]:
            key = (id(base), dtype)
            hit = self._scaling.get(key)
            if hit is None or hit[0] is not base:
                table = base.reshape(-1, base.shape[-1]).index_select(1, self.row_slots).to(dtype)
                hit = (base, table)  # [rows of base, Ta]
                self._scaling[key] = hit
            row = (scaling.storage_offset() - base.storage_offset()) // scaling.shape[1]
            return hit[1][row : row + scaling.shape[0]].t().unsqueeze(-1)
        key = (id(scaling), dtype)
        hit = self._scaling.get(key)
        if hit is None or hit[0] is not scaling:
            hit = (scaling, scaling.t().index_select(0, self.row_slots).to(dtype).unsqueeze(-1))
            self._scaling[key] = hit
        return hit[1]

    def bags(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """embedding_bag (indices, offsets): row t's bag is slot_t*width + [0, width); -1 rows empty."""
        if width not in self._bags:
            idx = (self.row_slots[:, None] * width + torch.arange(width)[None, :]).reshape(-1)
            starts = torch.zeros(self.num_tokens, dtype=torch.long)
            counts = torch.zeros(self.num_tokens, dtype=torch.long)
            counts[self.rows] = width
            starts[1:] = counts.cumsum(0)[:-1]
            self._bags[width] = (idx, starts)
        return self._bags[width]

    def active(self, t: torch.Tensor) -> torch.Tensor:
        """Rows of t that have a slot (t itself when every row does)."""
        return t if self.all_active else t.index_select(0, self.rows)


# --- the generic formulation (any layout) ------------------------------------------------------------

def shrink_segments(x: torch.Tensor, lora_a: Sequence[torch.Tensor], plan: CPUPlan) -> torch.Tensor:
    """v [n, T, r] in x.dtype, zeros on -1 rows: one matmul per (segment, slice)."""
    n, r = len(lora_a), lora_a[0].shape[1]
    v = x.new_zeros(n, plan.num_tokens, r)
    for slot, start, end in plan.segs:
        for i, a in enumerate(lora_a):
            torch.matmul(x[start:end], a[slot].T, out=v[i, start:end])
    return v


def expand_segments(y, v, lora_b, scaling, plan: CPUPlan, out_slices) -> None:
    """y[:, slice i] += scaling[i, slot] * v[i] @ B_i[slot].T on rows with a slot."""
    for slot, start, end in plan.segs:
        for i, (b, (off, size)) in enumerate(zip(lora_b, out_slices, strict=True)):
            w = v[i, start:end].to(y.dtype) * scaling[i, slot].to(y.dtype)
            y[start:end, off : off + size].addmm_(w, b[slot].T)


# --- the row-table formulations --------------------------------------------------------------------

def _embbag_fused(y, x, a_tab, b_tabs, scaling, plan: CPUPlan, out_slices, r: int) -> None:
    """Decode without the kernel: one embedding_bag shrink for all slices, scale folded into the
    per-row weights of one embedding_bag expand per slice; no weight copies, few small ops."""
    n = len(b_tabs)
    idx, offs = plan.bags(a_tab.shape[0] // scaling.shape[1])
    v = F.embedding_bag(idx, a_tab, offs, mode="sum", per_sample_weights=plan.active(x).reshape(-1))
    sc = plan.row_scaling(scaling, y.dtype)  # [Ta, n, 1]
    w = (plan.active(v).view(-1, n, r) * sc).transpose(0, 1).contiguous()  # [n, Ta, r]
    idx_b, offs_b = plan.bags(r)
    for i, (off, size) in enumerate(out_slices):
        y[:, off : off + size].add_(F.embedding_bag(idx_b, b_tabs[i], offs_b, mode="sum",
                                                    per_sample_weights=w[i].view(-1)))


def _segments_fused(y, x, a_tab, b_tabs, scaling, plan: CPUPlan, out_slices, r: int) -> None:
    """Few/long segments: per segment one GEMM for the shrink of all slices (the slot's A rows are
    one [in, n*r] block of the row table) and one addmm per slice into y (B rows are [r, out_i])."""
    n = len(b_tabs)
    k = a_tab.shape[0] // scaling.shape[1]  # in_features
    for slot, start, end in plan.segs:
        v = x[start:end] @ a_tab[slot * k : (slot + 1) * k]  # [rows, n*r]
        w = v.view(end - start, n, r) * scaling[:, slot].to(v.dtype)[None, :, None]
        for i, (off, size) in enumerate(out_slices):
            y[start:end, off : off + size].addmm_(w[:, i], b_tabs[i][slot * r : (slot + 1) * r])


class CPULoRA:
    """One projection's LoRA add-on bound to its slot buffers: `bound(y, x, plan)` adds in place
    y[t, slice i] += scaling[i, s] * (x[t] @ A_i[s].T) @ B_i[s].T for every row t with slot s >= 0."""

    def __init__(self, lora_a, lora_b, scaling, out_slices, impl: str = "auto") -> None:
        if impl not in IMPLS:
            raise ValueError(f"unknown CPU LoRA implementation {impl!r} (expected one of {IMPLS})")
        check_buffers(lora_a, lora_b, scaling, out_slices)
        self.lora_a, self.lora_b, self.scaling = list(lora_a), list(lora_b), scaling
        self.out_slices = [tuple(s) for s in out_slices]
        self.impl = impl
        self.rank = lora_a[0].shape[1]
        self.in_features = lora_a[0].shape[2]
        self.out_width = max(off + size for off, size in out_slices)
        self.dtype = lora_a[0].dtype
        a_tab = a_table(lora_a)
        b_tabs = [b_table(b) for b in lora_b]
        if a_tab is None or any(t is None for t in b_tabs):
            a_tab, b_tabs = None, None
        self.a_tab, self.b_tabs = a_tab, b_tabs  # row-table views, or None (other layouts)
        self.offsets = [off for off, _ in out_slices]
        self.ext = None  # the C++ ops module when the fused kernel can take these buffers
        if (impl != "segments" and a_tab is not None and a_tab.is_contiguous()
                and a_tab.shape[1] <= KERNEL_MAX_NR and scaling.stride(-1) == 1):
            self.ext = cpu_ext.load()
        if impl == "kernel" and self.ext is None:
            raise ValueError(f"the fused CPU kernel needs the row-table layout and a build ({cpu_ext.status()})")

    @property
    def kernel_args(self) -> tuple | None:
        """(A table, B tables, slice offsets, r) for the C++ kernel (the decode loop binds these),
        or None when these buffers do not suit it."""
        return None if self.ext is None else (self.a_tab, self.b_tabs, self.offsets, self.rank)

    def __call__(self, y: torch.Tensor, x: torch.Tensor, plan: CPUPlan) -> None:
        check_call(y, x, plan.num_tokens, self.in_features, self.out_width, self.dtype)
        if not plan.has_lora:
            return
        if (self.ext is not None and (plan.use_kernel or self.impl == "kernel")
                and x.stride(-1) == 1 and y.stride(-1) == 1):
            self.ext.bgmv(y, x, self.a_tab, self.b_tabs, self.offsets, self.scaling, plan.token_slots, self.rank)
            return
        if self.impl == "kernel":
            raise ValueError("the fused CPU kernel needs rows with unit stride")
        if self.a_tab is not None and self.impl == "auto":
            per_seg = SEG_FUSED_ROWS_FP32 if x.dtype == torch.float32 else SEG_FUSED_ROWS
            fn = _segments_fused if len(plan.rows) >= per_seg * len(plan.segs) else _embbag_fused
            fn(y, x, self.a_tab, self.b_tabs, self.scaling, plan, self.out_slices, self.rank)
            return
        expand_segments(y, shrink_segments(x, self.lora_a, plan), self.lora_b, self.scaling, plan, self.out_slices)


class CPUBackend:
    """The LoRA backend for CPU tensors (see the module docstring); `impl` forces a formulation."""

    name = "cpu"

    def __init__(self, impl: str = "auto") -> None:
        if impl not in IMPLS:
            raise ValueError(f"unknown CPU LoRA implementation {impl!r} (expected one of {IMPLS})")
        self.impl = impl

    def prepare(self, batch: LoRABatch) -> CPUPlan:
        return CPUPlan(batch)

    def bind(self, lora_a, lora_b, scaling, out_slices) -> CPULoRA:
        return CPULoRA(lora_a, lora_b, scaling, out_slices, self.impl)

    def shrink(self, x: torch.Tensor, lora_a, plan: CPUPlan) -> torch.Tensor:
        return shrink_segments(x, lora_a, plan).float()

    def expand(self, y, v, lora_b, scaling, plan: CPUPlan, out_slices) -> None:
        expand_segments(y, v, lora_b, scaling, plan, out_slices)
