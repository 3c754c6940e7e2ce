"""kernels/csrc/chunk_attention.cpp: a prefill chunk's attention over its paged context, read in place,
against an fp64 formula of the same attention (gather the context, causal scores, softmax, @ V) and
against the torch path it replaces (`prefill_one`: gather + SDPA), both code paths (AVX2 and scalar).

Cases cross the kernel's seams: one key; chunks of 1 and of many tokens; contexts that split into
several key ranges (> 256 keys, merged afterwards); partial last blocks; key counts not a multiple of
its 8-key step; GQA and MHA; head_dim 32..128 and one not a multiple of 8 (scalar path only).
"""
from __future__ import annotations

import pytest
import torch

from kernels import cpu_ext
from server.model.attention import PrefillSeq, _head_rows, prefill_one


@pytest.fixture(scope="module")
def ext():
    mod = cpu_ext.load()
    assert mod is not None, cpu_ext.status()
    return mod


def _setup(dtype, D, KV, G, bs, n, c, seed=0):
    g = torch.Generator().manual_seed(seed)
    nblocks = -(-c // bs)
    NB = nblocks + 5
    cache = torch.randn(2, KV, NB, bs, D, generator=g).to(dtype)
    table = torch.randperm(NB, generator=g)[:nblocks].to(torch.int32)
    q = torch.randn(n, KV * G * D, generator=g).to(dtype)
    return cache, table, q


def _reference(cache, table, q, c, heads, scale):
    """fp64: token j of the chunk (position c - n + j) attends to keys 0..c-n+j."""
    _, KV, _, bs, D = cache.shape
    n, G = q.shape[0], heads // KV
    kv = cache.double()[:, :, table.long()].reshape(2, KV, -1, D)[:, :, :c]  # [2, KV, c, D]
    k = kv[0].repeat_interleave(G, 0)  # [H, c, D]
    v = kv[1].repeat_interleave(G, 0)
    qh = q.double().view(n, heads, D).transpose(0, 1)  # [H, n, D]
    scores = qh @ k.transpose(1, 2) * scale  # [H, n, c]
    visible = torch.arange(c)[None, :] <= torch.arange(c - n, c)[:, None]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return (probs @ v).transpose(0, 1)  # [n, H, D]


CASES = [  # (D, KV, G, bs, n, c)
    (64, 3, 3, 16, 1, 1),  # one key
    (64, 3, 3, 16, 1, 8192 - 3),  # one token deep into a long context: many splits
    (64, 3, 3, 16, 7, 700),
    (128, 2, 4, 8, 37, 600),  # a chunk spanning several splits' causal edges
    (128, 2, 4, 8, 13, 13),  # the chunk is the whole context
    (32, 1, 1, 4, 5, 21),  # MHA, tiny blocks, keys not a multiple of 8
    (96, 2, 3, 16, 3, 1030),
    (36, 2, 2, 4, 6, 300),  # head_dim not a multiple of 8: the scalar path even when vectorized
]


@pytest.mark.parametrize("impl", [0, 1], ids=["auto", "scalar"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D,KV,G,bs,n,c", CASES)
def test_chunk_attention_matches_fp64(ext, dtype, impl, D, KV, G, bs, n, c):
    cache, table, q = _setup(dtype, D, KV, G, bs, n, c)
    H, scale = KV * G, D**-0.5
    out = torch.full((n, H, D), float("nan"), dtype=dtype)  # every element must be written
    ext.chunk_attention(out, q, cache, table, c, H, scale, impl=impl)
    ref = _reference(cache, table, q, c, H, scale)
    # fp32: statistics and accumulation in fp32; bf16: the same, then one rounding of the output
    tol = 2e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_attention_matches_the_torch_path(ext, dtype):
    """The op the fused attention calls equals the gather + SDPA formulation it replaces."""
    D, KV, G, bs, n, c = 64, 2, 3, 16, 9, 530
    cache, table, q = _setup(dtype, D, KV, G, bs, n, c, seed=3)
    H = KV * G
    q3 = q.view(n, H, D)
    # prefill_one reads the chunk's own k/v only when it holds its whole context; here it gathers
    kv_unused = torch.empty(n, KV, D, dtype=dtype)
    rows = _head_rows(table, cache.shape[2], 2 * KV)
    mask = torch.arange(c)[None, :] <= torch.arange(c - n, c)[:, None]
    ref = torch.empty(n, H, D, dtype=dtype)
    prefill_one(ref, q3, kv_unused, kv_unused, cache, PrefillSeq(0, n, c, rows, mask, table), D**-0.5)
    out = torch.empty(n, H, D, dtype=dtype)
    ext.chunk_attention(out, q, cache, table, c, H, D**-0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: SDPA rounds its probabilities, we do not
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


def test_chunk_attention_reads_q_as_strided_columns(ext):
    """q is the q-columns view of a fused qkv row (row stride > heads * head_dim), as the model passes it."""
    D, KV, G, bs, n, c = 64, 1, 2, 8, 4, 40
    cache, table, q = _setup(torch.float32, D, KV, G, bs, n, c, seed=5)
    qkv = torch.cat([q, torch.randn(n, 2 * KV * D)], dim=1)
    out = torch.empty(n, KV * G, D)
    ext.chunk_attention(out, qkv[:, : KV * G * D], cache, table, c, KV * G, D**-0.5)
    torch.testing.assert_close(out.double(), _reference(cache, table, q, c, KV * G, D**-0.5), rtol=2e-5, atol=2e-5)


def test_chunk_attention_refuses_bad_arguments(ext):
    D, KV, G, bs, n, c = 64, 2, 2, 4, 3, 10
    cache, table, q = _setup(torch.float32, D, KV, G, bs, n, c)
    H = KV * G
    out = torch.empty(n, H, D)
    bad = table.clone()
    bad[1] = cache.shape[2]
    with pytest.raises(RuntimeError, match="block outside the cache"):
        ext.chunk_attention(out, q, cache, bad, c, H, 0.125)
    with pytest.raises(RuntimeError, match="table must be"):
        ext.chunk_attention(out, q, cache, table[:1], c, H, 0.125)  # too short for the context
    with pytest.raises(RuntimeError, match="at least the chunk"):
        ext.chunk_attention(out, q, cache, table, n - 1, H, 0.125)
    with pytest.raises(RuntimeError, match="multiple of kv_heads"):
        ext.chunk_attention(out, q, cache, table, c, 3, 0.125)
    with pytest.raises(RuntimeError, match="out must be"):
        ext.chunk_attention(torch.empty(n, H, D + 1), q, cache, table, c, H, 0.125)
    with pytest.raises(RuntimeError, match="one dtype"):
        ext.chunk_attention(out, q.bfloat16(), cache, table, c, H, 0.125)


class _Spy:
    """The extension with chunk_attention counted (everything else passed through)."""

    def __init__(self, ext) -> None:
        self.ext, self.chunk_lens = ext, []

    def __getattr__(self, name):
        return getattr(self.ext, name)

    def chunk_attention(self, out, q, *args, **kw):
        self.chunk_lens.append(q.shape[0])
        return self.ext.chunk_attention(out, q, *args, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_attention_sends_chunks_after_cached_tokens_to_the_kernel(ext, dtype):
    """Through the model's attention module: a chunk after cached tokens takes chunk_attention.cpp
    (fp32 always; bf16 up to 16 tokens, where it beats SDPA), a prefill holding its whole context
    and a long bf16 chunk take SDPA; the outputs equal the torch path either way."""
    from server.model.attention import PagedAttention
    from server.model.cpu_ops import FusedPagedAttention
    from tests.server.model.paged_case import KV, D, G, paged_case

    # a fresh prefill, a 5-token chunk after 40 cached, a 20-token chunk after 30 cached
    positions = [list(range(6)), list(range(40, 45)), list(range(30, 50))]
    c = paged_case(dtype, 40, 4, positions, [[0, 1], list(range(2, 14)), list(range(14, 27))], seed=7)
    cache, ctx, plan, q, k, v, T, ref = c.cache, c.ctx, c.plan, c.q, c.k, c.v, c.T, c.ref
    spy = _Spy(ext)
    attn = FusedPagedAttention(PagedAttention(KV * G, KV, D, D**-0.5), spy)
    qkv = torch.cat((q.reshape(T, -1), k.reshape(T, -1), v.reshape(T, -1)), dim=1)
    with torch.inference_mode():
        out = attn(qkv, torch.ones(T, D, dtype=dtype), torch.zeros(T, D, dtype=dtype), cache, ctx, plan)
    assert spy.chunk_lens == ([5, 20] if dtype == torch.float32 else [5])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
