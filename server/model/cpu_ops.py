"""Switch a model's decode step onto the fused CPU ops (kernels/csrc/model_cpu.cpp).

`enable_cpu_ops(model)` builds (or loads the cached) extension of kernels/cpu_ext.py and sets
`model.model.cpu_ops`; from then on, while no autograd graph is recorded, each decoder layer runs
its norms (with the residual add), rotary, SiLU-and-mul, KV write and decode attention as one C++
call each, with the torch formulations' numerics. Returns False (the torch path stays) when the
model is not on the CPU, is not a float/bf16/fp16 model, or the build is disabled or failed
(`LORAMUX_CPU_KERNEL=0`, no compiler): the reason is in `kernels.cpu_ext.status()`.
"""
from __future__ import annotations

import torch
from torch import nn

from kernels import cpu_ext

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def enable_cpu_ops(model: nn.Module) -> bool:
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "cpu_ops"):
        return False
    p = next(model.parameters())
    if p.device.type != "cpu" or p.dtype not in SUPPORTED_DTYPES:
        return False
    ext = cpu_ext.load()
    inner.cpu_ops = ext
    return ext is not None


def disable_cpu_ops(model: nn.Module) -> None:
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "cpu_ops"):
        inner.cpu_ops = None
