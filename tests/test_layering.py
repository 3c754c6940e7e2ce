"""Keeps the import arrows of DESIGN.md true by parsing every module's imports (no import runs)."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"server", "kernels", "adapters", "loadtest"}
STDLIB = set(sys.stdlib_module_names)
# server/ core objects: plain Python, no torch (the scheduler plans, it never touches tensors).
TORCH_FREE_SERVER = {
    "server/config.py",
    "server/request.py",
    "server/sampling_params.py",
    "server/block_manager.py",
    "server/scheduler.py",
    "server/outputs.py",
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _files(pkg: str) -> list[Path]:
    return sorted((ROOT / pkg).rglob("*.py"))


def test_packages_exist():
    for pkg in OURS:
        assert (ROOT / pkg / "__init__.py").exists(), pkg


@pytest.mark.parametrize("path", _files("kernels"), ids=lambda p: str(p.relative_to(ROOT)))
def test_kernels_import_only_torch_triton(path):
    bad = _imports(path) - STDLIB - {"torch", "triton", "kernels", "numpy"}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", _files("adapters"), ids=lambda p: str(p.relative_to(ROOT)))
def test_adapters_never_import_server(path):
    bad = _imports(path) & {"server", "loadtest"}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", _files("loadtest"), ids=lambda p: str(p.relative_to(ROOT)))
def test_loadtest_imports_nothing_of_ours(path):
    bad = _imports(path) & (OURS - {"loadtest"})
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize(
    "path",
    [p for p in _files("server") if str(p.relative_to(ROOT)) in TORCH_FREE_SERVER or "api" in p.parts],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_server_core_and_api_are_torch_free(path):
    bad = _imports(path) & {"torch", "triton", "kernels", "safetensors"}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
