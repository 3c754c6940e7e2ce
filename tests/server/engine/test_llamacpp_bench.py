"""`python -m server.bench.llamacpp`: the files it writes (a random-weight GGUF that loramux loads
with its blocks kept; llama.cpp LoRA GGUFs holding the PEFT adapter's own tensors, q/k rows permuted
as llama.cpp's converter does) and its closed loop, against a mock server. The llama.cpp binary is
not part of the tests (it is built from PyPI's source by hand: docs/quantization.md)."""
from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from adapters.safetensors_io import load_tensors  # noqa: E402
from loadtest.synthetic import make_adapter  # noqa: E402
from server.bench import llamacpp  # noqa: E402


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("llamacpp") / "tiny-q4_0.gguf"
    assert llamacpp.main(["--write-gguf", str(path), "--shape", "tiny", "--type", "q4_0"]) == 0
    return path


def test_written_gguf_loads_with_its_blocks_kept(tiny_gguf):
    from server.model.loader import load_model

    loaded = load_model(str(tiny_gguf), dtype="float32", device="cpu", quantize="auto")
    cfg = loaded.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (256, 4, 512)
    assert cfg.tie_word_embeddings and cfg.vocab_size == 49152
    assert {q.format for q in loaded.quant.values()} == {"q4_0"}
    assert len(loaded.tokenizer.encode("hello world")) > 0  # the embedded model's tokenizer came along
    info = llamacpp.base_info(tiny_gguf)
    assert info["num_layers"] == 4 and info["projections"]["k_proj"] == (256, 128)
    assert info["projections"]["down_proj"] == (512, 256)


def test_lora_gguf_holds_the_peft_tensors(tiny_gguf, tmp_path):
    info = llamacpp.base_info(tiny_gguf)
    _, weights = make_adapter(info, rank=4, seed=3)
    peft = {k: v.float().numpy() for k, v in load_tensors(weights).items()}
    out = tmp_path / "a.gguf"
    llamacpp.write_lora_gguf(out, weights, 4, info)
    r = gguf.GGUFReader(str(out))
    assert r.fields["general.type"].contents() == "adapter"
    assert r.fields["adapter.type"].contents() == "lora"
    assert r.fields["adapter.lora.alpha"].contents() == pytest.approx(8.0)
    t = {x.name: np.asarray(x.data).reshape([int(d) for d in reversed(x.shape)]) for x in r.tensors}
    assert len(t) == 4 * 7 * 2
    key = "base_model.model.model.layers.1.{}.{}.lora_{}.weight"
    np.testing.assert_array_equal(t["blk.1.attn_v.weight.lora_a"], peft[key.format("self_attn", "v_proj", "A")])
    np.testing.assert_array_equal(t["blk.1.ffn_down.weight.lora_b"], peft[key.format("mlp", "down_proj", "B")])
    b = peft[key.format("self_attn", "q_proj", "B")]  # [out, r]; 4 heads of 64: pairs interleaved per head
    heads, half = 4, 32
    want = b.reshape(heads, 2, half, 4).swapaxes(1, 2).reshape(b.shape)
    np.testing.assert_array_equal(t["blk.1.attn_q.weight.lora_b"], want)
    assert not np.array_equal(want, b)
    np.testing.assert_array_equal(t["blk.1.attn_q.weight.lora_b"][1], b[half])  # row 1 is the second half's first


def test_closed_loop_counts_tokens_and_names_adapters_per_engine():
    class Args:
        seed, prompt_tokens, max_tokens = 0, 5, 7

    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body)
        return httpx.Response(200, json={"usage": {"completion_tokens": body["max_tokens"]}})

    names = ["a000", "a001", "a002"]
    lm = llamacpp._bodies("loramux", "distinct", 4, Args, names)
    assert [b["adapter"] for b in lm] == ["a000", "a001", "a002", "a000"]
    lc = llamacpp._bodies("llama.cpp", "distinct", 4, Args, names)
    assert [b["lora"] for b in lc][:2] == [[{"id": 0, "scale": 1.0}], [{"id": 1, "scale": 1.0}]]
    assert [b["prompt"] for b in lm] == [b["prompt"] for b in lc]  # both engines: the same prompts
    assert llamacpp._bodies("loramux", "distinct", 1, Args, names, level=1)[0]["prompt"] != lm[0]["prompt"]
    base = llamacpp._bodies("llama.cpp", "base", 2, Args, names)
    assert all("lora" not in b and "adapter" not in b and len(b["prompt"]) == 5 and b["ignore_eos"] for b in base)
    r = asyncio.run(llamacpp._level("http://test", lm, 2, 10, transport=httpx.MockTransport(handler)))
    assert r["requests"] == 4 and r["output_tokens"] == 28 and r["output_tokens_per_s"] > 0
    assert sorted(b["adapter"] for b in seen) == ["a000", "a000", "a001", "a002"]

    def failing(request):
        return httpx.Response(404, json={"error": {"message": "no such adapter"}})

    with pytest.raises(RuntimeError, match="4 requests failed"):
        asyncio.run(llamacpp._level("http://test", lm, 2, 10, transport=httpx.MockTransport(failing)))


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        llamacpp.main([])
    assert e.value.code == 2 and "--gguf and --llama-server" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        llamacpp.main(["--gguf", "x.gguf", "--llama-server", str(tmp_path / "nope")])
    assert e.value.code == 2 and "no such file" in capsys.readouterr().err
