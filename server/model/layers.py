"""Small elementwise layers of the Llama block: RMSNorm (with the residual add) and SiLU-and-mul.

Both follow Hugging Face numerics exactly: RMSNorm normalises in fp32 and casts back to the input
dtype before the weight multiply; SiLU-and-mul splits a fused `gate|up` projection output. They are
modules so that a faster implementation can be substituted at build time (the fused CPU ops of
server/model/cpu_ops.py subclass them) without a branch here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = weight * (x / sqrt(mean(x^2) + eps)), statistics in fp32 (as `LlamaRMSNorm`)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm on the fp32 copy is h * rsqrt(mean(h^2) + eps) in one op (was five)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    def residual_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x); with no residual yet (first layer): (norm(x), x)."""
        residual = x if residual is None else residual + x
        return self(residual), residual


class SiluAndMul(nn.Module):
    """[T, 2*I] (gate | up) -> [T, I] = silu(gate) * up."""

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
