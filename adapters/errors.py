"""Adapter errors: one exception type with a stable machine-readable `code`.

Validation, the store and the registry raise `AdapterError(code, message, keys)`; the HTTP layer maps
codes to status codes (`AdapterNotFound` -> 404, `AdapterExists` / `AdapterBusy` -> 409, every other
code -> 400). The message names the offending keys (at most 10, then "... and N more") so a user can
fix the file without reading our source.
"""
from __future__ import annotations

from collections.abc import Iterable

MAX_KEYS_SHOWN = 10

# Stable codes (part of the HTTP contract: clients may switch on them).
CODES = frozenset(
    {
        "not_safetensors",  # pickle / zip / unknown weight format, refused unopened
        "file_too_large",  # weights or config file over its byte cap
        "header_too_large",  # safetensors JSON header over its cap (or longer than the file)
        "bad_header",  # header is not a JSON object of well-formed tensor entries
        "bad_offsets",  # data offsets not contiguous / overlapping / not covering the buffer
        "bad_dtype",  # tensor dtype outside {F16, BF16, F32}
        "non_finite",  # NaN or Inf in a tensor
        "too_many_keys",  # more tensors than the base model can have
        "duplicate_key",  # the same tensor name twice in the header
        "rank_too_large",  # a module's rank exceeds the server's max LoRA rank
        "shape_mismatch",  # tensor shape disagrees with r or with the base model
        "missing_weight",  # lora_A without lora_B (or the reverse)
        "unknown_module",  # key for a module / layer the base model does not have
        "unsupported_feature",  # DoRA, bias, modules_to_save, embeddings, other PEFT types, ...
        "bad_config",  # adapter_config.json malformed or with bad values
        "config_too_large",  # adapter_config.json over 64 KiB
        "bad_name",  # adapter name breaks the name rules
        "empty_adapter",  # no LoRA tensor at all
        "corrupt",  # stored files disagree with their recorded hash
        "not_found",  # no adapter under that name
        "exists",  # name taken and replace not requested
        "in_use",  # unload timed out with requests still in flight
    }
)


def format_keys(keys: Iterable[str]) -> str:
    """'a, b, c' with at most MAX_KEYS_SHOWN names, then '... and N more'."""
    keys = list(keys)
    shown = ", ".join(keys[:MAX_KEYS_SHOWN])
    if len(keys) > MAX_KEYS_SHOWN:
        shown += f", ... and {len(keys) - MAX_KEYS_SHOWN} more"
    return shown


class AdapterError(ValueError):
    """A user-facing adapter problem. Subclasses ValueError so generic handlers map it to 4xx."""

    http_status = 400

    def __init__(self, code: str, message: str, keys: Iterable[str] = ()):
        assert code in CODES, f"unregistered adapter error code {code!r}"
        self.code = code
        self.keys = list(keys)
        self.message = message + (f": {format_keys(self.keys)}" if self.keys else "")
        super().__init__(f"[{code}] {self.message}")


class AdapterNotFound(AdapterError):
    http_status = 404

    def __init__(self, name: str):
        super().__init__("not_found", f"no adapter named {name!r}")
        self.name = name


class AdapterExists(AdapterError):
    http_status = 409

    def __init__(self, name: str):
        super().__init__("exists", f"adapter {name!r} already exists (pass replace to overwrite it)")
        self.name = name


class AdapterBusy(AdapterError):
    http_status = 409

    def __init__(self, name: str, in_flight: int, timeout_s: float, deleting: bool = False):
        message = (f"adapter {name!r} is being deleted; retry once the delete has finished" if deleting else
                   f"adapter {name!r} still has {in_flight} request(s) in flight after {timeout_s:g}s; "
                   "it stays registered")
        super().__init__("in_use", message)
        self.name = name
        self.in_flight = in_flight
