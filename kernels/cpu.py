"""The CPU path: a fused C++ kernel, several torch formulations of shrink/expand, and the rule that
picks one per call.

Formulations (all give the reference's result; measured in docs/kernels.md):
  "kernel"   kernels/csrc/bgmv_cpu.cpp (via kernels/cpu_ext.py): shrink + scaling + expand of all
             slices in one call per projection, per row, fp32 accumulation, AVX-512 when compiled
             for it. Needs the row-table layout and a C++ toolchain (built once, cached). The
             default whenever it is available, except for very long segments (plain GEMMs win).
  "embbag"   `embedding_bag` over the row-table layout of kernels/layout.py: reads each row's
             adapter weights once, no gather copy. Needs that layout; the fastest for decode.
  "gather"   index_select each row's A/B (a copy) then bmm. Any layout.
  "segments" one matmul per segment of rows sharing a slot. Best when segments are long (prefill)
             or few.
  "dense"    all active slots at once (x @ A_active.T, one-hot mask, @ B_active): T*S redundant
             work; kept as a measured candidate.
"auto" (the engine's path): with the row-table layout, the kernel when it is built and segments
average under KERNEL_MAX_SEG_ROWS rows, else fused per-segment GEMMs or the fused embedding_bag path by
rows per segment; with other layouts, `choose()`. Per-batch host metadata (segments, active rows, embedding_bag index
tensors) is computed once per LoRABatch and cached: the same batch serves ~120 calls per step.

Data flow: shrink -> v [n, T, r] (x.dtype, zeros on -1 rows) -> expand adds scaling * v @ B.T into y.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kernels import cpu_ext
from kernels.batch import LoRABatch
from kernels.layout import a_table, b_table

IMPLS = ("auto", "kernel", "embbag", "gather", "segments", "dense")
# Measured (docs/kernels.md), torch formulations only: "embbag" beats the others at decode, even with
# one adapter at batch 32; "segments" (plain GEMMs) wins for one segment or long ones (prefill); without the
# row-table layout, "segments" beats "gather" from ~8 rows per segment.
SEG_LONG_ROWS = 32
SEG_MIN_ROWS = 8
# With the row-table layout: per-segment fused GEMMs once segments average this many rows, else
# the fused embedding_bag path. Measured in the engine at batch 32 (docs/kernels.md): bf16 small
# GEMMs carry more fixed cost than fp32 ones, so bf16 switches later.
SEG_FUSED_ROWS = 48
SEG_FUSED_ROWS_FP32 = 16
# With the fused kernel: it beats per-segment GEMMs up to at least 256 rows per segment (bf16 and
# fp32, docs/kernels.md); past this many rows per segment the GEMMs take over.
KERNEL_MAX_SEG_ROWS = 512
KERNEL_MAX_NR = 256  # slices x r_max the kernel's per-row buffer holds (kMaxNR in bgmv_cpu.cpp)


class _Plan:
    """Host-side view of one LoRABatch, built once and reused by every call of the step."""

    def __init__(self, batch: LoRABatch):
        slots = batch.token_slots.tolist()  # CPU tensor: no device sync
        ptr = batch.seg_indptr.tolist()
        self.segs = [(int(s), ptr[k], ptr[k + 1]) for k, s in enumerate(batch.seg_slots.tolist())]
        self.segs = [(s, a, b) for s, a, b in self.segs if s >= 0 and b > a]
        act = [t for t, s in enumerate(slots) if s >= 0]
        self.num_tokens = len(slots)
        self.all_active = len(act) == len(slots)
        self.rows = torch.tensor(act, dtype=torch.long)  # active rows
        self.row_slots = torch.tensor([slots[t] for t in act], dtype=torch.long)  # their slots
        self.token_slots = torch.tensor(slots, dtype=torch.long)  # every row's slot, -1 = base
        self.slot_list = list(batch.slot_list)
        self._bags: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._scaling: dict[tuple[int, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def row_scaling(self, scaling: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[Ta, n, 1] scaling of each active row's slot, per slice (cached for the step: slot
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


_cache: list = [None, None]  # [batch, plan]: one entry, the current step's batch


def plan_for(batch: LoRABatch) -> _Plan:
    if _cache[0] is not batch:
        _cache[0], _cache[1] = batch, _Plan(batch)
    return _cache[1]


def choose(plan: _Plan, lora_a: Sequence[torch.Tensor] = (), lora_b: Sequence[torch.Tensor] = ()) -> str:
    """The measured rule: one or long segments -> segments; else embbag when laid out for it."""
    n_seg, rows = len(plan.segs), len(plan.rows)
    if n_seg <= 1 or rows >= SEG_LONG_ROWS * n_seg:
        return "segments"
    if (not lora_a or a_table(lora_a) is not None) and all(b_table(b) is not None for b in lora_b):
        return "embbag"
    return "segments" if (n_seg <= 2 or rows >= SEG_MIN_ROWS * n_seg) else "gather"


def _active(t: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """Rows of t that have a slot (t itself when every row does)."""
    return t if plan.all_active else t.index_select(0, plan.rows)


def _scatter_rows(v_act: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """[n, Ta, r] active-row values -> [n, T, r] with zeros on -1 rows."""
    if plan.all_active:
        return v_act
    v = v_act.new_zeros(v_act.shape[0], plan.num_tokens, v_act.shape[2])
    v[:, plan.rows] = v_act
    return v


def shrink(x: torch.Tensor, lora_a: Sequence[torch.Tensor], plan: _Plan, impl: str) -> torch.Tensor:
    """v [n, T, r] in x.dtype, zeros on -1 rows."""
    n, (_, r, k) = len(lora_a), lora_a[0].shape
    if impl == "embbag":
        idx, offs = plan.bags(k)
        table = a_table(lora_a)  # [S*in, n*r]
        v = torch.nn.functional.embedding_bag(idx, table, offs, mode="sum", per_sample_weights=_active(x, plan).reshape(-1))
        return v.view(plan.num_tokens, n, r).transpose(0, 1)  # [T, n*r] -> [n, T, r]
    if impl == "segments":
        v = x.new_zeros(n, plan.num_tokens, r)
        for slot, start, end in plan.segs:
            for i, a in enumerate(lora_a):
                torch.matmul(x[start:end], a[slot].T, out=v[i, start:end])
        return v
    if impl == "gather":
        xa = _active(x, plan).unsqueeze(1)  # [Ta, 1, in]
        v = torch.stack([torch.bmm(xa, a.index_select(0, plan.row_slots).transpose(1, 2))[:, 0] for a in lora_a])
        return _scatter_rows(v, plan)
    if impl == "dense":
        sl = torch.tensor(plan.slot_list, dtype=torch.long)
        onehot = (plan.row_slots[:, None] == sl[None, :]).to(x.dtype)  # [Ta, S_act]
        xa = _active(x, plan)
        out = []
        for a in lora_a:
            a_act = a.index_select(0, sl).reshape(-1, k)  # [S_act*r, in]
            va = (xa @ a_act.T).view(len(xa), len(sl), r)  # [Ta, S_act, r]: every active slot
            out.append((va * onehot[:, :, None]).sum(1))
        return _scatter_rows(torch.stack(out), plan)
    raise ValueError(f"unknown CPU LoRA implementation {impl!r} (expected one of {IMPLS})")


def expand(
    y: torch.Tensor,
    v: torch.Tensor,
    lora_b: Sequence[torch.Tensor],
    scaling: torch.Tensor,
    plan: _Plan,
    out_slices: Sequence[tuple[int, int]],
    impl: str,
) -> None:
    """y[:, slice i] += scaling[i, slot] * v[i] @ B_i[slot].T on rows with a slot."""
    dtype = y.dtype
    if impl == "segments":
        for slot, start, end in plan.segs:
            for i, (b, (off, size)) in enumerate(zip(lora_b, out_slices, strict=True)):
                w = v[i, start:end].to(dtype) * scaling[i, slot].to(dtype)
                y[start:end, off : off + size].addmm_(w, b[slot].T)
        return
    sc = scaling.index_select(1, plan.row_slots).to(dtype)  # [n, Ta]
    for i, (b, (off, size)) in enumerate(zip(lora_b, out_slices, strict=True)):
        w = _active(v[i], plan).to(dtype) * sc[i][:, None]  # [Ta, r], scale folded in
        if impl == "embbag":
            idx, offs = plan.bags(b.shape[2])
            d = torch.nn.functional.embedding_bag(idx, b_table(b), offs, mode="sum", per_sample_weights=w.reshape(-1))
            y[:, off : off + size].add_(d)  # -1 rows: empty bags add exactly 0
            continue
        if impl == "gather":
            bg = b.index_select(0, plan.row_slots)  # [Ta, out, r]: a copy of each row's B
            d = torch.bmm(bg, w.unsqueeze(-1))[..., 0]
        elif impl == "dense":
            sl = torch.tensor(plan.slot_list, dtype=torch.long)
            onehot = (plan.row_slots[:, None] == sl[None, :]).to(dtype)  # [Ta, S_act]
            b_act = b.index_select(0, sl).transpose(1, 2).reshape(-1, size)  # [S_act*r, out]
            d = (onehot[:, :, None] * w[:, None, :]).reshape(len(w), -1) @ b_act
        else:
            raise ValueError(f"unknown CPU LoRA implementation {impl!r} (expected one of {IMPLS})")
        if plan.all_active:
            y[:, off : off + size].add_(d)
        else:
            y[:, off : off + size].index_add_(0, plan.rows, d)


_tables: dict[tuple[int, int], tuple] = {}  # (id(lora_a), id(lora_b)) -> (lora_a, lora_b, a_table, b_tables)


def _row_tables(lora_a, lora_b):
    """The row-table views of a projection's buffers, found once per buffer list (the LoRA
    layers pass the same lists every step), or None when they are not laid out for embbag."""
    key = (id(lora_a), id(lora_b))
    hit = _tables.get(key)
    if hit is not None and hit[0] is lora_a and hit[1] is lora_b:
        return hit[2], hit[3]
    at = a_table(lora_a)
    bts = [b_table(b) for b in lora_b]
    if at is None or any(bt is None for bt in bts):
        at, bts = None, None
    if len(_tables) > 4096:
        _tables.clear()
    _tables[key] = (lora_a, lora_b, at, bts)
    return at, bts


def _embbag_fused(y, x, a_tab, b_tabs, scaling, plan: _Plan, out_slices, r: int) -> None:
    """Decode fast path: one embedding_bag shrink for all slices, scale folded into the per-row
    weights of one embedding_bag expand per slice; no weight copies, few small ops."""
    n = len(b_tabs)
    idx, offs = plan.bags(a_tab.shape[0] // scaling.shape[1])
    v = F.embedding_bag(idx, a_tab, offs, mode="sum", per_sample_weights=_active(x, plan).reshape(-1))
    sc = plan.row_scaling(scaling, y.dtype)  # [Ta, n, 1]
    w = (_active(v, plan).view(-1, n, r) * sc).transpose(0, 1).contiguous()  # [n, Ta, r]
    idx_b, offs_b = plan.bags(r)
    for i, (off, size) in enumerate(out_slices):
        y[:, off : off + size].add_(F.embedding_bag(idx_b, b_tabs[i], offs_b, mode="sum",
                                                    per_sample_weights=w[i].view(-1)))


def _segments_fused(y, x, a_tab, b_tabs, scaling, plan: _Plan, out_slices, r: int) -> None:
    """Few/long segments: per segment one GEMM for the shrink of all slices (the slot's A rows are
    one [in, n*r] block of the row table) and one addmm per slice into y (B rows are [r, out_i])."""
    n = len(b_tabs)
    k = a_tab.shape[0] // scaling.shape[1]  # in_features
    for slot, start, end in plan.segs:
        v = x[start:end] @ a_tab[slot * k : (slot + 1) * k]  # [rows, n*r]
        w = v.view(end - start, n, r) * scaling[:, slot].to(v.dtype)[None, :, None]
        for i, (off, size) in enumerate(out_slices):
            y[start:end, off : off + size].addmm_(w[:, i], b_tabs[i][slot * r : (slot + 1) * r])


def _kernel(y, x, a_tab, b_tabs, scaling, plan: _Plan, out_slices, r: int) -> bool:
    """Run the fused C++ kernel if it is built and the call suits it; False otherwise."""
    if (x.stride(-1) != 1 or y.stride(-1) != 1 or scaling.stride(-1) != 1 or not a_tab.is_contiguous()
            or a_tab.shape[1] > KERNEL_MAX_NR):
        return False
    ext = cpu_ext.load()
    if ext is None:
        return False
    ext.bgmv(y, x, a_tab, b_tabs, [off for off, _ in out_slices], scaling, plan.token_slots, r)
    return True


def bind_kernel(lora_a, lora_b, out_slices) -> tuple | None:
    """The fused kernel's fixed arguments for one projection's buffers (A table, B tables, slice
    offsets, r), or None when the buffers do not suit it or it is not built: bound once by a LoRA
    layer so that each call only passes the step's rows (`run_bound_kernel`)."""
    a_tab, b_tabs = _row_tables(lora_a, lora_b)
    if a_tab is None or not a_tab.is_contiguous() or a_tab.shape[1] > KERNEL_MAX_NR or cpu_ext.load() is None:
        return None
    return a_tab, b_tabs, [off for off, _ in out_slices], lora_a[0].shape[1]


def kernel_suits(plan: _Plan) -> bool:
    """`auto` picks the fused kernel for this step: segments shorter than KERNEL_MAX_SEG_ROWS on average."""
    return len(plan.rows) < KERNEL_MAX_SEG_ROWS * len(plan.segs)


def run_bound_kernel(y, x, bound: tuple, scaling, batch: LoRABatch) -> bool:
    """`add_lora`'s "auto" choice for a bound projection when that choice is the kernel: runs it and
    returns True; False (nothing done) when the step's segments are long enough for GEMMs."""
    plan = plan_for(batch)
    if not kernel_suits(plan) or x.stride(-1) != 1 or y.stride(-1) != 1:
        return False
    a_tab, b_tabs, offs, r = bound
    cpu_ext.load().bgmv(y, x, a_tab, b_tabs, offs, scaling, plan.token_slots, r)
    return True


def add_lora(y, x, lora_a, lora_b, scaling, batch: LoRABatch, out_slices, impl: str = "auto") -> None:
    """The CPU add-on for one fused projection: shrink then expand."""
    if not batch.has_lora:
        return
    plan = plan_for(batch)
    r = lora_a[0].shape[1]
    if impl == "kernel":
        a_tab, b_tabs = _row_tables(lora_a, lora_b)
        if a_tab is None or not _kernel(y, x, a_tab, b_tabs, scaling, plan, out_slices, r):
            raise ValueError(f"the fused CPU kernel needs the row-table layout and a build ({cpu_ext.status()})")
        return
    if impl == "auto":
        a_tab, b_tabs = _row_tables(lora_a, lora_b)
        n_seg, rows = len(plan.segs), len(plan.rows)
        if a_tab is not None:
            if kernel_suits(plan) and _kernel(y, x, a_tab, b_tabs, scaling, plan, out_slices, r):
                return
            per_seg = SEG_FUSED_ROWS_FP32 if x.dtype == torch.float32 else SEG_FUSED_ROWS
            fn = _segments_fused if rows >= per_seg * n_seg else _embbag_fused
            fn(y, x, a_tab, b_tabs, scaling, plan, out_slices, r)
            return
        impl = choose(plan, lora_a, lora_b)
    v = shrink(x, lora_a, plan, impl)
    expand(y, v, lora_b, scaling, plan, out_slices, impl)
