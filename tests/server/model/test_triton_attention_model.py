"""The Triton attention substitution (server/model/triton_attention.py) in a whole model, under the
Triton interpreter on the CPU: prefill, chunked prefill and decode steps through the paged cache give
Hugging Face's logits (fp32), as the torch path does. On CUDA the same test runs compiled (gpu)."""
from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("triton")

from server.model.attention import PagedAttention, allocate_kv_cache  # noqa: E402
from server.model.context import make_context  # noqa: E402
from server.model.triton_attention import TritonPagedAttention, enable_triton_attention  # noqa: E402

STEPS = [[(0, range(0, 8)), (1, range(0, 13))],  # a prefill chunk and a full prefill in one step
         [(0, range(8, 17))],  # the second chunk
         [(0, range(17, 18)), (1, range(13, 14))],  # decode both
         [(0, range(18, 19)), (1, range(14, 15))]]


def _run(tmp_path, device, dims):
    from server.model.loader import load_model
    from tests.server.model.tiny import save_tiny_hf

    hf = save_tiny_hf(tmp_path, "untied", **dims)
    ours = load_model(str(tmp_path), dtype="float32", device=device)
    assert enable_triton_attention(ours.model) == ours.config.num_hidden_layers
    assert not any(type(m) is PagedAttention for m in ours.model.modules())
    rng = random.Random(5)
    seqs = [[rng.randrange(100) for _ in range(n)] for n in (19, 15)]
    with torch.no_grad():
        ref = [hf(torch.tensor([s])).logits[0] for s in seqs]
    bs = 4
    ours.model.bind_kv_cache(allocate_kv_cache(ours.config, 16, bs, torch.float32, device))
    tables = [[9, 2, 14, 5, 0], [3, 11, 7, 1]]
    for step in STEPS:
        ctx = make_context([list(p) for _, p in step], [tables[s] for s, _ in step], bs, torch.device(device))
        ids = torch.tensor([seqs[s][p] for s, pos in step for p in pos], device=device)
        with torch.inference_mode():
            logits = ours.model.compute_logits(ours.model(ids, ctx)).cpu()
        row = 0
        for s, pos in step:
            err = (logits[row : row + len(pos)] - ref[s][pos[0] : pos[-1] + 1]).abs().max().item()
            assert err <= 2e-4, f"seq {s} positions {list(pos)}: max abs err {err}"
            row += len(pos)


def test_interpreter_model_matches_hf(tmp_path, monkeypatch):
    from server.model import triton_attention as ta

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []
    for name in ("paged_decode_attention", "paged_prefill_attention"):
        real = getattr(ta, name)
        monkeypatch.setattr(ta, name, lambda *a, _n=name, _r=real, **k: calls.append(_n) or _r(*a, **k))
    _run(tmp_path, "cpu", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2))
    layers = 2  # tests/server/model/tiny.py
    assert calls.count("paged_prefill_attention") == 2 * layers and calls.count("paged_decode_attention") == 2 * layers


def test_autograd_keeps_the_torch_path(monkeypatch):
    """Training records a graph: the substitution must hand over to the torch parent."""
    from server.model.attention import build_attention_plan

    called = []
    orig = PagedAttention.forward
    monkeypatch.setattr(PagedAttention, "forward", lambda self, *a: called.append(1) or orig(self, *a))
    attn = TritonPagedAttention(PagedAttention(2, 1, 16, 0.25))
    ctx = make_context([[0, 1]], [[0]], 4, torch.device("cpu"))
    cache = torch.zeros(2, 1, 2, 4, 16)
    qkv = torch.randn(2, 64, requires_grad=True)
    out = attn(qkv, torch.ones(2, 16), torch.zeros(2, 16), cache, ctx, build_attention_plan(ctx, cache))
    out.sum().backward()
    assert called and qkv.grad is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_matches_hf(tmp_path):
    _run(tmp_path, "cuda", dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=1))
