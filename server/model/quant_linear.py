"""Quantized base weights as module substitutions: `QuantLinear`, `QuantEmbedding`, `apply_quantization`.

The loaders leave, per module path, kept GGUF blocks or a float weight to quantize
(`LoadedModel.quant`, server/model/quant_blocks.py) and a NaN placeholder in the float model. The
engine builder calls `apply_quantization(loaded)` first thing: each entry becomes a
`kernels.quant.QuantizedWeight` (kept blocks wrapped byte for byte; float sources quantized, the
error of a K-quant conversion logged against the file's own dequantization) on the model's device,
and the placeholder module is replaced:

    nn.Linear   -> QuantLinear(qweight, bias)   forward: kernels.quant.quantized_linear (C++ on the
                                                CPU, Triton on CUDA), output in the compute dtype
    nn.Embedding -> QuantEmbedding(qweight)     forward: dequantizes only the rows it reads

A tied LM head shares the embedding's QuantizedWeight (counted once). LoRA wraps a QuantLinear like
any base linear (it needs `out_features`): the delta runs on the activations in the compute dtype.
`weight_report(model)` gives the base's weight format(s) and resident bytes for `GET /v1/models`.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from kernels import quant as kq
from kernels import quant_reference
from server.model.quant_blocks import QuantBlocks, QuantSource

log = logging.getLogger("loramux.model")


class QuantLinear(nn.Module):
    """y [..., out] = x [..., in] @ W.T (+ bias), W kept quantized; y in x's dtype."""

    def __init__(self, qweight: kq.QuantizedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.qweight = qweight
        self.in_features, self.out_features = qweight.in_features, qweight.out_features
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kq.quantized_linear(x, self.qweight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.qweight.format}, in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class QuantEmbedding(nn.Module):
    """Embedding lookup from a quantized [vocab, hidden] matrix: the rows read are dequantized (the
    format's spec, kernels/quant_reference.py) into the compute dtype."""

    def __init__(self, qweight: kq.QuantizedWeight, dtype: torch.dtype) -> None:
        super().__init__()
        if qweight.format == "nf4":
            raise ValueError("nf4 embeddings are not kept quantized (QLoRA keeps them in the compute dtype)")
        self.qweight, self.dtype = qweight, dtype
        self.num_embeddings, self.embedding_dim = qweight.out_features, qweight.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.qweight.data[ids.reshape(-1)]  # [T, row_bytes]
        out = quant_reference.DEQUANTIZE_BLOCKS[self.qweight.format](rows)  # [T, hidden] fp32
        return out.to(self.dtype).view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.qweight.format}, {self.num_embeddings}x{self.embedding_dim}"


def to_qweight(entry: QuantBlocks | QuantSource, name: str) -> kq.QuantizedWeight:
    """A loader's entry -> QuantizedWeight on the CPU (kept blocks as they are; sources quantized)."""
    if isinstance(entry, QuantBlocks):
        return kq.QuantizedWeight(entry.format, entry.data, entry.out_features, entry.in_features)
    qw = kq.quantize(entry.weight, entry.format)
    if entry.note:  # converted from a file's tensor (a K-quant, a mixed fused group, a requantization)
        err = kq.quant_error(entry.weight, qw)
        log.info("%s: %s converted to %s, max |error| %.3g, relative RMS error %.3g against the file's "
                 "dequantization", name, entry.note, qw.format, err.max_abs, err.rel_rms)
    return qw


def apply_quantization(loaded) -> int:
    """Substitute the quantized modules `loaded.quant` asks for (a `server.model.loader.LoadedModel`);
    returns how many; empties `loaded.quant`. Idempotent."""
    model, device, dtype = loaded.model, loaded.device, loaded.dtype
    done: dict[str, kq.QuantizedWeight] = {}
    for path, entry in list(loaded.quant.items()):
        try:
            qw = to_qweight(entry, path).to(device)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        done[path] = qw
        loaded.quant.pop(path)  # frees a float source as soon as it is quantized
    for path, qw in done.items():
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        old = getattr(parent, attr)
        if isinstance(old, nn.Embedding):
            setattr(parent, attr, QuantEmbedding(qw, dtype))
        else:
            bias = old.bias if getattr(old, "bias", None) is not None else None
            setattr(parent, attr, QuantLinear(qw, bias))
    if "model.embed_tokens" in done and model.config.tie_word_embeddings:
        model.lm_head = QuantLinear(done["model.embed_tokens"])  # the tied head shares the blocks
    if done:
        log.info("quantized base weights: %s", weight_report(model)["weight_format"])
    return len(done)


def weight_report(model: nn.Module) -> dict:
    """The base's weight format ("bfloat16", "q4_1", "q4_1+q8_0", ...) and its resident bytes
    (every parameter and quantized weight once; LoRA slot buffers are not the base's)."""
    seen: dict[int, int] = {}
    formats: dict[str, int] = {}
    for m in model.modules():
        qw = getattr(m, "qweight", None)
        if isinstance(qw, kq.QuantizedWeight) and id(qw) not in seen:
            seen[id(qw)] = qw.nbytes
            formats[qw.format] = formats.get(qw.format, 0) + qw.nbytes
    for name, p in model.named_parameters():
        if "lora" in name or id(p) in seen:
            continue
        n = p.numel() * p.element_size()
        seen[id(p)] = n
        if name.endswith("proj.weight") or name.endswith(("lm_head.weight", "embed_tokens.weight")):
            key = str(p.dtype).replace("torch.", "")
            formats[key] = formats.get(key, 0) + n
    fmt = "+".join(sorted(formats, key=lambda k: -formats[k])) or "none"
    return {"weight_format": fmt, "resident_weight_bytes": sum(seen.values()),
            "weight_bytes_by_format": formats}
