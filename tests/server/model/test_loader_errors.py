"""Loader failures surface as one-line `ModelLoadError`s, never raw tracebacks."""
from __future__ import annotations

import json

import numpy as np
import pytest

from server.model.errors import ModelLoadError
from server.model.loader import load_model
from tests.server.model.tiny import save_tiny_hf


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    save_tiny_hf(root, "untied")
    return root


def _copy_dir(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"), device="cpu")


def test_unsupported_architecture(tiny_dir, tmp_path):
    d = _copy_dir(tiny_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel"):
        load_model(str(d), device="cpu")


def test_truncated_safetensors(tiny_dir, tmp_path):
    d = _copy_dir(tiny_dir, tmp_path / "m")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="corrupt or truncated safetensors"):
        load_model(str(d), device="cpu")


def test_missing_weight(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _copy_dir(tiny_dir, tmp_path / "m")
    weights = load_file(str(d / "model.safetensors"))
    del weights["model.layers.1.self_attn.k_proj.weight"]
    save_file(weights, str(d / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="k_proj"):
        load_model(str(d), device="cpu")


def test_pickle_checkpoints_are_not_loaded(tiny_dir, tmp_path):
    d = _copy_dir(tiny_dir, tmp_path / "m")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(str(d), device="cpu")


def _write_gguf(path, arch="llama"):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(32)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_truncated_gguf(tmp_path):
    path = tmp_path / "m.gguf"
    _write_gguf(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 64])
    # the tensor whose data runs past the end is named, with where it ends and the file's size
    with pytest.raises(ModelLoadError, match=r"truncated GGUF file: tensor \S+: its data ends at byte \d+, past the end"):
        load_model(str(path), device="cpu")


def test_unsupported_gguf_architecture(tmp_path):
    path = tmp_path / "m.gguf"
    _write_gguf(path, arch="gpt2")
    with pytest.raises(ModelLoadError, match="gpt2"):
        load_model(str(path), device="cpu")


def test_not_a_model_file(tmp_path):
    path = tmp_path / "weights.txt"
    path.write_text("hello")
    with pytest.raises(ModelLoadError, match="directory or a .gguf"):
        load_model(str(path), device="cpu")
