"""Device and dtype resolution for the model runtime.

`resolve_device` turns "auto"|"cpu"|"cuda" into a `torch.device`; `resolve_dtype` picks the weight
and activation dtype for that device: bf16 on CUDA, bf16 on CPUs with native bf16 matmul
(avx512_bf16 / amx_bf16), else fp32. Both raise ValueError on bad user input.
"""
from __future__ import annotations

import functools

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda when available else cpu; 'cuda' without a GPU -> ValueError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        return torch.device(name)
    raise ValueError(f"unknown device {name!r} (expected auto, cpu or cuda)")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when /proc/cpuinfo advertises avx512_bf16 or amx_bf16 (bf16 matmul in hardware)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> bf16 on CUDA or bf16-capable CPUs, else fp32; fp16 on CPU -> ValueError."""
    if name == "auto":
        if device.type == "cuda" or cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r} (expected auto, float32, bfloat16 or float16)")
    dtype = _DTYPES[name]
    if dtype == torch.float16 and device.type == "cpu":
        raise ValueError("float16 is not supported on CPU; use bfloat16 or float32")
    return dtype


def synchronize(device: torch.device) -> None:
    """Wait for queued work on `device` (CUDA); a no-op on the CPU. For timing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
