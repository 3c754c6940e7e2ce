"""The model on a quantized base against `transformers` running the dequantized weights (fp32, CPU).

GGUF files are written from tiny random HF models with the `gguf` package's writer (Q8_0, Q4_0, Q4_1
quantized by `gguf`; K-quants as random valid blocks) and loaded through the real loader; the
reference is HF `transformers` with each weight replaced by the file's own dequantization
(`gguf.quants.dequantize`), or, for `--quantize int8|int4|nf4` of an HF directory, by the weight's
dequantization per the format's spec (kernels/quant_reference.py, itself checked against gguf and
bitsandbytes in tests/kernels/test_quant_formats.py). Logits must agree within 2e-3 (summation order
of the C++ kernels; fp32 activations, no activation quantization).
"""
from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch

from kernels import cpu_ext
from kernels import quant as kq
from server.model.attention import allocate_kv_cache
from server.model.context import make_context
from server.model.errors import ModelLoadError
from server.model.loader import load_model
from server.model.quant_blocks import KQUANT_TARGET, QuantBlocks, QuantSource
from server.model.quant_linear import QuantEmbedding, QuantLinear, apply_quantization, weight_report
from tests.server.model.tiny import VOCAB, save_tiny_hf
from tests.server.model.tiny_gguf import HF_TO_GGUF, write_tiny_gguf

TOL = 2e-3
GGUF_TO_HF = {v: k for k, v in HF_TO_GGUF.items()}


@pytest.fixture(scope="module", autouse=True)
def cpp_kernels():
    cpu_ext.load()  # the C++ quantized matmul when it builds here (else the torch fallback is what runs)


def hf_with(hf, ref: dict[str, np.ndarray]):
    """A copy of `hf` whose weights are the file's dequantization (gguf names -> HF names)."""
    model = copy.deepcopy(hf)
    sd = model.state_dict()
    with torch.no_grad():
        for name, w in ref.items():
            if name == "token_embd.weight":
                key = "model.embed_tokens.weight"
            elif name == "output.weight":
                key = "lm_head.weight"
            elif name == "output_norm.weight":
                key = "model.norm.weight"
            else:
                _, i, g, kind = name.split(".")
                key = f"model.layers.{i}.{GGUF_TO_HF[g]}.{kind}"
            sd[key].copy_(torch.from_numpy(w).reshape(sd[key].shape))
    return model


def hf_from_ours(hf, loaded):
    """A copy of `hf` whose quantized weights are our QuantizedWeights' dequantization (the spec)."""
    ref = copy.deepcopy(hf)
    sd = ref.state_dict()
    model, cfg = loaded.model, loaded.config
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            q, k, v = layer.self_attn.qkv_proj.qweight.dequantize().split([cfg.q_size, cfg.kv_size, cfg.kv_size])
            g, u = layer.mlp.gate_up_proj.qweight.dequantize().chunk(2)
            parts = {"self_attn.q_proj": q, "self_attn.k_proj": k, "self_attn.v_proj": v, "mlp.gate_proj": g,
                     "mlp.up_proj": u, "self_attn.o_proj": layer.self_attn.o_proj.qweight.dequantize(),
                     "mlp.down_proj": layer.mlp.down_proj.qweight.dequantize()}
            for name, w in parts.items():
                sd[f"model.layers.{i}.{name}.weight"].copy_(w)
        if isinstance(model.lm_head, QuantLinear):
            sd["lm_head.weight"].copy_(model.lm_head.qweight.dequantize())
        if isinstance(model.model.embed_tokens, QuantEmbedding):
            sd["model.embed_tokens.weight"].copy_(model.model.embed_tokens.qweight.dequantize())
    return ref


@torch.inference_mode()
def ours_vs_hf(loaded, hf, seq_len=9, decode=3):
    """Prefill `seq_len` tokens then `decode` single-token steps through the paged cache; max |logit
    difference| against HF's full-sequence forward at every position, relative to max(1, max |logit|)."""
    model = loaded.model
    rng = np.random.default_rng(0)
    ids = rng.integers(3, VOCAB, seq_len + decode).tolist()
    ref = hf(torch.tensor([ids])).logits[0]
    model.bind_kv_cache(allocate_kv_cache(loaded.config, 8, 4, loaded.dtype, torch.device("cpu")))
    table = [[3, 1, 6, 0, 7, 2, 5, 4]]  # shuffled blocks: up to 32 positions
    worst = 0.0
    steps = [list(range(seq_len))] + [[seq_len + j] for j in range(decode)]
    for pos in steps:
        ctx = make_context([pos], table, 4, torch.device("cpu"))
        logits = model.compute_logits(model(torch.tensor([ids[p] for p in pos]), ctx))
        worst = max(worst, (logits - ref[pos[0]: pos[-1] + 1]).abs().max().item())
    return worst / max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("variant", ["untied", "tied", "qwen2"])
def test_gguf_blocks_kept_and_logits_match_hf(tmp_path, fmt, variant):
    hf = save_tiny_hf(tmp_path / "hf", variant)
    path = tmp_path / "m.gguf"
    ref = write_tiny_gguf(path, hf, fmt)
    loaded = load_model(str(path), "float32", "cpu", quantize="auto")
    assert all(isinstance(q, QuantBlocks) and q.format == fmt for q in loaded.quant.values())
    assert set(loaded.quant) >= {"model.layers.0.self_attn.qkv_proj", "model.layers.1.mlp.down_proj",
                                 "model.embed_tokens"}
    assert apply_quantization(loaded) > 0 and not loaded.quant
    model = loaded.model
    layer = model.model.layers[1]
    assert isinstance(layer.self_attn.qkv_proj, QuantLinear) and isinstance(model.model.embed_tokens, QuantEmbedding)
    assert isinstance(model.lm_head, QuantLinear)
    if variant == "tied":
        assert model.lm_head.qweight is model.model.embed_tokens.qweight  # one copy of the blocks
    # kept byte for byte: the dequantized kept blocks (rows un-permuted) equal the file's dequantization
    qkv = np.concatenate([ref[f"blk.1.attn_{p}.weight"] for p in "qkv"])
    assert torch.equal(layer.self_attn.qkv_proj.qweight.dequantize(), torch.from_numpy(qkv))
    if variant == "qwen2":
        assert layer.self_attn.qkv_proj.bias is not None
    report = weight_report(model)
    assert report["weight_format"].startswith(fmt)
    assert ours_vs_hf(loaded, hf_with(hf, ref)) <= TOL


def test_gguf_quantize_none_dequantizes_as_before(tmp_path):
    hf = save_tiny_hf(tmp_path / "hf", "untied")
    ref = write_tiny_gguf(tmp_path / "m.gguf", hf, "q4_0")
    loaded = load_model(str(tmp_path / "m.gguf"), "float32", "cpu", quantize="none")
    assert not loaded.quant and weight_report(loaded.model)["weight_format"] == "float32"
    assert ours_vs_hf(loaded, hf_with(hf, ref)) <= 1e-4


@pytest.mark.parametrize("mode,fmt", [("int8", "q8_0"), ("int4", "q4_1"), ("nf4", "nf4")])
@pytest.mark.parametrize("variant", ["untied", "tied"])
def test_hf_quantize_at_load_matches_hf_on_dequantized_weights(tmp_path, mode, fmt, variant):
    hf = save_tiny_hf(tmp_path / "hf", variant, intermediate_size=128)  # nf4 blocks are 64 wide
    loaded = load_model(str(tmp_path / "hf"), "float32", "cpu", quantize=mode)
    assert all(isinstance(q, QuantSource) and q.format == fmt for q in loaded.quant.values())
    apply_quantization(loaded)
    model = loaded.model
    heads = {"embed": model.model.embed_tokens, "head": model.lm_head}
    if mode == "nf4":  # QLoRA: the embeddings and the LM head stay in the compute dtype
        assert all(type(m).__name__ in ("Embedding", "Linear") for m in heads.values())
    else:
        assert isinstance(heads["head"], QuantLinear) and heads["head"].qweight.format == fmt
    err = ours_vs_hf(loaded, hf_from_ours(hf, loaded))
    assert err <= TOL, err
    bf16_bytes = sum(2 * p.numel() for n, p in hf.named_parameters() if n.endswith("proj.weight"))
    q_bytes = sum(m.qweight.nbytes for m in model.modules() if isinstance(m, QuantLinear)
                  and m is not model.lm_head)
    assert q_bytes <= (0.55 if mode == "int8" else 0.32) * bf16_bytes


def test_kquants_convert_to_the_nearest_kept_format(tmp_path, caplog):
    hf = save_tiny_hf(tmp_path / "hf", "untied", hidden_size=256, intermediate_size=256, num_attention_heads=4)
    types = {"attn_q": "q4_k", "attn_k": "q4_k", "attn_v": "q6_k", "attn_output": "q5_k",
             "ffn_gate": "q4_k", "ffn_up": "q4_k", "ffn_down": "q6_k", "token_embd.weight": "q8_0",
             "output.weight": "q6_k"}
    ref = write_tiny_gguf(tmp_path / "k.gguf", hf, types)
    with caplog.at_level(logging.INFO, logger="loramux.model"):
        loaded = load_model(str(tmp_path / "k.gguf"), "float32", "cpu", quantize="auto")
        apply_quantization(loaded)
    model = loaded.model
    layer = model.model.layers[0]
    # q|k (q4_k -> q4_1) and v (q6_k -> q8_0) share one fused weight: the widest format for all three
    assert layer.self_attn.qkv_proj.qweight.format == "q8_0"
    assert layer.self_attn.o_proj.qweight.format == KQUANT_TARGET["q5_k"]
    assert layer.mlp.gate_up_proj.qweight.format == KQUANT_TARGET["q4_k"] == kq.KQUANT_TARGET["q4_k"]
    assert model.lm_head.qweight.format == "q8_0" and model.model.embed_tokens.qweight.format == "q8_0"
    # each converted weight is exactly the kept format's quantization of the file's dequantization
    gate_up = np.concatenate([ref["blk.0.ffn_gate.weight"], ref["blk.0.ffn_up.weight"]])
    want = kq.quantize(torch.from_numpy(gate_up), "q4_1")
    assert torch.equal(layer.mlp.gate_up_proj.qweight.data, want.data)
    assert any("converted to q4_1" in r.getMessage() and "q4_k" in r.getMessage() for r in caplog.records)
    assert any("mixed formats" in r.getMessage() for r in caplog.records)
    assert ours_vs_hf(loaded, hf_from_ours(hf, loaded)) <= TOL


def test_llama3_rope_freqs_are_loaded(tmp_path):
    import math

    hf = save_tiny_hf(tmp_path / "hf", "llama3")
    sc = hf.config.rope_parameters if hasattr(hf.config, "rope_parameters") else hf.config.rope_scaling
    dim = hf.config.hidden_size // hf.config.num_attention_heads
    inv = 1.0 / 10000.0 ** (np.arange(0, dim, 2) / dim)
    factors = []
    old, low, high, factor = sc["original_max_position_embeddings"], sc["low_freq_factor"], sc["high_freq_factor"], sc["factor"]
    for wl in 2 * math.pi / inv:  # llama.cpp's convert_hf_to_gguf.py rope_freqs
        if wl < old / high:
            factors.append(1.0)
        elif wl > old / low:
            factors.append(factor)
        else:
            s = (old / wl - low) / (high - low)
            factors.append(1 / ((1 - s) / factor + s))
    ref = write_tiny_gguf(tmp_path / "l3.gguf", hf, "q8_0", rope_freqs=np.array(factors))
    loaded = load_model(str(tmp_path / "l3.gguf"), "float32", "cpu", quantize="auto")
    assert loaded.config.rope_scaling["rope_type"] == "llama3"
    apply_quantization(loaded)
    assert ours_vs_hf(loaded, hf_with(hf, ref), seq_len=20, decode=4) <= TOL


def test_bad_tensors_fail_with_one_line_naming_the_tensor(tmp_path):
    import gguf

    hf = save_tiny_hf(tmp_path / "hf", "untied")
    write_tiny_gguf(tmp_path / "i8.gguf", hf, {"attn_q": "f32", "*": "q8_0"})
    # an unsupported type: rewrite one tensor as I8 (gguf has no dequantization for it)
    path = tmp_path / "bad.gguf"
    r = gguf.GGUFReader(str(tmp_path / "i8.gguf"))
    w = gguf.GGUFWriter(str(path), "llama")
    for f in r.fields.values():
        if not f.name.startswith(("GGUF.", "general.architecture")):
            val = f.contents()
            vtype = f.types[0]
            sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(f.name, val, vtype, sub_type=sub)
    for t in r.tensors:
        if t.name == "blk.0.attn_q.weight":
            w.add_tensor(t.name, np.zeros(np.asarray(t.data).shape, dtype=np.int8), raw_dtype=gguf.GGMLQuantizationType.I8)
        else:
            w.add_tensor(t.name, np.asarray(t.data), raw_shape=np.asarray(t.data).shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for mode in ("auto", "none"):
        with pytest.raises(ModelLoadError, match="blk.0.attn_q.weight") as e:
            load_model(str(path), "float32", "cpu", quantize=mode)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="--quantize"):
        load_model(str(path), "float32", "cpu", quantize="int3")
