"""Loader for a GGUF file (llama.cpp format): config, dequantized weights and tokenizer from one file.

Data flow: `GGUFReader` (memory-mapped) -> metadata (`{arch}.*` keys) -> `ModelConfig`;
tensors (`blk.N.attn_q.weight`, ...) -> `gguf.quants.dequantize` (Q4_1, Q8_0, F16, F32, K-quants ...)
-> HF names, undoing the Q/K row permutation llama.cpp applies for its interleaved rotary on `llama`
models (so PEFT adapters trained on the HF layout apply unchanged); the byte-level BPE tokenizer
(`tokenizer.ggml.tokens/merges/token_type`) and chat template -> `Tokenizer`.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from server.model.config import ModelConfig
from server.model.errors import ModelLoadError
from server.model.gguf_tokenizer import build_gguf_tokenizer

_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def _open(path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as e:  # truncated/corrupt files fail in numpy memmap or header parsing
        raise ModelLoadError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") from None


def read_metadata(reader) -> dict[str, Any]:
    """All key/value fields as Python values (arrays as lists)."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = _field_value(field)
    return meta


def _field_value(field) -> Any:
    if hasattr(field, "contents"):  # gguf >= 0.11
        return field.contents()
    from gguf import GGUFValueType

    # Older gguf: `data` indexes the `parts` holding the values; strings are raw utf-8 bytes.
    values = [field.parts[i] for i in field.data]
    if field.types[-1] == GGUFValueType.STRING:
        values = [bytes(v).decode("utf-8") for v in values]
    else:
        values = [v.tolist()[0] for v in values]
    return values if field.types[0] == GGUFValueType.ARRAY else values[0]


def gguf_config(meta: dict[str, Any], tensor_names: set[str], path: Path) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in _ARCHS:
        raise ModelLoadError(f"{path}: unsupported GGUF architecture {arch!r} (supported: {', '.join(_ARCHS)})")
    if "rope_freqs.weight" in tensor_names:
        raise ModelLoadError(f"{path}: GGUF rope frequency factors (Llama 3.1 rope scaling) are not supported")

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    try:
        hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
        scaling = None
        scaling_type = get("rope.scaling.type", "none")
        if scaling_type in ("linear", "yarn"):
            scaling = {"rope_type": scaling_type, "factor": float(get("rope.scaling.factor"))}
            if scaling_type == "yarn":
                scaling["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length"))
        elif scaling_type != "none":
            raise ModelLoadError(f"{path}: unsupported GGUF rope scaling {scaling_type!r}")
        eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta]
        return ModelConfig(
            architecture=_ARCHS[arch],
            vocab_size=int(get("vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_hidden_layers=int(get("block_count")),
            num_attention_heads=heads,
            num_key_value_heads=int(get("attention.head_count_kv", heads)),
            head_dim=int(get("attention.key_length") or get("rope.dimension_count") or hidden // heads),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=int(get("context_length", 2048)),
            tie_word_embeddings="output.weight" not in tensor_names,
            attention_bias="blk.0.attn_q.bias" in tensor_names,
            o_proj_bias="blk.0.attn_output.bias" in tensor_names,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos)),
        )
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{path}: incomplete GGUF metadata ({e})") from None


def reverse_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of Q/K rows: per head, rows (pairs interleaved) -> (halves).

    llama.cpp stores rows of each head as [x0, x(d/2), x1, x(d/2+1), ...]; HF rotates halves.
    [heads*D, ...] -> [heads, D/2, 2, ...] -> swap -> [heads, 2, D/2, ...] -> [heads*D, ...]
    """
    dim = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _dequantize(t) -> np.ndarray:
    from gguf.quants import dequantize

    # Tensor shapes in GGUF are (cols, rows, ...); numpy data is row-major (rows, cols).
    shape = tuple(int(d) for d in reversed(list(t.shape)))
    return np.ascontiguousarray(dequantize(t.data, t.tensor_type)).reshape(shape)


def gguf_weights(reader, cfg: ModelConfig, arch: str, path: Path) -> dict[str, torch.Tensor]:
    """Dequantized fp32 tensors under HF names."""
    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name in _GLOBAL_NAMES:
            name = _GLOBAL_NAMES[t.name]
        else:
            m = _BLOCK.fullmatch(t.name)
            if not m or m.group(2) not in _BLOCK_NAMES:
                raise ModelLoadError(f"{path}: unexpected tensor {t.name!r} for a Llama-family model")
            name = f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
        try:
            w = _dequantize(t)
        except NotImplementedError as e:
            raise ModelLoadError(f"{path}: tensor {t.name} uses an unsupported quantization ({e})") from None
        except Exception as e:
            raise ModelLoadError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") from None
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = reverse_permute(w, cfg.num_attention_heads)
        elif arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = reverse_permute(w, cfg.num_key_value_heads)
        w = np.ascontiguousarray(w, dtype=np.float32)
        # Unquantized tensors are read-only views of the memory map: copy those.
        out[name] = torch.from_numpy(w if w.flags.writeable else w.copy())
    return out


def load_gguf(path: Path):
    """(config, HF-named fp32 CPU tensors, tokenizer) of a GGUF file."""
    reader = _open(path)
    try:
        meta = read_metadata(reader)
    except Exception as e:
        raise ModelLoadError(f"{path}: corrupt GGUF metadata ({type(e).__name__}: {e})") from None
    names = {t.name for t in reader.tensors}
    cfg = gguf_config(meta, names, path)
    tokenizer = build_gguf_tokenizer(meta, path)
    return cfg, gguf_weights(reader, cfg, meta["general.architecture"], path), tokenizer
