"""Helpers for tests: a tiny HF Llama/Qwen2 model written as a GGUF file with the `gguf` package's writer.

`write_tiny_gguf(path, hf_model, types)` writes the HF model's weights under llama.cpp's names, the
Q/K rows permuted as llama.cpp's converter does for `llama` models, each linear weight in the GGML
type `types` names for it ("q8_0", "q4_0", "q4_1": quantized by `gguf.quants.quantize`; "q4_k",
"q5_k", "q6_k": random valid blocks, as the `gguf` package cannot quantize K-quants; "f32"), plus a
one-merge byte-level tokenizer. Returns {gguf tensor name: the weight as the file's own
dequantization (`gguf.quants.dequantize`), rows in HF order}: the independent reference.
"""
from __future__ import annotations

import numpy as np
import torch

HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
KQ_BYTES = {"q4_k": 144, "q5_k": 176, "q6_k": 210}


def permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf `permute` (HF halves -> interleaved pairs), rows of a head."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_kquant(fmt: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant blocks with small finite fp16 scales: uint8 [rows, cols / 256 * block bytes]."""
    nb = cols // 256
    raw = rng.integers(0, 256, (rows, nb, KQ_BYTES[fmt]), dtype=np.uint8)
    d = (np.abs(rng.standard_normal((rows, nb, 1))) * 0.002 + 0.001).astype(np.float16).view(np.uint8)
    dmin = (np.abs(rng.standard_normal((rows, nb, 1))) * 0.002).astype(np.float16).view(np.uint8)
    if fmt == "q6_k":
        raw[..., 208:210] = d
    else:
        raw[..., 0:2], raw[..., 2:4] = d, dmin
    return raw.reshape(rows, -1)


def write_tiny_gguf(path, hf, types: dict[str, str] | str = "q8_0", rope_freqs: np.ndarray | None = None,
                    seed: int = 0) -> dict[str, np.ndarray]:
    import gguf
    from gguf import GGMLQuantizationType as T

    cfg = hf.config
    arch = "qwen2" if cfg.model_type == "qwen2" else "llama"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    symbols = sorted(__import__("tokenizers").pre_tokenizers.ByteLevel.alphabet())
    w.add_tokenizer_model("gpt2")
    # 255 byte symbols + one merge: as many tokens as the tiny vocabulary (256); no test tokenizes text here
    w.add_token_list(symbols[:255] + [symbols[0] + symbols[1]])
    w.add_token_merges([f"{symbols[0]} {symbols[1]}"])
    w.add_token_types([1] * len(symbols))
    w.add_eos_token_id(2)
    rng = np.random.default_rng(seed)
    ref: dict[str, np.ndarray] = {}

    def add(name: str, t: torch.Tensor, kind: str, heads: int = 0):
        a = t.detach().float().numpy()
        if heads:
            a = permute(a, heads)
        if kind == "f32" or a.ndim == 1:
            w.add_tensor(name, np.ascontiguousarray(a, dtype=np.float32))
            deq = a
        elif kind in KQ_BYTES:
            raw = random_kquant(kind, a.shape[0], a.shape[1], rng)
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=T[kind.upper()])
            deq = gguf.quants.dequantize(raw, T[kind.upper()])
        else:
            raw = gguf.quants.quantize(np.ascontiguousarray(a, dtype=np.float32), T[kind.upper()])
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=T[kind.upper()])
            deq = gguf.quants.dequantize(raw, T[kind.upper()])
        if heads:  # the reference in HF row order
            d = deq.shape[0] // heads // 2
            deq = deq.reshape(heads, d, 2, *deq.shape[1:]).swapaxes(2, 1).reshape(deq.shape)
        ref[name] = np.ascontiguousarray(deq, dtype=np.float32)

    def kind_of(name: str) -> str:
        return types if isinstance(types, str) else types.get(name, types.get("*", "q8_0"))

    sd = hf.state_dict()
    add("token_embd.weight", sd["model.embed_tokens.weight"], kind_of("token_embd.weight"))
    if not cfg.tie_word_embeddings:
        add("output.weight", sd["lm_head.weight"], kind_of("output.weight"))
    add("output_norm.weight", sd["model.norm.weight"], "f32")
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, dtype=np.float32))
    for i in range(cfg.num_hidden_layers):
        for hf_name, g in HF_TO_GGUF.items():
            for kind in ("weight", "bias"):
                key = f"model.layers.{i}.{hf_name}.{kind}"
                if key not in sd:
                    continue
                heads = 0
                if arch == "llama" and hf_name == "self_attn.q_proj":
                    heads = cfg.num_attention_heads
                elif arch == "llama" and hf_name == "self_attn.k_proj":
                    heads = cfg.num_key_value_heads
                name = f"blk.{i}.{g}.{kind}"
                add(name, sd[key], kind_of(g) if kind == "weight" and "norm" not in g else "f32", heads)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ref
