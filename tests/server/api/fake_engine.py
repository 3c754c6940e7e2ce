"""A fake `EngineClient` for the HTTP tests: byte tokenizer, deterministic echo generation, and an
in-memory adapter manager with the registry's atomicity rules. No torch, no model.

Generation: choice text is the adapter's "voice" (the adapter name, or "base") repeated, one byte
token per step with a small `asyncio.sleep` so concurrent streams interleave; stop strings and
max_tokens are honoured like the real output processor (stop string cut out, finish "stop" or
"length"). Logprobs are `-(position+1)/10` with top-k alternatives `(token+1+j, logprob-(j+1))`.
Counters (`submitted`, `aborted`, `running`) let tests check what reached the engine and that a
disconnect aborted its request. `make_engine(settings)` is the CLI test hook.
"""
from __future__ import annotations

import asyncio
import json
import re
import threading
import time

from adapters.errors import AdapterBusy, AdapterError, AdapterExists, AdapterNotFound
from adapters.ref import AdapterRef
from server.engine.outputs import CompletionDelta, TokenLogprob
from server.engine.sampling_params import SamplingParams

EOS = 256
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class FakeTokenizer:
    """Byte-level: token id = byte value; 256 = EOS; vocab 260."""

    vocab_size = 260
    eos_token_ids = (EOS,)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        if messages and messages[-1]["role"] == "assistant" and add_generation_prompt:
            raise ValueError("messages: the last message must not be from the assistant")
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


class FakeAdapterManager:
    """name -> AdapterRef under one lock; acquire is atomic resolve + count; delete unregisters, then
    waits for in-flight refs up to the timeout (re-registering on timeout, like the real registry)."""

    def __init__(self, max_rank: int = 64, upload_delay_s: float = 0.0):
        self.max_rank = max_rank
        self.upload_delay_s = upload_delay_s
        self.lock = threading.Condition()
        self.infos: dict[str, AdapterRef] = {}
        self.inflight: dict[int, int] = {}
        self.next_id = 1
        self.uploads_committed = 0

    def _validate(self, name: str, config_bytes: bytes, weights_bytes: bytes) -> tuple[int, tuple[str, ...]]:
        if not NAME_RE.match(name) or ".." in name:
            raise AdapterError("bad_name", f"bad adapter name {name!r}")
        try:
            cfg = json.loads(config_bytes)
        except ValueError:
            raise AdapterError("bad_config", "adapter_config.json is not valid JSON") from None
        r = cfg.get("r") if isinstance(cfg, dict) else None
        if not isinstance(r, int) or r < 1:
            raise AdapterError("bad_config", "r must be a positive integer")
        if r > self.max_rank:
            raise AdapterError("rank_too_large", f"rank {r} exceeds the max LoRA rank {self.max_rank}")
        if not weights_bytes.startswith(b"SAFE"):  # stand-in for the real safetensors parser
            raise AdapterError("not_safetensors", "weights are not a safetensors file")
        return r, tuple(cfg.get("target_modules") or ("q_proj", "v_proj"))

    def list(self) -> list[AdapterRef]:
        with self.lock:
            return list(self.infos.values())

    def get(self, name: str) -> AdapterRef:
        with self.lock:
            if name not in self.infos:
                raise AdapterNotFound(name)
            return self.infos[name]

    def acquire(self, name: str) -> AdapterRef:
        with self.lock:
            info = self.infos.get(name)
            if info is None:
                raise AdapterNotFound(name)
            self.inflight[info.id] = self.inflight.get(info.id, 0) + 1
            return info

    def release(self, ref: AdapterRef) -> None:
        with self.lock:
            self.inflight[ref.id] -= 1
            self.lock.notify_all()

    def upload(self, name: str, config_bytes: bytes, weights_bytes: bytes, replace: bool = False,
               weights_filename: str = "adapter_model.safetensors") -> AdapterRef:
        rank, targets = self._validate(name, config_bytes, weights_bytes)
        time.sleep(self.upload_delay_s)  # "validation and writing", outside the lock
        import hashlib

        with self.lock:  # check-and-commit is atomic: concurrent uploads of one name -> one wins
            old = self.infos.get(name)
            if old is not None and not replace:
                raise AdapterExists(name)
            info = AdapterRef(name=name, id=self.next_id, version=(old.version + 1 if old else 1),
                              sha256=hashlib.sha256(weights_bytes).hexdigest(), ranks=tuple((m, rank) for m in targets),
                              target_modules=targets, max_rank=rank, created_at=time.time())
            self.next_id += 1
            self.infos[name] = info
            self.uploads_committed += 1
            return info

    def delete(self, name: str, timeout_s: float) -> None:
        with self.lock:
            info = self.infos.pop(name, None)
            if info is None:
                raise AdapterNotFound(name)
            deadline = time.monotonic() + timeout_s
            while self.inflight.get(info.id, 0) > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.infos.setdefault(name, info)  # stays registered
                    raise AdapterBusy(name, self.inflight[info.id], timeout_s)
                self.lock.wait(left)


class FakeEngine:
    """Implements server.engine_client.EngineClient, plus start()/shutdown() like AsyncEngine."""

    model_name = "fake-base"

    def __init__(self, max_model_len: int = 512, token_delay_s: float = 0.002, queue_full: bool = False):
        self.tokenizer = FakeTokenizer()
        self.adapters = FakeAdapterManager()
        self.max_model_len = max_model_len
        self.token_delay_s = token_delay_s
        self.full = queue_full
        self.submitted: list[tuple[str, list[int], SamplingParams, AdapterRef | None]] = []
        self.aborted: list[str] = []
        self.running: set[str] = set()
        self.generated_tokens = 0
        self.started = False
        self.shutdown_calls: list[float] = []
        self.ready = True
        self.loop_alive = True

    def start(self) -> None:
        self.started = True

    async def shutdown(self, drain_timeout_s: float) -> None:
        self.shutdown_calls.append(drain_timeout_s)
        deadline = time.monotonic() + drain_timeout_s
        while self.running and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    def model_info(self) -> dict:
        return {"architecture": "FakeForCausalLM", "num_layers": 2, "hidden_size": 64,
                "projections": {"q_proj": [64, 64], "k_proj": [64, 32], "v_proj": [64, 32],
                                "o_proj": [64, 64], "gate_proj": [64, 128], "up_proj": [64, 128],
                                "down_proj": [128, 64]},
                "max_lora_rank": self.adapters.max_rank, "dtype": "float32", "device": "cpu"}

    @staticmethod
    def voice(adapter: AdapterRef | None) -> str:
        return (adapter.name if adapter is not None else "base") + " "

    async def generate(self, request_id, prompt_token_ids, params, adapter):
        self.submitted.append((request_id, list(prompt_token_ids), params, adapter))
        self.running.add(request_id)
        voice = self.voice(adapter).encode()
        text_so_far, sent, finished = "", 0, False
        try:
            for i in range(params.max_tokens):
                await asyncio.sleep(self.token_delay_s)
                if request_id in self.aborted:
                    return
                tok = voice[i % len(voice)]
                self.generated_tokens += 1
                text_so_far += chr(tok)
                reason = "length" if i + 1 == params.max_tokens else None
                cut = min((text_so_far.find(s) for s in params.stop if s in text_so_far), default=-1)
                if cut >= 0:
                    text_so_far, reason = text_so_far[:cut], "stop"
                lps = None
                if params.logprobs is not None:
                    lp = -(i + 1) / 10
                    lps = [TokenLogprob(tok, lp, tuple((tok + 1 + j, lp - (j + 1)) for j in range(params.logprobs)))]
                # Hold back a tail that could still become a stop string (as the real detokenizer does).
                held = 0 if reason else max((k for s in params.stop for k in range(1, len(s))
                                             if text_so_far.endswith(s[:k])), default=0)
                new_text = text_so_far[sent:len(text_so_far) - held]
                sent += len(new_text)
                finished = reason is not None
                yield CompletionDelta(request_id, new_text, [tok], lps, finished=finished, finish_reason=reason,
                                      prompt_tokens=len(prompt_token_ids), completion_tokens=i + 1)
                if finished:
                    return
        finally:
            self.running.discard(request_id)
            if not finished and request_id not in self.aborted:
                self.aborted.append(request_id)  # generator closed / cancelled = abort

    async def abort(self, request_id: str) -> None:
        if request_id not in self.aborted:
            self.aborted.append(request_id)

    def stats(self) -> dict:
        names = sorted({a.name for (rid, _, _, a) in self.submitted if a is not None and rid in self.running})
        return {"running": len(self.running), "waiting": 0, "kv_blocks_used": len(self.running),
                "kv_blocks_total": 100, "slots_used": len(names), "slots_total": 8, "adapter_loads": 0,
                "adapter_evictions": 0, "preemptions": 0, "prompt_tokens": sum(len(s[1]) for s in self.submitted),
                "generation_tokens": self.generated_tokens, "steps": self.generated_tokens,
                "scheduled_sequences": self.generated_tokens, "running_adapters": names,
                "waiting_adapters": [], "step_loop_alive": self.loop_alive}

    def is_ready(self) -> bool:
        return self.ready

    def queue_full(self) -> bool:
        return self.full


def make_engine(settings) -> FakeEngine:
    """CLI test hook (`--engine-factory tests.api.fake_engine:make_engine`): slow tokens so drains show."""
    return FakeEngine(token_delay_s=0.02)


class FakeLoadError(ValueError):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def make_failing_engine(settings) -> FakeEngine:
    """CLI test hook: a model that fails to load."""
    raise FakeLoadError("cannot load model 'nope':\n no such file")


class _StartFails(FakeEngine):
    def start(self) -> None:
        raise RuntimeError("engine thread failed to start")


def make_engine_failing_start(settings) -> FakeEngine:
    return _StartFails()


def make_slow_engine(settings) -> FakeEngine:
    """CLI test hook: a model that takes a while to load (the port must be open meanwhile)."""
    time.sleep(float(__import__("os").environ.get("FAKE_LOAD_S", "3")))
    return FakeEngine(token_delay_s=0.02)
