"""The contract between the HTTP layer (`server/api/`) and the async engine, with no torch.

`server.engine.async_engine.AsyncEngine` implements it; API tests may use a fake. The HTTP layer
tokenizes (through `tokenizer`), validates limits, resolves and acquires the adapter in the
registry, then iterates `generate(...)` and releases the adapter reference when it ends.
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

from adapters.ref import AdapterRef
from server.engine.outputs import CompletionDelta
from server.engine.sampling_params import SamplingParams


class TokenizerLike(Protocol):
    vocab_size: int
    eos_token_ids: tuple[int, ...]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str: ...


class AdapterService(Protocol):
    """Adapter lifecycle as the HTTP layer sees it (`adapters.manager.AdapterManager` implements it:
    validation + store + registry, with the slot pool behind the registry's retire listener).

    Refs are `adapters.ref.AdapterRef` (plain data). Errors are `adapters.errors.AdapterError`, whose
    `http_status` and stable `code` the API maps to 404 / 409 / 400. Blocking calls: run them in a
    thread (`starlette.concurrency.run_in_threadpool`) from async routes.
    """

    def list(self) -> list[AdapterRef]: ...

    def get(self, name: str) -> AdapterRef: ...

    def acquire(self, name: str) -> AdapterRef:
        """Atomically resolve `name` and take an in-flight reference; the ref is passed to generate()."""

    def release(self, ref: AdapterRef) -> None: ...

    def upload(self, name: str, config_bytes: bytes, weights_bytes: bytes, replace: bool = False,
               weights_filename: str = "adapter_model.safetensors") -> AdapterRef:
        """`weights_filename` is the client's name for the weights file: checked, never used as a path."""

    def delete(self, name: str, timeout_s: float) -> None: ...


class EngineClient(Protocol):
    tokenizer: TokenizerLike
    adapters: AdapterService
    model_name: str  # id the base model is listed under in /v1/models
    max_model_len: int  # prompt + max_tokens must not exceed this

    def model_info(self) -> dict[str, Any]:
        """Architecture, num_layers, hidden_size, per-projection (in, out) sizes, max_lora_rank, dtype, device."""

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        adapter: AdapterRef | None,  # already acquired by the caller; None = the base model
    ) -> AsyncIterator[CompletionDelta]:
        """Yields text deltas until one with finished=True. Cancelling the iterator aborts the request."""

    # Optional: `submit(jobs, adapter) -> list[AsyncIterator[CompletionDelta]]` queues one HTTP
    # request's (request_id, prompt ids, params) jobs all or none (QueueFullError: no room now -> 503;
    # ValueError: can never fit -> 400). Engines without it get one `generate()` per job.

    async def abort(self, request_id: str) -> None: ...

    def stats(self) -> dict[str, Any]:
        """running, waiting, kv_blocks_used, kv_blocks_total, slots_used, slots_total, step_loop_alive, ..."""

    def is_ready(self) -> bool: ...

    def queue_full(self) -> bool: ...
