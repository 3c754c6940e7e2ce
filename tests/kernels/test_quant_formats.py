"""The quantized formats' spec (kernels/quant_reference.py) and constructors (kernels/quant.py)
against independent references: gguf's own numpy (de)quantizers, bitsandbytes when it is installed,
and NF4 / double-quantization vectors worked out by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels import quant
from kernels import quant_reference as ref

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402
from gguf.quants import quantize as gguf_quantize  # noqa: E402

KEPT = {"q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1}
KQ = {"q4_k": T.Q4_K, "q5_k": T.Q5_K, "q6_k": T.Q6_K}


@pytest.mark.parametrize("fmt", KEPT)
@pytest.mark.parametrize("rows,cols", [(1, 32), (7, 96), (13, 160)])
def test_gguf_blocks_dequantize_like_gguf(fmt, rows, cols):
    w = np.random.default_rng(rows * cols).standard_normal((rows, cols)).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero block (d = 0)
    raw = gguf_quantize(w, KEPT[fmt])
    qw = quant.from_gguf_blocks(fmt.upper(), raw, (rows, cols))
    assert qw.data.data_ptr() != torch.from_numpy(raw).data_ptr()  # owns its bytes
    assert torch.equal(qw.data, torch.from_numpy(raw))  # kept byte for byte
    assert torch.equal(qw.dequantize(), torch.from_numpy(gguf_dequantize(raw, KEPT[fmt])))
    assert qw.nbytes == rows * cols // 32 * ref.BLOCKS[fmt][1]
    # our quantizer is ggml's, bit for bit
    assert torch.equal(quant.quantize(torch.from_numpy(w), fmt).data, torch.from_numpy(raw))


def test_int8_int4_are_q8_0_q4_1():
    w = torch.randn(5, 64)
    assert quant.quantize(w, "int8").format == "q8_0" and quant.quantize(w, "int4").format == "q4_1"
    assert quant.quantize(w, "int8").bits_per_weight == 8.5 and quant.quantize(w, "int4").bits_per_weight == 5.0


def test_q4_nibble_order_by_hand():
    # one Q4_0 block: d = 1.0 (fp16 0x3C00), qs[0] = 0x21: element 0 = 1 - 8, element 16 = 2 - 8
    block = bytes([0x00, 0x3C, 0x21] + [0x88] * 15)
    w = quant.from_gguf_blocks("q4_0", block, (1, 32)).dequantize()[0]
    assert w[0] == -7 and w[16] == -6 and w[1:16].eq(0).all() and w[17:].eq(0).all()
    # Q4_1: d = 0.5, m = -1.0 (fp16 0xBC00): q = 3 (low), 15 (high)
    block = bytes([0x00, 0x38, 0x00, 0xBC, 0xF3] + [0x00] * 15)
    w = quant.from_gguf_blocks(3, block, (1, 32)).dequantize()[0]  # 3 = GGML_TYPE_Q4_1
    assert w[0] == 0.5 and w[16] == 6.5 and w[1] == -1.0


def _random_kquant_blocks(fmt, rows, nblocks, rng):
    bb = ref.BLOCKS[fmt][1]
    raw = rng.integers(0, 256, (rows, nblocks, bb), dtype=np.uint8)
    d = (rng.standard_normal((rows, nblocks, 1)) * 0.01).astype(np.float16).view(np.uint8)
    dmin = (np.abs(rng.standard_normal((rows, nblocks, 1))) * 0.01).astype(np.float16).view(np.uint8)
    if fmt == "q6_k":
        raw[..., 208:210] = d
    else:
        raw[..., 0:2], raw[..., 2:4] = d, dmin
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("fmt", KQ)
def test_kquant_decoding_matches_gguf(fmt):
    rng = np.random.default_rng(1)
    raw = _random_kquant_blocks(fmt, 3, 2, rng)
    want = torch.from_numpy(gguf_dequantize(raw, KQ[fmt]))
    assert torch.equal(ref.DEQUANTIZE_BLOCKS[fmt](torch.from_numpy(raw)), want)
    qw, err = quant.convert_kquant(KQ[fmt], raw, (3, 512))
    assert qw.format == quant.KQUANT_TARGET[fmt] and qw.shape == (3, 512)
    diff = qw.dequantize() - want
    assert err.max_abs == pytest.approx(diff.abs().max().item())
    assert err.rel_rms == pytest.approx((diff.norm() / want.norm()).item())
    assert err.rel_rms < (0.1 if qw.format == "q4_1" else 0.01)


def test_nf4_tables():
    code = ref.NF4_CODE
    assert code.numel() == 16 and code[0] == -1 and code[7] == 0 and code[15] == 1
    assert (code[1:] > code[:-1]).all()
    dyn = ref.DYNAMIC_MAP
    assert dyn.numel() == 256 and (dyn[1:] > dyn[:-1]).all()
    assert dyn[127] == 0 and dyn[255] == 1
    assert dyn[128].item() == pytest.approx(0.55e-6)  # smallest magnitude: 1e-6 * mean(0.1, 1.0)
    assert dyn[0].item() == pytest.approx(-(1 - 0.9 / 64 / 2))  # largest negative: the midpoint below 1


def test_nf4_by_hand():
    # two 64-blocks of one row: block 0 has absmax 2, block 1 absmax 1
    w = torch.zeros(1, 128)
    w[0, 0], w[0, 1], w[0, 2], w[0, 3] = 2.0, -2.0, 1.0, 0.0  # /2 -> 1, -1, 0.5 (nearest 0.4407 = code 12), 0
    w[0, 64] = -1.0
    qw = quant.quantize(w, "nf4")
    # element 2j in the high nibble of byte j: (15, 0) -> 0xF0, (12, 7) -> 0xC7; zeros are code 7
    assert qw.data[0, 0] == 0xF0 and qw.data[0, 1] == 0xC7 and qw.data[0, 2] == 0x77
    assert qw.data[0, 32] == 0x07  # element 64 = -1 -> code 0 in the high nibble, element 65 = 0 -> 7
    # double quantization: offset = mean(2, 1) = 1.5; centered (0.5, -0.5) over one 256-group, scale 0.5;
    # +1 -> map index 255 (1.0), -1 -> index 0 (-0.99296875: the map has no -1)
    assert qw.absmax_offset == 1.5 and qw.absmax_scale.tolist() == [0.5]
    assert qw.absmax.tolist() == [255, 0]
    d = qw.dequantize()[0]
    assert d[0] == 2.0 and d[1] == -2.0 and d[2].item() == pytest.approx(2 * 0.44070982933044434)
    assert d[64].item() == pytest.approx(-(1.5 - 0.5 * 0.99296875), rel=1e-6)
    assert qw.nbytes == 64 + 2 + 4


def test_nf4_bytes_per_weight():
    qw = quant.quantize(torch.randn(64, 4096), "nf4")  # 4096 absmax values: 16 second-level scales
    assert qw.nbytes == 64 * 4096 // 2 + 4096 + 16 * 4
    assert qw.bits_per_weight == pytest.approx(4 + 8 / 64 + 32 / (64 * 256))


def test_nf4_matches_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(24, 320)
    q, st = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(st.state2.code.cpu(), ref.DYNAMIC_MAP)
    theirs = quant.QuantizedWeight("nf4", q.reshape(24, 160), 24, 320, st.absmax, st.state2.absmax, float(st.offset))
    assert torch.equal(theirs.dequantize(), bnb.dequantize_4bit(q, st))
    ours = quant.quantize(w, "nf4")
    assert (ours.data == theirs.data).float().mean() > 0.999 and (ours.absmax == theirs.absmax).float().mean() > 0.99
    torch.testing.assert_close(ours.absmax_scale, theirs.absmax_scale)


@pytest.mark.parametrize("call,match", [
    (lambda: quant.from_gguf_blocks("q8_0", bytes(33), (1, 32)), "truncated"),
    (lambda: quant.from_gguf_blocks("q8_0", bytes(68), (1, 48)), "multiple of the block size"),
    (lambda: quant.from_gguf_blocks("q5_0", bytes(22), (1, 32)), "unsupported"),
    (lambda: quant.from_gguf_blocks("q4_k", bytes(144), (1, 256)), "convert_kquant"),
    (lambda: quant.from_gguf_blocks(99, bytes(34), (1, 32)), "unsupported GGML type"),
    (lambda: quant.from_gguf_blocks("q8_0", np.zeros(34, np.int8), (1, 32)), "uint8"),
    (lambda: quant.quantize(torch.randn(4, 96), "nf4"), "multiple of the block size 64"),
    (lambda: quant.quantize(torch.randn(4, 64), "fp8"), "unsupported quantization"),
    (lambda: quant.quantize(torch.full((1, 32), float("nan")), "int8"), "non-finite"),
    (lambda: quant.convert_kquant("q8_0", bytes(34), (1, 32)), "convert_kquant takes"),
    (lambda: quant.QuantizedWeight("q8_0", torch.zeros(2, 33, dtype=torch.uint8), 2, 32), "data must be uint8"),
    (lambda: quant.QuantizedWeight("nf4", torch.zeros(1, 32, dtype=torch.uint8), 1, 64), "absmax"),
])
def test_bad_inputs_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert "\n" not in str(info.value)
