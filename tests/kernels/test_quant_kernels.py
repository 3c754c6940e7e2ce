"""C++ CPU quantized matmul (kernels/csrc/qgemm_cpu.cpp through kernels/quant.py) vs the spec:
x @ dequant(W).T in fp32 (kernels/quant_reference.py), for every kept format, odd shapes, K beyond
one 256 chunk, 1..300 rows (the 1-8 row decode paths, the panel GEMM, its 256-column chunks), fp32 and bf16.

Tolerance, per output element, with S = |x| @ |W|.T (the sum a rounding error can scale with):
fp32 |y - ref| <= 1e-5 S (summation order only); bf16 adds the output's one rounding, 2^-8 |ref|.
The int16-activation path (1-8 rows of q8_0/q4_0/q4_1, kernels/csrc/qgemv_i16.cpp) adds its
rounding of x: sum over groups g of (max|x_g| / 32767 / 2) * sum_{k in g} |W_k|."""
from __future__ import annotations

import pytest
import torch

from kernels import cpu_ext, quant
from kernels.quant_reference import quantized_linear_reference

FORMATS = ["q8_0", "q4_0", "q4_1", "nf4"]


@pytest.fixture(scope="module")
def ext():
    module = cpu_ext.load()
    if module is None or not hasattr(module, "quant_linear"):
        pytest.skip(f"C++ ops unavailable: {cpu_ext.status()}")
    return module


def _i16_bound(x, qw):
    """The int16 rounding of x's bound: (max|x_g| / 65534) @ (sum_{k in g} |W_k|).T."""
    m, g = x.shape[0], x.shape[1] // 32
    step = x.float().abs().view(m, g, 32).amax(-1) / 65534
    return step @ qw.dequantize().abs().view(qw.out_features, g, 32).sum(-1).T


def _check(y, x, qw, bias=None, exact=False):
    """exact: fp32 activations (impl 1/2, nf4, more than 8 rows) — no int16 term."""
    want = quantized_linear_reference(x, qw, bias)
    bound = x.float().abs() @ qw.dequantize().abs().T + (bias.float().abs() if bias is not None else 0)
    tol = 1e-5 * bound + 1e-6
    if not exact and qw.format != "nf4" and x.shape[0] <= 8:
        tol = tol + 1.01 * _i16_bound(x, qw)
    if x.dtype == torch.bfloat16:
        tol = tol + want.abs() * 2.0 ** -8
    assert y.dtype == x.dtype and y.shape == want.shape
    err = (y.float() - want).abs()
    assert (err <= tol).all(), f"max err {err.max().item()} (tol there {tol.flatten()[err.argmax()].item()})"


_WEIGHTS: dict = {}


def _weight(fmt, n, k):
    if (fmt, n, k) not in _WEIGHTS:
        torch.manual_seed(n * 7 + k)
        w = torch.randn(n, k) * 0.1
        w[0] = 0.0  # an all-zero row: d = 0 blocks
        _WEIGHTS[fmt, n, k] = quant.quantize(w, fmt)
    return _WEIGHTS[fmt, n, k]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 64, 300])
def test_matches_reference(ext, fmt, dtype, m):
    qw = _weight(fmt, 53, 640)  # 53 rows: panel (24) and tile (3) tails; K = 512 + 128: a second chunk
    x = torch.randn(m, 640).to(dtype)
    _check(quant.quantized_linear(x, qw, backend="cpp"), x, qw)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", [1, 4, 9])
def test_bias_small_k_and_scalar_path(ext, fmt, m):
    k = 64 if fmt == "nf4" else 96
    qw = _weight(fmt, 5, k)
    x, bias = torch.randn(m, k), torch.randn(5)
    _check(quant.quantized_linear(x, qw, bias, backend="cpp"), x, qw, bias)
    xb, bb = x.bfloat16(), bias.bfloat16()
    _check(quant.quantized_linear(xb, qw, bb, backend="cpp"), xb, qw, bb)
    # the portable path (what builds without AVX2) does the same math
    y = ext.quant_linear(x, qw.data, quant._CPP_FORMAT_IDS[fmt], 5, k, *_nf4_args(qw), bias, 1)
    _check(y, x, qw, bias, exact=True)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_int16_activation_path(ext, fmt, m):
    """1-8 rows: impl 0 rounds x to int16 per group (within the stated bound, also with a zero group
    and a 1000x outlier), impl 2 keeps fp32 x (the fp32 bound); the two differ, so impl 0 took its path."""
    qw = _weight(fmt, 53, 640)
    x = torch.randn(m, 640)
    x[:, 32:64] = 0.0
    x[0, 100] = 1000.0
    args = (qw.data, quant._CPP_FORMAT_IDS[fmt], 53, 640, *_nf4_args(qw), None)
    y16, y32 = ext.quant_linear(x, *args, 0), ext.quant_linear(x, *args, 2)
    _check(y16, x, qw)
    _check(y32, x, qw, exact=True)
    if ext.quant_linear_vectorized():
        assert not torch.equal(y16, y32)
        assert (y16 - quantized_linear_reference(x, qw)).abs().max() <= _i16_bound(x, qw).max()


def _nf4_args(qw):
    empty = torch.empty(0, dtype=torch.uint8)
    if qw.format == "nf4":
        return qw.absmax, qw.absmax_scale, qw.absmax_offset, quant.ref.DYNAMIC_MAP
    return empty, empty.float(), 0.0, quant.ref.DYNAMIC_MAP


def test_leading_dims_strided_input_and_empty(ext):
    qw = _weight("q4_1", 53, 640)
    x = torch.randn(2, 3, 1280)[..., ::2]  # non-contiguous rows
    y = quant.quantized_linear(x, qw)
    assert y.shape == (2, 3, 53)
    _check(y.reshape(6, 53), x.reshape(6, 640), qw)
    assert quant.quantized_linear(torch.randn(0, 640), qw).shape == (0, 53)


def test_fp16_falls_back_to_torch(ext):
    qw = _weight("q8_0", 53, 640)
    x = torch.randn(3, 640).half()
    y = quant.quantized_linear(x, qw)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), quantized_linear_reference(x, qw), rtol=2e-2, atol=2e-2)


def test_bad_inputs_rejected(ext):
    qw = _weight("q8_0", 53, 640)
    x = torch.randn(2, 640)
    args = _nf4_args(qw)
    with pytest.raises(RuntimeError, match="columns"):
        ext.quant_linear(torch.randn(2, 608), qw.data, 0, 53, 640, *args)
    with pytest.raises(RuntimeError, match="bytes"):
        ext.quant_linear(x, qw.data[:-1], 0, 53, 640, *args)
    with pytest.raises(RuntimeError, match="unknown quantized format"):
        ext.quant_linear(x, qw.data, 7, 53, 640, *args)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ext.quant_linear(x.half(), qw.data, 0, 53, 640, *args)
    with pytest.raises(RuntimeError, match="nf4 absmax"):
        ext.quant_linear(x, _weight("nf4", 53, 640).data, 3, 53, 640, *args)
    with pytest.raises(ValueError, match="features"):
        quant.quantized_linear(torch.randn(2, 64), qw)
