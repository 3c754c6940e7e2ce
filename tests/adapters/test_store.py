"""AdapterStore: atomic writes, replace, delete, symlink refusal, start-up scan with reasons."""
from __future__ import annotations

import os

import pytest

from adapters import store as store_mod
from adapters.errors import AdapterError, AdapterExists, AdapterNotFound
from adapters.store import AdapterStore
from adapters.validate import ValidationLimits, validate_adapter
from tests.adapters.helpers import SPEC, make_adapter

LIMITS = ValidationLimits(max_rank=8)


def entries(path) -> list[str]:
    """What lies in the store dir, less the version ledger (which outlives every adapter)."""
    return sorted(n for n in os.listdir(path) if n != store_mod.LEDGER_FILE)


def put(store, name, seed=0, replace=False):
    cfg, w = make_adapter(seed=seed)
    loaded = validate_adapter(name, cfg, w, SPEC, LIMITS)
    store.write(name, cfg, w, loaded.sha256, replace=replace)
    return loaded


def test_write_read_replace_delete(tmp_path):
    store = AdapterStore(tmp_path)
    first = put(store, "a")
    assert store.list() == ["a"] and store.meta("a") == {"sha256": first.sha256, "version": 1}
    assert store.load("a", SPEC, LIMITS).sha256 == first.sha256
    with pytest.raises(AdapterExists):
        put(store, "a", seed=1)
    second = put(store, "a", seed=1, replace=True)
    assert store.load("a", SPEC, LIMITS).sha256 == second.sha256 != first.sha256
    assert store.meta("a")["version"] == 2
    assert entries(tmp_path) == ["a"]  # no temp or old dirs left behind
    store.delete("a")
    assert store.list() == [] and entries(tmp_path) == []
    with pytest.raises(AdapterNotFound):
        store.delete("a")


def test_failure_mid_write_leaves_nothing_visible(tmp_path, monkeypatch):
    store = AdapterStore(tmp_path)
    put(store, "keep")
    real = store_mod._write_file
    calls = []

    def failing(path, data):
        calls.append(path.name)
        if path.name == "adapter_model.safetensors":
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(store_mod, "_write_file", failing)
    with pytest.raises(OSError):
        put(store, "new")
    with pytest.raises(OSError):
        put(store, "keep", seed=3, replace=True)
    assert calls  # the failure really happened inside write()
    assert store.list() == ["keep"] and entries(tmp_path) == ["keep"]
    assert store.meta("keep")["version"] == 1  # the replace failed: old content intact
    monkeypatch.setattr(store_mod, "_write_file", real)
    put(store, "new")
    assert store.list() == ["keep", "new"]


def test_crash_leftovers_are_recovered(tmp_path):
    store = AdapterStore(tmp_path)
    put(store, "x")
    (tmp_path / ".tmp-y-123").mkdir()  # crashed before publish
    os.rename(tmp_path / "x", tmp_path / ".old-x-abc")  # crashed between the two renames of a replace
    store = AdapterStore(tmp_path)
    assert store.list() == ["x"] and entries(tmp_path) == ["x"]


def test_symlinks_never_followed(tmp_path):
    outside = tmp_path / "outside"
    root = tmp_path / "root"
    AdapterStore(outside)
    put(AdapterStore(outside), "secret")
    store = AdapterStore(root)
    os.symlink(outside / "secret", root / "link")
    assert store.list() == []
    with pytest.raises(AdapterError) as info:
        store.read("link")
    assert info.value.code == "corrupt"
    store.delete("link")  # removes the link, not the target
    assert (outside / "secret" / "adapter_model.safetensors").exists()
    # a file inside an adapter dir that is a symlink is refused too
    put(store, "b")
    os.remove(root / "b" / "adapter_model.safetensors")
    os.symlink(outside / "secret" / "adapter_model.safetensors", root / "b" / "adapter_model.safetensors")
    with pytest.raises(AdapterError):
        store.read("b")


@pytest.mark.parametrize("name", ["../x", ".x", "a/b"])
def test_names_with_path_characters_refused(tmp_path, name):
    store = AdapterStore(tmp_path)
    with pytest.raises(AdapterError) as info:
        put(store, name)
    assert info.value.code == "bad_name" and entries(tmp_path) == []


def test_scan_skips_invalid_with_reasons(tmp_path):
    store = AdapterStore(tmp_path)
    good = put(store, "good")
    put(store, "tampered")
    with open(tmp_path / "tampered" / "adapter_model.safetensors", "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x00\xc0\x7f")  # a NaN in the last float
    put(store, "rehashed")
    (tmp_path / "rehashed" / "loramux.json").write_text('{"sha256": "0" , "version": 1}')
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "adapter_model.bin").write_bytes(b"\x80\x04junk")
    (tmp_path / "pickled" / "adapter_config.json").write_bytes(make_adapter()[0])
    valid, invalid = store.scan(SPEC, LIMITS)
    assert [a.name for a in valid] == ["good"] and valid[0].sha256 == good.sha256
    reasons = {name: err.code for name, err in invalid}
    assert reasons == {"tampered": "non_finite", "rehashed": "corrupt", "pickled": "not_safetensors"}


def test_half_deleted_adapter_never_comes_back(tmp_path, monkeypatch):
    """Issue #16: a delete killed while removing its files left an `.old-` dir that start-up
    recovery renamed back into place. Simulate the kill: rmtree removes one file, then dies."""
    store = AdapterStore(tmp_path)
    put(store, "gone")

    def killed_rmtree(path, ignore_errors=False):
        os.remove(os.path.join(path, "adapter_model.safetensors"))
        raise SystemExit("killed")  # the process dies here: nothing after it runs

    monkeypatch.setattr(store_mod.shutil, "rmtree", killed_rmtree)
    with pytest.raises(SystemExit):
        store.delete("gone")
    monkeypatch.undo()
    restarted = AdapterStore(tmp_path)
    assert restarted.list() == [] and entries(tmp_path) == []


def test_versions_monotonic_across_restarts_and_deletes(tmp_path):
    """Issue #16: upload -> v1, replace -> v2, restart, replace -> v3 (it was v2 again); a delete and
    re-upload continues the count too, so a (name, version) pair is never reused."""
    store = AdapterStore(tmp_path)
    put(store, "a")
    put(store, "a", seed=1, replace=True)
    store = AdapterStore(tmp_path)
    put(store, "a", seed=2, replace=True)
    assert store.meta("a")["version"] == 3
    store.delete("a")
    store = AdapterStore(tmp_path)
    put(store, "a", seed=3)
    assert store.meta("a")["version"] == 4 and store.last_version("a") == 4
