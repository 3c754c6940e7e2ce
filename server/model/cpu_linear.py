"""CPU inference linears with weights pre-packed once for oneDNN (what Inductor's CPU freezing does).

`F.linear` on the CPU goes through MKL (fp32) or oneDNN (bf16) and re-lays-out the weight on every
call; a weight packed once into oneDNN's blocked format skips that. Measured here on decode-sized
inputs (32 rows x SmolLM2 projections, weights cold in cache, see docs/bench-engine-*.json): fp32
2.3-3.7x faster, bf16 about 1.3x faster, with the same results (bf16 bit-identical, fp32 equal up to
summation order).

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

from server.model.tracked import Tracked

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


def prepack_supported(device: torch.device, dtype: torch.dtype) -> bool:
    return (device.type == "cpu" and dtype in _PACKABLE and torch.backends.mkldnn.is_available()
            and os.environ.get("LORAMUX_CPU_PREPACK", "1") != "0")


_linear_pointwise = torch.ops.mkldnn._linear_pointwise


class PackedLinear(Tracked, nn.Linear):
    """`nn.Linear` whose inference forward runs oneDNN on a pre-packed weight."""

    def __init__(self, base: nn.Linear, batch_hint: int = 32):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # shared Parameters: tying survives
        self.batch_hint = batch_hint
        self._packed: torch.Tensor | None = None
        self._packed_version = -1

    def _pack(self) -> torch.Tensor:
        w = self.weight
        # Inference tensors (made under torch.inference_mode) keep no version counter: packed once.
        version = -2 if w.is_inference() else w._version
        if self._packed is None or self._packed_version != version:
            with torch.no_grad():
                self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), self.batch_hint)
            self._packed_version = version
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if torch.is_grad_enabled() or x.dtype != w.dtype or x.device.type != "cpu" or x.dim() < 2:
            return F.linear(x, w, self.bias)
        packed = self._packed  # the repack check of _pack(), inlined: this runs ~120 times per step
        if packed is None or self._packed_version != (-2 if w.is_inference() else w._version):
            packed = self._pack()
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
        packed._pack()
        setattr(parent, name, packed)
    return len(targets)
