"""Loader for a Hugging Face model directory (safetensors only; no code, no pickle is executed).

Reads `config.json` -> `ModelConfig`; `model.safetensors`, the sharded
`model.safetensors.index.json`, or any `*.safetensors` -> HF-named tensors; `tokenizer.json` +
`tokenizer_config.json` / `chat_template.jinja` + `generation_config.json` -> `Tokenizer`.
Every failure becomes a one-line `ModelLoadError`.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import tokenizers
import torch
from safetensors import safe_open

from server.model.config import ModelConfig
from server.model.errors import ModelLoadError
from server.model.tokenizer import Tokenizer


def _read_json(path: Path, required: bool = True) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise ModelLoadError(f"{path.parent}: missing {path.name}")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def read_hf_config(root: Path) -> ModelConfig:
    cfg = _read_json(root / "config.json")
    gen = _read_json(root / "generation_config.json", required=False)
    if gen.get("eos_token_id") is not None:
        # generation_config's eos list (e.g. Llama 3's <|eot_id|>) wins over config.json's.
        cfg = {**cfg, "eos_token_id": gen["eos_token_id"]}
    return ModelConfig.from_hf_dict(cfg)


def _safetensors_files(root: Path) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index}: no weight_map")
        files = [root / f for f in sorted(set(weight_map.values()))]
    elif (root / "model.safetensors").is_file():
        files = [root / "model.safetensors"]
    else:
        files = sorted(root.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{root}: no model.safetensors (pickled .bin checkpoints are not loaded)")
    for f in files:
        if not f.is_file() or f.resolve().parent != root.resolve():
            raise ModelLoadError(f"{root}: shard {f.name} is missing")
    return files


def read_hf_weights(root: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in _safetensors_files(root):
        try:
            with safe_open(str(f), framework="pt", device="cpu") as st:
                for name in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                    tensors[name] = st.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types for corrupt headers/data
            raise ModelLoadError(f"{f}: corrupt or truncated safetensors file ({type(e).__name__}: {e})") from None
    return tensors


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def read_hf_tokenizer(root: Path, cfg: ModelConfig) -> Tokenizer:
    path = root / "tokenizer.json"
    if not path.is_file():
        raise ModelLoadError(f"{root}: missing tokenizer.json")
    try:
        tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot be parsed ({e})") from None
    tc = _read_json(root / "tokenizer_config.json", required=False)
    template = tc.get("chat_template")
    if isinstance(template, list):  # [{name, template}, ...]: use the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if template is None and (root / "chat_template.jinja").is_file():
        template = (root / "chat_template.jinja").read_text(encoding="utf-8")
    bos = cfg.bos_token_id
    if bos is None and _token_content(tc.get("bos_token")):
        bos = tok.token_to_id(_token_content(tc.get("bos_token")))
    eos = list(cfg.eos_token_ids)
    eos_tok = _token_content(tc.get("eos_token"))
    if eos_tok and tok.token_to_id(eos_tok) is not None and tok.token_to_id(eos_tok) not in eos:
        eos.append(tok.token_to_id(eos_tok))
    return Tokenizer(tok, eos_token_ids=eos, bos_token_id=bos, chat_template=template)


def load_hf_dir(root: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """(config, HF-named CPU tensors, tokenizer) of a Hugging Face model directory."""
    cfg = read_hf_config(root)
    tokenizer = read_hf_tokenizer(root, cfg)
    if not cfg.eos_token_ids and tokenizer.eos_token_ids:
        cfg = dataclasses.replace(cfg, eos_token_ids=tokenizer.eos_token_ids)
    return cfg, read_hf_weights(root), tokenizer
