"""The fused CPU decoder-layer ops (kernels/csrc/model_cpu.cpp) against the torch formulations they
replace, op by op and through whole models (and Hugging Face), in fp32 and bf16.

bf16 tolerances: the torch formulations round every intermediate to bf16 and so does the kernel,
so elementwise ops agree exactly or, where fp32 rounding differs, by one bf16 ulp (2^-8 relative).
"""
from __future__ import annotations

import random

import pytest
import torch

from kernels import cpu_ext
from server.model.attention import PagedAttention, allocate_kv_cache, build_attention_plan, paged_attention
from server.model.context import make_context
from server.model.cpu_ops import (
    FusedPagedAttention,
    FusedRMSNorm,
    FusedSiluAndMul,
    disable_cpu_ops,
    enable_cpu_ops,
)
from server.model.layers import RMSNorm, SiluAndMul
from server.model.rope import apply_rotary
from tests.server.model.paged_case import paged_case

DTYPES = [torch.float32, torch.bfloat16]
BF16_ULP = 2.0**-8


@pytest.fixture(scope="module")
def ext():
    mod = cpu_ext.load()
    assert mod is not None, cpu_ext.status()
    return mod


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, fp32_tol: float = 1e-5) -> None:
    out, ref = out.float(), ref.float()
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=fp32_tol, atol=fp32_tol)
        return
    err = (out - ref).abs()
    bound = BF16_ULP * ref.abs() + 1e-6
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()}"
    assert (out == ref).float().mean().item() > 0.98  # nearly all bit-identical


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(ext, dtype, with_residual):
    g = torch.Generator().manual_seed(0)
    T, H = 9, 83  # a width that is no multiple of 16
    x = (torch.randn(T, H, generator=g) * 3).to(dtype)
    res = torch.randn(T, H, generator=g).to(dtype)
    norm = RMSNorm(H, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(H, generator=g))
    ref_res = res + x if with_residual else x
    ref = norm(ref_res)
    out = torch.empty_like(x)
    res_in = res.clone()
    ext.rms_norm(out, x, norm.weight.detach(), 1e-5, res_in if with_residual else None)
    assert_close(out, ref, dtype)
    if with_residual:
        assert torch.equal(res_in, ref_res)  # the sum, written in place, rounded once like torch's add
    with torch.inference_mode():  # the module entry point the model uses
        h, r = FusedRMSNorm(norm, ext).residual_norm(x, res.clone() if with_residual else None)
    assert_close(h, ref, dtype)
    assert torch.equal(r, ref_res)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 16])
def test_rotary_in_place(ext, dtype, head_dim):
    g = torch.Generator().manual_seed(1)
    T, H, KV = 7, 4, 2
    qkv = torch.randn(T, (H + 2 * KV) * head_dim, generator=g).to(dtype)
    angles = torch.rand(T, head_dim // 2, generator=g) * 6
    cos = torch.cat((angles.cos(), angles.cos()), -1).to(dtype)
    sin = torch.cat((angles.sin(), angles.sin()), -1).to(dtype)
    ref = apply_rotary(qkv[:, : (H + KV) * head_dim].view(T, H + KV, head_dim), cos, sin).reshape(T, -1)
    v_before = qkv[:, (H + KV) * head_dim :].clone()
    ext.rotary_(qkv, cos, sin, H + KV, head_dim)
    assert_close(qkv[:, : (H + KV) * head_dim], ref, dtype)
    assert torch.equal(qkv[:, (H + KV) * head_dim :], v_before)  # V columns untouched


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(ext, dtype):
    g = torch.Generator().manual_seed(2)
    gate_up = (torch.randn(5, 2 * 75, generator=g) * 4).to(dtype)
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -20.0])  # saturated and zero inputs
    ref = SiluAndMul()(gate_up)
    with torch.inference_mode():
        assert_close(FusedSiluAndMul(ext)(gate_up), ref, dtype, fp32_tol=2e-6)


def _fused_attention(ext, q, k, v, cache, ctx, plan, scale):
    """The fused attention module on q|k|v with an identity rotation (cos 1, sin 0: rotary is tested
    on its own above), so that its output compares with `paged_attention` on the same q, k, v."""
    T, H, D = q.shape
    qkv = torch.cat((q.reshape(T, -1), k.reshape(T, -1), v.reshape(T, -1)), dim=1)
    cos, sin = torch.ones(T, D, dtype=q.dtype), torch.zeros(T, D, dtype=q.dtype)
    attn = FusedPagedAttention(PagedAttention(H, k.shape[1], D, scale), ext)
    with torch.inference_mode():
        return attn(qkv, cos, sin, cache, ctx, plan)


def _decode_setup(dtype, D, KV, G, bs, lens, seed=3):
    """A random cache and one decode token per sequence (context lens `lens`), non-contiguous tables."""
    g = torch.Generator().manual_seed(seed)
    H = KV * G
    per_seq = [-(-n // bs) for n in lens]
    num_blocks = sum(per_seq) + 3
    blocks = list(range(num_blocks))
    random.Random(seed).shuffle(blocks)
    tables, k = [], 0
    for n in per_seq:
        tables.append(blocks[k : k + n])
        k += n

    class Cfg:
        num_key_value_heads, head_dim, num_hidden_layers = KV, D, 1

    cache = allocate_kv_cache(Cfg, num_blocks, bs, dtype, "cpu")[0]
    cache.copy_(torch.randn(cache.shape, generator=g))  # earlier tokens' K/V
    q = torch.randn(len(lens), H, D, generator=g).to(dtype)
    kv = torch.randn(2, len(lens), KV, D, generator=g).to(dtype)
    return cache, tables, q, kv[0], kv[1]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D,KV,G,bs", [(64, 3, 3, 16), (128, 2, 4, 8), (64, 1, 1, 16), (32, 2, 2, 4)])
def test_decode_attention_matches_torch_path(ext, dtype, D, KV, G, bs):
    lens = [1, bs, bs + 1, 3 * bs - 1, 70, 5]  # one key; exact blocks; a partial last block; long
    cache, tables, q, k, v = _decode_setup(dtype, D, KV, G, bs, lens)
    ctx = make_context([[n - 1] for n in lens], tables, bs, torch.device("cpu"))
    plan = build_attention_plan(ctx, cache)
    ref_cache = cache.clone()
    ref = paged_attention(q, k, v, ref_cache, ctx, plan, D**-0.5)  # torch formulation
    out = _fused_attention(ext, q, k, v, cache, ctx, plan, D**-0.5)
    assert torch.equal(cache, ref_cache)  # kv_write put every K/V row where index_copy_ did
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: scores from a different summation order
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_step_decode_rows_and_prefills(ext, dtype):
    """Decode rows between a full prefill and a chunked prefill: the kernel serves the decode rows,
    the torch path the prefills, all reading what kv_write just stored."""
    positions = [[9], list(range(6)), [4], list(range(5, 11))]  # decode, prefill, decode, 2nd chunk
    c = paged_case(dtype, 24, 4, positions, [[3, 7, 1], [0, 2], [5, 9], [11, 4, 8]], seed=4)
    cache, ref_cache, ref = c.cache, c.ref_cache, c.ref
    out = _fused_attention(ext, c.q, c.k, c.v, cache, c.ctx, c.plan, c.k.shape[-1] ** -0.5)
    assert torch.equal(cache, ref_cache)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


def test_ops_refuse_bad_indices_and_shapes(ext):
    cache, tables, q, k, v = _decode_setup(torch.float32, 64, 2, 2, 4, [5, 6])
    nb = cache.shape[2]
    rows = torch.arange(2)
    lens = torch.tensor([5, 6])
    bad_tables = torch.tensor([[0, nb], [1, 2]], dtype=torch.int32)  # a block beyond the cache
    out = torch.empty(2, 4, 64)
    with pytest.raises(RuntimeError, match="block outside the cache"):
        ext.decode_attention(out, q.view(2, -1), rows, cache, bad_tables, lens, 4, 0.125)
    good = torch.tensor([t + [0] * (2 - len(t)) for t in tables], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="beyond the table"):
        ext.decode_attention(out, q.view(2, -1), rows, cache, good, torch.tensor([5, 99]), 4, 0.125)
    with pytest.raises(RuntimeError, match="outside the cache"):
        ext.kv_write(cache, k.view(2, -1), v.view(2, -1), torch.tensor([0, nb * 4]))
    with pytest.raises(RuntimeError, match="one dtype"):
        ext.rms_norm(torch.empty(2, 8), torch.randn(2, 8), torch.ones(8, dtype=torch.bfloat16), 1e-5, None)
    with pytest.raises(RuntimeError, match="gate_up"):
        ext.silu_and_mul(torch.empty(2, 8), torch.randn(2, 10))


class _Refuse:
    """Stands in for the ops module: any use is a test failure."""

    def __getattr__(self, name):
        raise AssertionError(f"fused op {name} used")


def test_fused_ops_only_without_autograd():
    from server.bench.engine import random_model

    loaded = random_model("tiny", "float32", "cpu")
    model = loaded.model
    model.bind_kv_cache(allocate_kv_cache(loaded.config, 4, 16, torch.float32, "cpu"))
    assert enable_cpu_ops(model)
    fused = [m for m in model.modules() if isinstance(m, (FusedRMSNorm, FusedSiluAndMul, FusedPagedAttention))]
    assert len(fused) == 4 * len(model.model.layers) + 1  # 2 norms, activation, attention per layer + final norm
    for m in fused:
        m.ops = _Refuse()
    ctx = make_context([[0, 1, 2]], [[0]], 16, torch.device("cpu"))
    model(torch.tensor([5, 6, 7]), ctx)  # grad mode (training): the torch formulations
    with torch.inference_mode(), pytest.raises(AssertionError, match="fused op"):
        model(torch.tensor([5, 6, 7]), ctx)


@pytest.mark.parametrize("dims", [dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1),
                                  dict(hidden_size=384, intermediate_size=160, num_attention_heads=3,
                                       num_key_value_heads=3)])
@torch.inference_mode()
def test_fused_model_matches_hf(ext, tmp_path, dims):
    """head_dim 64 (GQA 2) and 128 (MHA): prefill, chunked prefill (chunk_attention.cpp), decode;
    logits vs HF in fp64, within max(1e-4, 2 x HF's own fp32 error)."""
    import copy

    from server.model.cpu_linear import prepack_linears
    from server.model.loader import load_model
    from tests.server.model.tiny import save_tiny_hf

    hf = save_tiny_hf(tmp_path, "untied", **dims)
    ours = load_model(str(tmp_path), dtype="float32", device="cpu")
    assert prepack_linears(ours.model) > 0 and enable_cpu_ops(ours.model)
    rng = random.Random(5)
    seqs = [[rng.randrange(100) for _ in range(n)] for n in (20, 13)]
    ref = [hf(torch.tensor([s])).logits[0].double() for s in seqs]
    ref64 = [copy.deepcopy(hf).double()(torch.tensor([s])).logits[0] for s in seqs]
    bs = 4
    ours.model.bind_kv_cache(allocate_kv_cache(ours.config, 16, bs, torch.float32, "cpu"))
    tables = [[9, 2, 14, 5, 0], [3, 11, 7, 1]]
    steps = [[(0, range(0, 8)), (1, range(0, 13))],  # prefill chunk, full prefill
             [(1, range(13, 13)), (0, range(8, 17))],  # (seq 1 idle) second chunk
             [(0, range(17, 18))], [(0, range(18, 19))], [(0, range(19, 20))]]  # decode
    for step in steps:
        step = [(s, list(r)) for s, r in step if len(r)]
        ctx = make_context([p for _, p in step], [tables[s] for s, _ in step], bs, torch.device("cpu"))
        ids = torch.tensor([seqs[s][p] for s, pos in step for p in pos])
        logits = ours.model.compute_logits(ours.model(ids, ctx))
        row = 0
        for s, pos in step:
            err = (logits[row : row + len(pos)].double() - (want := ref64[s][pos[0] : pos[-1] + 1])).abs().max().item()
            hf_err = (ref[s][pos[0] : pos[-1] + 1] - want).abs().max().item()
            assert err <= max(1e-4, 2 * hf_err), f"seq {s} positions {pos}: max abs err {err} (HF fp32: {hf_err})"
            row += len(pos)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@torch.inference_mode()
def test_fused_engine_model_matches_torch_path(ext, dtype):
    """The bench's random 'tiny' shape (head_dim 64, GQA 2): the same decode steps with the fused ops
    and with the torch formulations give the same logits (bf16: within rounding) and the same argmax."""
    from server.bench.engine import random_model

    loaded = random_model("tiny", dtype, "cpu")
    model, cfg, dt = loaded.model, loaded.config, loaded.dtype
    bs, lens = 16, [3, 17, 40]
    tables = [[0], [1, 2], [3, 4, 5]]
    ids = torch.randint(3, 1000, (sum(lens),), generator=torch.Generator().manual_seed(6))
    outs = {}
    for fused in (False, True):
        if fused:
            assert enable_cpu_ops(model)
        else:
            disable_cpu_ops(model)
        model.bind_kv_cache(allocate_kv_cache(cfg, 8, bs, dt, "cpu"))
        ctx = make_context([list(range(n)) for n in lens], tables, bs, torch.device("cpu"))
        model(ids, ctx)  # prefill
        decode = make_context([[n] for n in lens], tables, bs, torch.device("cpu"))
        outs[fused] = model.compute_logits(model(torch.tensor([7, 8, 9]), decode))
    disable_cpu_ops(model)
    assert not any(isinstance(m, FusedPagedAttention) for m in model.modules())
    tol = 1e-4 if dtype == "float32" else 0.1
    torch.testing.assert_close(outs[True], outs[False], rtol=tol, atol=tol)
    assert torch.equal(outs[True].argmax(-1), outs[False].argmax(-1))


def test_argmax_rows_matches_torch(ext):
    """First maximum per row, ties to the lowest index, NaN wins, -inf rows give 0; odd widths."""
    from server.engine.sampler import argmax_rows

    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 1003, generator=g)
    x[1, 17] = x[1, 900] = 50.0  # a tie: the first one
    x[2, 500] = float("nan")
    x[2, 3] = float("inf")  # NaN still wins, as torch.argmax has it
    x[3] = float("-inf")
    x[4, 1002] = 99.0  # the maximum in the scalar tail
    x[5, :] = 1.0  # all equal
    assert torch.equal(ext.argmax_rows(x), x.argmax(-1))
    assert torch.equal(argmax_rows(x), x.argmax(-1))
    wide = torch.randn(32, 49152, generator=g)
    assert torch.equal(ext.argmax_rows(wide), wide.argmax(-1))
    assert torch.equal(ext.argmax_rows(wide[:, :777]), wide[:, :777].argmax(-1))  # strided rows
    with pytest.raises(RuntimeError, match="float32"):
        ext.argmax_rows(wide.bfloat16())


def _run_engine(engine, adapters, names, use_loop: bool, seed: int = 8):
    """Greedy generation with logprobs for one request per name; -> {request: (tokens, logprobs)}."""
    from server.engine.sampling_params import SamplingParams

    engine.runner.decode_executor.enabled = use_loop
    # Both runs prefill from scratch: a prefix-cache hit would change the prefill path, not the loop's.
    engine.scheduler.block_manager.reset_prefix_cache()
    rng = random.Random(seed)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=3)
    refs = []
    for i, name in enumerate(names):
        ref = adapters.registry.acquire(name) if name else None
        refs.append(ref)
        prompt = [rng.randrange(3, 1000) for _ in range(5 + 3 * i)]  # different lengths
        engine.add_request(f"r{use_loop}-{i}", prompt, params, ref)
    out = {}
    while engine.has_unfinished():
        for d in engine.step():
            toks, lps = out.setdefault(d.request_id.split("-")[1], ([], []))
            toks += d.token_ids
            lps += [(lp.logprob, lp.top) for lp in d.logprobs or []]
    for ref in refs:
        if ref is not None:
            adapters.registry.release(ref)
    return out


@pytest.mark.parametrize("quantize", ["none", "q8_0", "q4_0", "int4", "nf4"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_loop_is_bit_identical_to_the_layer_path(ext, dtype, quantize):
    """The C++ DecodeLoop (all layers of a decode step in one call) against the Python layer loop
    over the same fused ops: same tokens and bit-identical logprobs, for base rows and several
    adapters (two rows share one) in one batch; on a float base and on quantized bases (the
    loop's kind-4 projections call the same qgemm kernel as QuantLinear)."""
    from server.bench.engine import BenchAdapters, random_model
    from server.engine.builder import build_llm_engine
    from server.engine.config import LoRASettings, SchedulerConfig
    from server.model.quant_linear import QuantLinear
    loaded = random_model("tiny", dtype, "cpu", quantize)
    adapters = BenchAdapters(loaded)
    for i in range(3):
        adapters.add(f"ad{i}", 8, seed=20 + i)
    engine = build_llm_engine(loaded, adapters, scheduler=SchedulerConfig(max_num_seqs=8),
                              lora=LoRASettings(max_slots=4, max_lora_rank=8), kv_cache_tokens=512)
    used = []
    executor = engine.runner.decode_executor
    real = executor.run
    executor.run = lambda *a: (lambda out: used.append(out is not None) or out)(real(*a))
    names = [None, "ad0", "ad1", "ad1", "ad2", None]
    with_loop = _run_engine(engine, adapters, names, True)
    assert sum(used) >= 5  # the decode steps went through the loop
    without = _run_engine(engine, adapters, names, False)
    assert all(len(toks) == 6 and len(lps) == 6 for toks, lps in with_loop.values())
    assert with_loop == without
    quantized = [m for m in engine.runner.model.modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == (0 if quantize == "none" else 4 * 4 + (quantize != "nf4"))


def test_decode_loop_is_rebuilt_when_the_model_changes(ext):
    """Swapping a module, binding another KV cache or editing a pre-packed weight in place makes the
    next decode step rebuild the loop instead of using stale references."""
    from server.bench.engine import BenchAdapters, random_model
    from server.engine.builder import build_llm_engine
    from server.engine.config import LoRASettings, SchedulerConfig

    loaded = random_model("tiny", "float32", "cpu")
    adapters = BenchAdapters(loaded)
    engine = build_llm_engine(loaded, adapters, scheduler=SchedulerConfig(max_num_seqs=4),
                              lora=LoRASettings(max_slots=2), kv_cache_tokens=256)
    inner, executor = engine.runner.model.model, engine.runner.decode_executor
    first = _run_engine(engine, adapters, [None, None], True)
    builds = executor.builds
    assert executor._loop is not None
    assert _run_engine(engine, adapters, [None, None], True) == first
    assert executor.builds == builds  # nothing changed: reused
    with torch.no_grad():
        inner.layers[0].mlp.down_proj.base.weight.mul_(0.5)  # in place: the packed copy is stale
    edited = _run_engine(engine, adapters, [None, None], True)
    assert executor.builds == builds + 1
    assert edited == _run_engine(engine, adapters, [None, None], False)  # and it matches the layer path
    inner.layers[1].self_attn.kv_cache = inner.layers[1].self_attn.kv_cache.clone()  # another cache bound
    _run_engine(engine, adapters, [None], True)
    assert executor.builds == builds + 2
    inner.layers[0].mlp.act_fn = SiluAndMul()  # a module swapped (the loop does not read it: no rebuild)
    inner.layers[0].mlp.down_proj = inner.layers[0].mlp.down_proj  # same object: no rebuild
    _run_engine(engine, adapters, [None], True)
    assert executor.builds == builds + 2
    inner.layers[0].self_attn.o_proj = torch.nn.Identity()  # a projection the loop cannot take
    _run_engine(engine, adapters, [None], True)
    assert executor.builds == builds + 3 and executor._loop is None  # rebuilt, refused: the layer path runs
