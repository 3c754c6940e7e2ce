"""Issue #16: settings that were constants are flags (--max-cpu-adapters, --gpu-memory-utilization,
--max-num-batched-tokens) reaching the engine's config objects, and --max-adapters-per-batch
defaults to a count derived from memory (one slot per batch row, slot buffers <= 10% of memory)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from adapters.spec import BaseModelSpec
from server.engine.builder import auto_adapter_slots, engine_configs, slot_bytes
from server.settings import ServerSettings
from tests.server.api.test_cli import ROOT

# SmolLM2-135M: 30 layers, hidden 576, intermediate 1536, 3 KV heads x 64
SMOL = BaseModelSpec(30, {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192),
                          "o_proj": (576, 576), "gate_proj": (576, 1536), "up_proj": (576, 1536),
                          "down_proj": (1536, 576)})


def test_flags_reach_the_engine_configs():
    s = ServerSettings.from_args(["--max-cpu-adapters", "5", "--gpu-memory-utilization", "0.5",
                                  "--max-num-batched-tokens", "512", "--max-adapters-per-batch", "3"])
    sched, cache, lora = engine_configs(s)
    assert sched.max_num_batched_tokens == 512 and cache.memory_fraction == 0.5
    assert lora.host_cache_size == 5 and lora.max_slots == 3
    s = ServerSettings.from_args([], env={"LORAMUX_MAX_CPU_ADAPTERS": "2", "LORAMUX_MAX_ADAPTERS_PER_BATCH": "auto"})
    assert s.max_adapters_per_batch is None
    sched, cache, lora = engine_configs(s, adapter_slots=40)
    assert lora.max_slots == 40 and lora.host_cache_size == 40  # the host tier holds at least the slots
    for bad in (["--gpu-memory-utilization", "0"], ["--gpu-memory-utilization", "1.5"], ["--max-cpu-adapters", "0"],
                ["--max-num-batched-tokens", "8", "--max-batch-size", "16"], ["--max-adapters-per-batch", "0"]):
        with pytest.raises(ValueError, match=bad[0]):
            ServerSettings.from_args(bad)


def test_auto_adapter_slots_from_memory():
    per_slot = slot_bytes(SMOL, 16, 4)
    assert per_slot == 30 * 16 * 4 * (1152 + 768 + 768 + 1152 + 2112 * 3)  # 19.5 MB in fp32
    assert auto_adapter_slots(SMOL, 16, 4, 24 << 30, 64) == 64  # 24 GiB host: one per batch row
    assert auto_adapter_slots(SMOL, 16, 4, 24 << 30, 256) == int((24 << 30) * 0.10) // per_slot
    assert auto_adapter_slots(SMOL, 16, 4, 1 << 20, 64) == 1  # never 0


def test_help_shows_the_flags():
    out = subprocess.run([sys.executable, "-m", "server", "serve", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60).stdout
    text = " ".join(out.split())
    for flag in ("--max-cpu-adapters", "--gpu-memory-utilization", "--max-num-batched-tokens", "--prefix-caching",
                 "--max-model-len"):
        assert flag in text
    assert "auto: one slot per batch row" in text and "10% of the device's memory" in text


def test_prefix_caching_and_max_model_len_flags(caplog):
    from server.engine.builder import resolve_max_model_len

    sched, cache, _ = engine_configs(ServerSettings.from_args(["--prefix-caching", "off", "--max-model-len", "300"]))
    assert cache.enable_prefix_caching is False and sched.max_model_len == 300
    sched, cache, _ = engine_configs(ServerSettings.from_args([]))
    assert cache.enable_prefix_caching is True and sched.max_model_len is None  # auto
    for bad in (["--prefix-caching", "maybe"], ["--max-model-len", "1"]):
        with pytest.raises(ValueError, match=bad[0]):
            ServerSettings.from_args(bad)
    # auto: the model's context, lowered with a warning to what the KV cache holds
    assert resolve_max_model_len(None, 8192, 65536) == 8192
    with caplog.at_level("WARNING", logger="loramux.engine"):
        assert resolve_max_model_len(None, 8192, 4096) == 4096
    assert "lowered from the model's context (8192)" in caplog.text
    assert resolve_max_model_len(1000, 8192, 4096) == 1000
    with pytest.raises(ValueError, match="exceeds the model's context"):
        resolve_max_model_len(9000, 8192, 65536)
    with pytest.raises(ValueError, match="exceeds what the KV cache holds"):
        resolve_max_model_len(5000, 8192, 4096)


def test_attention_cost_len_from_the_model_shape():
    from server.engine.builder import attention_cost_len
    from server.model.config import ModelConfig

    smol = ModelConfig(architecture="LlamaForCausalLM", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                       num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64)
    assert attention_cost_len(smol) == 3072.0  # 2 x 3,538,944 weights / (4 x 9 heads x 64)
