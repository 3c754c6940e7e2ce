"""Upload flow (validate -> store -> registry): a refused adapter changes nothing anywhere,
and a good one uploaded right after still registers, becomes resident and holds its weights."""
from __future__ import annotations

import io
import json
import os
import struct

import pytest
import torch
from safetensors.torch import save

from adapters.errors import AdapterError, AdapterExists
from adapters.manager import AdapterManager
from adapters.slots import SlotPool
from adapters.validate import ValidationLimits
from tests.adapters.helpers import SPEC, key, make_adapter, make_config, make_tensors
from tests.adapters.test_registry import assert_slot_holds

LIMITS = ValidationLimits(max_rank=8, header_cap=4096)


def _with(tensors, k, value):
    tensors = dict(tensors)
    tensors[k] = value
    return save(tensors)


def _torch_save():
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    return buf.getvalue()


T = make_tensors(modules=("q_proj", "v_proj"))
CFG = make_config(modules=("q_proj", "v_proj"))
NAN = T[key(0, "q_proj", "A")].clone()
NAN[0, 0] = float("nan")
# code -> (name, config bytes, weights bytes, weights filename)
BAD = {
    "not_safetensors": ("x", CFG, _torch_save(), "adapter_model.safetensors"),
    "header_too_large": ("x", CFG, struct.pack("<Q", 5000) + bytes(5000), "adapter_model.safetensors"),
    "bad_header": ("x", CFG, struct.pack("<Q", 3) + b"[1]", "adapter_model.safetensors"),
    "bad_offsets": ("x", CFG, save(T) + b"tail", "adapter_model.safetensors"),
    "bad_dtype": ("x", CFG, _with(T, key(0, "q_proj", "A"), T[key(0, "q_proj", "A")].double()), "a.safetensors"),
    "non_finite": ("x", CFG, _with(T, key(0, "q_proj", "A"), NAN), "adapter_model.safetensors"),
    "rank_too_large": ("x", *make_adapter(r=16), "adapter_model.safetensors"),
    "shape_mismatch": ("x", CFG, _with(T, key(1, "v_proj", "B"), torch.zeros(64, 4)), "adapter_model.safetensors"),
    "unknown_module": ("x", CFG, _with(T, key(7, "q_proj", "A"), torch.zeros(4, 64)), "adapter_model.safetensors"),
    "missing_weight": ("x", CFG, save({k: v for k, v in T.items() if k != key(0, "v_proj", "B")}),
                       "adapter_model.safetensors"),
    "unsupported_feature": ("x", make_config(use_dora=True), save(T), "adapter_model.safetensors"),
    "bad_config": ("x", b"{", save(T), "adapter_model.safetensors"),
    "config_too_large": ("x", json.dumps({"r": 4, "pad": "x" * 70000}).encode(), save(T), "adapter_model.safetensors"),
    "bad_name": ("../escape", CFG, save(T), "adapter_model.safetensors"),
    "empty_adapter": ("x", CFG, save({}), "adapter_model.safetensors"),
}


@pytest.fixture
def world(tmp_path):
    manager = AdapterManager(tmp_path / "adapters", SPEC, LIMITS)
    pool = SlotPool(SPEC, 2, 8, torch.float32, "cpu", 2, fetch=manager.registry.weights)
    manager.registry.add_retire_listener(lambda ref: pool.evict(ref.id))
    existing = manager.upload("existing", *make_adapter(seed=5))
    pool.prepare([existing])
    return manager, pool, tmp_path


def _snapshot(manager, pool, tmp_path):
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    buffers = [t.clone() for m in pool.A for t in pool.A[m] + pool.B[m]] + [pool.scaling.clone()]
    return files, manager.registry.list(), pool.resident(), buffers


@pytest.mark.parametrize("code", sorted(BAD))
def test_refused_upload_changes_nothing(world, code):
    manager, pool, tmp_path = world
    before = _snapshot(manager, pool, tmp_path)
    name, cfg, weights, filename = BAD[code]
    with pytest.raises(AdapterError) as info:
        manager.upload(name, cfg, weights, weights_filename=filename)
    assert info.value.code == code, info.value
    after = _snapshot(manager, pool, tmp_path)
    assert after[:3] == before[:3]  # store files, registry entries, slot assignments
    assert all(torch.equal(a, b) for a, b in zip(after[3], before[3], strict=True))  # slot contents
    assert not (tmp_path.parent / "escape").exists()

    # ... and a good adapter still registers and works.
    cfg, weights = make_adapter(r=8, modules=("q_proj", "down_proj"), seed=9)
    ref = manager.upload("good", cfg, weights)
    slot = pool.prepare([ref])[ref.id]
    assert_slot_holds(pool, slot, manager.registry.weights(ref))
    assert sorted(n for n in os.listdir(tmp_path / "adapters") if not n.startswith(".")) == ["existing", "good"]


def test_upload_replace_unload_and_restart(world):
    manager, pool, tmp_path = world
    with pytest.raises(AdapterExists):
        manager.upload("existing", *make_adapter(seed=6))
    old = manager.registry.acquire("existing")
    new = manager.upload("existing", *make_adapter(seed=6), replace=True)
    assert manager.registry.weights(old).sha256 == old.sha256  # pinned: disk now holds v2
    assert manager.registry.weights(new).sha256 == new.sha256 != old.sha256
    manager.registry.release(old)
    manager.delete("existing", timeout_s=1)
    assert manager.store.list() == [] and pool.resident() == {}
    manager.upload("a", *make_adapter(seed=1))
    (tmp_path / "adapters" / "junk").mkdir()  # an invalid dir: skipped at start-up with its reason
    restarted = AdapterManager(tmp_path / "adapters", SPEC, LIMITS)
    invalid = restarted.load_all()
    assert [r.name for r in restarted.registry.list()] == ["a"]
    assert [(n, e.code) for n, e in invalid] == [("junk", "not_safetensors")]
