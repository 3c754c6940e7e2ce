"""Fault injection on the REAL engine behind HTTP (issue #16): a step that raises fails only the
requests in that step and the engine goes on; a stuck step turns /ready to 503 under load
(`--step-stall-s`), and back to 200 once the step finishes. The hook: the test wraps the runner's
`execute` (the one place a step touches the model)."""
from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from tests.real_server import save_tiny_model, tiny_server, wait_until

BODY = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


def _wrap_execute(engine, hook):
    runner = engine.engine.runner
    real = runner.execute

    def execute(sched_out):
        hook(sched_out)
        return real(sched_out)

    runner.execute = execute
    return lambda: setattr(runner, "execute", real)


async def _many(url: str, count: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        return await asyncio.gather(*(http.post("/v1/completions", json={"prompt": [5 + i, 6, 7], **BODY})
                                      for i in range(count)))


def test_a_failing_step_fails_only_its_requests(model_dir, tmp_path):
    with tiny_server(model_dir, tmp_path, max_batch_size=2) as live:
        failed: list[int] = []
        calls = [0]

        def hook(sched_out):
            calls[0] += 1
            if calls[0] == 3:  # mid-decode of the first two requests; the other two still wait
                failed.extend(s.request.prompt_token_ids[0] - 5 for s in sched_out.scheduled)  # request index
                raise RuntimeError("injected fault")

        restore = _wrap_execute(live.engine, hook)
        try:
            responses = asyncio.run(_many(live.url, 4))
        finally:
            restore()
        bad = {i for i, r in enumerate(responses) if r.status_code != 200}
        assert failed and set(failed) == bad
        for r in responses:
            if r.status_code != 200:
                assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error"
        assert sum(r.status_code == 200 for r in responses) == 4 - len(bad) >= 2
        assert live.engine.engine.counters.step_errors == 1
        again = httpx.post(live.url + "/v1/completions", json={"prompt": [1, 2], **BODY}, timeout=60)
        assert again.status_code == 200  # the engine went on
        assert wait_until(lambda: live.engine.stats()["kv_blocks_used"] == 0)


def test_a_stuck_step_turns_ready_503_under_load(model_dir, tmp_path):
    with tiny_server(model_dir, tmp_path, max_batch_size=4, step_stall_s=0.5) as live:
        stuck = threading.Event()
        calls = [0]

        def hook(sched_out):
            calls[0] += 1
            if calls[0] == 4:
                stuck.set()
                time.sleep(2.0)

        restore = _wrap_execute(live.engine, hook)
        seen: list[int] = []

        def watch():
            stuck.wait(30)
            deadline = time.monotonic() + 1.8
            while time.monotonic() < deadline:
                seen.append(httpx.get(live.url + "/ready", timeout=5).status_code)
                time.sleep(0.05)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            responses = asyncio.run(_many(live.url, 6))
        finally:
            watcher.join(30)
            restore()
        assert 503 in seen
        assert all(r.status_code == 200 for r in responses)
        assert wait_until(lambda: httpx.get(live.url + "/ready", timeout=5).status_code == 200, 10)
