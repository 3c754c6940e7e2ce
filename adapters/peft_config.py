"""Parse and check a PEFT `adapter_config.json` (bytes in, frozen `LoraConfig` out).

The file is untrusted data: it is size-capped, parsed as plain JSON (never through transformers or
peft), type-checked field by field, and anything we do not implement is refused with
`unsupported_feature` instead of being silently ignored. Matching follows PEFT exactly:
- `target_modules` as a string is a full-match regex on the module path; as a list, an entry matches
  a path equal to it or ending in ".<entry>"; "all-linear" means every projection;
- `layers_to_transform` (+ `layers_pattern`) restricts list-form targets to some layer indices;
- `rank_pattern` / `alpha_pattern` keys match a path when `(.*\\.)?(<key>)$` matches it (first key wins).
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from adapters.errors import AdapterError

MAX_CONFIG_BYTES = 64 * 1024
# Module names that would need embedding / lm_head LoRA (trainable tokens): refused.
EMBEDDING_MODULES = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out")
_UNSUPPORTED_TRUTHY = {  # field -> why it is refused when set / truthy
    "use_dora": "DoRA (use_dora) is not supported",
    "modules_to_save": "modules_to_save (fully trained extra modules) is not supported",
    "trainable_token_indices": "trainable token embeddings are not supported",
    "layer_replication": "layer_replication is not supported",
    "target_parameters": "target_parameters (parameter-level LoRA) is not supported",
    "lora_bias": "lora_bias is not supported",
    "use_qalora": "QALoRA is not supported",
    "megatron_config": "megatron parallel LoRA layers are not supported",
}


@dataclass(frozen=True)
class LoraConfig:
    r: int
    lora_alpha: float
    use_rslora: bool = False
    target_modules: str | tuple[str, ...] = ()
    exclude_modules: str | tuple[str, ...] = ()
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] = ()
    rank_pattern: Mapping[str, int] = field(default_factory=dict, hash=False)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict, hash=False)
    fan_in_fan_out: bool = False
    base_model_name_or_path: str | None = None

    # --- PEFT matching semantics --------------------------------------------------------------
    def targets(self, path: str) -> bool:
        """Whether PEFT would put a LoRA layer on the module at `path` (model.layers.N.x.y_proj)."""
        if _matches_list_or_regex(self.exclude_modules, path):
            return False
        if isinstance(self.target_modules, str):
            if self.target_modules == "all-linear":
                return True  # we only ever ask about the seven projections
            return re.fullmatch(self.target_modules, path) is not None
        if not _matches_list_or_regex(self.target_modules, path):
            return False
        if self.layers_to_transform is None:
            return True
        # PEFT: the layer index is the first numbered segment (after a layers_pattern name if given).
        match = None
        if not self.layers_pattern:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
        else:
            for pattern in self.layers_pattern:
                match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", path)
                if match is not None:
                    break
        return match is not None and int(match.group("idx")) in self.layers_to_transform

    def rank_for(self, path: str) -> int:
        return int(self.rank_pattern.get(_pattern_key(self.rank_pattern, path), self.r))

    def alpha_for(self, path: str) -> float:
        return float(self.alpha_pattern.get(_pattern_key(self.alpha_pattern, path), self.lora_alpha))

    def scaling_for(self, path: str, rank: int) -> float:
        """PEFT's LoRA scaling for a module of rank `rank`: alpha / r, or alpha / sqrt(r) (rsLoRA)."""
        alpha = self.alpha_for(path)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    @property
    def max_configured_rank(self) -> int:
        return max([self.r, *self.rank_pattern.values()])


def _matches_list_or_regex(spec: str | tuple[str, ...], path: str) -> bool:
    if isinstance(spec, str):
        return bool(spec) and re.fullmatch(spec, path) is not None
    return path in spec or any(path.endswith(f".{name}") for name in spec)


def _pattern_key(patterns: Mapping[str, object], path: str) -> str:
    """peft.utils.other.get_pattern_key: first key whose regex matches a dotted suffix of path."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", path):
            return key
    return path


def _bad(message: str, keys=()) -> AdapterError:
    return AdapterError("bad_config", message, keys)


def _compile(pattern: str, what: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise _bad(f"{what} is not a valid regular expression ({exc})", [pattern]) from None


def _str_or_list(value, what: str) -> str | tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        _compile(value, what)
        return value
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    raise _bad(f"{what} must be a string or a list of non-empty strings")


def _number(value, what: str, *, integer: bool) -> float:
    ok_types = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_types) or not math.isfinite(value) or value <= 0:
        kind = "a positive integer" if integer else "a positive finite number"
        raise _bad(f"{what} must be {kind}, got {value!r}")
    return value


def _pattern_dict(value, what: str, *, integer: bool) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(f"{what} must be an object")
    out = {}
    for key, v in value.items():
        _compile(key, f"{what} key")
        out[key] = _number(v, f"{what}[{key!r}]", integer=integer)
    return out


def parse_adapter_config(data: bytes) -> LoraConfig:
    """Parse adapter_config.json bytes; raise AdapterError on anything malformed or unsupported."""
    if len(data) > MAX_CONFIG_BYTES:
        raise AdapterError("config_too_large", f"adapter_config.json is {len(data)} bytes (cap {MAX_CONFIG_BYTES})")
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise _bad(f"adapter_config.json is not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(raw, dict):
        raise _bad("adapter_config.json must be a JSON object")

    peft_type = raw.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterError("unsupported_feature", f"peft_type {peft_type!r} is not supported (only LORA)")
    refused = [k for k, why in _UNSUPPORTED_TRUTHY.items() if raw.get(k)]
    if refused:
        raise AdapterError("unsupported_feature", "; ".join(_UNSUPPORTED_TRUTHY[k] for k in refused), refused)
    bias = raw.get("bias", "none")
    if bias != "none":
        raise AdapterError("unsupported_feature", f"bias={bias!r} is not supported (only 'none')")

    target_modules = _str_or_list(raw.get("target_modules"), "target_modules")
    if not target_modules:
        raise _bad("target_modules is missing or empty")
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    embed = [n for n in names if any(e in n for e in EMBEDDING_MODULES)]
    if embed:
        raise AdapterError("unsupported_feature", "LoRA on embeddings / lm_head is not supported", embed)

    layers = raw.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if layers is not None and not (
        isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)
    ):
        raise _bad("layers_to_transform must be a non-negative integer or a list of them")
    layers_pattern = _str_or_list(raw.get("layers_pattern"), "layers_pattern")
    if isinstance(layers_pattern, str):
        layers_pattern = (layers_pattern,)

    for flag in ("use_rslora", "fan_in_fan_out"):
        if not isinstance(raw.get(flag, False), bool):
            raise _bad(f"{flag} must be true or false")
    return LoraConfig(
        r=int(_number(raw.get("r", 8), "r", integer=True)),
        lora_alpha=float(_number(raw.get("lora_alpha", 8), "lora_alpha", integer=False)),
        use_rslora=raw.get("use_rslora", False),
        target_modules=target_modules,
        exclude_modules=_str_or_list(raw.get("exclude_modules"), "exclude_modules"),
        layers_to_transform=tuple(layers) if layers else None,
        layers_pattern=layers_pattern,
        rank_pattern=_pattern_dict(raw.get("rank_pattern"), "rank_pattern", integer=True),
        alpha_pattern=_pattern_dict(raw.get("alpha_pattern"), "alpha_pattern", integer=False),
        fan_in_fan_out=raw.get("fan_in_fan_out", False),
        base_model_name_or_path=raw.get("base_model_name_or_path")
        if isinstance(raw.get("base_model_name_or_path"), str) else None,
    )
