"""Hand-built PEFT-format adapters for the adapter tests (fast: no peft / transformers import)."""
from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import save

from adapters.spec import MODULES, BaseModelSpec, module_path

# Tiny GQA Llama: hidden 64, 4 heads x 16, 2 KV heads, MLP 128, 2 layers.
SPEC = BaseModelSpec(
    num_layers=2,
    module_dims={
        "q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
        "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64),
    },
)


def key(layer: int, module: str, ab: str) -> str:
    return f"base_model.model.{module_path(layer, module)}.lora_{ab}.weight"


def make_tensors(spec=SPEC, r=4, modules=MODULES, layers=None, dtype=torch.float32, seed=0, ranks=None):
    """{key: tensor} for random non-zero A [r, in] / B [out, r]; `ranks` overrides r per module."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in layers if layers is not None else range(spec.num_layers):
        for m in modules:
            rm = (ranks or {}).get(m, r)
            d_in, d_out = spec.module_dims[m]
            out[key(layer, m, "A")] = (torch.randn(rm, d_in, generator=g) * 0.1).to(dtype)
            out[key(layer, m, "B")] = (torch.randn(d_out, rm, generator=g) * 0.1).to(dtype)
    return out


def make_config(r=4, alpha=8, modules=MODULES, **extra) -> bytes:
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(modules),
           "bias": "none", "use_rslora": False, "fan_in_fan_out": False, **extra}
    return json.dumps(cfg).encode()


def make_adapter(r=4, alpha=8, modules=MODULES, seed=0, **kw) -> tuple[bytes, bytes]:
    """(adapter_config.json bytes, adapter_model.safetensors bytes) of a valid adapter."""
    return make_config(r, alpha, modules), save(make_tensors(r=r, modules=modules, seed=seed, **kw))


def raw_safetensors(header: dict, data: bytes, length: int | None = None) -> bytes:
    """A safetensors buffer from a hand-written header (for malformed-file tests)."""
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h) if length is None else length) + h + data
