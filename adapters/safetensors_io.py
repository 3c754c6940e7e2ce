"""Safe reading of untrusted safetensors bytes: refuse pickles unopened, check the header by hand.

Data flow: `check_not_pickle(filename, data)` -> `parse_header(data)` (our own checks of the
8-byte length, the JSON, every offset and size, before any library sees the bytes) ->
`load_tensors(data, header)` (the safetensors library, then dtype and finiteness checks).
The checks mirror huggingface/safetensors `tensor.rs` with much lower caps, so a malformed file is
refused with a precise code instead of reaching native code.
"""
from __future__ import annotations

import json
import math
import struct
from collections import Counter
from dataclasses import dataclass

import torch
from safetensors.torch import load as st_load

from adapters.errors import AdapterError

DEFAULT_HEADER_CAP = 1 << 20  # 1 MiB of JSON header is ~10k tensors: far more than any LoRA
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
ALLOWED_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
# Element sizes of every safetensors dtype (to check byte ranges even for dtypes we then refuse).
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "F4": 1, "F6_E2M3": 1,
    "F6_E3M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8,
    "I64": 8, "U64": 8, "C64": 8,
}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int  # byte offsets into the data buffer (after the header)
    end: int


def check_not_pickle(filename: str, data: bytes) -> None:
    """Refuse pickle / torch.save zip files by name or magic bytes, without deserialising them."""
    if filename.lower().endswith(PICKLE_SUFFIXES):
        raise AdapterError("not_safetensors", f"{filename!r} is a pickle-based checkpoint; upload safetensors")
    head = data[:4]
    # torch.save writes a zip (PK\x03\x04); raw pickles start with PROTO (0x80) + protocol 2..5.
    if head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
        raise AdapterError("not_safetensors", f"{filename!r} looks like a zip/pickle, not safetensors")
    if not filename.lower().endswith(".safetensors"):
        raise AdapterError("not_safetensors", f"weights file {filename!r} must end with .safetensors")


def _header_pairs(pairs: list[tuple[str, object]]) -> dict:
    """json object hook that refuses duplicate names (json.loads would silently keep the last)."""
    counts = Counter(k for k, _ in pairs)
    dups = sorted(k for k, c in counts.items() if c > 1)
    if dups:
        raise AdapterError("duplicate_key", "the safetensors header names a tensor twice", dups)
    return dict(pairs)


def parse_header(data: bytes, header_cap: int = DEFAULT_HEADER_CAP) -> tuple[dict[str, TensorInfo], dict]:
    """Check the header of a safetensors buffer; return (tensor name -> TensorInfo, __metadata__)."""
    if len(data) < 8:
        raise AdapterError("not_safetensors", f"file is {len(data)} bytes, too short for safetensors")
    (n,) = struct.unpack("<Q", data[:8])  # little-endian u64 header length
    if n > header_cap or n > len(data) - 8:
        raise AdapterError("header_too_large", f"header length {n} exceeds cap {header_cap} or the file size")
    try:
        raw = json.loads(data[8 : 8 + n].decode("utf-8"), object_pairs_hook=_header_pairs)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise AdapterError("bad_header", f"header is not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(raw, dict):
        raise AdapterError("bad_header", "header must be a JSON object")
    meta = raw.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise AdapterError("bad_header", "__metadata__ must map strings to strings")

    infos: dict[str, TensorInfo] = {}
    malformed = []
    for name, entry in raw.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            ints = [*shape, start, end]
            ok = isinstance(dtype, str) and isinstance(shape, list) and all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints
            )
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            malformed.append(name)
            continue
        infos[name] = TensorInfo(dtype, tuple(shape), start, end)
    if malformed:
        raise AdapterError("bad_header", "malformed tensor entries (need dtype, shape, data_offsets)", malformed)
    unknown = [k for k, t in infos.items() if t.dtype not in DTYPE_SIZES]
    if unknown:
        raise AdapterError("bad_dtype", "unknown dtypes", unknown)

    # Offsets: sorted by start they must tile [0, buffer) exactly, each range = numel * itemsize.
    buffer_len = len(data) - 8 - n
    pos = 0
    for name, t in sorted(infos.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        size = math.prod(t.shape) * DTYPE_SIZES[t.dtype]  # Python ints: no overflow
        if t.start != pos or t.end < t.start:
            raise AdapterError("bad_offsets", f"data_offsets leave a gap or overlap at byte {pos}", [name])
        if t.end - t.start != size:
            raise AdapterError("bad_offsets", f"byte range {t.end - t.start} != shape x dtype size {size}", [name])
        pos = t.end
    if pos != buffer_len:
        raise AdapterError("bad_offsets", f"tensors cover {pos} bytes of a {buffer_len}-byte data buffer")
    bad = [k for k, t in infos.items() if t.dtype not in ALLOWED_DTYPES]
    if bad:
        raise AdapterError("bad_dtype", "tensor dtypes must be F16, BF16 or F32", bad)
    return infos, meta


def load_tensors(data: bytes) -> dict[str, torch.Tensor]:
    """Deserialize with the safetensors library (after parse_header) and refuse NaN / Inf."""
    try:
        tensors = st_load(data)
    except Exception as exc:  # the library's own checks: should not fire after parse_header
        raise AdapterError("bad_header", f"safetensors refused the file ({exc})") from None
    non_finite = [k for k, t in tensors.items() if not bool(torch.isfinite(t).all())]
    if non_finite:
        raise AdapterError("non_finite", "tensors contain NaN or Inf", sorted(non_finite))
    return tensors
