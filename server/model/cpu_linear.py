"""CPU inference linears with weights pre-packed once for oneDNN (what Inductor's CPU freezing does).

`F.linear` on the CPU goes through MKL (fp32) or oneDNN (bf16) and re-lays-out the weight on every
call; a weight packed once into oneDNN's blocked format skips that. Measured here on decode-sized
inputs (32 rows x SmolLM2 projections, weights cold in cache, see docs/bench-engine-*.json): fp32
2.3-3.7x faster, bf16 about 1.3x faster, with the same results (bf16 bit-identical, fp32 equal up to
summation order). Once the C++ ops (kernels/cpu_ext.py) are loaded, the packed copy is in the
panel layout of our own GEMMs instead: AVX512-BF16 for bf16 (kernels/csrc/gemm_bf16.cpp: 1.4-1.7x
oneDNN's pre-packed linear at 32 rows with cold weights, at least as fast up to 2048 rows) and
AVX-512 FMA for fp32 (kernels/csrc/gemm_f32.cpp: a step's linears 21 vs 30 ms at 32 rows); same
math (fp32 accumulation, bf16 rounded once), different summation order. `LORAMUX_CPU_GEMM=0` keeps
oneDNN.

`PackedLinear` is an `nn.Linear` (same parameters, same `state_dict`, so training, HF export and the
LoRA wrappers are unchanged) that keeps a packed copy of its weight (extra memory: one more copy of
each linear weight) and uses it only when no autograd graph is being recorded; it re-packs if the
weight was changed in place. `prepack_linears(model)` swaps one in for every CPU `nn.Linear`,
unless the extra copy would take more than half of the memory available right now (then it logs why
and packs nothing). Set `LORAMUX_CPU_PREPACK=0` to turn it off.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from kernels import cpu_ext

_PACKABLE = (torch.float32, torch.bfloat16)
log = logging.getLogger("loramux.model")


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None (unknown: no limit is applied)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _bf16_packable() -> bool:
    """oneDNN packs bf16 weights only with AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT; our own bf16 GEMM
    needs AVX512-BF16. On an AVX2-only CPU bf16 linears stay plain `nn.Linear`s."""
    ext = cpu_ext.loaded()
    if ext is not None and own_gemm_enabled() and ext.bf16_gemm_available():
        return True
    avx512 = getattr(torch.cpu, "_is_avx512_supported", None)
    return bool(avx512()) if avx512 is not None else True


def prepack_supported(device: torch.device, dtype: torch.dtype) -> bool:
    return (device.type == "cpu" and dtype in _PACKABLE and torch.backends.mkldnn.is_available()
            and os.environ.get("LORAMUX_CPU_PREPACK", "1") != "0"
            and (dtype != torch.bfloat16 or _bf16_packable()))


_linear_pointwise = torch.ops.mkldnn._linear_pointwise


def own_gemm_enabled() -> bool:
    return os.environ.get("LORAMUX_CPU_GEMM", "1") != "0"


def _own_gemm(w: torch.Tensor):
    """(C++ ops module, kind) when `w` should use one of our GEMMs — "bf16_gemm" (AVX512-BF16, even
    in_features) or "f32_gemm" (AVX-512) — with the module already loaded and not turned off; else None."""
    if w.dim() != 2 or not own_gemm_enabled():
        return None
    ext = cpu_ext.loaded()
    if ext is None:
        return None
    if w.dtype == torch.bfloat16 and w.shape[1] % 2 == 0 and ext.bf16_gemm_available():
        return ext, "bf16_gemm"
    if w.dtype == torch.float32 and ext.f32_gemm_available():
        return ext, "f32_gemm"
    return None


class PackedLinear(nn.Linear):
    """`nn.Linear` whose inference forward runs on a pre-packed weight: our GEMMs
    (kernels/csrc/gemm_bf16.cpp, gemm_f32.cpp) when the C++ ops are loaded, oneDNN's pre-packed
    linear otherwise."""

    def __init__(self, base: nn.Linear, batch_hint: int = 32):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # shared Parameters: tying survives
        self.batch_hint = batch_hint
        self._packed: torch.Tensor | None = None
        self._packed_version = -1
        self.kind = "onednn"  # or "bf16_gemm" / "f32_gemm": which packed layout `_packed` holds

    def packed_weight(self) -> torch.Tensor:
        """The packed copy of the weight, re-packed first if the weight was edited in place;
        `self.kind` says which layout it is in (the C++ decode loop reads both)."""
        w = self.weight
        # Inference tensors (made under torch.inference_mode) keep no version counter: packed once.
        version = -2 if w.is_inference() else w._version
        if self._packed is None or self._packed_version != version:
            with torch.no_grad():
                own = _own_gemm(w)
                if own is not None:
                    ext, self.kind = own
                    pack = ext.pack_bf16_weight if self.kind == "bf16_gemm" else ext.pack_f32_weight
                    self._packed = pack(w.detach())
                else:
                    self.kind = "onednn"
                    self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), self.batch_hint)
            self._packed_version = version
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if torch.is_grad_enabled() or x.dtype != w.dtype or x.device.type != "cpu" or x.dim() < 2:
            return F.linear(x, w, self.bias)
        packed = self._packed  # the repack check of packed_weight(), inlined: this runs ~120 times per step
        if packed is None or self._packed_version != (-2 if w.is_inference() else w._version):
            packed = self.packed_weight()
        if self.kind != "onednn":
            x2 = x if x.dim() == 2 and x.stride(-1) == 1 else x.reshape(-1, x.shape[-1]).contiguous()
            ext = cpu_ext.loaded()
            gemm = ext.bf16_gemm if self.kind == "bf16_gemm" else ext.f32_gemm
            y = gemm(x2, packed, self.out_features, self.bias)
            return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)
        return _linear_pointwise(x, packed, self.bias, "none", [], "")


def prepack_linears(model: nn.Module, batch_hint: int = 32, available: int | None = -1) -> int:
    """Replace every CPU fp32/bf16 `nn.Linear` of `model` with a `PackedLinear` (packed now, so the
    first step does not pay for it); returns how many were replaced. Idempotent. `available`: bytes
    of free memory (-1: read it from the system; None: no limit)."""
    targets = [(parent, name, child) for parent in list(model.modules())
               for name, child in list(parent.named_children())
               if type(child) is nn.Linear and prepack_supported(child.weight.device, child.weight.dtype)]
    extra = sum(w.numel() * w.element_size() for w in {id(c.weight): c.weight for _, _, c in targets}.values())
    if available == -1:
        available = available_memory_bytes()
    if targets and available is not None and extra > available // 2:
        log.warning("not pre-packing linear weights: the packed copy needs %.1f GiB, %.1f GiB available",
                    extra / 2**30, available / 2**30)
        return 0
    for parent, name, child in targets:
        packed = PackedLinear(child, batch_hint)
        packed.packed_weight()
        setattr(parent, name, packed)
    return len(targets)
