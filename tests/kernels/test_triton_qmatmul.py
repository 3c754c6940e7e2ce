"""Triton dequantize-matmul (kernels/triton_qmatmul.py) vs the spec (kernels/quant_reference.py):
under the interpreter on CPU (small shapes), and compiled on CUDA (gpu)."""
from __future__ import annotations

import pytest
import torch

from kernels import quant
from kernels.quant_reference import quantized_linear_reference

pytest.importorskip("triton")

FORMATS = ["q8_0", "q4_0", "q4_1", "nf4"]


def _check(fmt, dtype, m, n, k, device, bias=True):
    torch.manual_seed(m * 1000 + n + k)
    qw = quant.quantize(torch.randn(n, k), fmt).to(device)
    x = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(n, device=device).to(dtype) if bias else None
    from kernels import triton_qmatmul

    y = triton_qmatmul.qmatmul(x, qw, b)
    want = quantized_linear_reference(x, qw, b)
    assert y.dtype == dtype and y.shape == (m, n)
    # fp32: summation order only; bf16: the output's rounding (and, compiled, the weight's cast to bf16)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    scale = want.abs().max().item() + 1
    assert (y.float() - want).abs().max().item() <= tol * scale


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interpreter(interpret, fmt, dtype):
    _check(fmt, dtype, m=5, n=37, k=192, device="cpu")


@pytest.mark.parametrize("fmt", ["q4_1", "nf4"])
def test_interpreter_tails_no_bias(interpret, fmt):
    _check(fmt, torch.float32, m=17, n=65, k=64 * 3, device="cpu", bias=False)  # ragged M, N; K not a BLOCK_K multiple for q4


def test_interpreter_k_tail_q8(interpret):
    _check("q8_0", torch.float32, m=1, n=3, k=96, device="cpu")  # K = 96: a 32-wide tail after one 64 step


def test_dispatch_forces_triton_on_cpu(interpret):
    qw = quant.quantize(torch.randn(8, 64), "q8_0")
    x = torch.randn(2, 3, 64)
    y = quant.quantized_linear(x, qw, backend="triton")
    assert y.shape == (2, 3, 8)
    torch.testing.assert_close(y, quantized_linear_reference(x, qw), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 7, 64])
def test_compiled(fmt, dtype, m):
    _check(fmt, dtype, m=m, n=1000, k=2048 + 64, device="cuda")
