"""The spec itself: reference shrink/expand vs a hand-written per-row loop, and row vs segment forms."""
from __future__ import annotations

import pytest
import torch

from kernels import LoRABatch, reference

from .cases import PATTERNS, batch_with_empty_segment, make_case


def _loop(case, slots):
    """The LoRA formula written out row by row, slice by slice, in float64."""
    y = case.y.double().clone()
    for t, s in enumerate(slots):
        if s < 0:
            continue
        for i, (off, size) in enumerate(case.out_slices):
            v = case.lora_a[i][s].double() @ case.x[t].double()
            y[t, off : off + size] += case.scaling[i, s].double() * (case.lora_b[i][s].double() @ v)
    return y


@pytest.mark.parametrize("name", PATTERNS)
def test_rows_and_segments_match_hand_loop(name):
    slots = PATTERNS[name]
    case = make_case(slots)
    want = _loop(case, slots).float()
    batch = LoRABatch.build(slots)
    y_rows = case.y.clone()
    v = reference.shrink_rows(case.x, case.lora_a, batch.token_slots)
    reference.expand_rows(y_rows, v, case.lora_b, case.scaling, batch.token_slots, case.out_slices)
    y_seg = case.y.clone()
    reference.add_lora(y_seg, case.x, case.lora_a, case.lora_b, case.scaling, batch, case.out_slices)
    torch.testing.assert_close(y_rows, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y_seg, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v, reference.shrink_segments(case.x, case.lora_a, batch.seg_indptr, batch.seg_slots))


def test_tiny_hand_computed():
    # One slot, rank 1: A = [1, 2], B = [[3], [4]], scale 0.5, x = [1, 1] -> v = 3, delta = [4.5, 6].
    a = [torch.tensor([[[1.0, 2.0]]])]
    b = [torch.tensor([[[3.0], [4.0]]])]
    y = torch.tensor([[10.0, 20.0], [7.0, 8.0]])
    batch = LoRABatch.build([0, -1])
    reference.add_lora(y, torch.ones(2, 2), a, b, torch.tensor([[0.5]]), batch, [(0, 2)])
    assert y.tolist() == [[14.5, 26.0], [7.0, 8.0]]


def test_empty_segment_is_skipped():
    batch, slots = batch_with_empty_segment()
    case = make_case(slots)
    y = case.y.clone()
    reference.add_lora(y, case.x, case.lora_a, case.lora_b, case.scaling, batch, case.out_slices)
    torch.testing.assert_close(y, _loop(case, slots).float(), atol=1e-5, rtol=1e-5)
