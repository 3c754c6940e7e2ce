"""Server settings: one frozen dataclass, filled from CLI flags with `LORAMUX_<FLAG>` env fallbacks.

Data flow: `argv` -> `build_parser()` (each flag's default read from the environment, parsed with the
flag's own type, so a bad env value fails exactly like a bad flag) -> `ServerSettings.from_namespace`
-> `__post_init__` validation (ValueError naming the flag). The CLI, the app factory and the engine
builder all read this one object; nothing mutates it afterwards.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields

ENV_PREFIX = "LORAMUX_"
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZE = ("auto", "none", "int8", "int4", "nf4")  # server/model/quant_blocks.py QUANTIZE_MODES
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


@dataclass(frozen=True)
class ServerSettings:
    """Everything `loramux serve` can be told. Limits are enforced by the HTTP layer before enqueueing."""

    model: str = "default"
    adapter_dir: str | None = None  # None: the engine picks its default store location
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 64
    # None ("auto"): derived from memory when the engine is built (see the flag's help)
    max_adapters_per_batch: int | None = None
    max_cpu_adapters: int = 64  # adapters kept in host memory (LRU) above the device slots
    gpu_memory_utilization: float = 0.85  # CUDA: share of free device memory the KV cache may take
    max_num_batched_tokens: int = 2048  # per-step token budget (prefill chunks + decodes)
    # prefill beside decode rows adds at most this multiple of a decode-only step (0: off; docs/long_context.md)
    max_decode_stall: float = 1.5
    max_lora_rank: int = 16  # slot buffers are padded to this rank (vLLM default): raise it for bigger adapters
    kv_cache_tokens: int | None = None  # None: sized automatically from free memory
    prefix_caching: str = "on"  # reuse the KV of cached block-aligned prompt prefixes (per adapter version)
    max_model_len: int | None = None  # None: the model's context, lowered (with a warning) to what the KV cache holds
    device: str = "auto"
    dtype: str = "auto"
    quantize: str = "auto"  # base weights kept quantized: see docs/quantization.md
    api_key: str | None = None  # inference scope (an admin key also works for inference)
    admin_key: str | None = None  # adapter upload/delete scope
    # HTTP limits
    max_body_bytes: int = 1 << 20  # JSON request bodies
    max_upload_bytes: int = 256 << 20  # multipart adapter uploads
    max_n: int = 4
    max_logprobs: int = 20
    max_stop: int = 4
    max_stop_len: int = 256
    max_waiting: int = 1024  # engine queue cap; beyond it requests get 503 + Retry-After
    # lifecycle
    drain_timeout_s: float = 30.0
    unload_timeout_s: float = 30.0
    step_stall_s: float = 60.0  # /ready turns 503 when the step loop makes no progress this long
    log_level: str = "info"
    # scale-out on Ray Serve (server/cluster/, docs/ray.md): 1 without an address = the single server
    replicas: int = 1
    ray_address: str | None = None  # join this Ray cluster; None: start a local Ray in-process
    # Hidden test hook "module:callable" building an EngineClient from settings (see server/cli.py).
    engine_factory: str | None = None

    def __post_init__(self) -> None:
        if not (0 < self.port < 65536):
            raise ValueError("--port: must be in 1..65535")
        positive = ("max_batch_size", "max_lora_rank", "max_body_bytes", "max_upload_bytes", "max_n",
                    "max_stop_len", "max_waiting", "max_cpu_adapters", "max_num_batched_tokens")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: must be >= 1")
        if self.max_adapters_per_batch is not None and self.max_adapters_per_batch < 1:
            raise ValueError("--max-adapters-per-batch: must be >= 1 (or auto)")
        if not (0.0 < self.gpu_memory_utilization <= 1.0):
            raise ValueError("--gpu-memory-utilization: must be in (0, 1]")
        if self.max_num_batched_tokens < self.max_batch_size:
            raise ValueError(f"--max-num-batched-tokens: must be >= --max-batch-size ({self.max_batch_size}), "
                             "so every running sequence can decode in one step")
        if not (self.max_decode_stall >= 0):
            raise ValueError("--max-decode-stall: must be >= 0 (0: off)")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < 1:
            raise ValueError("--kv-cache-tokens: must be >= 1")
        if self.prefix_caching not in ("on", "off"):
            raise ValueError("--prefix-caching: must be on or off")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("--max-model-len: must be >= 2 (or auto)")
        if not (0 <= self.max_logprobs <= 20):
            raise ValueError("--max-logprobs: must be in [0, 20]")
        if self.max_stop < 0:
            raise ValueError("--max-stop: must be >= 0")
        for name in ("drain_timeout_s", "unload_timeout_s", "step_stall_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')}: must be >= 0")
        if self.device not in DEVICES:
            raise ValueError(f"--device: must be one of {', '.join(DEVICES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype: must be one of {', '.join(DTYPES)}")
        if self.quantize not in QUANTIZE:
            raise ValueError(f"--quantize: must be one of {', '.join(QUANTIZE)}")
        if self.replicas < 1:
            raise ValueError("--replicas: must be >= 1")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"--log-level: must be one of {', '.join(LOG_LEVELS)}")
        for name in ("api_key", "admin_key"):
            if getattr(self, name) == "":
                raise ValueError(f"--{name.replace('_', '-')}: must not be empty")

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_key or self.admin_key)

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> ServerSettings:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in vars(ns).items() if k in names})

    @classmethod
    def from_args(cls, argv: list[str] | None = None, env: dict[str, str] | None = None) -> ServerSettings:
        """Parse `serve` flags (no subcommand) with env fallbacks; ValueError on bad values."""
        parser = _RaisingParser(prog="loramux serve")
        add_serve_arguments(parser, env)
        return cls.from_namespace(parser.parse_args(argv or []))


class _RaisingParser(argparse.ArgumentParser):
    """Turns argparse's print-and-exit into a ValueError, for library use of `from_args`."""

    def error(self, message: str):
        raise ValueError(message)


def _opt_int(text: str) -> int | None:
    return None if text.lower() in ("", "auto", "none") else int(text)


def _opt_str(text: str) -> str | None:
    return text or None


# (flag, type, help). Defaults come from the dataclass; argparse parses string env defaults with `type`.
_FLAGS: list[tuple[str, object, str]] = [
    ("model", str, "model directory, GGUF file, or 'default' (embedded SmolLM2-135M-Instruct)"),
    ("adapter-dir", _opt_str, "directory of the adapter store"),
    ("host", str, "bind address (default 127.0.0.1: loopback only)"),
    ("port", int, "TCP port"),
    ("max-batch-size", int, "most sequences per engine step"),
    ("max-adapters-per-batch", _opt_int, "distinct adapters per step (= device adapter slots). auto: one "
     "slot per batch row (--max-batch-size), capped so that the slot buffers (per slot: LoRA A and B of "
     "every projection of every layer at --max-lora-rank, in the model dtype) take at most 10%% of the "
     "device's memory (host RAM on the CPU)"),
    ("max-cpu-adapters", int, "adapters kept in host memory (LRU) besides the device slots; the rest are "
     "read from the adapter store on demand"),
    ("gpu-memory-utilization", float, "CUDA: share of free device memory the KV cache may take when "
     "--kv-cache-tokens is auto"),
    ("max-num-batched-tokens", int, "per-step token budget (prefill chunks + decodes); >= --max-batch-size"),
    ("max-decode-stall", float, "in a step that carries decode rows, prefill chunks may add at most this "
     "multiple of the measured decode-only step time, so a long prompt cannot stall running streams "
     "(their typical inter-token latency stays near 1 + this times its usual value); a prompt with no "
     "stream beside it prefills at the full budget. 0: off (docs/long_context.md)"),
    ("max-lora-rank", int, "largest accepted LoRA rank"),
    ("kv-cache-tokens", _opt_int, "KV cache capacity in tokens (auto: from free memory)"),
    ("prefix-caching", str, "on | off: keep the KV of finished requests' full blocks and reuse the longest "
     "cached prefix of a new prompt; keyed by the adapter version's content hash, so adapters never "
     "share KV (docs/long_context.md)"),
    ("max-model-len", _opt_int, "longest prompt + max_tokens (auto: the model's context, lowered with a "
     "warning to what the KV cache holds)"),
    ("device", str, "auto | cpu | cuda"),
    ("dtype", str, "auto | float32 | bfloat16 | float16"),
    ("quantize", str, "base weights kept quantized in memory: auto (a GGUF file's own Q8_0/Q4_0/Q4_1 "
                      "blocks, the embedded model's included (on CUDA it is dequantized); K-quants "
                      "converted; HF weights as they are; see docs/quantization.md) | none (dequantize) | "
                      "int8 | int4 | nf4 (quantize at load)"),
    ("api-key", _opt_str, "bearer key for inference routes"),
    ("admin-key", _opt_str, "bearer key for adapter upload/delete (also valid for inference)"),
    ("max-body-bytes", int, "largest JSON request body"),
    ("max-upload-bytes", int, "largest adapter upload body"),
    ("max-n", int, "largest `n` (choices per prompt)"),
    ("max-logprobs", int, "largest `logprobs` / `top_logprobs`"),
    ("max-stop", int, "most stop strings per request"),
    ("max-stop-len", int, "longest stop string (characters)"),
    ("max-waiting", int, "queue cap; beyond it 503 + Retry-After"),
    ("drain-timeout-s", float, "seconds running requests get to finish after SIGTERM"),
    ("unload-timeout-s", float, "seconds DELETE /v1/adapters/{name} waits for in-flight requests"),
    ("step-stall-s", float, "/ready fails when the step loop is stuck this long"),
    ("log-level", str, "critical | error | warning | info | debug"),
    ("replicas", int, "engine replicas behind one API, on Ray Serve (needs `pip install loramux[ray]`; "
     "docs/ray.md). 1 (default) without --ray-address: the single-process server"),
    ("ray-address", _opt_str, "join this Ray cluster (e.g. ray://head:10001 or auto) instead of starting a "
     "local Ray in-process; the adapter dir must be one directory every node reads (a shared filesystem)"),
]


def add_serve_arguments(parser: argparse.ArgumentParser, env: dict[str, str] | None = None) -> None:
    """Adds every `serve` flag; each flag's default is `LORAMUX_<FLAG>` from `env` when set."""
    env = os.environ if env is None else env
    defaults = ServerSettings()
    for flag, typ, help_text in _FLAGS:
        dest = flag.replace("-", "_")
        env_name = ENV_PREFIX + dest.upper()
        default = env.get(env_name, getattr(defaults, dest))
        parser.add_argument(f"--{flag}", dest=dest, type=typ, default=default,
                            help=f"{help_text} [env {env_name}]")
    # Hidden: lets tests run the real CLI/uvicorn/signal path on a fake engine.
    parser.add_argument("--engine-factory", dest="engine_factory", type=_opt_str,
                        default=env.get(ENV_PREFIX + "ENGINE_FACTORY"), help=argparse.SUPPRESS)
