"""Loader for a GGUF file (llama.cpp format): config, weights and tokenizer from one file.

Data flow: `GGUFReader` (memory-mapped) -> metadata (`{arch}.*` keys) -> `ModelConfig` (a Llama 3
`rope_freqs` tensor -> HF's `llama3` rope scaling, checked to reproduce the file's factors);
tensors (`blk.N.attn_q.weight`, ...) -> HF names, undoing the Q/K row permutation llama.cpp applies
for its interleaved rotary on `llama` models (so PEFT adapters trained on the HF layout apply
unchanged). With `quantize="auto"` the linear weights' Q8_0 / Q4_0 / Q4_1 blocks are kept byte for
byte (`QuantBlocks`; the permutation moves whole rows of blocks) and K-quants (Q4_K, Q5_K, Q6_K) are
dequantized by `gguf` and handed over as `QuantSource`s to convert to the nearest kept format;
everything else goes through `gguf.quants.dequantize` to fp32 (all of it with `quantize="none"`).
The byte-level BPE tokenizer (`tokenizer.ggml.tokens/merges/token_type`) and chat template ->
`Tokenizer`. Any bad tensor (unsupported type, truncated blocks, a row not a whole number of
blocks) is a one-line `ModelLoadError` naming it, raised before any model is built.
"""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from server.model.config import ModelConfig
from server.model.errors import ModelLoadError
from server.model.gguf_tokenizer import build_gguf_tokenizer
from server.model.quant_blocks import (
    BLOCK_BYTES,
    FORMAT_BITS,
    KEPT,
    KQUANT_TARGET,
    MODE_FORMAT,
    QuantBlocks,
    QuantSource,
    check_mode,
)

log = logging.getLogger("loramux.model")

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


class _TruncatedTensor(Exception):
    pass


def _checked_reader(path: Path):
    """gguf's GGUFReader, but a tensor whose data runs past the end of the file is named (the plain
    reader fails on a reshape deep inside numpy, naming nothing)."""
    from gguf import GGUFReader
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    class CheckedReader(GGUFReader):
        def _build_tensors(self, start_offs, fields):
            size = len(self.data)
            for field in fields:
                try:  # the tensor-info layout GGUFReader._build_tensors reads
                    _, name_data, _, dims, raw_dtype, offset_tensor = field.parts
                    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(int(raw_dtype[0]))]
                    end = int(start_offs + offset_tensor[0]) + int(np.prod(dims)) * type_size // block
                except Exception:  # noqa: BLE001 - anything odd is left to the reader's own checks
                    continue
                if end > size:
                    name = bytes(name_data).decode("utf-8", "replace")
                    raise _TruncatedTensor(f"tensor {name}: its data ends at byte {end}, past the end of the "
                                           f"file ({size} bytes)")
            super()._build_tensors(start_offs, fields)

    return CheckedReader(str(path))


def _open(path: Path):
    try:
        return _checked_reader(path)
    except _TruncatedTensor as e:
        raise ModelLoadError(f"{path}: truncated GGUF file: {e}") from None
    except Exception as e:  # corrupt files fail in numpy memmap or header parsing
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


def llama3_scaling(factors: np.ndarray, head_dim: int, theta: float, path: Path) -> dict[str, Any]:
    """HF's `llama3` rope_scaling that reproduces a GGUF `rope_freqs` tensor (the per-frequency
    divisors llama.cpp's converter computes from it), or a ModelLoadError naming the tensor."""
    factors = np.asarray(factors, dtype=np.float64).reshape(-1)
    if factors.size != head_dim // 2 or not np.isfinite(factors).all() or (factors <= 0).any():
        raise ModelLoadError(f"{path}: tensor rope_freqs.weight has {factors.size} values, expected "
                             f"{head_dim // 2} positive ones")
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float64) / head_dim)
    wavelen = 2 * math.pi / inv
    factor = float(factors.max())
    # Which (low, high, original context) made them: Meta's own values first; else solved from the
    # smoothed frequencies, where 1 / f = (1 - s) / factor + s and s = (old / wavelen - low) / (high - low)
    # (low = 1 by convention: any triple that reproduces the factors gives the same rotary).
    candidates = [(1.0, 4.0, 8192.0), (1.0, 4.0, 4096.0), (1.0, 2.0, 8192.0)]
    medium = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    if factor > 1 and medium.any():
        s = (1 / factors[medium] - 1 / factor) / (1 - 1 / factor)
        if medium.sum() >= 2:  # s = a / wavelen - b, with a = old / (high - 1), b = 1 / (high - 1)
            a, b = np.linalg.lstsq(np.stack([1 / wavelen[medium], -np.ones(int(medium.sum()))], 1), s, rcond=None)[0]
            if b > 0:
                candidates.append((1.0, 1 + 1 / b, a / b))
        else:
            candidates.append((1.0, 4.0, float(wavelen[medium][0] * (s[0] * 3 + 1))))
    for low, high, old in candidates:
        smooth = (old / wavelen - low) / (high - low)
        want = np.where(wavelen < old / high, 1.0,
                        np.where(wavelen > old / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
        if np.allclose(want, factors, rtol=1e-4, atol=1e-6):
            old = int(round(old)) if abs(old - round(old)) < 1e-3 else old
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                    "original_max_position_embeddings": old}
    raise ModelLoadError(f"{path}: tensor rope_freqs.weight holds frequency factors that are not Llama 3 rope "
                         "scaling (unsupported)")


def gguf_config(meta: dict[str, Any], tensor_names: set[str], path: Path,
                rope_freqs: np.ndarray | None = None) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in _ARCHS:
        raise ModelLoadError(f"{path}: unsupported GGUF architecture {arch!r} (supported: {', '.join(_ARCHS)})")
    if "rope_freqs.weight" in tensor_names and rope_freqs is None:
        raise ModelLoadError(f"{path}: tensor rope_freqs.weight could not be read")

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
        if rope_freqs is not None:  # Llama 3.x: the factors are a tensor, not metadata
            if scaling is not None:
                raise ModelLoadError(f"{path}: both rope_freqs.weight and rope.scaling.type {scaling_type!r}")
            head_dim = int(get("attention.key_length") or get("rope.dimension_count") or hidden // heads)
            scaling = llama3_scaling(rope_freqs, head_dim, float(get("rope.freq_base", 10000.0)), path)
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


def _kept_blocks(t, fmt: str, path: Path) -> np.ndarray:
    """A Q8_0 / Q4_0 / Q4_1 tensor's bytes as uint8 [rows, row_bytes], checked against its shape."""
    dims = [int(d) for d in t.shape]
    if len(dims) != 2 or dims[0] % 32:
        raise ModelLoadError(f"{path}: tensor {t.name}: shape {dims} is not rows of whole {fmt} blocks of 32")
    cols, rows = dims
    row_bytes = cols // 32 * BLOCK_BYTES[fmt]
    data = np.asarray(t.data)
    if data.dtype != np.uint8 or data.size != rows * row_bytes:
        raise ModelLoadError(f"{path}: tensor {t.name}: {data.size} bytes of {fmt} blocks, expected {rows * row_bytes}"
                             " (truncated or wrong shape)")
    return data.reshape(rows, row_bytes)


def _hf_name(tname: str, path: Path) -> str:
    if tname in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[tname]
    m = _BLOCK.fullmatch(tname)
    if not m or m.group(2) not in _BLOCK_NAMES:
        raise ModelLoadError(f"{path}: unexpected tensor {tname!r} for a Llama-family model")
    return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"


def _quantizable(name: str, quantize: str) -> bool:
    """Linear weights (projections, the LM head) and the (maybe tied) embeddings; nf4 follows QLoRA:
    the embeddings and the LM head stay in the compute dtype."""
    if name.endswith("_proj.weight"):
        return True
    return name in ("lm_head.weight", "model.embed_tokens.weight") and quantize != "nf4"


def gguf_weights(reader, cfg: ModelConfig, arch: str, path: Path, quantize: str = "none"
                 ) -> tuple[dict[str, torch.Tensor], dict[str, QuantBlocks | QuantSource]]:
    """(fp32 tensors, quantized weights), both under HF names. `quantize`: see quant_blocks.py."""
    check_mode(quantize)
    out: dict[str, torch.Tensor] = {}
    quant: dict[str, QuantBlocks | QuantSource] = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue  # read into the config (llama3 rope scaling)
        name = _hf_name(t.name, path)
        ttype = t.tensor_type.name.lower()
        n_heads = (cfg.num_attention_heads if name.endswith(("q_proj.weight", "q_proj.bias")) else
                   cfg.num_key_value_heads if name.endswith(("k_proj.weight", "k_proj.bias")) else 0)
        quantizable = _quantizable(name, quantize)
        if quantize == "auto" and quantizable and ttype in KEPT:
            raw = _kept_blocks(t, ttype, path)
            if arch == "llama" and n_heads:
                raw = reverse_permute(raw, n_heads)  # whole rows of blocks move: no dequantization
            rows = torch.from_numpy(np.ascontiguousarray(raw).copy())  # own copy: the map may close
            quant[name] = QuantBlocks(ttype, rows, rows.shape[0], int(t.shape[0]))
            continue
        try:
            w = _dequantize(t)
        except NotImplementedError as e:
            raise ModelLoadError(f"{path}: tensor {t.name} uses an unsupported quantization ({e})") from None
        except Exception as e:
            raise ModelLoadError(f"{path}: tensor {t.name} is corrupt or truncated ({type(e).__name__}: {e})") from None
        if arch == "llama" and n_heads:
            w = reverse_permute(w, n_heads)
        w = np.ascontiguousarray(w, dtype=np.float32)
        # Unquantized tensors are read-only views of the memory map: copy those.
        wt = torch.from_numpy(w if w.flags.writeable else w.copy())
        if quantizable and quantize in MODE_FORMAT:
            quant[name] = QuantSource(MODE_FORMAT[quantize], wt, ttype)
        elif quantizable and quantize == "auto" and ttype in KQUANT_TARGET:
            quant[name] = QuantSource(KQUANT_TARGET[ttype], wt, ttype)
        else:
            out[name] = wt
    _unify_fused_groups(out, quant)
    return out, quant


_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _unify_fused_groups(out: dict[str, torch.Tensor], quant: dict[str, QuantBlocks | QuantSource]) -> None:
    """q|k|v and gate|up run as one fused weight, so their parts must share one format: when a file
    mixes them (Q4_K_M: attn_v is Q6_K), every part becomes a float source of the widest format."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    for name in [n for n in quant if n.endswith(("q_proj.weight", "gate_proj.weight"))]:
        prefix, _, first = name.rpartition(".")[0].rpartition(".")
        group = next(g for g in _GROUPS if g[0] == first)
        names = [f"{prefix}.{p}.weight" for p in group]
        parts = [quant.get(n) for n in names]
        kinds = {(type(p).__name__, p.format) if p is not None else None for p in parts}
        if len(kinds) == 1:
            continue
        fmt = max((p.format for p in parts if p is not None), key=FORMAT_BITS.__getitem__)
        for n, p in zip(names, parts, strict=True):
            if isinstance(p, QuantBlocks):
                w = dequantize(p.data.numpy(), GGMLQuantizationType[p.format.upper()])
                quant[n] = QuantSource(fmt, torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)), p.format)
            elif isinstance(p, QuantSource):
                quant[n] = QuantSource(fmt, p.weight, p.note)
            elif n in out:
                quant[n] = QuantSource(fmt, out.pop(n), "float")
        log.info("%s.{%s}: mixed formats in one fused projection, all converted to %s", prefix, ",".join(group), fmt)


def load_gguf(path: Path, quantize: str = "none"):
    """(config, HF-named fp32 CPU tensors, quantized weights by HF name, tokenizer) of a GGUF file."""
    reader = _open(path)
    try:
        meta = read_metadata(reader)
    except Exception as e:
        raise ModelLoadError(f"{path}: corrupt GGUF metadata ({type(e).__name__}: {e})") from None
    names = {t.name for t in reader.tensors}
    rope_freqs = None
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            try:
                rope_freqs = _dequantize(t)
            except Exception as e:
                raise ModelLoadError(f"{path}: tensor rope_freqs.weight cannot be read ({type(e).__name__}: {e})") from None
    cfg = gguf_config(meta, names, path, rope_freqs)
    tokenizer = build_gguf_tokenizer(meta, path)
    weights, quant = gguf_weights(reader, cfg, meta["general.architecture"], path, quantize)
    return cfg, weights, quant, tokenizer
