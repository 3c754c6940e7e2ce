"""The spec of the quantized base-weight formats: plain-torch dequantization, fp32 everywhere.

Every kernel (kernels/csrc/qgemm_cpu.cpp, kernels/triton_qmatmul.py) is tested against these.
A weight W [out, in] is stored row by row; each row is a run of blocks along `in`.

Kept formats (the bytes of a row are exactly the GGUF file's bytes for the first three):
    q8_0  34 bytes / 32 weights: fp16 d, int8 q[32]                 w = q * d
    q4_0  18 bytes / 32 weights: fp16 d, uint8 qs[16]               w = (q - 8) * d
    q4_1  20 bytes / 32 weights: fp16 d, fp16 m, uint8 qs[16]       w = q * d + m
          (q4: element j < 16 is the low nibble of qs[j], element j + 16 its high nibble)
    nf4   bitsandbytes NF4: 32 bytes / 64 weights, element 2j in the HIGH nibble of byte j and
          2j+1 in the low one, w = NF4[q] * absmax[block]; blocks of 64 over the flattened
          weight (= along `in`, which must be a multiple of 64). Double quantization as QLoRA:
          absmax[b] = DYNAMIC[absmax_q[b]] * absmax_scale[b // 256] + absmax_offset.

K-quants (decoded here so that they can be converted at load, see kernels/quant.py), 256 weights
per block: q4_k 144 bytes, q5_k 176 bytes, q6_k 210 bytes, laid out as in ggml.

`quantized_linear_reference(x, qweight)` = x @ dequant(W).T in fp32.
"""
from __future__ import annotations

import torch

# bitsandbytes' NF4 code (quantiles of N(0, 1) normalized to [-1, 1], with an exact zero).
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=torch.float32)


def _dynamic_map_signed() -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (Dettmers 2016): for each decade 10^-6..10^0, the
    midpoints of 2^i + 1 points spread linearly over [0.1, 1] scaled to that decade, both signs,
    plus 0 and 1; 256 values sorted ascending."""
    values: list[float] = []
    for i in range(7):
        edges = torch.linspace(0.1, 1.0, 2 ** i + 1)
        mids = (edges[:-1] + edges[1:]) / 2
        values += (10.0 ** (i - 6) * mids).tolist() + (-(10.0 ** (i - 6)) * mids).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_MAP = _dynamic_map_signed()

# format -> (weights per block, bytes per block)
BLOCKS = {"q8_0": (32, 34), "q4_0": (32, 18), "q4_1": (32, 20), "nf4": (64, 32),
          "q4_k": (256, 144), "q5_k": (256, 176), "q6_k": (256, 210)}
NF4_DQ_BLOCK = 256  # absmax values per second-level scale


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """[..., 2] uint8 -> [..., 1] float32 from little-endian fp16 bytes."""
    return raw.contiguous().view(torch.float16).float()


def _blocks(raw: torch.Tensor, fmt: str) -> torch.Tensor:
    """[rows, nb * block_bytes] uint8 -> [rows, nb, block_bytes]."""
    return raw.reshape(raw.shape[0], -1, BLOCKS[fmt][1])


def _nibbles_lo_hi(qs: torch.Tensor) -> torch.Tensor:
    """[..., 16] uint8 -> [..., 32] int32: the 16 low nibbles, then the 16 high nibbles (ggml order)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1).to(torch.int32)


def dequantize_q8_0(raw: torch.Tensor) -> torch.Tensor:
    b = _blocks(raw, "q8_0")  # [rows, nb, 34]
    q = b[..., 2:].contiguous().view(torch.int8).float()
    return (q * _f16(b[..., 0:2])).reshape(raw.shape[0], -1)


def dequantize_q4_0(raw: torch.Tensor) -> torch.Tensor:
    b = _blocks(raw, "q4_0")  # [rows, nb, 18]
    q = (_nibbles_lo_hi(b[..., 2:]) - 8).float()
    return (q * _f16(b[..., 0:2])).reshape(raw.shape[0], -1)


def dequantize_q4_1(raw: torch.Tensor) -> torch.Tensor:
    b = _blocks(raw, "q4_1")  # [rows, nb, 20]
    q = _nibbles_lo_hi(b[..., 4:]).float()
    return (_f16(b[..., 0:2]) * q + _f16(b[..., 2:4])).reshape(raw.shape[0], -1)


def nf4_absmax(absmax_q: torch.Tensor, absmax_scale: torch.Tensor, absmax_offset: float) -> torch.Tensor:
    """The per-64-block absmax from its double quantization: [nblocks] float32."""
    idx = torch.arange(absmax_q.numel()) // NF4_DQ_BLOCK
    return DYNAMIC_MAP[absmax_q.long()] * absmax_scale.float()[idx] + absmax_offset


def dequantize_nf4(packed: torch.Tensor, absmax_q: torch.Tensor, absmax_scale: torch.Tensor,
                   absmax_offset: float) -> torch.Tensor:
    """packed [rows, in/2] uint8 (high nibble first) -> [rows, in] float32."""
    rows = packed.shape[0]
    q = torch.stack([packed >> 4, packed & 0x0F], dim=-1).reshape(-1).long()  # flattened weight order
    w = NF4_CODE[q].reshape(-1, 64) * nf4_absmax(absmax_q, absmax_scale, absmax_offset)[:, None]
    return w.reshape(rows, -1)


def _kquant_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins, [..., 8] each (ggml's packing)."""
    s = scales.to(torch.int32)
    sc = torch.cat([s[..., 0:4] & 63, (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)], dim=-1)
    mn = torch.cat([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], dim=-1)
    return sc.float(), mn.float()


def dequantize_q4_k(raw: torch.Tensor) -> torch.Tensor:
    b = _blocks(raw, "q4_k")  # [rows, nb, 144]: d, dmin, scales[12], qs[128]
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    sc, mn = _kquant_scale_min(b[..., 4:16])
    qs = b[..., 16:].reshape(*b.shape[:2], 4, 1, 32)  # 4 chunks of 32 bytes -> 2 sub-blocks each
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-2).reshape(*b.shape[:2], 8, 32).float()
    return ((d * sc)[..., None] * q - (dmin * mn)[..., None]).reshape(raw.shape[0], -1)


def dequantize_q5_k(raw: torch.Tensor) -> torch.Tensor:
    b = _blocks(raw, "q5_k")  # [rows, nb, 176]: d, dmin, scales[12], qh[32], qs[128]
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    sc, mn = _kquant_scale_min(b[..., 4:16])
    qh, qs = b[..., 16:48], b[..., 48:].reshape(*b.shape[:2], 4, 1, 32)
    ql = torch.cat([qs & 0x0F, qs >> 4], dim=-2).reshape(*b.shape[:2], 8, 32)
    hi = torch.stack([(qh >> i) & 1 for i in range(8)], dim=-2)  # [rows, nb, 8, 32]: bit i -> sub-block i
    q = (ql | (hi << 4)).float()
    return ((d * sc)[..., None] * q - (dmin * mn)[..., None]).reshape(raw.shape[0], -1)


def dequantize_q6_k(raw: torch.Tensor) -> torch.Tensor:
    b = _blocks(raw, "q6_k")  # [rows, nb, 210]: ql[128], qh[64], scales[16] int8, d
    ql = b[..., :128].reshape(*b.shape[:2], 2, 1, 64)
    ql = torch.cat([ql & 0x0F, ql >> 4], dim=-2).reshape(*b.shape[:2], 8, 32)
    qh = b[..., 128:192].reshape(*b.shape[:2], 2, 1, 32)
    qh = torch.cat([(qh >> s) & 3 for s in (0, 2, 4, 6)], dim=-2).reshape(*b.shape[:2], 8, 32)
    q = ((ql | (qh << 4)).to(torch.int32) - 32).float().reshape(*b.shape[:2], 16, 16)
    scales = b[..., 192:208].contiguous().view(torch.int8).float()
    d = _f16(b[..., 208:210])
    return ((d * scales)[..., None] * q).reshape(raw.shape[0], -1)


DEQUANTIZE_BLOCKS = {"q8_0": dequantize_q8_0, "q4_0": dequantize_q4_0, "q4_1": dequantize_q4_1,
                     "q4_k": dequantize_q4_k, "q5_k": dequantize_q5_k, "q6_k": dequantize_q6_k}


def dequantize_weight(qweight) -> torch.Tensor:
    """A kernels.quant.QuantizedWeight (duck-typed) -> float32 [out, in] on its device."""
    if qweight.format == "nf4":
        dev = qweight.data.device
        return dequantize_nf4(qweight.data.cpu(), qweight.absmax.cpu(), qweight.absmax_scale.cpu(),
                              qweight.absmax_offset).to(dev)
    return DEQUANTIZE_BLOCKS[qweight.format](qweight.data)


def quantized_linear_reference(x: torch.Tensor, qweight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ dequant(W).T (+ bias), computed in float32 (returned as float32)."""
    y = x.float() @ dequantize_weight(qweight).to(x.device).T
    return y + bias.float() if bias is not None else y
