"""Helpers for tests: tiny random Hugging Face Llama/Qwen2 checkpoints saved to a directory.

`save_tiny_hf(tmp_path, variant)` builds a 2-layer, hidden-64, GQA (4 heads / 2 kv heads) model with
`transformers` in fp32, re-randomises all weights (HF's init is too small to make errors visible),
saves it with `save_pretrained` plus a byte-level `tokenizer.json`, and returns the HF model.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

VOCAB = 256
ROPE_VARIANTS = {
    "untied": None,
    "tied": None,
    "llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "linear": {"rope_type": "linear", "factor": 2.0},
    "qwen2": None,
}


def byte_tokenizer() -> Tokenizer:
    """A merge-free byte-level BPE over the 256 byte symbols (+ specials), like GPT-2's alphabet."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def save_tiny_hf(root: Path, variant: str = "untied", **dims):
    """A tiny random HF checkpoint; `dims` override the config (e.g. hidden_size, num_attention_heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  rms_norm_eps=1e-5, tie_word_embeddings=variant == "tied", bos_token_id=1, eos_token_id=2)
    common.update(dims)
    rope = {"rope_theta": 10000.0, **(ROPE_VARIANTS[variant] or {"rope_type": "default"})}
    if variant == "qwen2":
        cfg = Qwen2Config(**common, rope_parameters=rope)
        model = Qwen2ForCausalLM(cfg)
    else:
        cfg = LlamaConfig(**common, rope_parameters=rope)
        model = LlamaForCausalLM(cfg)
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.15 * noise)
    model = model.float().eval()
    model.config._attn_implementation = "eager"
    model.save_pretrained(root)
    tok = byte_tokenizer()
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}",
    }))
    return model
