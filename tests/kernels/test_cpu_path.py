"""The CPU backend (the fused kernel, its torch fallbacks and the auto pick), the benchmark's
formulations, and the public functional ops, vs the reference."""
from __future__ import annotations

import pytest
import torch

from kernels import (
    CPUBackend,
    LoRABatch,
    add_lora,
    bench_formulations,
    cpu,
    lora_expand,
    lora_shrink,
    make_backend,
    reference,
)
from kernels.layout import a_table, b_table

from .cases import PATTERNS, batch_with_empty_segment, check, make_case

# The engine's CPU backend formulations ("kernel" needs the row-table layout) and the benchmark's
# candidates ("embbag" needs the row-table layout, the others take any layout).
IMPL_LAYOUTS = [(i, lay) for i in ("auto", "kernel", "segments") for lay in ("plain", "table")
                if not (i == "kernel" and lay == "plain")]
BENCH_LAYOUTS = [(i, lay) for i in bench_formulations.FORMULATIONS for lay in ("plain", "table")
                 if not (i == "embbag" and lay == "plain")]


def _cpu_add(y, case, slots, impl="auto", batch=None):
    backend = CPUBackend(impl)
    backend.bind(case.lora_a, case.lora_b, case.scaling, case.out_slices)(
        y, case.x, backend.prepare(batch or LoRABatch.build(slots)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("impl", "layout"), IMPL_LAYOUTS)
@pytest.mark.parametrize("name", PATTERNS)
def test_formulation_matches_reference(name, impl, layout, dtype):
    slots = PATTERNS[name]
    case = make_case(slots, dtype=dtype, layout=layout, seed=len(slots))
    y = case.y.clone()
    _cpu_add(y, case, slots, impl)
    check(y, case, slots)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("impl", "layout"), BENCH_LAYOUTS)
@pytest.mark.parametrize("name", PATTERNS)
def test_bench_formulation_matches_reference(name, impl, layout, dtype):
    slots = PATTERNS[name]
    case = make_case(slots, dtype=dtype, layout=layout, seed=len(slots))
    y = case.y.clone()
    plan = CPUBackend().prepare(LoRABatch.build(slots))
    bench_formulations.add_lora(y, case.x, case.lora_a, case.lora_b, case.scaling, plan, case.out_slices, impl)
    check(y, case, slots)


def test_bench_rule_picks_by_segments_and_layout():
    table, plain = make_case([0], layout="table"), make_case([0])
    choose, prep = bench_formulations.choose, CPUBackend().prepare
    decode = prep(LoRABatch.build(list(range(6))))
    assert choose(decode, table.lora_a, table.lora_b) == "embbag"
    assert choose(decode, plain.lora_a, plain.lora_b) == "gather"
    prefill = prep(LoRABatch.build([0] * 40 + [1] * 40 + [2] * 40))
    assert choose(prefill, table.lora_a, table.lora_b) == "segments"
    one = prep(LoRABatch.build([3] * 6))
    assert choose(one, table.lora_a, table.lora_b) == "segments"


def test_plan_picks_the_kernel_by_rows_per_segment():
    """The step's plan, made once by the backend: the kernel below KERNEL_MAX_SEG_ROWS rows per segment."""
    prep = CPUBackend().prepare
    assert prep(LoRABatch.build(list(range(6)))).use_kernel
    assert not prep(LoRABatch.build([1] * cpu.KERNEL_MAX_SEG_ROWS)).use_kernel


def test_layout_detection():
    case = make_case([0], layout="table")
    assert a_table(case.lora_a).shape == (6 * 32, 3 * 8)
    assert b_table(case.lora_b[0]).shape == (6 * 8, 16)
    plain = make_case([0])
    assert a_table(plain.lora_a) is None and b_table(plain.lora_b[0]) is None
    assert a_table(case.lora_a[1:]) is None  # slices not starting at the storage's slice 0


@pytest.mark.parametrize("backend", ["cpu", "torch", "reference"])
@pytest.mark.parametrize("layout", ["plain", "table"])
def test_public_shrink_expand_and_empty_segment(backend, layout):
    batch, slots = batch_with_empty_segment()
    case = make_case(slots, layout=layout)
    v = lora_shrink(case.x, case.lora_a, batch, backend=backend)
    want_v = reference.shrink_rows(case.x, case.lora_a, batch.token_slots)
    assert v.dtype == torch.float32 and v.shape == (3, 5, 8)
    torch.testing.assert_close(v, want_v, atol=1e-5, rtol=1e-5)
    y = case.y.clone()
    lora_expand(y, v, case.lora_b, case.scaling, batch, case.out_slices, backend=backend)
    check(y, case, slots)
    y = case.y.clone()
    add_lora(y, case.x, case.lora_a, case.lora_b, case.scaling, batch, case.out_slices, backend=backend)
    check(y, case, slots)


def test_shrink_zero_on_base_rows():
    slots = [-1, 2, -1]
    case = make_case(slots, layout="table")
    v = lora_shrink(case.x, case.lora_a, LoRABatch.build(slots))
    assert torch.count_nonzero(v[:, [0, 2]]) == 0 and torch.count_nonzero(v[:, 1]) > 0


def test_bad_inputs_raise_value_error():
    slots = [0, 1]
    case = make_case(slots)
    batch = LoRABatch.build(slots)
    args = (case.lora_a, case.lora_b, case.scaling, batch, case.out_slices)
    with pytest.raises(ValueError, match="rows"):
        add_lora(case.y, case.x[:1], *args[:3], batch, case.out_slices)
    with pytest.raises(ValueError, match="dtype"):
        add_lora(case.y, case.x.double(), *args)
    with pytest.raises(ValueError, match="outside"):
        add_lora(case.y, case.x, case.lora_a, case.lora_b, case.scaling, batch, [(0, 16), (30, 8), (32, 8)])
    with pytest.raises(ValueError, match="scaling"):
        add_lora(case.y, case.x, case.lora_a, case.lora_b, case.scaling.double(), batch, case.out_slices)
    with pytest.raises(ValueError, match="backend"):
        make_backend("cpu", "cuda-magic")
    with pytest.raises(ValueError, match="implementation"):
        CPUBackend("dense")  # a benchmark-only formulation is not an engine backend


def test_make_backend_picks_by_device():
    assert make_backend("cpu").name == "cpu" and make_backend("cpu", "torch").name == "cpu"
    assert make_backend("cuda").name == "triton" and make_backend("cpu", "reference").name == "reference"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", ["_embbag_fused", "_segments_fused"])
@pytest.mark.parametrize("slots", [[1] * 20 + [-1] * 3 + [4] * 20, [2] * 17, list(range(6)) * 3])
def test_both_fused_paths_match_reference(slots, fused, dtype):
    """The two row-table paths the auto pick chooses between (by dtype and rows per segment)."""
    case = make_case(slots, dtype=dtype, layout="table", seed=len(slots))
    y = case.y.clone()
    a_tab, b_tabs = a_table(case.lora_a), [b_table(b) for b in case.lora_b]
    plan = CPUBackend().prepare(LoRABatch.build(slots))
    getattr(cpu, fused)(y, case.x, a_tab, b_tabs, case.scaling, plan, case.out_slices, case.lora_a[0].shape[1])
    check(y, case, slots)


def test_auto_fused_pick_depends_on_dtype(monkeypatch):
    """20 rows per segment: fused GEMMs in fp32 (threshold 16), embedding_bag in bf16 (48)."""
    from kernels import cpu_ext

    calls = []
    monkeypatch.setattr(cpu_ext, "load", lambda: None)  # as on a machine without the C++ build
    monkeypatch.setattr(cpu, "_segments_fused", lambda *a: calls.append("segments"))
    monkeypatch.setattr(cpu, "_embbag_fused", lambda *a: calls.append("embbag"))
    slots = [1] * 20 + [4] * 20
    for dtype in (torch.float32, torch.bfloat16):
        case = make_case(slots, dtype=dtype, layout="table")
        _cpu_add(case.y, case, slots)
    assert calls == ["segments", "embbag"]


def test_scaling_as_a_view_of_a_larger_table():
    """The slot pool passes each projection a row block of one [layers, modules, slots] table; the
    per-step gather of that table must give every projection its own rows."""
    slots = [0, 0, 1, -1, 3, 5, 5, 2]
    case = make_case(slots, layout="table", seed=7)
    n, s = case.scaling.shape
    table = torch.rand(3, n + 2, s)
    table[1, 1 : 1 + n] = case.scaling  # this projection's rows sit in the middle of the table
    view = table[1, 1 : 1 + n]
    assert view._base is not None
    batch = LoRABatch.build(slots)
    y = case.y.clone()
    other = make_case(slots, layout="table", seed=8)  # a second projection reads other rows first
    backend = CPUBackend("auto")
    with pytest.MonkeyPatch.context() as mp:  # the torch path's per-step scaling gather, not the kernel
        mp.setattr(cpu, "KERNEL_MAX_SEG_ROWS", 0)
        plan = backend.prepare(batch)  # one plan for the step, shared by both projections
    assert not plan.use_kernel
    backend.bind(other.lora_a, other.lora_b, table[0, :n], other.out_slices)(other.y.clone(), other.x, plan)
    backend.bind(case.lora_a, case.lora_b, view, case.out_slices)(y, case.x, plan)
    check(y, case, slots)


def test_fused_kernel_is_built_and_used_by_auto(monkeypatch):
    """The C++ kernel builds on this machine (CI has g++ and ninja) and `auto` routes decode to it."""
    from kernels import cpu_ext

    ext = cpu_ext.load()
    assert ext is not None, cpu_ext.status()
    calls = []

    class Spy:  # the extension module, counting bgmv calls
        def bgmv(self, *a):
            calls.append(1)
            return ext.bgmv(*a)

    slots = [0, 3, 3, -1, 5, 1]
    case = make_case(slots, dtype=torch.bfloat16, layout="table", seed=3)
    backend = CPUBackend()
    bound = backend.bind(case.lora_a, case.lora_b, case.scaling, case.out_slices)
    assert bound.kernel_args is not None
    bound.ext = Spy()
    y = case.y.clone()
    bound(y, case.x, backend.prepare(LoRABatch.build(slots)))
    assert calls == [1]
    check(y, case, slots)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kernel_large_shapes_and_tails(dtype):
    """Widths that are not multiples of 16 (masked tails), n*r up to 3 x 64, long rows, 1 and 2 threads."""
    slots = [2, -1, 0, 7, 7, 1, -1, 3] * 5
    case = make_case(slots, in_features=203, out_sizes=(131, 37, 37), r_max=64, num_slots=8, dtype=dtype,
                     layout="table", seed=11)
    for threads in (1, 2):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            y = case.y.clone()
            _cpu_add(y, case, slots, "kernel")
        finally:
            torch.set_num_threads(old)
        check(y, case, slots)


def test_fused_kernel_disabled_falls_back(monkeypatch):
    """LORAMUX_CPU_KERNEL=0: no build, `auto` still gives the reference result, `kernel` is refused."""
    from kernels import cpu_ext

    monkeypatch.setattr(cpu_ext, "_state", {})
    monkeypatch.setenv("LORAMUX_CPU_KERNEL", "0")
    slots = [1, 1, 4, -1]
    case = make_case(slots, layout="table", seed=5)
    y = case.y.clone()
    _cpu_add(y, case, slots)
    check(y, case, slots)
    assert cpu_ext.status() == "disabled"
    with pytest.raises(ValueError, match="fused CPU kernel"):
        _cpu_add(case.y.clone(), case, slots, "kernel")


def test_stale_build_lock_is_removed(tmp_path):
    """A lock left by a process killed mid-build would make every later start wait forever."""
    import os
    import time

    from kernels import cpu_ext

    lock = tmp_path / "lock"
    lock.write_text("")
    assert not cpu_ext._clear_stale_lock(lock)  # fresh: another process may be building right now
    assert lock.exists()
    old = time.time() - 2 * cpu_ext.STALE_LOCK_S
    os.utime(lock, (old, old))
    assert cpu_ext._clear_stale_lock(lock) and not lock.exists()
    assert not cpu_ext._clear_stale_lock(tmp_path / "missing")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kernel_rows_of_one_adapter_equal_rows_alone(dtype):
    """Runs of >= 4 rows with one slot take the 4-row path; every row must come out bit-identical to
    that row computed alone (batch invariance), and match the reference."""
    slots = [4, 4, 4, 4, 4, 4, -1, 2, 2, 2, 2, 1, 4, 4, 4, 4]
    case = make_case(slots, in_features=203, out_sizes=(131, 37, 37), r_max=16, num_slots=8, dtype=dtype,
                     layout="table", seed=12)
    y = case.y.clone()
    backend = CPUBackend("kernel")
    bound = backend.bind(case.lora_a, case.lora_b, case.scaling, case.out_slices)
    bound(y, case.x, backend.prepare(LoRABatch.build(slots)))
    check(y, case, slots)
    for t, s in enumerate(slots):
        alone = case.y[t : t + 1].clone()
        bound(alone, case.x[t : t + 1], backend.prepare(LoRABatch.build([s])))
        assert torch.equal(alone[0], y[t]), f"row {t} differs from the same row alone"


def test_fused_kernel_refuses_a_slot_beyond_the_pool():
    from kernels import cpu_ext

    case = make_case([0, 1], dtype=torch.float32, layout="table", seed=13)
    a_tab, b_tabs = a_table(case.lora_a), [b_table(b) for b in case.lora_b]
    bad = torch.tensor([0, case.scaling.shape[1]])
    with pytest.raises(RuntimeError, match="outside the"):
        cpu_ext.load().bgmv(case.y.clone(), case.x, a_tab, b_tabs, [off for off, _ in case.out_slices],
                            case.scaling, bad, case.lora_a[0].shape[1])


@pytest.mark.parametrize("layout", ["plain", "table"])
def test_bound_projection_matches_add_lora(layout):
    """A bound CPU projection (what LoRA layers call, one plan per step): the reference's result on
    every step, the kernel bound exactly for the row-table layout, and a clear error for a bad batch."""
    backend = CPUBackend()
    bound = None
    for slots in ([0, 3, 3, -1, 5, 1], [2, 2, 2, 2, -1], [-1, -1]):
        case = make_case(slots, dtype=torch.float32, layout=layout, seed=14)
        if bound is None:
            bound = backend.bind(case.lora_a, case.lora_b, case.scaling, case.out_slices)
        else:  # same buffers every step, as a LoRA layer's views of the slot pool
            case.lora_a, case.lora_b, case.scaling = bound.lora_a, bound.lora_b, bound.scaling
        y = case.y.clone()
        bound(y, case.x, backend.prepare(LoRABatch.build(slots)))
        check(y, case, slots)
    assert (bound.kernel_args is not None) == (layout == "table")
    with pytest.raises(ValueError, match="rows"):
        bound(case.y.clone(), case.x, backend.prepare(LoRABatch.build([0])))
