"""Keeps the import arrows of docs/architecture.md true, transitively (no import runs: every module is parsed).

An import counts wherever it sits (module top, inside a function: lazy imports too), except under
`if TYPE_CHECKING:`. Importing `a.b.c` also runs `a/__init__.py` and `a/b/__init__.py`, so those count
for what a module reaches. The rules:
  - no import cycle between modules of ours;
  - the model's math files never reach `kernels` or a fast-path module (only the substitution
    modules -- the LoRA layer, packed linears, fused CPU ops -- may);
  - torch (or triton, safetensors, kernels) is unreachable from server/engine's core objects and from
    server/api/;
  - kernels imports nothing of ours and only torch, triton, numpy and the standard library;
  - adapters never reaches server; loadtest imports nothing of ours;
  - Ray (an optional extra) is reachable only from server/cluster/ and the CLI that starts it lazily.
"""
from __future__ import annotations

import ast
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("server", "kernels", "adapters", "loadtest")
STDLIB = set(sys.stdlib_module_names)
TORCH_LIKE = {"torch", "triton", "safetensors"}

# server/engine core objects: plain Python (the scheduler plans, it never touches tensors).
ENGINE_CORE = ["server.engine.config", "server.engine.request", "server.engine.sampling_params",
               "server.engine.block_manager", "server.engine.scheduler", "server.engine.schedule_plan", "server.engine.outputs",
               "server.engine.client"]
# The model's math: the decoder, its layers' torch path, rope, config, context, loaders, tokenizers.
MODEL_MATH = ["server.model.llama", "server.model.layers", "server.model.attention", "server.model.rope",
              "server.model.config", "server.model.context", "server.model.loader", "server.model.hf_loader",
              "server.model.gguf_loader", "server.model.weights", "server.model.tokenizer",
              "server.model.gguf_tokenizer", "server.model.errors", "server.model.generate",
              "server.model.quant_blocks"]
# Modules that substitute faster or LoRA-aware parts into the model at build time.
FAST_PATHS = {"server.model.lora", "server.model.cpu_linear", "server.model.cpu_ops",
              "server.model.quant_linear", "server.model.triton_attention"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _index(root: Path = ROOT) -> dict[str, Path]:
    return {_module_name(p): p for pkg in OURS for p in sorted((root / pkg).rglob("*.py"))}


MODULES = _index()


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every Import/ImportFrom node, skipping the bodies of `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of a dotted name that is one of our modules."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in modules:
            return ".".join(parts[:i])
    return None


@cache
def direct_imports(module: str) -> tuple[frozenset[str], frozenset[str]]:
    """(our modules it imports, external top-level packages it imports)."""
    return _direct(module, MODULES)


def _direct(module: str, modules: dict[str, Path]) -> tuple[frozenset[str], frozenset[str]]:
    path = modules[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    ours: set[str] = set()
    external: set[str] = set()
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                pkg = package.split(".")
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            # `from a.b import c` imports the submodule a.b.c when there is one, else names of a.b
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for name in names:
            target = _resolve(name, modules)
            if target is not None:
                ours.add(target)
            elif name.split(".")[0] not in OURS:
                external.add(name.split(".")[0])
    ours.discard(module)
    return frozenset(ours), frozenset(external)


def _with_packages(module: str) -> list[str]:
    """`a.b.c` -> ["a", "a.b", "a.b.c"] (the __init__ files that run first), ours only."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in MODULES]


def reach(module: str, direct=direct_imports) -> tuple[set[str], set[str]]:
    """Every module of ours and every external package that importing `module` runs, transitively."""
    seen: set[str] = set()
    external: set[str] = set()
    todo = _with_packages(module)
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        ours, ext = direct(m)
        external |= ext
        for o in ours:
            todo.extend(_with_packages(o))
    return seen, external


def find_cycle(modules, direct) -> list[str] | None:
    """A cycle in the direct-import graph (package parents not counted as edges), or None."""
    color: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        color[m] = 1
        path.append(m)
        for n in sorted(direct(m)[0]):
            if color.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in color and (found := visit(n)):
                return found
        path.pop()
        color[m] = 2
        return None

    for m in sorted(modules):
        if m not in color and (found := visit(m)):
            return found
    return None


# --- the rules -------------------------------------------------------------------------------------

def test_packages_exist_and_open_with_a_docstring():
    for path in MODULES.values():
        tree = ast.parse(path.read_text())
        assert ast.get_docstring(tree), f"{path.relative_to(ROOT)} has no module docstring"
    for pkg in OURS:
        assert (ROOT / pkg / "__init__.py").exists(), pkg


def test_no_import_cycles():
    cycle = find_cycle(MODULES, direct_imports)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", MODEL_MATH)
def test_model_math_reaches_no_kernels_or_fast_path(module):
    seen, _ = reach(module)
    bad = sorted(m for m in seen if m.split(".")[0] == "kernels" or m in FAST_PATHS)
    assert not bad, f"{module} reaches {bad}"


@pytest.mark.parametrize("module", ENGINE_CORE + sorted(m for m in MODULES if m.startswith("server.api")))
def test_engine_core_and_api_reach_no_torch(module):
    seen, external = reach(module)
    bad = sorted((external & TORCH_LIKE) | {m for m in seen if m.split(".")[0] == "kernels"})
    assert not bad, f"{module} reaches {bad}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.split(".")[0] == "kernels"))
def test_kernels_import_nothing_of_ours(module):
    ours, external = direct_imports(module)
    assert all(o.split(".")[0] == "kernels" for o in ours), f"{module} imports {sorted(ours)}"
    bad = external - STDLIB - {"torch", "triton", "numpy"}
    assert not bad, f"{module} imports {sorted(bad)}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.split(".")[0] == "adapters"))
def test_adapters_never_reach_server(module):
    seen, _ = reach(module)
    bad = sorted(m for m in seen if m.split(".")[0] in ("server", "loadtest"))
    assert not bad, f"{module} reaches {bad}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.split(".")[0] == "loadtest"))
def test_loadtest_imports_nothing_of_ours(module):
    ours, _ = direct_imports(module)
    assert all(o.split(".")[0] == "loadtest" for o in ours), f"{module} imports {sorted(ours)}"


# Modules allowed to reach Ray: the cluster package, and the CLI (it imports server.cluster lazily,
# only for --replicas / --ray-address), with the `python -m server` entry point that runs it.
RAY_USERS = ("server.cluster", "server.cli", "server.__main__")


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.startswith(RAY_USERS)))
def test_only_the_cluster_package_reaches_ray(module):
    _, external = reach(module)
    assert "ray" not in external, f"{module} reaches ray (an optional extra: import it in server/cluster only)"


# --- the checker itself can fail ----------------------------------------------------------------------

def _scratch(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return {_module_name_at(tmp_path, p): p for p in tmp_path.rglob("*.py")}


def _module_name_at(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_checker_sees_lazy_chained_imports_and_cycles(tmp_path):
    """A lazy import two modules away reaches torch; a cycle through three modules is found; an
    import under `if TYPE_CHECKING:` is not followed."""
    mods = _scratch(tmp_path, {
        "server/__init__.py": '"""p"""\n',
        "server/a.py": '"""a"""\nfrom server import b\n',
        "server/b.py": '"""b"""\ndef f():\n    import server.c\n',
        "server/c.py": '"""c"""\nimport torch\nfrom server.a import x\n',
        "server/d.py": '"""d"""\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n',
    })

    def direct(m):
        return _direct(m, mods)

    assert find_cycle(mods, direct) == ["server.a", "server.b", "server.c", "server.a"]
    seen: set[str] = set()
    external: set[str] = set()
    todo = ["server.a"]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            ours, ext = direct(m)
            external |= ext
            todo += list(ours)
    assert "torch" in external and "server.c" in seen
    assert direct("server.d")[1] == frozenset({"typing"})
