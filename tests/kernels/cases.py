"""Shared test material: random slot buffers (random real ranks, zero-padded), batches, poisoned outputs."""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from kernels import LoRABatch, alloc_lora_a, alloc_lora_b, reference

# Tolerances vs the fp32 reference, relative to the output's magnitude (values here are O(1)).
# fp32: only summation order differs. bf16/fp16: the output (and on the CPU path the rank-r
# intermediate) is rounded to 8/11 mantissa bits.
TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@dataclass
class Case:
    x: torch.Tensor
    lora_a: list[torch.Tensor]
    lora_b: list[torch.Tensor]
    scaling: torch.Tensor
    out_slices: list[tuple[int, int]]
    y: torch.Tensor  # poisoned output, not yet updated


def make_case(token_slots, *, in_features=32, out_sizes=(16, 8, 8), r_max=8, num_slots=6,
              dtype=torch.float32, layout="plain", device="cpu", seed=0) -> Case:
    """Random adapters in `num_slots` slots, each with its own rank <= r_max (zeros beyond)."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    n = len(out_sizes)
    if layout == "table":
        lora_a = alloc_lora_a(num_slots, r_max, in_features, n, dtype=dtype, device=device)
        lora_b = alloc_lora_b(num_slots, out_sizes, r_max, dtype=dtype, device=device)
    else:
        lora_a = [torch.zeros(num_slots, r_max, in_features, dtype=dtype, device=device) for _ in out_sizes]
        lora_b = [torch.zeros(num_slots, o, r_max, dtype=dtype, device=device) for o in out_sizes]
    for s in range(num_slots):
        rank = rng.randint(1, r_max)
        for a, b in zip(lora_a, lora_b, strict=True):
            a[s, :rank] = (torch.randn(rank, in_features, generator=g) / in_features**0.5).to(dtype)
            b[s, :, :rank] = torch.randn(b.shape[1], rank, generator=g).to(dtype)
    scaling = torch.rand(n, num_slots, generator=g).to(device)
    scaling[-1, 0] = 0.0  # slot 0's adapter does not target the last slice
    offs = [sum(out_sizes[:i]) for i in range(n)]
    x = torch.randn(len(token_slots), in_features, generator=g).to(dtype).to(device)
    y = torch.randn(len(token_slots), sum(out_sizes), generator=g).to(dtype).to(device)  # poison
    return Case(x, lora_a, lora_b, scaling, list(zip(offs, out_sizes, strict=True)), y)


def expected(case: Case, token_slots) -> torch.Tensor:
    """poison + delta from the per-row reference, computed in fp32 on the CPU."""
    y = case.y.float().cpu().clone()  # .float() of an fp32 tensor is the tensor itself: never edit the case
    slots = torch.tensor(list(token_slots), dtype=torch.int32)
    cpu = lambda ts: [t.float().cpu() for t in ts]
    v = reference.shrink_rows(case.x.float().cpu(), cpu(case.lora_a), slots)
    reference.expand_rows(y, v, cpu(case.lora_b), case.scaling.cpu(), slots, case.out_slices)
    return y


def check(out: torch.Tensor, case: Case, token_slots) -> None:
    """out matches poison + delta; rows with slot -1 kept the poison bit for bit."""
    exp = expected(case, token_slots)
    tol = TOL[out.dtype]
    torch.testing.assert_close(out.float().cpu(), exp, atol=tol * 4, rtol=tol)
    base = [t for t, s in enumerate(token_slots) if s < 0]
    assert torch.equal(out[base].cpu(), case.y[base].cpu())


# Slot patterns every backend is checked on (names -> per-row slots).
PATTERNS = {
    "mixed": [0, 0, 1, -1, 3, 3, 3, 5, -1, 2],
    "identical": [2] * 9,
    "all_base": [-1] * 5,
    "one_row": [4],
    "distinct": [5, 4, 3, 2, 1, 0],
    "unsorted": [1, 0, 1, 0, -1, 1],
}


def batch_with_empty_segment(device="cpu") -> tuple[LoRABatch, list[int]]:
    """A hand-built batch whose segment list holds an empty segment (build() never makes one)."""
    slots = [1, 1, 3, 3, 3]
    t = lambda v: torch.tensor(v, dtype=torch.int32, device=device)
    batch = LoRABatch(token_slots=t(slots), seg_indptr=t([0, 2, 2, 5]), seg_slots=t([1, 4, 3]),
                      num_tokens=5, max_seg_len=3, num_active_slots=2, slot_list=(1, 3))
    return batch, slots
