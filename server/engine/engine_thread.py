"""One long-lived thread that does all of the engine's torch work: loading, then the step loop.

Why one thread: torch's CPU ops parallelise with OpenMP, and each OS thread that runs a parallel
op gets its own OpenMP team. Measured on the 2-core dev machine, the model's matmuls ran about
25% slower in the engine thread once the main thread (which had loaded the model) owned a team
too; loading the model on the same thread that later runs the steps leaves a single team.
`submit(fn)` runs callables in order on that thread and returns a `concurrent.futures.Future`.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class EngineThread:
    def __init__(self, name: str = "loramux-engine") -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, fut = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
                fut.set_exception(exc)

    def submit(self, fn: Callable[[], Any]) -> Future:
        if not self._thread.is_alive():
            raise RuntimeError("engine thread has stopped")
        fut: Future = Future()
        self._jobs.put((fn, fut))
        return fut

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the engine thread and wait for its result (re-raises its exception)."""
        return self.submit(fn).result()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish the queued jobs, then end the thread."""
        self._jobs.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
