"""The fused CPU ops (kernels/csrc/*.cpp, one extension module): built on first use, then cached.

    bgmv(y, x, a_tab, b_tabs, offs, scaling, slots, r)   LoRA: in place on y, rows with slot -1 untouched
    rms_norm / rotary_ / silu_and_mul / kv_write / decode_attention
                                                          the decode step's non-linear ops, used by the
                                                          model through server/model/cpu_ops.py (module substitutions)
    argmax_rows(x)                                        the sampler's greedy pick (server/engine/sampler.py)
    DecodeLoop                                            all layers of a decode step in one call
    chunk_attention(out, q, cache, table, context_len, heads, scale)
                                                          a prefill chunk over its cached context, read in place

Why C++: at decode each LoRA projection is a few thousand multiply-adds per row, so the torch
formulations (embedding_bag shrink, scale, per-slice embedding_bag expand and add) cost their per-op
overhead, about 60-90 us per projection call in the engine, more than the math. One fused call per
projection does shrink + scaling + expand for all slices, accumulating in fp32. The same holds for a
decoder layer's norms, rotary, activation and paged attention: about fifty small eager ops per layer
become five calls.

Built with `torch.utils.cpp_extension.load` (g++ and ninja, both already needed by torch's own
tooling; about 80 s on 2 quiet cores: only bindings.cpp includes torch/extension.h, whose parsing alone
costs about 35 s per translation unit, the others include light ATen headers), cached under TORCH_EXTENSIONS_DIR keyed by the sources and this
CPU's instruction set (it is compiled with -march=native). If the build fails (no compiler, e.g. the
CUDA runtime image) the CPU path keeps its torch formulations and logs why once. Set
LORAMUX_CPU_KERNEL=0 to skip it.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
import time
from pathlib import Path

log = logging.getLogger("loramux.kernels")

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = [_CSRC / "bindings.cpp", _CSRC / "bgmv_cpu.cpp", _CSRC / "model_cpu.cpp", _CSRC / "decode_loop.cpp",
            _CSRC / "gemm_bf16.cpp", _CSRC / "gemm_f32.cpp", _CSRC / "qgemm_cpu.cpp", _CSRC / "qgemv_i16.cpp",
            _CSRC / "chunk_attention.cpp"]
_HEADERS = [_CSRC / "loramux_cpu.h", _CSRC / "decode_loop.h", _CSRC / "vec512.h", _CSRC / "avx2_reduce.h"]
_lock = threading.Lock()
_state: dict[str, object] = {}  # "module" or "error"


def _cpu_tag() -> str:
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    text = platform.machine() + flags + "".join(p.read_text() for p in _SOURCES + _HEADERS)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# A build takes 1-2 minutes on 2 quiet cores and over 10 when they are shared; a lock older than this was left
# by a process killed mid-build (a shorter limit made busy machines delete live locks and compile twice).
STALE_LOCK_S = 1800


def _clear_stale_lock(lock: Path, max_age_s: float = STALE_LOCK_S) -> bool:
    """torch's build lock is a plain file that waiters poll forever: if a process was killed while
    building, every later start would hang. Remove a lock older than `max_age_s`; True if removed."""
    try:
        if time.time() - lock.stat().st_mtime > max_age_s:
            lock.unlink()
            log.warning("removed a stale kernel build lock %s", lock)
            return True
    except FileNotFoundError:
        pass
    except OSError as exc:  # unreadable or not ours: let the build report what it finds
        log.warning("could not check kernel build lock %s: %s", lock, exc)
    return False


def enabled() -> bool:
    return os.environ.get("LORAMUX_CPU_KERNEL", "1") != "0"


def load():
    """The compiled module, or None (disabled, or the build failed: the reason is logged once)."""
    if "module" in _state or "error" in _state:
        return _state.get("module")
    if not enabled():
        return None
    with _lock:
        if "module" in _state or "error" in _state:
            return _state.get("module")
        try:
            from torch.utils import cpp_extension

            name = f"loramux_cpu_{_cpu_tag()}"
            _clear_stale_lock(Path(cpp_extension._get_build_directory(name, False)) / "lock")
            module = cpp_extension.load(
                name=name,
                sources=[str(p) for p in _SOURCES],
                extra_include_paths=[str(_CSRC)],
                # -fopenmp only when compiling: the OpenMP calls then bind to torch's own libgomp,
                # so the kernel's threads are the same pool as every other op's.
                extra_cflags=["-O3", "-march=native", "-fopenmp"],
                verbose=False,
            )
            _state["module"] = module
        except Exception as exc:  # noqa: BLE001 - any build problem means "use the torch path"
            _state["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
            log.warning("fused CPU ops unavailable, using the torch formulations: %s", _state["error"])
            return None
    return _state["module"]


def loaded():
    """The module if it is already built and loaded, else None (never starts a build)."""
    return _state.get("module")


def status() -> str:
    """'loaded', 'disabled', 'failed: <reason>' or 'not built yet'."""
    if "module" in _state:
        return "loaded"
    if "error" in _state:
        return f"failed: {_state['error']}"
    return "not built yet" if enabled() else "disabled"
