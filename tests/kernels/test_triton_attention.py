"""Triton paged attention (decode, varlen prefill) vs `reference.paged_attention_reference`.

Interpreter tests (CI, no GPU) set TRITON_INTERPRET=1 only for their own duration: the kernels are
decorated lazily (see kernels/triton_attention.py), so the setting takes effect although triton was
imported earlier. They run in `make test` under triton 3.9 and again under 3.6 (`make test-triton36`).
Caches hold NaN in every slot no sequence owns (block tails included) and outputs start as NaN, so a read
past a context or a row left unwritten shows. `test_compiles_for_sm90` builds the compiled forms (runtime
loop bounds, native half dots) to a cubin without a GPU; `gpu` tests run them on CUDA where one is lent.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("triton")

from kernels import reference, triton_attention  # noqa: E402
from kernels.triton_attention import paged_decode_attention, paged_prefill_attention  # noqa: E402

TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@dataclass
class Case:
    q: torch.Tensor  # [T, H, D]
    kv: torch.Tensor  # [2, KVH, blocks, page, D]
    block_tables: torch.Tensor  # [S, max_blocks] int32
    context_lens: torch.Tensor  # [S] int32
    query_start_loc: torch.Tensor  # [S + 1] int32


def make_case(ctx_lens, q_lens, kv_heads, group, head_dim, page, dtype=torch.float32, device="cpu") -> Case:
    """Sequences with shuffled, non-contiguous blocks; NaN in every cache slot past a context."""
    gen = torch.Generator().manual_seed(1234 + sum(ctx_lens) + page + head_dim + group)
    n_blocks = [-(-c // page) for c in ctx_lens]
    total = sum(n_blocks) + 3  # spare blocks nobody owns
    order = torch.randperm(total, generator=gen).tolist()
    kv = torch.full((2, kv_heads, total, page, head_dim), float("nan"))
    tables = torch.full((len(ctx_lens), max(n_blocks) + 2), 10**6, dtype=torch.int32)  # unused entries: absurd
    for i, ctx in enumerate(ctx_lens):
        mine, order = order[: n_blocks[i]], order[n_blocks[i]:]
        tables[i, : n_blocks[i]] = torch.tensor(mine, dtype=torch.int32)
        for p in range(ctx):
            kv[:, :, mine[p // page], p % page] = torch.randn(2, kv_heads, head_dim, generator=gen)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(qsl[-1]), kv_heads * group, head_dim, generator=gen)
    return Case(q.to(device, dtype), kv.to(device, dtype), tables.to(device),
                torch.tensor(ctx_lens, dtype=torch.int32, device=device), qsl.to(device))


def expected(case: Case) -> torch.Tensor:
    scale = 1.0 / math.sqrt(case.q.shape[-1])
    return reference.paged_attention_reference(case.q, case.kv, case.block_tables, case.context_lens,
                                               case.query_start_loc, scale)


def check(out: torch.Tensor, case: Case) -> None:
    tol = TOL[case.q.dtype]
    torch.testing.assert_close(out.float(), expected(case).float(), atol=tol, rtol=tol)


def poisoned(case: Case) -> torch.Tensor:
    return torch.full_like(case.q, float("nan"))


def run_decode(case: Case, **kw) -> torch.Tensor:
    return paged_decode_attention(case.q, case.kv, case.block_tables, case.context_lens, out=poisoned(case), **kw)


def run_prefill(case: Case, **kw) -> torch.Tensor:
    return paged_prefill_attention(case.q, case.kv, case.block_tables, case.context_lens, case.query_start_loc,
                                   out=poisoned(case), **kw)


@pytest.fixture(params=["auto", "static"])
def interpret(request, monkeypatch):
    """The interpreter, with the launchers' own loop form ("auto") and with constexpr trip counts forced
    ("static": the only form triton 3.6's interpreter runs; under 3.9 "auto" is the compiled form)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if request.param == "static":
        monkeypatch.setattr(triton_attention, "_dynamic_loops", lambda: False)


DECODE_CTX = [1, 17, 40, 100, 16]  # one-token context, block tails, exact block multiple


@pytest.mark.parametrize(("group", "head_dim", "page", "partition"), [
    (1, 64, 16, 32),  # split: up to 4 partitions, one past the 1-token context
    (3, 128, 5, 512),  # odd group and page, one partition (direct write)
    (8, 64, 16, 48),  # 8 heads per KV head, partitions of 3 x 16 keys, 3 of them (not a power of 2)
])
def test_decode_fp32(interpret, group, head_dim, page, partition):
    case = make_case(DECODE_CTX, [1] * len(DECODE_CTX), 2, group, head_dim, page)
    check(run_decode(case, partition_size=partition), case)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_half(interpret, dtype):
    case = make_case([1, 33, 70], [1, 1, 1], 2, 3, 64, 16, dtype=dtype)
    check(run_decode(case, partition_size=32, max_context_len=70), case)


PREFILL_SEQS = [(1, 1), (17, 17), (40, 7), (9, 0), (70, 1), (23, 20)]  # (context, new tokens)


@pytest.mark.parametrize(("group", "head_dim", "page"), [(1, 128, 16), (3, 64, 5), (8, 64, 16)])
def test_prefill_fp32(interpret, group, head_dim, page):
    ctx, qlen = zip(*PREFILL_SEQS, strict=True)
    case = make_case(list(ctx), list(qlen), 2, group, head_dim, page)
    check(run_prefill(case, block_m=16), case)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefill_half(interpret, dtype):
    case = make_case([30, 5], [12, 5], 1, 3, 64, 16, dtype=dtype)
    check(run_prefill(case, block_m=16, max_query_len=12, max_context_len=30), case)


def test_prefill_of_decode_rows_matches_decode(monkeypatch):
    # One query per sequence through both kernels: the same attention.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    case = make_case([1, 19, 50], [1, 1, 1], 2, 3, 64, 16)
    torch.testing.assert_close(run_prefill(case, block_m=16), run_decode(case, partition_size=32),
                               atol=2e-6, rtol=2e-6)


def test_rejects_mismatched_cache(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    case = make_case([4], [1], 2, 2, 64, 16)
    with pytest.raises(ValueError, match="does not fit"):
        paged_decode_attention(case.q[:, :3], case.kv, case.block_tables, case.context_lens)
    with pytest.raises(ValueError, match="dtype"):
        paged_decode_attention(case.q.half(), case.kv, case.block_tables, case.context_lens)


def _signature(fn, args: dict, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        else:
            sig[name] = args.get(name, "i32")
    return sig


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_compiles_for_sm90(monkeypatch, dtype):
    """The compiled forms (runtime loop bounds, native dots) lower to a cubin; no GPU needed."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    decode_k, combine_k, prefill_k = triton_attention._jitted(False)
    t = f"*{dtype}"
    prec = "ieee" if dtype == "fp32" else "tf32"
    common = dict(GROUP=4, BLOCK_D=128, PAGE=16, DYNAMIC=True, PRECISION=prec, UPCAST=False)
    kinds = {"q_ptr": t, "kv_ptr": t, "out_ptr": t, "bt_ptr": "*i32", "ctx_ptr": "*i32", "qsl_ptr": "*i32",
             "m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32", "scale_log2": "fp32"}
    target = GPUTarget("cuda", 90, 32)
    variants = [(prefill_k, dict(common, BLOCK_G=4, BLOCK_Q=16, BLOCK_N=32, MAX_TILES=1))]
    if dtype != "fp32":  # fp32 differs only in the dots' precision: one kernel is enough (6 s each)
        variants += [
            (decode_k, dict(common, BLOCK_G=16, BLOCK_N=64, PART=512, SPLIT=True)),
            (decode_k, dict(common, BLOCK_G=16, BLOCK_N=64, PART=512, SPLIT=False)),
            (combine_k, dict(BLOCK_D=128, MAX_PARTS=8)),
        ]
    for fn, cx in variants:
        compiled = compile(ASTSource(fn, _signature(fn, kinds, cx), constexprs=cx), target=target)
        assert "cubin" in compiled.asm


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_cuda_decode_and_prefill(dtype, group, head_dim):
    ctx = [1, 17, 700, 2100, 64]
    case = make_case(ctx, [1] * len(ctx), 4, group, head_dim, 16, dtype=dtype, device="cuda")
    check(run_decode(case), case)  # 2100 keys: 5 partitions of 512
    check(run_decode(case, partition_size=1024, max_context_len=2100), case)
    seqs = [(1, 1), (300, 300), (700, 129), (2100, 1), (33, 0)]
    c2, q2 = zip(*seqs, strict=True)
    case = make_case(list(c2), list(q2), 4, group, head_dim, 16, dtype=dtype, device="cuda")
    check(run_prefill(case), case)
    check(run_prefill(case, block_m=128), case)
