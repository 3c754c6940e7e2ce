"""Quantized base weights kept quantized in memory: the weight object, its constructors, the matmul.

    QuantizedWeight                    one [out, in] weight in a kept format (q8_0, q4_0, q4_1, nf4)
    from_gguf_blocks(fmt, raw, shape)  a GGUF tensor's blocks, kept byte for byte
    quantize(weight, fmt)              at load, from a float weight: "int8" (= q8_0: symmetric groups
                                       of 32), "int4" (= q4_1: asymmetric groups of 32), "nf4"
                                       (bitsandbytes NF4, blocks of 64, double-quantized absmax),
                                       or q8_0 / q4_0 / q4_1 directly (ggml's rounding, bit-exact)
    convert_kquant(fmt, raw, shape)    GGUF K-quant blocks (q4_k, q5_k, q6_k) decoded (the spec in
                                       kernels/quant_reference.py, equal to gguf's dequantize) and
                                       requantized to a kept format; returns the error for the log
    quantized_linear(x, qw, bias)      y = x @ W.T (+ bias) in x's dtype: the C++ CPU kernels
                                       (kernels/csrc/qgemm_cpu.cpp) when loaded, Triton on CUDA,
                                       else dequantize then F.linear

Formats and bytes per weight (see kernels/quant_reference.py for the exact layouts):
q8_0 34/32 = 1.0625, q4_0 18/32 = 0.5625, q4_1 20/32 = 0.625, nf4 0.5 + 1/64 + 4/(64*256) = 0.5159.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from kernels import cpu_ext
from kernels import quant_reference as ref

FORMATS = ("q8_0", "q4_0", "q4_1", "nf4")
ALIASES = {"int8": "q8_0", "int4": "q4_1"}
KQUANTS = ("q4_k", "q5_k", "q6_k")
KQUANT_TARGET = {"q4_k": "q4_1", "q5_k": "q8_0", "q6_k": "q8_0"}  # nearest kept format, no fewer bits
_GGML_TYPE_IDS = {2: "q4_0", 3: "q4_1", 8: "q8_0", 12: "q4_k", 13: "q5_k", 14: "q6_k"}
_CPP_FORMAT_IDS = {"q8_0": 0, "q4_0": 1, "q4_1": 2, "nf4": 3}


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A weight W [out_features, in_features] in a kept format.

    data: uint8 [out, in / block * block_bytes] (q8_0/q4_0/q4_1: the GGUF blocks of each row) or
    uint8 [out, in / 2] (nf4: bitsandbytes' packing, high nibble first). nf4 only: absmax (uint8
    [out * in / 64]), absmax_scale (float32 [ceil(out * in / 64 / 256)]), absmax_offset."""

    format: str
    data: torch.Tensor
    out_features: int
    in_features: int
    absmax: torch.Tensor | None = None
    absmax_scale: torch.Tensor | None = None
    absmax_offset: float = 0.0

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"unsupported quantized format {self.format!r} (kept: {', '.join(FORMATS)})")
        block, nbytes = ref.BLOCKS[self.format]
        out, inf = self.out_features, self.in_features
        if out <= 0 or inf <= 0 or inf % block:
            raise ValueError(f"{self.format}: in_features {inf} is not a positive multiple of the block size {block}")
        expect = (out, inf // block * nbytes)
        if self.data.dtype != torch.uint8 or tuple(self.data.shape) != expect:
            raise ValueError(f"{self.format}: data must be uint8 {list(expect)}, got {self.data.dtype} {list(self.data.shape)}")
        if self.format == "nf4":
            nb = out * inf // block
            ns = math.ceil(nb / ref.NF4_DQ_BLOCK)
            if self.absmax is None or self.absmax.dtype != torch.uint8 or self.absmax.numel() != nb:
                raise ValueError(f"nf4: absmax must be uint8 with {nb} values")
            if self.absmax_scale is None or self.absmax_scale.dtype != torch.float32 or self.absmax_scale.numel() != ns:
                raise ValueError(f"nf4: absmax_scale must be float32 with {ns} values")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def nbytes(self) -> int:
        """Bytes held in memory (all tensors)."""
        return sum(t.numel() * t.element_size() for t in (self.data, self.absmax, self.absmax_scale) if t is not None)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / (self.out_features * self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W [out, in] in `dtype` (computed in float32 by the spec, then cast)."""
        return ref.dequantize_weight(self).to(dtype)

    def to(self, device) -> QuantizedWeight:
        move = (lambda t: None if t is None else t.to(device))
        return replace(self, data=move(self.data), absmax=move(self.absmax), absmax_scale=move(self.absmax_scale))


@dataclass(frozen=True)
class QuantError:
    """How far a (re)quantized weight is from the float weight it was made from."""

    max_abs: float
    rel_rms: float  # ||W_q - W|| / ||W|| (Frobenius)


def quant_error(reference: torch.Tensor, qweight: QuantizedWeight) -> QuantError:
    w = reference.float()
    diff = qweight.dequantize().to(w.device) - w
    norm = w.norm().item()
    return QuantError(max_abs=diff.abs().max().item(), rel_rms=diff.norm().item() / norm if norm else 0.0)


def _format_name(fmt) -> str:
    """'Q8_0', 'q8_0', a GGML type id (8) or gguf's GGMLQuantizationType -> 'q8_0'."""
    if isinstance(fmt, int) and not hasattr(fmt, "name"):
        if fmt not in _GGML_TYPE_IDS:
            raise ValueError(f"unsupported GGML type id {fmt}")
        return _GGML_TYPE_IDS[fmt]
    name = str(getattr(fmt, "name", fmt)).lower()
    return ALIASES.get(name, name)


def _raw_rows(fmt: str, raw, shape) -> tuple[torch.Tensor, int, int]:
    """File bytes -> uint8 [out, row_bytes], validating the count. `shape` is (out, in), torch order
    (GGUF lists dims innermost first: pass them reversed)."""
    if len(shape) != 2 or any(int(s) <= 0 for s in shape):
        raise ValueError(f"{fmt}: shape must be (out_features, in_features), got {tuple(shape)}")
    out, inf = (int(s) for s in shape)
    block, nbytes = ref.BLOCKS[fmt]
    if inf % block:
        raise ValueError(f"{fmt}: in_features {inf} is not a multiple of the block size {block}")
    if isinstance(raw, (bytes, bytearray, memoryview)):
        t = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    else:
        t = torch.as_tensor(raw)
        if t.dtype != torch.uint8:
            raise ValueError(f"{fmt}: raw blocks must be uint8 bytes, got {t.dtype}")
    t = t.reshape(-1)
    need = out * (inf // block) * nbytes
    if t.numel() != need:
        raise ValueError(f"{fmt}: {t.numel()} bytes for shape {out}x{inf}, expected {need} (truncated or wrong shape)")
    return t.reshape(out, need // out), out, inf


def from_gguf_blocks(fmt, raw, shape) -> QuantizedWeight:
    """A GGUF Q8_0 / Q4_0 / Q4_1 tensor's bytes (numpy/torch uint8 or bytes), kept exactly."""
    name = _format_name(fmt)
    if name in KQUANTS:
        raise ValueError(f"{name} blocks have no kernel: convert them with convert_kquant()")
    if name not in ("q8_0", "q4_0", "q4_1"):
        raise ValueError(f"unsupported GGUF block type {name!r} (kept: q8_0, q4_0, q4_1)")
    rows, out, inf = _raw_rows(name, raw, shape)
    return QuantizedWeight(name, rows.clone(), out, inf)


def _round_away(v: torch.Tensor) -> torch.Tensor:
    """C roundf: halves away from zero (what ggml uses)."""
    return torch.sign(v) * torch.floor(v.abs() + 0.5)


def _inv(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


def _f16_bytes(v: torch.Tensor) -> torch.Tensor:
    """[..., 1] float32 -> [..., 2] uint8 of its fp16."""
    return v.to(torch.float16).view(torch.uint8)


def _pack_lo_hi(q: torch.Tensor) -> torch.Tensor:
    """[..., 32] 0..15 -> [..., 16] uint8: element j in the low nibble, j + 16 in the high one."""
    q = q.to(torch.uint8)
    return q[..., :16] | (q[..., 16:] << 4)


def _quantize_ggml(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """float32 [out, in] -> uint8 blocks [out, in/32 * block_bytes], as ggml's reference quantizers."""
    b = w.reshape(w.shape[0], -1, 32)  # [out, nb, 32]
    if fmt == "q8_0":
        d = b.abs().amax(-1, keepdim=True) / 127
        q = _round_away(b * _inv(d)).to(torch.int8).view(torch.uint8)
        parts = [_f16_bytes(d), q]
    elif fmt == "q4_0":
        amax = torch.gather(b, -1, b.abs().argmax(-1, keepdim=True))  # signed value of largest magnitude
        d = amax / -8
        q = torch.trunc(b * _inv(d) + 8.5).clamp(0, 15)
        parts = [_f16_bytes(d), _pack_lo_hi(q)]
    else:  # q4_1
        lo, hi = b.amin(-1, keepdim=True), b.amax(-1, keepdim=True)
        d = (hi - lo) / 15
        q = torch.trunc((b - lo) * _inv(d) + 0.5).clamp(0, 15)
        parts = [_f16_bytes(d), _f16_bytes(lo), _pack_lo_hi(q)]
    return torch.cat(parts, dim=-1).reshape(w.shape[0], -1)


def _nearest(values: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of the sorted `code` for each value."""
    mids = (code[1:] + code[:-1]) / 2
    return torch.bucketize(values.contiguous(), mids)


def _quantize_nf4(w: torch.Tensor) -> QuantizedWeight:
    out, inf = w.shape
    blocks = w.reshape(-1, 64)
    absmax = blocks.abs().amax(-1)
    q = _nearest(blocks * _inv(absmax)[:, None], ref.NF4_CODE).to(torch.uint8).reshape(-1, 2)
    packed = ((q[:, 0] << 4) | q[:, 1]).reshape(out, inf // 2)  # element 2j in the high nibble
    # double quantization (QLoRA): absmax minus its mean, blocks of 256, dynamic 8-bit map
    offset = absmax.mean()
    centered = absmax - offset
    nb = centered.numel()
    pad = (-nb) % ref.NF4_DQ_BLOCK
    groups = F.pad(centered, (0, pad)).reshape(-1, ref.NF4_DQ_BLOCK)
    scale = groups.abs().amax(-1)
    absmax_q = _nearest(groups * _inv(scale)[:, None], ref.DYNAMIC_MAP).to(torch.uint8).reshape(-1)[:nb]
    return QuantizedWeight("nf4", packed.contiguous(), out, inf, absmax_q.contiguous(), scale.float().contiguous(),
                           float(offset.item()))


def quantize(weight: torch.Tensor, fmt: str) -> QuantizedWeight:
    """A float weight [out, in] -> a kept format ("int8", "int4", "nf4", "q8_0", "q4_0", "q4_1"),
    on the CPU (quantize once at load, then `.to(device)`)."""
    name = _format_name(fmt)
    if name not in FORMATS:
        raise ValueError(f"unsupported quantization {fmt!r} (int8, int4, nf4, q8_0, q4_0, q4_1)")
    if weight.dim() != 2:
        raise ValueError(f"quantize expects a 2-D weight, got shape {list(weight.shape)}")
    block = ref.BLOCKS[name][0]
    if weight.shape[1] % block or weight.shape[0] == 0:
        raise ValueError(f"{name}: in_features {weight.shape[1]} is not a multiple of the block size {block}")
    w = weight.detach().float().cpu().contiguous()
    if not torch.isfinite(w).all():
        raise ValueError(f"{name}: the weight has non-finite values")
    if name == "nf4":
        return _quantize_nf4(w)
    return QuantizedWeight(name, _quantize_ggml(w, name), w.shape[0], w.shape[1])


def convert_kquant(fmt, raw, shape, target: str | None = None) -> tuple[QuantizedWeight, QuantError]:
    """GGUF K-quant blocks -> a kept format (default KQUANT_TARGET: q4_k -> q4_1, q5_k/q6_k -> q8_0),
    and the error against the file's own dequantization."""
    name = _format_name(fmt)
    if name not in KQUANTS:
        raise ValueError(f"convert_kquant takes {', '.join(KQUANTS)}, got {name!r}")
    rows, out, inf = _raw_rows(name, raw, shape)
    w = ref.DEQUANTIZE_BLOCKS[name](rows)
    qw = quantize(w, target or KQUANT_TARGET[name])
    return qw, quant_error(w, qw)


def _cpp_linear(ext, x2: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    empty = x2.new_empty(0, dtype=torch.uint8)
    nf4 = qw.format == "nf4"
    return ext.quant_linear(x2, qw.data, _CPP_FORMAT_IDS[qw.format], qw.out_features, qw.in_features,
                            qw.absmax if nf4 else empty,
                            qw.absmax_scale if nf4 else empty.float(), qw.absmax_offset,
                            ref.DYNAMIC_MAP, bias)


def quantized_linear(x: torch.Tensor, qweight: QuantizedWeight, bias: torch.Tensor | None = None,
                     backend: str = "auto") -> torch.Tensor:
    """y [..., out] = x [..., in] @ W.T (+ bias), in x's dtype, fp32 accumulation.
    backend: "auto", or force "cpp" / "triton" / "torch" (dequantize then F.linear)."""
    if x.shape[-1] != qweight.in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {qweight.in_features}")
    lead = x.shape[:-1]
    if backend in ("auto", "cpp") and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16):
        ext = cpu_ext.loaded()
        if ext is not None and hasattr(ext, "quant_linear"):
            x2 = x.reshape(-1, x.shape[-1])
            if x2.stride(-1) != 1:
                x2 = x2.contiguous()
            b = None if bias is None else bias.to(x.dtype).contiguous()
            return _cpp_linear(ext, x2, qweight, b).view(*lead, qweight.out_features)
        if backend == "cpp":
            raise RuntimeError(f"the C++ CPU kernels are not loaded ({cpu_ext.status()})")
    if backend in ("auto", "triton") and x.device.type == "cuda" or backend == "triton":
        from kernels import triton_qmatmul  # triton only where it can run

        return triton_qmatmul.qmatmul(x, qweight, bias)
    return F.linear(x, qweight.dequantize(x.dtype).to(x.device), bias)
