"""One test per validation rule: each bad adapter is refused with its specific AdapterError code."""
from __future__ import annotations

import io
import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import save

from adapters.errors import AdapterError
from adapters.spec import MODULES
from adapters.validate import ValidationLimits, check_name, validate_adapter
from tests.adapters.helpers import SPEC, key, make_adapter, make_config, make_tensors, raw_safetensors

LIMITS = ValidationLimits(max_rank=8)


def refuse(code, cfg, weights, filename="adapter_model.safetensors", limits=LIMITS, name="ok"):
    with pytest.raises(AdapterError) as info:
        validate_adapter(name, cfg, weights, SPEC, limits, weights_filename=filename)
    assert info.value.code == code, info.value
    return info.value


def test_good_adapter_scaling_and_shapes():
    cfg, w = make_adapter(r=4, alpha=8)
    a = validate_adapter("good", cfg, w, SPEC, LIMITS)
    assert len(a.weights) == 2 * 7 and a.max_rank == 4 and a.target_modules == MODULES
    w0 = a.weights[(1, "down_proj")]
    assert w0.a.shape == (4, 128) and w0.b.shape == (64, 4) and w0.scaling == 2.0  # alpha / r


@pytest.mark.parametrize("name", ["adapter_model.bin", "model.pt", "x.pth", "x.ckpt"])
def test_pickle_names_refused(name):
    refuse("not_safetensors", make_config(), make_adapter()[1], filename=name)


def test_pickle_and_zip_bytes_refused_unopened():
    buf = io.BytesIO()
    torch.save({"x": torch.zeros(1)}, buf)  # zip container
    refuse("not_safetensors", make_config(), buf.getvalue())
    refuse("not_safetensors", make_config(), pickle.dumps({"x": 1}, protocol=4))


def test_header_too_large():
    cfg, w = make_adapter()
    refuse("header_too_large", cfg, w, limits=ValidationLimits(max_rank=8, header_cap=64))
    refuse("header_too_large", cfg, struct.pack("<Q", 1 << 40) + w[8:])  # longer than the file


def test_bad_header_json():
    refuse("bad_header", make_config(), struct.pack("<Q", 5) + b"{nope")
    refuse("bad_header", make_config(), raw_safetensors({"t": {"dtype": "F32", "shape": [-1]}}, b""))


def _entry(start, end, shape=(1,), dtype="F32"):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [start, end]}


@pytest.mark.parametrize(
    "header,nbytes",
    [
        ({"a": _entry(0, 4), "b": _entry(8, 12)}, 12),  # gap
        ({"a": _entry(0, 8, (2,)), "b": _entry(4, 8)}, 8),  # overlap
        ({"a": _entry(0, 4)}, 8),  # buffer not covered
        ({"a": _entry(0, 8)}, 8),  # shape x dtype != range
        ({"a": _entry(0, 4)}, 2),  # range past the end
    ],
)
def test_bad_offsets(header, nbytes):
    refuse("bad_offsets", make_config(), raw_safetensors(header, bytes(nbytes)))


def test_duplicate_keys():
    a0, a1 = json.dumps(_entry(0, 4)), json.dumps(_entry(4, 8))
    body = f'{{"a": {a0}, "a": {a1}}}'
    refuse("duplicate_key", make_config(), struct.pack("<Q", len(body)) + body.encode() + bytes(8))


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64, torch.int8])
def test_bad_dtype(dtype):
    t = make_tensors(modules=("q_proj",))
    t[key(0, "q_proj", "A")] = t[key(0, "q_proj", "A")].to(dtype)
    refuse("bad_dtype", make_config(modules=("q_proj",)), save(t))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite(value):
    t = make_tensors(modules=("v_proj",))
    t[key(1, "v_proj", "B")][3, 2] = value
    err = refuse("non_finite", make_config(modules=("v_proj",)), save(t))
    assert key(1, "v_proj", "B") in err.message


def test_rank_too_large_from_tensors_and_rank_pattern():
    refuse("rank_too_large", *make_adapter(r=16))
    cfg = make_config(r=4, rank_pattern={"q_proj": 32})
    refuse("rank_too_large", cfg, save(make_tensors(r=4, ranks={"q_proj": 32})))


def test_shape_mismatch_base_dims_and_r():
    t = make_tensors(modules=("k_proj",))
    t[key(0, "k_proj", "B")] = torch.zeros(64, 4)  # k_proj out is 32 (GQA)
    refuse("shape_mismatch", make_config(modules=("k_proj",)), save(t))
    # tensors of rank 4 but the config says r=2
    refuse("shape_mismatch", make_config(r=2, modules=("k_proj",)), save(make_tensors(modules=("k_proj",))))


def test_unknown_module_and_layer():
    t = make_tensors(modules=("q_proj",))
    t[key(2, "q_proj", "A")] = torch.zeros(4, 64)  # the base model has layers 0 and 1
    t[key(2, "q_proj", "B")] = torch.zeros(64, 4)
    err = refuse("unknown_module", make_config(modules=("q_proj",)), save(t))
    assert "layers.2" in err.message and "layers.0" not in err.message
    t = make_tensors(modules=("q_proj",))
    t["base_model.model.model.layers.0.self_attn.rotary.lora_A.weight"] = torch.zeros(4, 64)
    refuse("unknown_module", make_config(modules=("q_proj",)), save(t))
    # tensors for a module the config does not target
    refuse("unknown_module", make_config(modules=("q_proj",)), save(make_tensors(modules=("q_proj", "o_proj"))))


def test_missing_a_or_b():
    t = make_tensors(modules=("o_proj",))
    del t[key(1, "o_proj", "B")]
    err = refuse("missing_weight", make_config(modules=("o_proj",)), save(t))
    assert "layers.1.self_attn.o_proj.lora_B" in err.message


def test_key_count_cap():
    cfg, w = make_adapter()
    refuse("too_many_keys", cfg, w, limits=ValidationLimits(max_rank=8, max_keys=27))


def test_empty_adapter():
    refuse("empty_adapter", make_config(), save({}))


@pytest.mark.parametrize(
    "extra",
    [{"use_dora": True}, {"bias": "all"}, {"modules_to_save": ["lm_head"]}, {"peft_type": "PREFIX_TUNING"},
     {"target_modules": ["embed_tokens", "q_proj"]}, {"trainable_token_indices": [1, 2]}],
)
def test_unsupported_config_features(extra):
    cfg = json.loads(make_config())
    cfg.update(extra)
    refuse("unsupported_feature", json.dumps(cfg).encode(), make_adapter()[1])


def test_unsupported_tensor_features():
    t = make_tensors(modules=("q_proj",))
    t["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(64)  # DoRA
    refuse("unsupported_feature", make_config(modules=("q_proj",)), save(t))


@pytest.mark.parametrize(
    "cfg",
    [b"not json", b"[1, 2]", make_config(r=-1), make_config(r=True), make_config(alpha=float("nan")),
     json.dumps({"r": 4, "target_modules": "(unclosed"}).encode(), json.dumps({"r": 4}).encode(),
     make_config(layers_to_transform="0")],
)
def test_bad_config(cfg):
    refuse("bad_config", cfg, make_adapter()[1])


def test_config_too_large():
    cfg = json.loads(make_config())
    cfg["padding"] = "x" * (64 * 1024)
    refuse("config_too_large", json.dumps(cfg).encode(), make_adapter()[1])


@pytest.mark.parametrize("name", ["", ".hidden", "..", "a/b", "../etc", "x" * 65, "sp ace", "a\\b", "é", None])
def test_bad_names(name):
    refuse("bad_name", *make_adapter(), name=name)
    with pytest.raises(AdapterError):
        check_name(name)


def test_good_names():
    for name in ["a", "my-adapter_v1.2", "x" * 64]:
        assert check_name(name) == name
