"""Rotary position embeddings with Hugging Face semantics (rotate_half, non-interleaved halves).

`RotaryEmbedding(cfg)` computes `inv_freq` and the attention scaling exactly as
`transformers.modeling_rope_utils` does for the rope types default, linear, dynamic, llama3 and yarn,
and keeps a cos/sin cache `[max_position_embeddings, head_dim]` (fp32, scaled) per device.
Per step: `cos_sin(positions, max_seq_len, dtype)` gathers `[T, head_dim]` rows for the step's
positions; `apply_rotary(x [T, heads, D], cos, sin)` rotates queries or keys.

`dynamic` (NTK) follows HF: within max_position_embeddings it equals default; when the longest
sequence of the step (`max_seq_len`, a host int) exceeds it, the base is rescaled for that length.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from server.model.config import ModelConfig


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    # int64 arange then float, as HF does, so the values match bit for bit.
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))


def compute_inv_freq(cfg: ModelConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim/2] fp32 on CPU, attention_scaling) for `cfg` (HF `ROPE_INIT_FUNCTIONS`)."""
    dim, base = cfg.head_dim, cfg.rope_theta
    sc = cfg.rope_scaling or {}
    rope_type = sc.get("rope_type", "default")
    if rope_type == "default":
        return _base_inv_freq(base, dim), 1.0
    factor = float(sc["factor"])
    if rope_type == "linear":
        return _base_inv_freq(base, dim) / factor, 1.0
    if rope_type == "dynamic":
        max_pos = cfg.max_position_embeddings
        seq_len = max(seq_len or max_pos, max_pos)
        base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim), 1.0
    if rope_type == "llama3":
        inv_freq = _base_inv_freq(base, dim)
        low, high = float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
        old_ctx = sc.get("original_max_position_embeddings", cfg.max_position_embeddings)
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(cfg, sc, factor)
    raise ValueError(f"unsupported rope type {rope_type!r}")


def _yarn_inv_freq(cfg: ModelConfig, sc: dict, factor: float) -> tuple[torch.Tensor, float]:
    dim, base = cfg.head_dim, cfg.rope_theta
    orig_max = sc.get("original_max_position_embeddings", cfg.max_position_embeddings)

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = sc.get("attention_factor")
    mscale, mscale_all_dim = sc.get("mscale"), sc.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = sc.get("beta_fast") or 32
    beta_slow = sc.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(orig_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if sc.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp, as HF does
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extra_factor = 1 - ramp
    inv_freq = interpolation * (1 - extra_factor) + extrapolation * extra_factor
    return inv_freq, float(attention_factor)


def _cos_sin_table(inv_freq: torch.Tensor, scaling: float, positions: torch.Tensor) -> torch.Tensor:
    """positions [N] -> [N, 2, head_dim] fp32 (cos, sin), HF's `cat((freqs, freqs))` layout."""
    freqs = positions[:, None].float() * inv_freq.to(positions.device)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return torch.stack((emb.cos() * scaling, emb.sin() * scaling), dim=1)


class RotaryEmbedding(nn.Module):
    """Cached cos/sin for positions < max_position_embeddings; computed on the fly beyond."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.is_dynamic = (cfg.rope_scaling or {}).get("rope_type") == "dynamic"
        with torch.device("cpu"):  # the model may be built under a meta-device context
            self.inv_freq, self.scaling = compute_inv_freq(cfg)
        self._cache: dict[torch.device, torch.Tensor] = {}  # device -> [max_pos, 2, head_dim] fp32

    def _table(self, device: torch.device) -> torch.Tensor:
        table = self._cache.get(device)
        if table is None:
            pos = torch.arange(self.cfg.max_position_embeddings, device=device)
            table = self._cache[device] = _cos_sin_table(self.inv_freq, self.scaling, pos)
        return table

    def cos_sin(self, positions: torch.Tensor, max_seq_len: int, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] int64 -> (cos, sin) each [T, head_dim] in `dtype`.

        `max_seq_len` is a host int (longest context in the step): no device sync is needed to
        decide between the cache and the on-the-fly path.
        """
        if max_seq_len <= self.cfg.max_position_embeddings:
            rows = self._table(positions.device)[positions]
        else:
            inv_freq, scaling = self.inv_freq, self.scaling
            if self.is_dynamic:
                inv_freq, scaling = compute_inv_freq(self.cfg, seq_len=max_seq_len)
            rows = _cos_sin_table(inv_freq, scaling, positions)
        return rows[:, 0].to(dtype), rows[:, 1].to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D], cos/sin [T, D] -> rotated x [T, heads, D] (same dtype)."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    return x * cos + rotate_half(x) * sin
