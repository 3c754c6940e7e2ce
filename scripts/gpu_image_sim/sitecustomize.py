"""The GPU image lacks fastapi, uvicorn, pydantic, python-multipart and gguf: `make gpu-check DRY_RUN=1`
puts this directory first on PYTHONPATH so that every import of one of them made by the project's own
code (server/, kernels/, adapters/, tests/, scripts/) is recorded in $OUT/forbidden_imports.log, which
fails the dry run. Imports made by third-party packages (optional extras they probe) do not count."""
import atexit
import os
import sys

FORBIDDEN = {"fastapi", "uvicorn", "pydantic", "multipart", "python_multipart", "gguf", "starlette"}
ROOT = os.environ.get("LORAMUX_REPO", "")
OUT = os.environ.get("OUT", ".")
_hits: list[str] = []


def _ours(filename: str) -> bool:
    return bool(ROOT) and filename.startswith(ROOT) and "/.venv" not in filename


def _hook(event: str, args: tuple) -> None:
    if event != "import" or args[0].split(".")[0] not in FORBIDDEN:
        return
    f = sys._getframe(1)
    while f is not None and (f.f_code.co_filename.startswith("<") or "importlib" in f.f_code.co_filename):
        f = f.f_back
    if f is not None and _ours(f.f_code.co_filename):
        _hits.append(f"{args[0]} imported by {f.f_code.co_filename}:{f.f_lineno}")


def _report() -> None:
    if _hits:
        with open(os.path.join(OUT, "forbidden_imports.log"), "a") as fh:
            fh.write("\n".join(_hits) + "\n")


if ROOT:
    sys.addaudithook(_hook)
    atexit.register(_report)
