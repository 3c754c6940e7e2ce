"""Per-step LoRA batch metadata: which device slot each flattened row uses.

Built once per engine step by the runner (one host->device copy) and shared by every LoRA
projection in every layer of that step. Rows are the flattened tokens `[num_tokens, hidden]`;
a row's slot is the index into the stacked slot buffers (`A[slots, r_max, in]`,
`B[slots, out, r_max]`), or -1 for "no adapter" (base model; the row gets no delta).

Segments are maximal runs of consecutive rows with the same slot (the runner orders sequences
by slot so that each adapter forms one run): SGMV kernels walk segments, BGMV kernels walk rows.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoRABatch:
    token_slots: torch.Tensor  # [num_tokens] int32, slot per row, -1 = base model
    seg_indptr: torch.Tensor  # [num_segments + 1] int32, rows of segment s: seg_indptr[s]:seg_indptr[s+1]
    seg_slots: torch.Tensor  # [num_segments] int32, slot of each segment (may be -1)
    num_tokens: int
    max_seg_len: int  # longest segment, for sizing SGMV grids
    num_active_slots: int  # distinct slots >= 0 in the batch
    slot_list: tuple[int, ...]  # the distinct slots >= 0, ascending (host copy; no device sync needed)

    @property
    def has_lora(self) -> bool:
        return self.num_active_slots > 0

    @classmethod
    def build(cls, token_slots: Sequence[int], device: torch.device | str = "cpu") -> LoRABatch:
        """Build from a host list of per-row slots (-1 = base)."""
        slots = [int(s) for s in token_slots]
        indptr = [0]
        seg_slots: list[int] = []
        for i, s in enumerate(slots):
            if i == 0 or s != slots[i - 1]:
                if i > 0:
                    indptr.append(i)
                seg_slots.append(s)
        if slots:
            indptr.append(len(slots))
        max_seg = max((indptr[i + 1] - indptr[i] for i in range(len(seg_slots))), default=0)
        distinct = tuple(sorted({s for s in slots if s >= 0}))
        # One packed copy to the device: token slots | indptr | segment slots.
        packed = torch.tensor(slots + indptr + seg_slots, dtype=torch.int32)
        packed = packed.to(device, non_blocking=True)
        n, m = len(slots), len(indptr)
        return cls(
            token_slots=packed[:n],
            seg_indptr=packed[n : n + m],
            seg_slots=packed[n + m :],
            num_tokens=n,
            max_seg_len=max_seg,
            num_active_slots=len(distinct),
            slot_list=distinct,
        )
