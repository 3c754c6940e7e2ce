"""Device slot pool: the stacked LoRA buffers the kernels read, and which adapter sits in each slot.

Buffers (allocated once, zero-padded to max_rank), per layer and HF module:
  A[module][layer]: [num_slots, max_rank, in]     B[module][layer]: [num_slots, out, max_rank]
  allocated with `kernels.layout` so the slices of one fused projection (q|k|v, gate|up) share the
  row-table storage the CPU kernel path reads without copies (any strides are valid for the kernels);
  scaling:   [num_layers, 7, num_slots] fp32, modules in spec.MODULES order, so scaling[layer, 0:3]
             is the q|k|v view and scaling[layer, 4:6] the gate|up view (views: no rebinding needed)
A slot holding an adapter that skips a module has zeros there and scaling 0.

Residency is three-tier: device slot (LRU) <- host LRU of LoadedAdapters <- `fetch(ref)` (the
registry, which reads the store). `prepare(refs)` runs on the engine thread once per step and makes
every ref of the step resident without evicting any of them; `evict(ref_id)` may come from another
thread (registry retire listener), so slot bookkeeping is under a lock. Only the engine thread
writes the buffers.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from adapters.load_times import LoadTimes
from adapters.spec import FUSED_GROUPS, MODULE_INDEX, MODULES, BaseModelSpec
from adapters.validate import LoadedAdapter
from kernels.layout import alloc_lora_a, alloc_lora_b


class SlotLoadError(RuntimeError):
    """Making one adapter version resident failed (e.g. its stored files no longer match). `ref`
    names it, so the engine can fail that adapter's requests and let the step's others go on."""

    def __init__(self, ref, cause: BaseException):
        super().__init__(f"could not load adapter {getattr(ref, 'name', ref)!r}: {cause}")
        self.ref = ref


class SlotPool:
    def __init__(
        self,
        spec: BaseModelSpec,
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device | str,
        host_cache_size: int,
        fetch: Callable[[object], LoadedAdapter],
    ):
        if num_slots <= 0 or max_rank <= 0 or host_cache_size < 0:
            raise ValueError("num_slots and max_rank must be positive, host_cache_size non-negative")
        self.spec, self.num_slots, self.max_rank = spec, num_slots, max_rank
        self.dtype, self.device = dtype, torch.device(device)
        self.host_cache_size, self._fetch = host_cache_size, fetch
        L = spec.num_layers
        self.A: dict[str, list[torch.Tensor]] = {m: [] for m in MODULES}
        self.B: dict[str, list[torch.Tensor]] = {m: [] for m in MODULES}
        for _ in range(L):
            for group in FUSED_GROUPS:  # slices of one fused projection share one A storage
                d_in = spec.in_features(group[0])
                a_views = alloc_lora_a(num_slots, max_rank, d_in, len(group), dtype=dtype, device=device)
                outs = [spec.out_features(m) for m in group]
                b_views = alloc_lora_b(num_slots, outs, max_rank, dtype=dtype, device=device)
                for m, a, b in zip(group, a_views, b_views, strict=True):
                    self.A[m].append(a)
                    self.B[m].append(b)
        self.scaling = torch.zeros(L, len(MODULES), num_slots, dtype=torch.float32, device=device)
        self._lock = threading.Lock()
        self._slot_of: OrderedDict[int, int] = OrderedDict()  # ref id -> slot, least recently used first
        self._ref_of: dict[int, object] = {}  # slot -> ref resident there
        self._host: OrderedDict[int, LoadedAdapter] = OrderedDict()  # ref id -> weights, LRU
        self.loads = self.evictions = self.hits = 0
        self.load_times = LoadTimes()  # seconds per load into a slot, by source (host cache | disk)

    # --- views for the LoRA-aware linears -----------------------------------------------------
    def a_views(self, layer: int, modules: Sequence[str]) -> list[torch.Tensor]:
        return [self.A[m][layer] for m in modules]  # each [num_slots, max_rank, in]

    def b_views(self, layer: int, modules: Sequence[str]) -> list[torch.Tensor]:
        return [self.B[m][layer] for m in modules]  # each [num_slots, out, max_rank]

    def scaling_view(self, layer: int, modules: Sequence[str]) -> torch.Tensor:
        """[len(modules), num_slots] view; modules must be consecutive in MODULES order."""
        first = MODULE_INDEX[modules[0]]
        assert [MODULE_INDEX[m] for m in modules] == list(range(first, first + len(modules))), modules
        return self.scaling[layer, first : first + len(modules)]

    # --- residency ----------------------------------------------------------------------------
    def slot_of(self, ref_id: int) -> int | None:
        with self._lock:
            return self._slot_of.get(ref_id)

    def resident(self) -> dict[int, int]:
        with self._lock:
            return dict(self._slot_of)

    def level(self, ref_id: int) -> str | None:
        """Where a version is held now: "device" (a slot), "host" (the host LRU only) or None."""
        with self._lock:
            if ref_id in self._slot_of:
                return "device"
            return "host" if ref_id in self._host else None

    def levels(self) -> dict[str, str]:
        """Adapter name -> the highest level any of its versions is held at ("device" | "host")."""
        with self._lock:
            out = {loaded.name: "host" for loaded in self._host.values()}
            out.update({ref.name: "device" for ref in self._ref_of.values()})
        return out

    def prepare(self, refs: Sequence) -> dict[int, int]:
        """Make every ref resident; returns ref.id -> slot. Never evicts a ref of this call."""
        wanted = {r.id: r for r in refs}
        if len(wanted) > self.num_slots:
            raise ValueError(f"{len(wanted)} distinct adapters in one step but only {self.num_slots} slots")
        out: dict[int, int] = {}
        for ref_id, ref in wanted.items():
            with self._lock:
                slot = self._slot_of.get(ref_id)
                if slot is not None:  # resident: just refresh its LRU position
                    self._slot_of.move_to_end(ref_id)
                    self.hits += 1
                    out[ref_id] = slot
                    continue
                slot = self._claim_slot(protected=wanted.keys())
            try:
                self._load(ref, slot)  # registers ref_id -> slot when the copy is done
            except Exception as exc:  # the claimed slot stays unregistered, i.e. free
                raise SlotLoadError(ref, exc) from exc
            out[ref_id] = slot
        return out

    def _claim_slot(self, protected) -> int:
        """A free slot, else the least recently used one outside `protected` (lock held)."""
        used = set(self._slot_of.values())
        free = [s for s in range(self.num_slots) if s not in used]
        if free:
            return free[0]
        victim = next(rid for rid in self._slot_of if rid not in protected)
        self.evictions += 1
        slot = self._slot_of.pop(victim)
        self._ref_of.pop(slot, None)
        return slot

    def _load(self, ref, slot: int) -> None:
        """Copy one adapter into `slot`: one host->device copy per module buffer."""
        t0 = time.perf_counter()
        with self._lock:
            source = "host" if ref.id in self._host else "disk"
        loaded = self._host_get(ref)
        if loaded.max_rank > self.max_rank:
            raise ValueError(f"adapter {loaded.name!r} rank {loaded.max_rank} > pool max_rank {self.max_rank}")
        L = self.spec.num_layers
        scaling = torch.zeros(L, len(MODULES), dtype=torch.float32)
        for m in MODULES:
            # Stage the whole module on the host ([L, r_max, in] / [L, out, r_max]), zero-padded.
            a_host = torch.zeros(L, self.max_rank, self.spec.in_features(m), dtype=self.dtype)
            b_host = torch.zeros(L, self.spec.out_features(m), self.max_rank, dtype=self.dtype)
            for layer in range(L):
                w = loaded.weights.get((layer, m))
                if w is not None:
                    a_host[layer, : w.rank] = w.a
                    b_host[layer, :, : w.rank] = w.b
                    scaling[layer, MODULE_INDEX[m]] = w.scaling
            for layer in range(L):
                self.A[m][layer][slot].copy_(a_host[layer])
                self.B[m][layer][slot].copy_(b_host[layer])
        self.scaling[:, :, slot].copy_(scaling)
        with self._lock:
            self._slot_of[ref.id] = slot
            self._slot_of.move_to_end(ref.id)
            self._ref_of[slot] = ref
            self.loads += 1
        self.load_times.observe(source, time.perf_counter() - t0)

    def _host_get(self, ref) -> LoadedAdapter:
        with self._lock:
            loaded = self._host.get(ref.id)
            if loaded is not None:
                self._host.move_to_end(ref.id)
                return loaded
        loaded = self._fetch(ref)  # may read the disk: outside the lock
        assert loaded.sha256 == ref.sha256, f"fetch returned other weights for {ref.name!r}"
        if self.host_cache_size:
            with self._lock:
                self._host[ref.id] = loaded
                while len(self._host) > self.host_cache_size:
                    self._host.popitem(last=False)
        return loaded

    def evict(self, ref_id: int) -> None:
        """Forget a version (retired): free its slot and its host copy. Safe from any thread."""
        with self._lock:
            slot = self._slot_of.pop(ref_id, None)
            if slot is not None:
                self._ref_of.pop(slot, None)
                self.evictions += 1
            self._host.pop(ref_id, None)
