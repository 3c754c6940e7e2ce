"""CPU LoRA formulations kept only as measured candidates for `kernels.bench` (not used by the engine).

Each takes the same arguments as a bound CPU projection (buffers, a `CPUPlan`) and gives the
reference's result; docs/kernels.md records why the engine's CPU backend (kernels/cpu.py) does not
use them: the fused C++ kernel beats them all at decode, and per-segment GEMMs win on long segments.
  "embbag"   `embedding_bag` over the row-table layout (kernels/layout.py): reads each row's adapter
             weights once, no gather copy; a shrink, then an expand per slice.
  "gather"   index_select each row's A/B (a copy) then bmm. Any layout.
  "dense"    all active slots at once (x @ A_active.T, one-hot mask, @ B_active): T*S redundant work.
`choose()` is the rule the CPU path used for layouts other than the row table before the kernel existed.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kernels.cpu import CPUPlan, expand_segments, shrink_segments
from kernels.layout import a_table, b_table

FORMULATIONS = ("embbag", "gather", "segments", "dense")
SEG_LONG_ROWS = 32  # one segment, or segments this long: plain GEMMs win
SEG_MIN_ROWS = 8  # without the row table, "segments" beats "gather" from ~8 rows per segment


def choose(plan: CPUPlan, lora_a: Sequence[torch.Tensor] = (), lora_b: Sequence[torch.Tensor] = ()) -> str:
    """The measured rule: one or long segments -> segments; else embbag when laid out for it."""
    n_seg, rows = len(plan.segs), len(plan.rows)
    if n_seg <= 1 or rows >= SEG_LONG_ROWS * n_seg:
        return "segments"
    if (not lora_a or a_table(lora_a) is not None) and all(b_table(b) is not None for b in lora_b):
        return "embbag"
    return "segments" if (n_seg <= 2 or rows >= SEG_MIN_ROWS * n_seg) else "gather"


def _scatter_rows(v_act: torch.Tensor, plan: CPUPlan) -> torch.Tensor:
    """[n, Ta, r] active-row values -> [n, T, r] with zeros on -1 rows."""
    if plan.all_active:
        return v_act
    v = v_act.new_zeros(v_act.shape[0], plan.num_tokens, v_act.shape[2])
    v[:, plan.rows] = v_act
    return v


def shrink(x: torch.Tensor, lora_a: Sequence[torch.Tensor], plan: CPUPlan, impl: str) -> torch.Tensor:
    """v [n, T, r] in x.dtype, zeros on -1 rows."""
    n, (_, r, k) = len(lora_a), lora_a[0].shape
    if impl == "segments":
        return shrink_segments(x, lora_a, plan)
    if impl == "embbag":
        idx, offs = plan.bags(k)
        v = F.embedding_bag(idx, a_table(lora_a), offs, mode="sum", per_sample_weights=plan.active(x).reshape(-1))
        return v.view(plan.num_tokens, n, r).transpose(0, 1)  # [T, n*r] -> [n, T, r]
    if impl == "gather":
        xa = plan.active(x).unsqueeze(1)  # [Ta, 1, in]
        v = torch.stack([torch.bmm(xa, a.index_select(0, plan.row_slots).transpose(1, 2))[:, 0] for a in lora_a])
        return _scatter_rows(v, plan)
    if impl == "dense":
        sl = torch.tensor(plan.slot_list, dtype=torch.long)
        onehot = (plan.row_slots[:, None] == sl[None, :]).to(x.dtype)  # [Ta, S_act]
        xa = plan.active(x)
        out = []
        for a in lora_a:
            a_act = a.index_select(0, sl).reshape(-1, k)  # [S_act*r, in]
            va = (xa @ a_act.T).view(len(xa), len(sl), r)  # [Ta, S_act, r]: every active slot
            out.append((va * onehot[:, :, None]).sum(1))
        return _scatter_rows(torch.stack(out), plan)
    raise ValueError(f"unknown CPU LoRA formulation {impl!r} (expected one of {FORMULATIONS})")


def expand(y, v, lora_b, scaling, plan: CPUPlan, out_slices, impl: str) -> None:
    """y[:, slice i] += scaling[i, slot] * v[i] @ B_i[slot].T on rows with a slot."""
    if impl == "segments":
        expand_segments(y, v, lora_b, scaling, plan, out_slices)
        return
    dtype = y.dtype
    sc = scaling.index_select(1, plan.row_slots).to(dtype)  # [n, Ta]
    for i, (b, (off, size)) in enumerate(zip(lora_b, out_slices, strict=True)):
        w = plan.active(v[i]).to(dtype) * sc[i][:, None]  # [Ta, r], scale folded in
        if impl == "embbag":
            idx, offs = plan.bags(b.shape[2])
            d = F.embedding_bag(idx, b_table(b), offs, mode="sum", per_sample_weights=w.reshape(-1))
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
            raise ValueError(f"unknown CPU LoRA formulation {impl!r} (expected one of {FORMULATIONS})")
        if plan.all_active:
            y[:, off : off + size].add_(d)
        else:
            y[:, off : off + size].index_add_(0, plan.rows, d)


def add_lora(y, x, lora_a, lora_b, scaling, plan: CPUPlan, out_slices, impl: str) -> None:
    """One formulation's whole add-on: shrink then expand."""
    if plan.has_lora:
        expand(y, shrink(x, lora_a, plan, impl), lora_b, scaling, plan, out_slices, impl)
