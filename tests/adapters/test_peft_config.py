"""adapter_config.json parsing: our pattern matching agrees with peft's own functions."""
from __future__ import annotations

import json

import pytest

from adapters.peft_config import parse_adapter_config
from adapters.spec import MODULES, module_path

PATHS = [module_path(layer, m) for layer in range(4) for m in MODULES]
CONFIGS = [
    {"target_modules": ["q_proj", "v_proj"]},
    {"target_modules": r".*\.(q|k)_proj"},
    {"target_modules": r"model\.layers\.[13]\.mlp\..*"},
    {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": [1, 3]},
    {"target_modules": ["o_proj"], "layers_to_transform": 2, "layers_pattern": "layers"},
    {"target_modules": ["q_proj", "k_proj", "gate_proj"], "exclude_modules": ["k_proj"]},
    {"target_modules": ["self_attn.q_proj", "mlp.up_proj"]},
]
PATTERNS = [
    {"rank_pattern": {"q_proj": 8, r"layers\.1\.mlp\.down_proj": 2}, "alpha_pattern": {"v_proj": 3.0}},
    {"rank_pattern": {r"^model.layers.0.self_attn.q_proj": 6}, "alpha_pattern": {r"(gate|up)_proj": 32}},
]


@pytest.mark.parametrize("raw", CONFIGS)
def test_target_matching_agrees_with_peft(raw):
    from peft import LoraConfig as PeftLoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    ours = parse_adapter_config(json.dumps({"r": 4, "lora_alpha": 8, **raw}).encode())
    theirs = PeftLoraConfig(r=4, lora_alpha=8, **raw)
    for path in PATHS:
        expect = check_target_module_exists(theirs, path)
        expect = bool(expect) and type(expect).__name__ != "_ExcludedModule"
        assert ours.targets(path) == expect, path


@pytest.mark.parametrize("raw", PATTERNS)
def test_rank_and_alpha_patterns_agree_with_peft(raw):
    from peft.utils.other import get_pattern_key

    ours = parse_adapter_config(json.dumps({"r": 4, "lora_alpha": 8, "target_modules": "all-linear", **raw}).encode())
    for path in PATHS:
        rk = get_pattern_key(raw["rank_pattern"].keys(), path)
        ak = get_pattern_key(raw["alpha_pattern"].keys(), path)
        assert ours.rank_for(path) == raw["rank_pattern"].get(rk, 4), path
        assert ours.alpha_for(path) == raw["alpha_pattern"].get(ak, 8), path
        r = ours.rank_for(path)
        assert ours.scaling_for(path, r) == pytest.approx(ours.alpha_for(path) / r)


def test_rslora_scaling():
    cfg = parse_adapter_config(b'{"r": 16, "lora_alpha": 8, "use_rslora": true, "target_modules": ["q_proj"]}')
    assert cfg.scaling_for(module_path(0, "q_proj"), 16) == pytest.approx(2.0)  # 8 / sqrt(16)
