"""Per-request grammar state and the step's token masks, computed while the forward pass runs.

The runner owns one `GrammarMasks`. Per step:
  `start(requests)` (before the model is called) gives each structured request of the step its own
  llguidance matcher on first use (a deep copy of its `CompiledGrammar` template: whatever the
  adapter, every row carries its own state), then hands the whole batch to one worker thread that
  fills an int32 bitmask `[N, ceil(V/32)]` in one `LLExecutor` call; llguidance drops the GIL while
  it computes, and the C++ kernels of the forward pass drop it too (kernels/csrc/bindings.cpp), so the
  masks are computed while the model runs. Unconstrained rows keep all bits set.
  `join(pending)` (after the forward, before sampling) waits for the worker and returns the bitmask
  as a tensor for the sampler. `advance(requests, tokens)` feeds each matcher its sampled token and
  returns the ids of requests whose grammar has finished: the engine ends those (finish_reason "stop").
  `forget(request_id)` drops a finished request's matcher.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch


def _mask_threads() -> int:
    env = os.environ.get("LORAMUX_GRAMMAR_THREADS")
    if env:
        return max(1, int(env))
    return max(1, (os.cpu_count() or 2) // 4)  # the forward pass keeps the other cores busy


@dataclass(slots=True)
class PendingMasks:
    bitmask: np.ndarray  # [N, W] int32, written by the worker
    future: Future | None  # None: nothing to compute (no structured row)
    guided: list[int]  # rows that carry a grammar


class GrammarMasks:
    def __init__(self, eos_token_ids: tuple[int, ...] = ()) -> None:
        self.eos_token_ids = eos_token_ids
        self._matchers: dict[str, object] = {}  # request id -> llguidance.LLMatcher
        self._pool: ThreadPoolExecutor | None = None  # one worker, made on first use
        self._executor = None  # llguidance.LLExecutor, made on first use
        # Counters (server/bench/structured.py reads them): steps with masks, seconds the worker spent
        # filling them, seconds the step waited for them after the forward pass (0 = fully hidden).
        self.steps = 0
        self.fill_s = 0.0
        self.wait_s = 0.0

    def forget(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._matchers)

    def start(self, requests: list) -> PendingMasks | None:
        """Start filling the step's masks (rows in `requests` order); None when no row is structured."""
        guided = [i for i, r in enumerate(requests) if r.sampling_params.guide is not None]
        if not guided:
            return None
        if self._pool is None:
            import llguidance

            self._executor = llguidance.LLExecutor(_mask_threads())
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="loramux-grammar")
        width = (requests[guided[0]].sampling_params.guide.vocab_size + 31) // 32
        bitmask = np.full((len(requests), width), -1, dtype=np.int32)  # [N, W]: all allowed
        pairs = []
        for i in guided:
            r = requests[i]
            m = self._matchers.get(r.request_id)
            if m is None:
                m = self._matchers[r.request_id] = r.sampling_params.guide.new_matcher()
            pairs.append((m, i))
        started = threading.Event()

        def fill() -> None:
            started.set()
            t0 = time.perf_counter()
            self._executor.unsafe_compute_mask_ptr(pairs, bitmask.ctypes.data, width * 4, len(requests))
            self.fill_s += time.perf_counter() - t0

        future = self._pool.submit(fill)
        # Let the worker reach llguidance (which releases the GIL) before the forward pass takes it:
        # a C++ call that holds the GIL would otherwise keep the worker from starting at all.
        started.wait()
        return PendingMasks(bitmask, future, guided)

    def join(self, pending: PendingMasks | None) -> torch.Tensor | None:
        """The step's bitmask as an int32 tensor [N, W] (None when no row is structured)."""
        if pending is None:
            return None
        t0 = time.perf_counter()
        pending.future.result()
        self.wait_s += time.perf_counter() - t0
        self.steps += 1
        bm = pending.bitmask
        # A matcher in an error state allows nothing; let it end with EOS rather than sample garbage.
        empty = [i for i in pending.guided if not bm[i].any()]
        for i in empty:
            for t in self.eos_token_ids:
                if t < bm.shape[1] * 32:
                    bm[i, t // 32] |= np.int32(np.uint32(1 << (t % 32)).view(np.int32))
        return torch.from_numpy(bm)

    def advance(self, requests: list, token_ids: list[int]) -> set[str]:
        """Feed each structured row its sampled token; the ids whose grammar is finished (or broken)."""
        done = set()
        for r, t in zip(requests, token_ids, strict=True):
            m = self._matchers.get(r.request_id)
            if m is None:
                continue
            m.consume_token(t)
            if m.is_stopped() or m.is_error():
                done.add(r.request_id)
        return done
