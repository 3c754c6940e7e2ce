"""Builders for tests that run the HTTP server and the load-test tool against the REAL engine.

Data flow: `save_tiny_model(dir)` writes the tiny random Llama of `tests/server/model/tiny.py` (byte-level
tokenizer, vocab 256, chat template) with a longer position limit, so streams can outlast adapter
uploads -> `real_settings(...)` + `build_async_engine(settings)` wire model, adapter manager, slot
pool, scheduler and runner exactly as `loramux serve` does -> `tiny_server(...)` puts the real app
on a real uvicorn socket (`tests.api.live.LiveServer`).

The independent references: `merged_model(...)` loads a second, plain copy of the model and folds
each adapter into the base weights (W += scaling * B @ A, no LoRA kernels, no slots), and
`greedy_generate` runs it through its own KV cache; `expected_text(...)` says which text the
server's incremental detokenizer must have produced for a list of generated ids. `World` bundles a
running server with those references; `bad_uploads` builds one upload per validation error code;
`BackgroundStreams` keeps base-model traffic flowing while a test changes adapters.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import pickle
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
from safetensors.torch import save
from tokenizers import Tokenizer

from server.engine.builder import build_async_engine
from server.model.generate import greedy_generate
from server.model.loader import LoadedModel, load_model
from server.settings import ServerSettings
from tests.adapters.helpers import key, make_config, make_tensors, raw_safetensors
from tests.server.api.live import LiveServer
from tests.server.model.tiny import save_tiny_hf

MAX_POSITIONS = 1024  # tiny.py says 64; default RoPE does not depend on it, so streams can be long
N = 24  # tokens per checked answer
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def save_tiny_model(root: Path) -> Path:
    """The tiny random Llama in `root` (HF layout), with max_position_embeddings = MAX_POSITIONS."""
    save_tiny_hf(root, "untied")
    cfg_path = root / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["max_position_embeddings"] = MAX_POSITIONS
    cfg_path.write_text(json.dumps(cfg))
    return root


def real_settings(model_dir: Path, adapter_dir: Path, **overrides) -> ServerSettings:
    """CPU fp32 settings sized for the tiny model; short drain/unload waits keep teardown quick."""
    kw = dict(model=str(model_dir), adapter_dir=str(adapter_dir), kv_cache_tokens=16384, dtype="float32",
              device="cpu", max_lora_rank=16, max_adapters_per_batch=4, drain_timeout_s=1.0,
              unload_timeout_s=10.0, log_level="warning")
    return ServerSettings(**(kw | overrides))


def build_engine(settings: ServerSettings):
    """The real AsyncEngine (not started): the same wiring `loramux serve` uses."""
    return build_async_engine(settings)


@contextlib.contextmanager
def tiny_server(model_dir: Path, adapter_dir: Path, **overrides) -> Iterator[LiveServer]:
    """The real app + real engine on a real uvicorn socket (127.0.0.1, free port); `.engine` is it."""
    settings = real_settings(model_dir, adapter_dir, **overrides)
    with LiveServer(build_engine(settings), settings) as live:
        yield live


# --- adapters ---------------------------------------------------------------------------------------
def adapter_tensors(spec, r: int = 4, modules: Sequence[str] = ALL, seed: int = 0,
                    scale: float = 3.0) -> dict[str, torch.Tensor]:
    """PEFT-keyed fp32 A/B tensors, scaled up so that the adapter changes greedy tokens."""
    return {k: v * scale for k, v in make_tensors(spec=spec, r=r, modules=tuple(modules), seed=seed).items()}


def adapter_files(spec, r: int = 4, modules: Sequence[str] = ALL, seed: int = 0,
                  scale: float = 3.0) -> tuple[bytes, bytes, dict[str, torch.Tensor]]:
    """(adapter_config.json bytes, adapter_model.safetensors bytes, the tensors) of a valid adapter
    with lora_alpha = 2r (scaling 2)."""
    tensors = adapter_tensors(spec, r, modules, seed, scale)
    return make_config(r=r, alpha=2 * r, modules=tuple(modules)), save(tensors), tensors


def multipart(name: str, config: bytes, weights: bytes, replace: bool = False,
              weights_name: str = "adapter_model.safetensors") -> dict:
    """Keyword arguments for httpx `post` of a multipart adapter upload."""
    data = {"name": name, **({"replace": "true"} if replace else {})}
    files = {"config": ("adapter_config.json", config, "application/json"),
             "weights": (weights_name, weights, "application/octet-stream")}
    return {"data": data, "files": files}


# --- the independent reference -----------------------------------------------------------------------
@torch.no_grad()
def merged_model(model_dir: Path, tensors: dict[str, torch.Tensor] | None = None,
                 scaling: float = 2.0) -> LoadedModel:
    """A fresh plain copy of the model; with `tensors`, the adapter is merged into the base weights."""
    loaded = load_model(str(model_dir), dtype="float32", device="cpu")
    if tensors is None:
        return loaded
    for target in loaded.model.lora_targets():
        weight = getattr(target.parent, target.attr).weight  # [sum of slice widths, in]
        row = 0
        for module, width in target.slices:  # fused q|k|v and gate|up: one row block per HF module
            a_key = key(target.layer_idx, module, "A")
            if a_key in tensors:
                a, b = tensors[a_key], tensors[key(target.layer_idx, module, "B")]  # [r, in], [out, r]
                weight[row:row + width] += scaling * (b @ a)
            row += width
    return loaded


def reference_ids(loaded: LoadedModel, prompt_ids: Sequence[int], max_tokens: int) -> list[int]:
    """Greedy ids of the plain (or merged) model, EOS ignored (requests send ignore_eos)."""
    return greedy_generate(loaded, list(prompt_ids), max_tokens)


def expected_text(tokenizer, ids: Sequence[int]) -> str:
    """Text the server streams for `ids`: the full decode, minus trailing U+FFFD (bytes of an
    unfinished UTF-8 character are held back and never flushed; random bytes often end that way)."""
    return tokenizer.decode(list(ids)).rstrip("\ufffd")


@dataclass
class World:
    """One running server with what the tests check it against (reference models, files on disk)."""

    live: LiveServer
    engine: object
    model_dir: Path
    adapter_dir: Path
    spec: object
    tok: Tokenizer  # the raw tokenizer file, not the server's wrapper
    alpha: dict  # tensors of the adapter "alpha" the fixture registered
    refs: list = field(default_factory=list)  # (tensors or None, reference model): identity-keyed cache

    @property
    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.live.url, timeout=60)

    def on_disk(self) -> list[str]:
        return sorted(p.name for p in self.adapter_dir.iterdir())

    def expected(self, prompt: list[int], n: int = N, tensors: dict | None = None) -> str:
        """The text the server must send: greedy ids of the merged reference, detokenized."""
        model = next((m for t, m in self.refs if t is tensors), None)
        if model is None:
            model = merged_model(self.model_dir, tensors)
            self.refs.append((tensors, model))  # holding `tensors` keeps the identity unique
        return expected_text(self.tok, reference_ids(model, prompt, n))


def content_sha(config: bytes, weights: bytes) -> str:
    """The adapter's content hash as documented in adapters/validate.py: sha256 of 'config:weights' hashes."""
    c, w = hashlib.sha256(config).hexdigest(), hashlib.sha256(weights).hexdigest()
    return hashlib.sha256(f"{c}:{w}".encode()).hexdigest()


def bad_uploads(spec) -> list[tuple[str, dict]]:
    """(expected error code, upload kwargs) for each validation failure that is cheap to build."""
    good_cfg, good_w, tensors = adapter_files(spec, r=4)
    nan = dict(tensors)
    first = next(iter(nan))
    nan[first] = nan[first].clone()
    nan[first][0, 0] = float("nan")
    one_missing = {k: v for i, (k, v) in enumerate(tensors.items()) if i != 1}  # drops a lora_B
    return [
        ("not_safetensors", multipart("bad1", good_cfg, pickle.dumps({"w": [1.0]}, protocol=2),
                                      weights_name="adapter_model.bin")),
        # Valid safetensors bytes under a pickle-style name: refused by name, never parsed.
        ("not_safetensors", multipart("bad1b", good_cfg, good_w, weights_name="adapter_model.pt")),
        ("bad_dtype", multipart("bad2", good_cfg, save({k: v.double() for k, v in tensors.items()}))),
        ("non_finite", multipart("bad3", good_cfg, save(nan))),
        ("rank_too_large", multipart("bad4", make_config(r=32, alpha=64), save(make_tensors(spec=spec, r=32)))),
        ("shape_mismatch", multipart("bad5", make_config(r=8, alpha=16), good_w)),
        ("unknown_module", multipart("bad6", good_cfg, save(make_tensors(spec=spec, r=4, layers=[0, 5])))),
        ("unsupported_feature", multipart("bad7", make_config(r=4, alpha=8, use_dora=True), good_w)),
        ("bad_config", multipart("bad8", b"{not json", good_w)),
        ("bad_name", multipart("../etc", good_cfg, good_w)),
        ("missing_weight", multipart("bad9", good_cfg, save(one_missing))),
        ("header_too_large", multipart("bad10", good_cfg, raw_safetensors({}, b"", length=1 << 40))),
        ("empty_adapter", multipart("bad11", good_cfg, save({}))),
    ]


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


class BackgroundStreams:
    """Sends base-model streams back to back in a thread until stopped; tallies every outcome.

    `stamps` holds the arrival time of each content chunk, so a test can check that tokens kept
    flowing during some window; `failures` lists anything but a 200 stream ending in [DONE].
    """

    def __init__(self, url: str, prompt_ids: Sequence[int], max_tokens: int = 400):
        self.url, self.prompt_ids, self.max_tokens = url, list(prompt_ids), max_tokens
        self.stamps: list[float] = []
        self.failures: list[str] = []
        self.completed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> BackgroundStreams:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        import httpx

        body = {"prompt": self.prompt_ids, "max_tokens": self.max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=self.url, timeout=60) as http:
            while not self._stop.is_set():
                try:
                    with http.stream("POST", "/v1/completions", json=body) as r:
                        if r.status_code != 200:
                            self.failures.append(f"status {r.status_code}")
                            continue
                        done = False
                        for line in r.iter_lines():
                            if line == "data: [DONE]":
                                done = True
                            elif line.startswith("data: "):
                                event = json.loads(line[6:])
                                if "error" in event:
                                    self.failures.append(f"error event {event['error']}")
                                self.stamps.append(time.monotonic())
                        if not done:
                            self.failures.append("stream ended without [DONE]")
                        self.completed += 1
                except Exception as exc:  # noqa: BLE001 - any failure is a finding, not a crash
                    self.failures.append(f"{type(exc).__name__}: {exc}")

    def tokens_between(self, t0: float, t1: float) -> int:
        return sum(t0 <= s <= t1 for s in list(self.stamps))
