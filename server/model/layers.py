"""Small elementwise layers of the Llama block: RMSNorm and SiLU-and-mul.

Both follow Hugging Face numerics exactly: RMSNorm normalises in fp32 and casts back to the input
dtype before the weight multiply; SiLU-and-mul splits a fused `gate|up` projection output.
Given `ops` (the fused CPU ops of kernels/cpu_ext.py, inference only) each is one C++ call with the
same numerics; `RMSNorm.residual_norm` then also does the residual add in place.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from server.model.tracked import Tracked


class RMSNorm(Tracked):
    """y = weight * (x / sqrt(mean(x^2) + eps)), statistics in fp32 (as `LlamaRMSNorm`)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm on the fp32 copy is h * rsqrt(mean(h^2) + eps) in one op (was five)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    def residual_norm(self, x: torch.Tensor, residual: torch.Tensor | None, ops=None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x); with no residual yet (first layer): (norm(x), x).
        With `ops` the sum is written into `residual` in place (one call for add and norm)."""
        if ops is None:
            residual = x if residual is None else residual + x
            return self(residual), residual
        out = torch.empty_like(x)
        ops.rms_norm(out, x, self.weight, self.eps, residual)
        return out, x if residual is None else residual


def silu_and_mul(gate_up: torch.Tensor, ops=None) -> torch.Tensor:
    """[T, 2*I] (gate | up) -> [T, I] = silu(gate) * up."""
    if ops is not None:
        out = gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)
        ops.silu_and_mul(out, gate_up)
        return out
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
