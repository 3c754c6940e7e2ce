"""Crash consistency of the adapter store (issue #16): SIGKILL at random points during upload,
replace and delete, then restart, at least 20 times (LORAMUX_CRASH_ROUNDS raises it for a longer run).

A forked child runs the real `AdapterManager` (validate -> store write -> registry) in a loop of
random uploads, replaces and deletes over a few names, journaling "begin" before each operation and
"done <version>" after it returned (what an HTTP client would have seen as its 201 / 200). The
parent kills it with SIGKILL at a random moment, restarts the store (start-up recovery + scan) and
checks, against the journal:
- the store is consistent: every listed adapter validates and matches its recorded sha256, nothing
  invalid is found, no temp / old / half-deleted dir is left behind;
- every acknowledged upload or replace is there with its exact bytes, every acknowledged delete is
  gone; only the operation in flight at the kill may have landed or not (all or nothing);
- versions are monotonic: what the restarted registry serves is at least the acknowledged version,
  and the next write of a name gets a version above every version that name ever had.
The child is forked from this process (torch already imported), so a round costs milliseconds.
"""
from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

from adapters.manager import AdapterManager
from adapters.store import DEL_PREFIX, OLD_PREFIX, TMP_PREFIX
from adapters.validate import ValidationLimits
from tests.adapters.helpers import SPEC, make_adapter

LIMITS = ValidationLimits(max_rank=8)
NAMES = ("a", "b", "c")
ROUNDS = int(os.environ.get("LORAMUX_CRASH_ROUNDS", "24"))
_FILES: dict[int, tuple[bytes, bytes]] = {}


def files(seed: int) -> tuple[bytes, bytes]:
    """(config, weights) of content `seed`: rank 8 over every projection, so writes take a moment."""
    if seed not in _FILES:
        _FILES[seed] = make_adapter(r=8, seed=seed)
    return _FILES[seed]


def _child(root: str, journal: str, first_seed: int, present: list[str], rng_seed: int) -> None:
    """Runs operations until killed. Journal lines: `B op name seed` / `E op name version`."""
    rng = random.Random(rng_seed)
    manager = AdapterManager(root, SPEC, LIMITS)
    manager.load_all()
    have, seed = set(present), first_seed
    fd = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(fd, b"R\n")  # ready: the kill may come from here on
    while True:
        name = rng.choice(NAMES)
        if name in have and rng.random() < 0.4:
            os.write(fd, f"B delete {name} 0\n".encode())
            manager.delete(name, timeout_s=1)
            have.discard(name)
            os.write(fd, f"E delete {name} 0\n".encode())
        else:
            seed += 1
            op = "replace" if name in have else "upload"
            os.write(fd, f"B {op} {name} {seed}\n".encode())
            ref = manager.upload(name, *files(seed), replace=op == "replace")
            have.add(name)
            os.write(fd, f"E {op} {name} {ref.version}\n".encode())


def _read_journal(path: str) -> tuple[list[tuple[str, str, int, int]], tuple[str, str, int] | None]:
    """(acknowledged ops as (op, name, seed, version), the op in flight or None)."""
    done, pending = [], None
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if len(parts) != 4:  # "R" (ready); each line is one small write(), so never cut
            continue
        kind, op, name, num = parts[0], parts[1], parts[2], int(parts[3])
        if kind == "B":
            pending = (op, name, num)
        elif kind == "E" and pending is not None:
            done.append((op, name, pending[2], num))
            pending = None
    return done, pending


def _state(manager: AdapterManager) -> dict[str, bytes]:
    """name -> stored weights bytes, after checking each entry is whole and valid."""
    out = {}
    for name in manager.store.list():
        config, weights = manager.store.read(name)
        out[name] = (config, weights)
    return out


def test_sigkill_during_upload_replace_delete(tmp_path):
    root = str(tmp_path / "store")
    ctx = multiprocessing.get_context("fork")
    expected: dict[str, int] = {}  # name -> content seed it must hold
    max_version: dict[str, int] = {}  # name -> highest version ever acknowledged or served
    seed, kills_mid_op = 0, 0
    rng = random.Random(16)
    for round_ in range(ROUNDS):
        journal = str(tmp_path / f"journal-{round_}")
        child = ctx.Process(target=_child, args=(root, journal, seed + 1000 * (round_ + 1), sorted(expected),
                                                 round_), daemon=True)
        child.start()
        deadline = time.monotonic() + 30
        while not (os.path.exists(journal) and Path(journal).read_text().startswith("R")):
            assert child.is_alive() and time.monotonic() < deadline, "child did not start"
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.15))
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        assert child.exitcode == -signal.SIGKILL
        seed += 1000 * (round_ + 1)

        done, pending = _read_journal(journal)
        for op, name, content, version in done:  # acknowledged: must have happened
            if op == "delete":
                expected.pop(name, None)
            else:
                expected[name] = content
                assert version > max_version.get(name, 0), (name, version, max_version)
                max_version[name] = version

        # Restart: recovery, scan, register.
        manager = AdapterManager(root, SPEC, LIMITS)
        assert manager.load_all() == []  # nothing half-written is ever found invalid
        leftovers = [e for e in os.listdir(root) if e.startswith((TMP_PREFIX, OLD_PREFIX, DEL_PREFIX))]
        assert leftovers == []
        state = _state(manager)
        assert sorted(r.name for r in manager.list()) == sorted(state)
        if pending is not None:  # the op the kill interrupted: all or nothing
            kills_mid_op += 1
            op, name, content = pending
            after = dict(expected)
            if op == "delete":
                after.pop(name, None)
            else:
                after[name] = content
            assert {n: state[n] for n in state} in ({n: files(s) for n, s in expected.items()},
                                                    {n: files(s) for n, s in after.items()}), (round_, pending)
            expected = after if state.keys() == after.keys() and all(
                state[n] == files(s) for n, s in after.items()) else expected
        assert state == {n: files(s) for n, s in expected.items()}, round_  # exact bytes
        for ref in manager.list():
            assert ref.version >= max_version.get(ref.name, 0)
            assert ref.sha256 == manager.store.meta(ref.name)["sha256"]
            max_version[ref.name] = ref.version

    # Versions stay monotonic after all those kills: the next write of every name goes above.
    manager = AdapterManager(root, SPEC, LIMITS)
    manager.load_all()
    for name in NAMES:
        ref = manager.upload(name, *files(999_999), replace=name in expected)
        assert ref.version > max_version.get(name, 0)
    assert kills_mid_op >= 1  # the kills did land inside operations
