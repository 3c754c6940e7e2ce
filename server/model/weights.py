"""From Hugging Face-named tensors to a ready `LlamaForCausalLM`.

Both loaders (HF directory, GGUF) produce a dict of tensors under HF names
(`model.layers.N.self_attn.q_proj.weight`, ...). `fuse_hf_weights` concatenates q|k|v into
`qkv_proj` and gate|up into `gate_up_proj` (the runtime's fused layout) and casts to the target dtype;
`build_model` instantiates the model without allocating (meta device), assigns the tensors, re-ties
the embeddings, and moves it to the device. Shape or name mismatches raise `ModelLoadError`.
Quantized weights (server/model/quant_blocks.py) are fused the same way by `fuse_quantized` (kept
blocks concatenate by rows), keyed by module path; `build_model` is given a zero-storage NaN
placeholder for each (`quant_placeholders`) until the builder substitutes the quantized module.
"""
from __future__ import annotations

import re

import torch

from server.model.config import ModelConfig
from server.model.errors import ModelLoadError
from server.model.llama import LlamaForCausalLM
from server.model.quant_blocks import QuantBlocks, QuantSource, fuse_quant, placeholder

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0), "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0), "mlp.up_proj": ("mlp.gate_up_proj", 1),
}
_IGNORED = ("rotary_emb.inv_freq",)


def fuse_hf_weights(hf: dict[str, torch.Tensor], cfg: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """HF-named tensors -> our state dict (fused projections, `dtype`). Consumes `hf`."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[int, torch.Tensor]] = {}
    for name in list(hf):
        t = hf.pop(name)
        if name.endswith(_IGNORED):
            continue
        m = _LAYER.fullmatch(name)
        if m:
            module, _, kind = m.group(2).rpartition(".")
            if module in _FUSED:
                fused, idx = _FUSED[module]
                parts.setdefault(f"model.layers.{m.group(1)}.{fused}.{kind}", {})[idx] = t.to(dtype)
                continue
        out[name] = t.to(dtype)
    for name, pieces in parts.items():
        hf_names = ("q_proj", "k_proj", "v_proj") if ".qkv_proj." in name else ("gate_proj", "up_proj")
        want = len(hf_names)
        if sorted(pieces) != list(range(want)):
            lost = [hf_names[i] for i in range(want) if i not in pieces]
            raise ModelLoadError(f"checkpoint is missing {', '.join(lost)} of {name.rsplit('.', 2)[0]}")
        out[name] = torch.cat([pieces[i] for i in range(want)], dim=0)
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)  # tied checkpoints sometimes store a copy
    return out


def fuse_quantized(quant: dict[str, QuantBlocks | QuantSource], cfg: ModelConfig
                   ) -> dict[str, QuantBlocks | QuantSource]:
    """HF weight names -> module paths of the runtime ("model.layers.0.self_attn.qkv_proj",
    "lm_head", "model.embed_tokens"), q|k|v and gate|up fused. Consumes `quant`."""
    out: dict[str, QuantBlocks | QuantSource] = {}
    parts: dict[str, dict[int, QuantBlocks | QuantSource]] = {}
    for name in list(quant):
        q = quant.pop(name)
        if not name.endswith(".weight"):
            raise ModelLoadError(f"quantized tensor {name} is not a weight")
        m = _LAYER.fullmatch(name)
        module = name[: -len(".weight")]
        if m and m.group(2).rpartition(".")[0] in _FUSED:
            fused, idx = _FUSED[m.group(2).rpartition(".")[0]]
            parts.setdefault(f"model.layers.{m.group(1)}.{fused}", {})[idx] = q
            continue
        out[module] = q
    for module, pieces in parts.items():
        want = 3 if module.endswith("qkv_proj") else 2
        if sorted(pieces) != list(range(want)):
            raise ModelLoadError(f"{module}: some of its fused parts are quantized and some are missing")
        out[module] = fuse_quant([pieces[i] for i in range(want)])
    if cfg.tie_word_embeddings:
        out.pop("lm_head", None)  # the LM head is the embedding matrix
    return out


def quant_placeholders(quant: dict[str, QuantBlocks | QuantSource], dtype: torch.dtype, device: torch.device
                       ) -> dict[str, torch.Tensor]:
    """`{module.weight: NaN placeholder}` for `build_model`'s state (see quant_blocks.placeholder)."""
    with torch.device(device):
        return {f"{module}.weight": placeholder(q.shape, dtype) for module, q in quant.items()}


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], device: torch.device) -> LlamaForCausalLM:
    """Instantiate on the meta device, assign `state` (strict), re-tie, move to `device`, eval()."""
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    if cfg.tie_word_embeddings and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelLoadError(
            f"checkpoint does not match {cfg.architecture}: missing {missing[:4]}{'...' if len(missing) > 4 else ''}"
            f", unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}"
        )
    for name, t in expected.items():
        if tuple(state[name].shape) != tuple(t.shape):
            raise ModelLoadError(f"weight {name} has shape {tuple(state[name].shape)}, config implies {tuple(t.shape)}")
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.to(device).eval().requires_grad_(False)
