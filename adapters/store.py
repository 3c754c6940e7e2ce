"""On-disk adapter store: one directory per adapter under `root`, written atomically.

Layout: `root/<name>/adapter_config.json`, `adapter_model.safetensors`, `loramux.json` (sha256 of
the content and a version counter). Writes go to a hidden temp dir inside root (same filesystem),
every file and the dir are fsynced, then one rename publishes it; a replace renames the old dir
aside (`.old-`), renames the new one in, and removes the old. A delete renames the dir to `.del-`
first, then removes it. Names starting with '.' are never adapters, so a crash mid-write leaves
nothing visible. Start-up recovery: `.tmp-` and `.del-` dirs are removed (a half-deleted adapter
never comes back); an `.old-` dir comes back only when its name is free (a replace killed between
its two renames). Versions: `.versions.json` records the highest version ever issued per name
(written atomically before the adapter is published), so versions stay monotonic across restarts,
deletes and re-uploads. Symlinks are never followed: an adapter dir or file that is a link is
treated as invalid.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import threading
import uuid
from pathlib import Path

from adapters.errors import AdapterError, AdapterExists, AdapterNotFound
from adapters.spec import BaseModelSpec
from adapters.validate import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    LoadedAdapter,
    ValidationLimits,
    check_name,
    read_adapter_dir,
)
from adapters.validate import validate_adapter as _validate

log = logging.getLogger(__name__)
META_FILE = "loramux.json"
TMP_PREFIX, OLD_PREFIX, DEL_PREFIX = ".tmp-", ".old-", ".del-"
LEDGER_FILE = ".versions.json"


def _write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AdapterStore:
    """Directory-per-adapter store. Thread-safe for concurrent writers (one lock)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._recover()

    def _recover(self) -> None:
        """Drop half-written temp dirs and half-deleted dirs; put back an old dir whose replacement
        never landed (only a replace makes `.old-` dirs; a delete makes `.del-` ones)."""
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(OLD_PREFIX):
                name = entry.name[len(OLD_PREFIX):].rsplit("-", 1)[0]
                if not (self.root / name).exists():
                    os.rename(entry, self.root / name)  # crash between the two renames of a replace
                    continue
            if entry.name.startswith((TMP_PREFIX, OLD_PREFIX, DEL_PREFIX)):
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.name.startswith(LEDGER_FILE + "."):
                entry.unlink(missing_ok=True)  # a ledger update that never landed
        _fsync_dir(self.root)

    # --- the version ledger (lock held by writers) -------------------------------------------------
    def _ledger(self) -> dict[str, int]:
        path = self.root / LEDGER_FILE
        try:
            data = json.loads(path.read_bytes()) if path.is_file() and not path.is_symlink() else {}
        except (ValueError, OSError):
            data = {}
        return {k: v for k, v in data.items() if isinstance(v, int)} if isinstance(data, dict) else {}

    def _write_ledger(self, ledger: dict[str, int]) -> None:
        tmp = self.root / f"{LEDGER_FILE}.{uuid.uuid4().hex}"
        _write_file(tmp, json.dumps(ledger, sort_keys=True).encode())
        os.replace(tmp, self.root / LEDGER_FILE)

    def last_version(self, name: str) -> int:
        """Highest version ever issued for `name` (0 if none): from the ledger and the stored meta."""
        return max(self._ledger().get(name, 0), int(self.meta(name).get("version", 0) or 0))

    def _dir(self, name: str) -> Path:
        return self.root / check_name(name)

    def exists(self, name: str) -> bool:
        path = self._dir(name)
        return path.is_dir() and not path.is_symlink()

    def list(self) -> list[str]:
        """Names of the adapter dirs (real dirs, valid names), sorted."""
        names = []
        for entry in self.root.iterdir():
            try:
                check_name(entry.name)
            except AdapterError:
                continue  # temp dirs, stray files
            if entry.is_dir() and not entry.is_symlink():
                names.append(entry.name)
        return sorted(names)

    def write(self, name: str, config_bytes: bytes, weights_bytes: bytes, sha256: str, replace: bool = False) -> int:
        """Publish an adapter atomically; returns its store version (1 for new, old + 1 on replace)."""
        final = self._dir(name)
        with self._lock:
            exists = self.exists(name)
            if exists and not replace:
                raise AdapterExists(name)
            version = self.last_version(name) + 1
            tmp = self.root / f"{TMP_PREFIX}{name}-{uuid.uuid4().hex}"
            tmp.mkdir()
            try:
                _write_file(tmp / CONFIG_FILE, config_bytes)
                _write_file(tmp / WEIGHTS_FILE, weights_bytes)
                _write_file(tmp / META_FILE, json.dumps({"sha256": sha256, "version": version}).encode())
                _fsync_dir(tmp)
                # Record the version before publishing: a crash between the two only skips a number.
                self._write_ledger({**self._ledger(), name: version})
                if exists:
                    old = self.root / f"{OLD_PREFIX}{name}-{uuid.uuid4().hex}"
                    os.rename(final, old)
                    os.rename(tmp, final)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.rename(tmp, final)
                _fsync_dir(self.root)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            return version

    def meta(self, name: str) -> dict:
        path = self._dir(name) / META_FILE
        if path.is_symlink() or not path.is_file():
            return {}
        try:
            meta = json.loads(path.read_bytes()[: 64 * 1024])
        except (ValueError, OSError):
            return {}
        return meta if isinstance(meta, dict) else {}

    def read(self, name: str, max_weights_bytes: int = 2 << 30) -> tuple[bytes, bytes]:
        """(config bytes, weights bytes) of a stored adapter; never follows symlinks."""
        path = self._dir(name)
        if not path.exists() and not path.is_symlink():
            raise AdapterNotFound(name)
        if path.is_symlink() or not stat.S_ISDIR(os.lstat(path).st_mode):
            raise AdapterError("corrupt", f"adapter dir {name!r} is not a plain directory")
        return read_adapter_dir(path, max_weights_bytes)

    def load(self, name: str, spec: BaseModelSpec, limits: ValidationLimits | None = None) -> LoadedAdapter:
        """Read and fully re-validate a stored adapter; refuse it when it disagrees with its recorded hash."""
        limits = limits or ValidationLimits()
        config, weights = self.read(name, limits.max_weights_bytes)
        loaded = _validate(name, config, weights, spec, limits)
        recorded = self.meta(name).get("sha256")
        if recorded is not None and recorded != loaded.sha256:
            raise AdapterError("corrupt", f"stored adapter {name!r} does not match its recorded sha256")
        return loaded

    def delete(self, name: str) -> None:
        path = self._dir(name)
        with self._lock:
            if not path.exists() and not path.is_symlink():
                raise AdapterNotFound(name)
            if path.is_symlink():
                path.unlink()  # remove the link itself, never what it points at
                return
            gone = self.root / f"{DEL_PREFIX}{name}-{uuid.uuid4().hex}"
            os.rename(path, gone)  # disappears from list() at once; recovery never restores a `.del-`
            _fsync_dir(self.root)
            shutil.rmtree(gone, ignore_errors=True)

    def scan(self, spec: BaseModelSpec, limits: ValidationLimits | None = None):
        """Validate every stored adapter: (valid LoadedAdapters, [(name, AdapterError)]). Invalid are logged."""
        valid: list[LoadedAdapter] = []
        invalid: list[tuple[str, AdapterError]] = []
        for name in self.list():
            try:
                valid.append(self.load(name, spec, limits))
            except AdapterError as exc:
                log.warning("skipping stored adapter %r: %s", name, exc)
                invalid.append((name, exc))
        return valid, invalid
