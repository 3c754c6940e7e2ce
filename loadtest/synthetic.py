"""Synthetic PEFT LoRA adapters built without torch or peft: a config and a hand-written safetensors.

Data flow: the server's base-model description (GET /v1/models -> `loramux` block: num_layers,
projections {name: [in, out]}) + rank + seed -> `make_adapter(...)` -> (adapter_config.json
bytes, adapter_model.safetensors bytes), ready for POST /v1/adapters.

Safetensors layout (https://github.com/huggingface/safetensors): an 8-byte little-endian header
length N, then N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}} (offsets
relative to the byte buffer that follows), then the raw little-endian tensor bytes.
"""
from __future__ import annotations

import json
import struct

import numpy as np

ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_ATTN = {"q_proj", "k_proj", "v_proj", "o_proj"}
_DTYPES = {"F16": np.float16, "F32": np.float32}


def write_safetensors(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    """Serialize numpy arrays (float16 / float32) into safetensors bytes."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    blobs, offset = [], 0
    for name, arr in tensors.items():
        code = next((k for k, v in _DTYPES.items() if arr.dtype == v), None)
        if code is None:
            raise ValueError(f"{name}: unsupported dtype {arr.dtype}")
        raw = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # pad so the data starts 8-byte aligned, as the reference writer does
    return struct.pack("<Q", len(head)) + head + b"".join(blobs)


def module_key(layer: int, module: str, which: str) -> str:
    """PEFT's key for one LoRA factor, e.g. base_model.model.model.layers.3.mlp.up_proj.lora_B.weight."""
    block = "self_attn" if module in _ATTN else "mlp"
    return f"base_model.model.model.layers.{layer}.{block}.{module}.lora_{which}.weight"


def parse_base_info(info: dict) -> tuple[int, dict[str, tuple[int, int]]]:
    """(num_layers, {module: (in, out)}) from the server's `loramux` base-model description."""
    try:
        layers = int(info["num_layers"])
        projections = {str(k): (int(v[0]), int(v[1])) for k, v in info["projections"].items()}
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ValueError(f"the server's base-model description lacks layers/projections ({e})") from None
    if layers < 1 or not projections:
        raise ValueError("the server's base-model description has no layers or projections")
    return layers, projections


def make_adapter(
    base_info: dict,
    rank: int,
    seed: int,
    *,
    target_modules: tuple[str, ...] = ALL_MODULES,
    dtype: str = "F16",
    std: float = 0.01,
    base_model_name: str = "",
) -> tuple[bytes, bytes]:
    """(adapter_config.json, adapter_model.safetensors) of a random rank-`rank` LoRA."""
    if rank < 1:
        raise ValueError("--rank must be >= 1")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}")
    max_rank = base_info.get("max_lora_rank")
    if max_rank and rank > int(max_rank):
        raise ValueError(f"--rank {rank} exceeds the server's max LoRA rank {max_rank}")
    layers, projections = parse_base_info(base_info)
    missing = [m for m in target_modules if m not in projections]
    if missing or not target_modules:
        raise ValueError(f"target modules {missing or '[]'} not among the server's projections {sorted(projections)}")
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for layer in range(layers):
        for module in target_modules:
            d_in, d_out = projections[module]
            # PEFT layout: lora_A is [r, in], lora_B is [out, r].
            tensors[module_key(layer, module, "A")] = rng.normal(0.0, std, (rank, d_in)).astype(_DTYPES[dtype])
            tensors[module_key(layer, module, "B")] = rng.normal(0.0, std, (d_out, rank)).astype(_DTYPES[dtype])
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(target_modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name,
        "fan_in_fan_out": False,
        "use_rslora": False,
    }
    weights = write_safetensors(tensors, metadata={"format": "pt"})
    return json.dumps(config, indent=2).encode(), weights
