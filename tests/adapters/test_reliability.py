"""Issue #16 defects at the adapter-service level: versions stay monotonic across restarts (the
store's ledger issues them), and a DELETE that waits for in-flight requests blocks only its own name."""
from __future__ import annotations

import threading
import time

import pytest

from adapters.errors import AdapterBusy
from adapters.manager import AdapterManager
from adapters.validate import ValidationLimits
from tests.adapters.helpers import SPEC, make_adapter

LIMITS = ValidationLimits(max_rank=8)


def test_versions_monotonic_across_restart(tmp_path):
    manager = AdapterManager(tmp_path, SPEC, LIMITS)
    assert manager.upload("a", *make_adapter(seed=0)).version == 1
    assert manager.upload("a", *make_adapter(seed=1), replace=True).version == 2
    restarted = AdapterManager(tmp_path, SPEC, LIMITS)
    assert restarted.load_all() == []
    assert restarted.get("a").version == 2  # the stored version, not 1
    assert restarted.upload("a", *make_adapter(seed=2), replace=True).version == 3
    restarted.delete("a", timeout_s=1)
    again = AdapterManager(tmp_path, SPEC, LIMITS)
    again.load_all()
    assert again.upload("a", *make_adapter(seed=3)).version == 4  # a deleted name's count goes on


def test_delete_waiting_for_requests_blocks_only_its_name(tmp_path):
    manager = AdapterManager(tmp_path, SPEC, LIMITS)
    manager.upload("busy", *make_adapter(seed=0))
    manager.upload("other", *make_adapter(seed=1))
    ref = manager.acquire("busy")  # a request in flight on "busy"
    errors: list[BaseException] = []

    def delete_busy():
        try:
            manager.delete("busy", timeout_s=30)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    deleter = threading.Thread(target=delete_busy)
    deleter.start()
    time.sleep(0.2)  # the delete now waits for the request
    t0 = time.monotonic()
    manager.upload("fresh", *make_adapter(seed=2))  # another name: no wait
    manager.upload("other", *make_adapter(seed=3), replace=True)
    manager.delete("other", timeout_s=1)
    assert time.monotonic() - t0 < 5 and deleter.is_alive()
    with pytest.raises(AdapterBusy) as info:  # the name being deleted: a clear 409, not a race
        manager.upload("busy", *make_adapter(seed=4), replace=True)
    assert "being deleted" in info.value.message
    manager.release(ref)
    deleter.join(10)
    assert not errors and not deleter.is_alive()
    assert [r.name for r in manager.list()] == ["fresh"] and manager.store.list() == ["fresh"]


def test_request_running_through_a_delete_still_gets_its_weights(tmp_path):
    """Found by the soak: a request acquired before a DELETE whose adapter was not yet resident got
    `not_found` at its slot load (the name was gone while the delete waited for it)."""
    manager = AdapterManager(tmp_path, SPEC, LIMITS)
    manager.upload("a", *make_adapter(seed=0))
    ref = manager.acquire("a")
    deleter = threading.Thread(target=manager.delete, args=("a", 30))
    deleter.start()
    time.sleep(0.2)  # the delete waits for the request; the name is gone
    assert "a" not in manager.registry and deleter.is_alive()
    assert manager.registry.weights(ref).sha256 == ref.sha256  # the slot load still works
    manager.release(ref)
    deleter.join(10)
    assert not deleter.is_alive() and manager.store.list() == []
