"""What the loaders hand over for quantized base weights: kept file blocks, or a float weight to quantize.

The loaders are model math (they never reach `kernels`): they only decide, per HF weight name, what
each linear's weight should become, and leave the doing to the substitution step of the engine
builder (server/model/quant_linear.py, which owns the formats through kernels/quant.py):

    QuantBlocks(format, data, out, in)   GGUF q8_0 / q4_0 / q4_1 blocks kept byte for byte
                                         (uint8 [out, row_bytes], rows in HF order: un-permuted)
    QuantSource(format, weight)          a float32 weight [out, in] to quantize at load: HF weights
                                         under `--quantize int8|int4|nf4`, GGUF K-quants (the
                                         file's own dequantization, converted to the nearest kept
                                         format; the conversion error is logged against it)

`--quantize`: "auto" keeps a GGUF file's own q8_0/q4_0/q4_1 blocks (K-quants converted) and leaves
HF weights as they are; "none" dequantizes everything as before; "int8" (= q8_0), "int4" (= q4_1),
"nf4" (QLoRA: the embeddings and the LM head stay in the compute dtype) quantize at load.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

QUANTIZE_MODES = ("auto", "none", "int8", "int4", "nf4")
KEPT = ("q8_0", "q4_0", "q4_1")  # GGUF block types kept as stored
MODE_FORMAT = {"int8": "q8_0", "int4": "q4_1", "nf4": "nf4"}
# GGUF K-quants -> the nearest kept format with no fewer bits (kernels/quant.py KQUANT_TARGET; a test checks)
KQUANT_TARGET = {"q4_k": "q4_1", "q5_k": "q8_0", "q6_k": "q8_0"}
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20}  # per 32 weights
FORMAT_BITS = {"q4_0": 4.5, "nf4": 4.13, "q4_1": 5.0, "q8_0": 8.5}


@dataclass(frozen=True, eq=False)
class QuantBlocks:
    """A GGUF tensor's blocks, kept: data uint8 [out_features, in_features / 32 * block bytes]."""

    format: str
    data: torch.Tensor
    out_features: int
    in_features: int

    def __post_init__(self):
        if self.format not in KEPT:
            raise ValueError(f"kept blocks must be one of {KEPT}, got {self.format!r}")
        want = (self.out_features, self.in_features // 32 * BLOCK_BYTES[self.format])
        if self.in_features % 32 or tuple(self.data.shape) != want or self.data.dtype != torch.uint8:
            raise ValueError(f"{self.format} blocks of shape {list(self.data.shape)} do not make "
                             f"{self.out_features}x{self.in_features}")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)


@dataclass(frozen=True, eq=False)
class QuantSource:
    """A float32 weight [out, in] to quantize to `format` at load; `note` says where it came from
    (e.g. "q4_k" for a converted K-quant tensor, whose conversion error is then logged)."""

    format: str
    weight: torch.Tensor
    note: str = ""

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)


def check_mode(quantize: str) -> str:
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"--quantize must be one of {', '.join(QUANTIZE_MODES)}, got {quantize!r}")
    return quantize


def placeholder(shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """A NaN weight of `shape` holding one element (a zero-stride view): stands in for a quantized
    weight in the float model until the builder substitutes the quantized module; a model run
    without that substitution gives NaN, never plausible output."""
    return torch.full((), float("nan"), dtype=dtype).expand(*shape)


def fuse_quant(parts: list[QuantBlocks | QuantSource]) -> QuantBlocks | QuantSource:
    """q|k|v or gate|up parts (all blocks of one format, or all float sources of one format) -> one."""
    first = parts[0]
    if isinstance(first, QuantBlocks):
        assert all(isinstance(p, QuantBlocks) and p.format == first.format for p in parts), "mixed fused group"
        data = torch.cat([p.data for p in parts], dim=0)
        return QuantBlocks(first.format, data, data.shape[0], first.in_features)
    assert all(isinstance(p, QuantSource) and p.format == first.format for p in parts), "mixed fused group"
    notes = sorted({p.note for p in parts if p.note})
    return QuantSource(first.format, torch.cat([p.weight for p in parts], dim=0), "+".join(notes))
