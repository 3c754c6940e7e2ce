"""A quantized base through the entry points users reach: `loramux serve --quantize`, `GET /v1/models`,
`POST /v1/completions`, and a bad file that must stop the server from starting.

The reference for the served tokens is an independent float model: the same GGUF file loaded with
`--quantize none` (every tensor through `gguf.quants.dequantize`) and run by `greedy_generate`.
"""
from __future__ import annotations

import httpx
import numpy as np
import pytest

from server.cli import build_parser
from server.engine.builder import build_async_engine
from server.model.errors import ModelLoadError
from server.model.generate import greedy_generate
from server.model.loader import load_model
from server.settings import ServerSettings
from tests.real_server import real_settings, tiny_server
from tests.server.model.tiny import save_tiny_hf
from tests.server.model.tiny_gguf import write_tiny_gguf


def test_serve_help_shows_quantize(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    out = capsys.readouterr().out
    assert "--quantize" in out and "nf4" in out
    assert "the embedded model's included" in " ".join(out.split())  # auto keeps the default's blocks too
    with pytest.raises(ValueError, match="--quantize"):
        ServerSettings(quantize="int3")
    assert ServerSettings.from_args(["--quantize", "int8"]).quantize == "int8"


def test_models_report_format_and_bytes_and_completions_match_float_reference(tmp_path):
    hf = save_tiny_hf(tmp_path / "hf", "untied", max_position_embeddings=256)
    path = tmp_path / "tiny-q4_0.gguf"
    write_tiny_gguf(path, hf, "q4_0")
    prompt = [5, 77, 140, 9, 33, 201, 18]
    reference = load_model(str(path), "float32", "cpu", quantize="none")
    expected = greedy_generate(reference, prompt, 8)
    float_bytes = sum(p.numel() * 4 for p in reference.model.parameters())
    with tiny_server(path, tmp_path / "adapters") as live, httpx.Client(base_url=live.url, timeout=60) as http:
        models = http.get("/v1/models").json()["data"]
        info = next(m for m in models if m["id"] == live.engine.model_name)["loramux"]
        assert info["quantize"] == "auto" and info["weight_format"].startswith("q4_0")
        assert info["weight_bytes_by_format"]["q4_0"] > 0
        assert 0 < info["resident_weight_bytes"] < 0.5 * float_bytes
        assert info["cpu_decode_loop"] is True  # the C++ decode loop takes quantized projections
        r = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 8, "temperature": 0,
                                               "ignore_eos": True, "logprobs": 1})
        assert r.status_code == 200, r.text
        got = r.json()["choices"][0]
    # the served text is the detokenization of the reference's greedy tokens
    assert got["text"] == reference.tokenizer.decode(expected)


def test_bad_file_stops_the_server_before_it_starts(tmp_path):
    hf = save_tiny_hf(tmp_path / "hf", "untied")
    path = tmp_path / "bad.gguf"
    write_tiny_gguf(path, hf, "q8_0")
    data = bytearray(path.read_bytes())
    from gguf import GGUFReader

    last = max(GGUFReader(str(path)).tensors, key=lambda t: t.data_offset).name
    # truncate: the last tensor's blocks are cut short
    path.write_bytes(bytes(data[: len(data) - 100]))
    settings = real_settings(path, tmp_path / "adapters")
    with pytest.raises(ModelLoadError) as e:
        build_async_engine(settings)
    assert "\n" not in str(e.value) and "truncated" in str(e.value)
    assert f"tensor {last}:" in str(e.value)  # the tensor is named


def test_shape_not_whole_blocks_names_the_tensor(tmp_path):
    """A Q8_0 weight whose rows are not whole blocks of 32 cannot even be written by `gguf`; a tensor
    whose shape does not match the config is refused naming it."""
    hf = save_tiny_hf(tmp_path / "hf", "untied")
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, hf, "q8_0")
    import gguf

    r = gguf.GGUFReader(str(path))
    bad = tmp_path / "bad.gguf"
    w = gguf.GGUFWriter(str(bad), "llama")
    for f in r.fields.values():
        if not f.name.startswith(("GGUF.", "general.architecture")):
            sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)
    for t in r.tensors:
        data = np.asarray(t.data)
        if t.name == "blk.1.ffn_up.weight":
            data = data[:-1]  # one row short
        w.add_tensor(t.name, data, raw_shape=data.shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for mode in ("auto", "none"):
        with pytest.raises(ModelLoadError, match="up_proj|gate_up_proj|ffn_up") as e:
            load_model(str(bad), "float32", "cpu", quantize=mode)
        assert "\n" not in str(e.value)


def test_embedded_model_auto_keeps_blocks_on_cpu_only():
    """`--model default --quantize auto`: the Q4_1 blocks are kept where they were measured faster (CPU);
    on CUDA (not measured against cuBLAS) the embedded model is dequantized; explicit modes pass through."""
    import torch

    from server.model.loader import default_model_quantize

    assert default_model_quantize("auto", torch.device("cpu")) == "auto"
    assert default_model_quantize("auto", torch.device("cuda")) == "none"
    assert default_model_quantize("int8", torch.device("cuda")) == "int8"
    assert default_model_quantize("none", torch.device("cpu")) == "none"
