"""Issue #16: `loramux serve` opens its port before the engine is built: /health answers at once,
/ready (and inference) is 503 with Retry-After until the engine is up, then 200. A model that fails
to load still ends the process with one error line and exit status 2 (test_cli covers that)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

from tests.server.api.live import free_port
from tests.server.api.test_cli import ROOT


def test_ready_is_503_until_the_engine_is_built():
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FAKE_LOAD_S": "4",
           "LORAMUX_ENGINE_FACTORY": "tests.server.api.fake_engine:make_slow_engine"}
    proc = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port), "--log-level", "warning"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:  # the port opens while the engine is still loading
            try:
                health = httpx.get(url + "/health", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
                time.sleep(0.05)
        assert health.status_code == 200
        ready = httpx.get(url + "/ready", timeout=1)
        assert ready.status_code == 503 and ready.headers.get("retry-after")
        assert ready.json()["error"]["code"] == "not_ready"
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=5)
        assert r.status_code == 503 and r.headers.get("retry-after")
        while httpx.get(url + "/ready", timeout=1).status_code != 200:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        assert httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=5).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
