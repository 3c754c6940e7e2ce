"""Adapter validation at registration: (name, config bytes, weights bytes) -> `LoadedAdapter`.

Everything is checked here, once, before anything reaches the engine (a bad adapter loaded lazily
inside a model step would take the engine down). Order: name rules -> adapter_config.json ->
pickle refusal -> safetensors header by hand (caps, offsets) -> key names against the base model ->
A/B pairs and shapes against r and the base dims (all from the header, no data read yet) -> rank
cap -> tensor data (safetensors library) -> finiteness. Each failure is an `AdapterError` code.

Note on `fan_in_fan_out`: in PEFT it only describes the *base* weight layout (GPT-2 Conv1D); LoRA
A/B are always `[r, in]` / `[out, r]`, and PEFT turns the flag off for nn.Linear targets. We do
the same: the flag is accepted and does not change how A/B are read.
"""
from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import torch

from adapters.errors import AdapterError
from adapters.peft_config import EMBEDDING_MODULES, LoraConfig, parse_adapter_config
from adapters.safetensors_io import (
    DEFAULT_HEADER_CAP,
    PICKLE_SUFFIXES,
    check_not_pickle,
    load_tensors,
    parse_header,
)
from adapters.spec import MODULE_INDEX, MODULE_PARENT, MODULES, BaseModelSpec, module_path

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
# base_model.model.<module path>.lora_A.weight, the layout peft's save_pretrained writes.
KEY_RE = re.compile(r"base_model\.model\.(?P<path>.+)\.lora_(?P<ab>[AB])\.weight")
PATH_RE = re.compile(r"model\.layers\.(?P<layer>\d+)\.(?P<parent>\w+)\.(?P<module>\w+)")


def check_name(name: object) -> str:
    """Name rules: [A-Za-z0-9._-]{1,64}, not starting with a dot (no path characters, no '..')."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name.startswith("."):
        raise AdapterError("bad_name", f"adapter name {name!r} must match [A-Za-z0-9._-]{{1,64}} and not start with '.'")
    return name


@dataclass(frozen=True)
class ValidationLimits:
    max_rank: int = 64
    header_cap: int = DEFAULT_HEADER_CAP
    max_weights_bytes: int = 2 << 30
    max_keys: int | None = None  # None: 2 * num_layers * 7 (an A and a B per projection)

    def __post_init__(self):
        if self.max_rank <= 0 or self.header_cap <= 0 or self.max_weights_bytes <= 0:
            raise ValueError("validation limits must be positive")


@dataclass(frozen=True)
class LoRAWeight:
    """One projection's delta: y += scaling * (x @ a.T) @ b.T."""

    a: torch.Tensor  # [rank, in], file dtype, CPU
    b: torch.Tensor  # [out, rank]
    scaling: float
    rank: int


@dataclass(frozen=True)
class LoadedAdapter:
    """A validated adapter in host memory. Treat as immutable: nothing mutates its tensors."""

    name: str
    sha256: str  # identity of the content: hash of (config hash, weights hash)
    weights_sha256: str
    config_sha256: str
    config: LoraConfig = field(repr=False)
    weights: Mapping[tuple[int, str], LoRAWeight] = field(repr=False, hash=False)  # (layer, module) ->

    @property
    def ranks(self) -> dict[str, int]:
        """Highest rank per HF module name over layers."""
        out: dict[str, int] = {}
        for (_, module), w in self.weights.items():
            out[module] = max(out.get(module, 0), w.rank)
        return {m: out[m] for m in MODULES if m in out}

    @property
    def target_modules(self) -> tuple[str, ...]:
        return tuple(self.ranks)

    @property
    def max_rank(self) -> int:
        return max(w.rank for w in self.weights.values())

    @property
    def nbytes(self) -> int:
        return sum(w.a.nbytes + w.b.nbytes for w in self.weights.values())


def _classify_keys(names, spec: BaseModelSpec) -> dict[tuple[int, str], dict[str, str]]:
    """Map header keys to (layer, module) -> {'A': key, 'B': key}; refuse anything else."""
    pairs: dict[tuple[int, str], dict[str, str]] = {}
    unsupported, unknown = [], []
    for key in names:
        m = KEY_RE.fullmatch(key)
        p = PATH_RE.fullmatch(m.group("path")) if m else None
        if "lora_magnitude_vector" in key or "lora_embedding" in key or any(e in key for e in EMBEDDING_MODULES):
            unsupported.append(key)  # DoRA magnitudes, embedding LoRA, lm_head: not served
        elif m is None and key.endswith(".bias"):
            unsupported.append(key)
        elif p is None or MODULE_PARENT.get(p["module"]) != p["parent"] or int(p["layer"]) >= spec.num_layers:
            unknown.append(key)  # not a projection of ours, or a layer index past the model's depth
        else:
            pairs.setdefault((int(p["layer"]), p["module"]), {})[m["ab"]] = key
    if unsupported:
        raise AdapterError("unsupported_feature", "tensors for unsupported LoRA features (DoRA, bias, embeddings)", unsupported)
    if unknown:
        raise AdapterError("unknown_module", f"keys for modules or layers the base model ({spec.architecture}, "
                           f"{spec.num_layers} layers) does not have", unknown)
    return pairs


def validate_adapter(
    name: str,
    config_bytes: bytes,
    weights_bytes: bytes,
    spec: BaseModelSpec,
    limits: ValidationLimits | None = None,
    weights_filename: str = WEIGHTS_FILE,
) -> LoadedAdapter:
    """Validate an uploaded or stored adapter; raise AdapterError with a specific code on failure."""
    limits = limits or ValidationLimits()
    check_name(name)
    config = parse_adapter_config(config_bytes)
    check_not_pickle(weights_filename, weights_bytes)
    if len(weights_bytes) > limits.max_weights_bytes:
        raise AdapterError("file_too_large", f"weights are {len(weights_bytes)} bytes (cap {limits.max_weights_bytes})")
    infos, _ = parse_header(weights_bytes, limits.header_cap)
    max_keys = limits.max_keys or 2 * spec.num_layers * len(MODULES)
    if len(infos) > max_keys:
        raise AdapterError("too_many_keys", f"{len(infos)} tensors, the base model allows at most {max_keys}")
    if not infos:
        raise AdapterError("empty_adapter", "the weights file holds no tensors")
    pairs = _classify_keys(infos, spec)

    missing = [f"{module_path(*lm)}.lora_{'B' if 'A' in ab else 'A'}" for lm, ab in pairs.items() if len(ab) != 2]
    if missing:
        raise AdapterError("missing_weight", "each LoRA module needs both lora_A and lora_B", sorted(missing))
    untargeted = [module_path(*lm) for lm in pairs if not config.targets(module_path(*lm))]
    if untargeted:
        raise AdapterError("unknown_module", "tensors for modules that target_modules / layers_to_transform exclude",
                           sorted(untargeted))

    # Shapes from the header only (no data read yet): A [r, in], B [out, r], r as configured.
    too_big, bad_shape = [], []
    for (layer, module), ab in sorted(pairs.items(), key=lambda kv: (kv[0][0], MODULE_INDEX[kv[0][1]])):
        a_shape, b_shape = infos[ab["A"]].shape, infos[ab["B"]].shape
        want_r = config.rank_for(module_path(layer, module))
        d_in, d_out = spec.module_dims[module]
        r = a_shape[0] if len(a_shape) == 2 else 0
        if max(r, want_r) > limits.max_rank:
            too_big.append(f"{ab['A']} (rank {max(r, want_r)})")
        elif a_shape != (want_r, d_in) or b_shape != (d_out, want_r):
            bad_shape.append(f"{ab['A']} {list(a_shape)} / B {list(b_shape)} (want [{want_r}, {d_in}] / [{d_out}, {want_r}])")
    if too_big:
        raise AdapterError("rank_too_large", f"ranks exceed the server's max LoRA rank {limits.max_rank}", too_big)
    if bad_shape:
        raise AdapterError("shape_mismatch", "LoRA shapes disagree with r or with the base model", bad_shape)

    tensors = load_tensors(weights_bytes)
    weights = {}
    for (layer, module), ab in pairs.items():
        path = module_path(layer, module)
        a, b = tensors[ab["A"]].contiguous(), tensors[ab["B"]].contiguous()
        weights[(layer, module)] = LoRAWeight(a=a, b=b, scaling=config.scaling_for(path, a.shape[0]), rank=a.shape[0])
    w_sha = hashlib.sha256(weights_bytes).hexdigest()
    c_sha = hashlib.sha256(config_bytes).hexdigest()
    return LoadedAdapter(
        name=name,
        sha256=hashlib.sha256(f"{c_sha}:{w_sha}".encode()).hexdigest(),
        weights_sha256=w_sha,
        config_sha256=c_sha,
        config=config,
        weights=MappingProxyType(weights),
    )


def _read_regular(path: Path, cap: int, code: str) -> bytes:
    """Read a regular file without following a symlink, refusing it when over `cap` bytes."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise AdapterError(code, f"cannot open {path.name} ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise AdapterError(code, f"{path.name} is not a regular file")
        if st.st_size > cap:
            raise AdapterError("file_too_large" if code != "bad_config" else "config_too_large",
                               f"{path.name} is {st.st_size} bytes (cap {cap})")
        return f.read(cap + 1)


def read_adapter_dir(directory: Path, max_weights_bytes: int = 2 << 30) -> tuple[bytes, bytes]:
    """(config bytes, weights bytes) of a PEFT directory; pickle weights refused unopened."""
    directory = Path(directory)
    if not (directory / WEIGHTS_FILE).exists():
        pickles = sorted(p.name for p in directory.iterdir() if p.name.lower().endswith(PICKLE_SUFFIXES))
        if pickles:
            raise AdapterError("not_safetensors", "only safetensors weights are accepted", pickles)
        raise AdapterError("not_safetensors", f"{WEIGHTS_FILE} is missing")
    config = _read_regular(directory / CONFIG_FILE, 64 * 1024, "bad_config")
    weights = _read_regular(directory / WEIGHTS_FILE, max_weights_bytes, "not_safetensors")
    return config, weights


def validate_dir(directory: Path, name: str, spec: BaseModelSpec, limits: ValidationLimits | None = None) -> LoadedAdapter:
    """Validate a PEFT save_pretrained directory from local disk."""
    limits = limits or ValidationLimits()
    config, weights = read_adapter_dir(directory, limits.max_weights_bytes)
    return validate_adapter(name, config, weights, spec, limits)
