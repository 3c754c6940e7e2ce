"""Triton SGMV shrink/expand vs the reference: under the interpreter on CPU (CI), and on CUDA (gpu).

Interpreter tests set TRITON_INTERPRET=1 only for their own duration: kernels/triton_sgmv.py
decorates its kernels lazily, keyed on that variable, so the setting takes effect even though
triton was imported earlier in the process.
"""
from __future__ import annotations

import pytest
import torch

from kernels import LoRABatch, add_lora, lora_expand, lora_shrink, reference

from .cases import PATTERNS, TOL, batch_with_empty_segment, check, make_case

pytest.importorskip("triton")


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return "triton"


def _run(slots, batch=None, backend="triton", **kw):
    case = make_case(slots, **kw)
    y = case.y.clone()
    add_lora(y, case.x, case.lora_a, case.lora_b, case.scaling, batch or LoRABatch.build(slots, kw.get("device", "cpu")),
             case.out_slices, backend=backend)
    check(y, case, slots)


@pytest.mark.parametrize("name", PATTERNS)
def test_interpreter_patterns_fp32(interpret, name):
    _run(PATTERNS[name], layout="plain" if len(PATTERNS[name]) % 2 else "table")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_interpreter_half_types(interpret, dtype):
    _run(PATTERNS["mixed"], dtype=dtype, layout="table")


def test_interpreter_empty_segment_and_long_segments(interpret):
    batch, slots = batch_with_empty_segment()
    _run(slots, batch=batch)
    # 20 + 3 + 17 rows: more than one BLOCK_M row-block per segment, ragged tails.
    _run([1] * 20 + [-1] * 3 + [4] * 17, r_max=5, out_sizes=(24, 40), in_features=80)


def test_interpreter_public_shrink_expand(interpret):
    slots = [3, 3, -1, 0]
    case = make_case(slots)
    batch = LoRABatch.build(slots)
    v = lora_shrink(case.x, case.lora_a, batch, backend="triton")
    torch.testing.assert_close(v, reference.shrink_rows(case.x, case.lora_a, batch.token_slots), atol=1e-5, rtol=1e-5)
    y = case.y.clone()
    lora_expand(y, v, case.lora_b, case.scaling, batch, case.out_slices, backend="triton")
    check(y, case, slots)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", PATTERNS)
def test_cuda_patterns(name, dtype):
    # Tolerances: kernels.TOL (fp16 4e-3, bf16 3e-2 relative; atol 4x that on O(1) values).
    assert dtype in TOL
    _run(PATTERNS[name], dtype=dtype, layout="table", device="cuda", backend="auto")
    _run(PATTERNS[name], dtype=dtype, layout="plain", device="cuda", backend="auto")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_llama_shapes(dtype):
    # 7B-shaped qkv slices, rank 16 in 32 slots, 64 decode rows + a 100-row prefill segment.
    slots = [s % 32 for s in range(64)] + [7] * 100 + [-1] * 5
    _run(slots, in_features=4096, out_sizes=(4096, 1024, 1024), r_max=16, num_slots=32, dtype=dtype,
         layout="plain", device="cuda", backend="auto")


@pytest.mark.gpu
@needs_cuda
def test_cuda_empty_segment():
    batch, slots = batch_with_empty_segment("cuda")
    _run(slots, batch=batch, device="cuda", dtype=torch.bfloat16)
