"""The CLI: settings from flags and env, one-line errors with exit 2, and SIGTERM drain against a real
`python -m server` subprocess (engine from the hidden `--engine-factory` hook: the fake engine)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from server.settings import ServerSettings
from tests.server.api.live import free_port

ROOT = Path(__file__).resolve().parents[3]


def _run(args, env=None, timeout=60):
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "server", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def test_settings_from_flags_and_env():
    s = ServerSettings.from_args(["--port", "9001", "--kv-cache-tokens", "auto", "--max-n", "2"],
                                 env={"LORAMUX_API_KEY": "k", "LORAMUX_PORT": "9000", "LORAMUX_DTYPE": "bfloat16"})
    assert (s.port, s.api_key, s.dtype, s.kv_cache_tokens, s.max_n, s.host) == (9001, "k", "bfloat16", None, 2,
                                                                                "127.0.0.1")
    with pytest.raises(ValueError, match="port"):
        ServerSettings.from_args([], env={"LORAMUX_PORT": "0"})
    with pytest.raises(ValueError, match="device"):
        ServerSettings(device="tpu")
    with pytest.raises(ValueError):
        ServerSettings.from_args(["--max-n", "lots"])


@pytest.mark.parametrize("args,env,needle", [
    (["serve", "--port", "abc"], {}, "--port"),
    (["serve", "--dtype", "int4", "--engine-factory", "tests.server.api.fake_engine:make_engine"], {}, "--dtype"),
    (["serve"], {"LORAMUX_MAX_N": "-3", "LORAMUX_ENGINE_FACTORY": "tests.server.api.fake_engine:make_engine"},
     "--max-n"),
    (["serve", "--engine-factory", "tests.server.api.fake_engine:make_failing_engine"], {}, "cannot load model"),
    (["serve", "--engine-factory", "tests.server.api.fake_engine:make_engine_failing_start"], {},
     "engine thread failed"),
])
def test_cli_errors_are_one_line_exit_2(args, env, needle):
    if "--port" not in args:
        args = [*args, "--port", str(free_port())]
    p = _run(args, env)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if "error" in ln.lower()]
    assert "Traceback" not in p.stderr
    assert len(lines) == 1 and needle in lines[0], p.stderr


def test_sigterm_drains_then_exits_0():
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LORAMUX_ENGINE_FACTORY": "tests.server.api.fake_engine:make_engine",
           "LORAMUX_DRAIN_TIMEOUT_S": "20"}
    proc = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port), "--log-level", "warning"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "server did not start"
            time.sleep(0.1)
        got: list[str] = []
        started = threading.Event()

        def stream():  # 60 tokens x 20 ms: still running when SIGTERM arrives
            with httpx.stream("POST", url + "/v1/completions", timeout=30,
                              json={"prompt": "x", "max_tokens": 60, "stream": True}) as r:
                for line in r.iter_lines():
                    if line:
                        got.append(line)
                        started.set()

        t = threading.Thread(target=stream)
        t.start()
        assert started.wait(15)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        # draining: readiness flips and new work is refused while the running stream continues
        r = httpx.get(url + "/ready", timeout=5)
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_draining"
        r = httpx.post(url + "/v1/completions", json={"prompt": "x"}, timeout=5)
        assert r.status_code == 503 and "retry-after" in r.headers
        t.join(30)
        assert got[-1] == "data: [DONE]" and len(got) == 61  # all 60 tokens, then [DONE]
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
