"""Synthetic adapters: the hand-written safetensors parses with the `safetensors` library."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load as load_numpy

from loadtest.synthetic import make_adapter, write_safetensors
from tests.loadtest.stub_server import BASE_INFO, PROJECTIONS


def test_adapter_files_parse_with_safetensors(tmp_path):
    config, weights = make_adapter(BASE_INFO, rank=4, seed=1, base_model_name="stub-base")
    cfg = json.loads(config)
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["bias"] == "none"
    assert sorted(cfg["target_modules"]) == sorted(PROJECTIONS)
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(weights)
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        assert len(keys) == 2 * 7 * 2  # layers x modules x (A, B)
        q_a = f.get_tensor("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight")
        down_b = f.get_tensor("base_model.model.model.layers.0.mlp.down_proj.lora_B.weight")
        assert f.metadata() == {"format": "pt"}
    assert q_a.dtype == torch.float16 and tuple(q_a.shape) == (4, 16)  # [r, in]
    assert tuple(down_b.shape) == (16, 4)  # [out, r]
    for key in keys:
        module = key.split(".")[-3]
        d_in, d_out = PROJECTIONS[module]
        with safe_open(str(path), framework="pt") as f:
            shape = tuple(f.get_tensor(key).shape)
        assert shape == ((4, d_in) if "lora_A" in key else (d_out, 4))
        assert (".self_attn." in key) == (module in ("q_proj", "k_proj", "v_proj", "o_proj"))
    values = torch.cat([t.flatten().float() for t in load_numpy_to_torch(weights).values()])
    assert torch.isfinite(values).all() and 0.005 < values.std() < 0.015  # N(0, 0.01)


def load_numpy_to_torch(blob: bytes) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v.astype(np.float32)) for k, v in load_numpy(blob).items()}


def test_seeded_and_subset_of_modules():
    a = make_adapter(BASE_INFO, 2, seed=5, target_modules=("q_proj", "v_proj"), dtype="F32")
    assert a == make_adapter(BASE_INFO, 2, seed=5, target_modules=("q_proj", "v_proj"), dtype="F32")
    assert a != make_adapter(BASE_INFO, 2, seed=6, target_modules=("q_proj", "v_proj"), dtype="F32")
    tensors = load_numpy(a[1])
    assert {k.split(".")[-3] for k in tensors} == {"q_proj", "v_proj"}
    assert all(v.dtype == np.float32 for v in tensors.values())


def test_write_safetensors_roundtrip_values():
    arrays = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "y": np.array([1.5, -2.0], dtype=np.float16)}
    back = load_numpy(write_safetensors(arrays))
    assert np.array_equal(back["x"], arrays["x"]) and np.array_equal(back["y"], arrays["y"])
    with pytest.raises(ValueError, match="dtype"):
        write_safetensors({"z": np.zeros(2, dtype=np.int64)})


def test_bad_requests_raise_value_error():
    with pytest.raises(ValueError, match="max LoRA rank"):
        make_adapter(BASE_INFO, rank=32, seed=0)
    with pytest.raises(ValueError, match="target modules"):
        make_adapter(BASE_INFO, rank=2, seed=0, target_modules=("lm_head",))
    with pytest.raises(ValueError, match="description"):
        make_adapter({"num_layers": 2}, rank=2, seed=0)
