"""Rotary frequencies vs `transformers.modeling_rope_utils`, config parsing, device/dtype choice."""
from __future__ import annotations

import pytest
import torch

from server.model.config import ModelConfig
from server.model.device import resolve_device, resolve_dtype
from server.model.errors import ModelLoadError
from server.model.rope import RotaryEmbedding, compute_inv_freq

SCALINGS = [
    None,
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 16,
     "mscale": 1.0, "mscale_all_dim": 0.5},
]


def _pair(scaling):
    from transformers import LlamaConfig

    rope = {"rope_theta": 50000.0, **(scaling or {"rope_type": "default"})}
    hf = LlamaConfig(vocab_size=32, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=64, num_hidden_layers=1, max_position_embeddings=256,
                     rope_parameters=rope)
    ours = ModelConfig.from_hf_dict({**hf.to_dict(), "architectures": ["LlamaForCausalLM"]})
    return hf, ours


@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: (s or {}).get("rope_type", "default"))
def test_inv_freq_matches_hf(scaling):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg, cfg = _pair(scaling)
    rope_type = hf_cfg.rope_parameters["rope_type"]
    for seq_len in (None, 1000):  # 1000 > max_position_embeddings: only `dynamic` depends on it
        ours, our_scale = compute_inv_freq(cfg, seq_len=seq_len)
        if rope_type == "default":
            ref = 1.0 / (50000.0 ** (torch.arange(0, 64, 2, dtype=torch.float) / 64))
            ref_scale = 1.0
        else:
            ref, ref_scale = ROPE_INIT_FUNCTIONS[rope_type](hf_cfg, "cpu", seq_len=seq_len)
        torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=0)
        assert our_scale == pytest.approx(ref_scale)


def test_dynamic_rescales_only_beyond_max_positions():
    _, cfg = _pair({"rope_type": "dynamic", "factor": 2.0})
    rope = RotaryEmbedding(cfg)
    pos = torch.tensor([0, 5, 200])
    cos_in, _ = rope.cos_sin(pos, 201, torch.float32)
    cos_default, _ = RotaryEmbedding(_pair(None)[1]).cos_sin(pos, 201, torch.float32)
    torch.testing.assert_close(cos_in, cos_default)
    cos_out, _ = rope.cos_sin(pos, 1000, torch.float32)
    inv, _ = compute_inv_freq(cfg, seq_len=1000)
    torch.testing.assert_close(cos_out[2, :32], torch.cos(200 * inv))
    assert not torch.allclose(cos_out[2], cos_in[2])


def test_config_validation():
    base = dict(architecture="LlamaForCausalLM", vocab_size=10, hidden_size=8, intermediate_size=16,
                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=4)
    assert ModelConfig(**base).projection_dims()["o_proj"] == (8, 8)
    with pytest.raises(ModelLoadError, match="multiple"):
        ModelConfig(**{**base, "num_key_value_heads": 3})
    with pytest.raises(ModelLoadError, match="FalconForCausalLM"):
        ModelConfig.from_hf_dict({"architectures": ["FalconForCausalLM"]})
    with pytest.raises(ModelLoadError, match="longrope"):
        ModelConfig(**base, rope_scaling={"rope_type": "longrope", "factor": 2.0})
    qwen = ModelConfig.from_hf_dict({"architectures": ["Qwen2ForCausalLM"], "vocab_size": 10, "hidden_size": 8,
                                     "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                                     "eos_token_id": [3, 4], "rope_theta": 1e6})
    assert qwen.attention_bias and not qwen.o_proj_bias and qwen.eos_token_ids == (3, 4)
    assert qwen.rope_theta == 1e6 and qwen.head_dim == 4 and qwen.num_key_value_heads == 2


def test_device_and_dtype():
    cpu = resolve_device("cpu")
    assert cpu.type == "cpu"
    assert resolve_dtype("float32", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype("auto", cpu) in (torch.bfloat16, torch.float32)
    with pytest.raises(ValueError):
        resolve_dtype("float16", cpu)
    with pytest.raises(ValueError):
        resolve_dtype("int8", cpu)
    with pytest.raises(ValueError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError):
            resolve_device("cuda")
        assert resolve_device("auto").type == "cpu"
