"""PackedLinear / prepack_linears: same results as F.linear, same parameters, safe under autograd."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from server.model.cpu_linear import PackedLinear, prepack_linears, prepack_supported

pytestmark = pytest.mark.skipif(not prepack_supported(torch.device("cpu"), torch.float32),
                                reason="oneDNN (mkldnn) not available in this torch build")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 32, 200])
def test_matches_f_linear(dtype, rows):
    g = torch.Generator().manual_seed(rows)
    lin = nn.Linear(96, 160, bias=True).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(160, 96, generator=g))
        lin.bias.copy_(torch.randn(160, generator=g))
    x = torch.randn(rows, 96, generator=g).to(dtype)
    packed = PackedLinear(lin)
    with torch.inference_mode():
        got, want = packed(x), F.linear(x, lin.weight, lin.bias)
    assert got.dtype == dtype and got.shape == want.shape
    if dtype == torch.bfloat16:  # both are oneDNN bf16 GEMMs with fp32 accumulation: bit-identical
        assert torch.equal(got, want)
    else:  # fp32: equal up to summation order
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # a 3-D input (leading dims) works too
    with torch.inference_mode():
        torch.testing.assert_close(packed(x.view(1, rows, 96)), want.view(1, rows, 160), rtol=1e-5, atol=1e-5)


def test_repacks_after_in_place_weight_change():
    lin = nn.Linear(32, 16, bias=False)
    packed = PackedLinear(lin)
    x = torch.randn(4, 32)
    with torch.no_grad():
        before = packed(x)
        lin.weight.mul_(2.0)  # e.g. weights loaded after the wrapper was built
        after = packed(x)
    torch.testing.assert_close(after, 2 * before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after, F.linear(x, lin.weight), rtol=1e-5, atol=1e-5)


def test_autograd_uses_plain_linear_and_gets_gradients():
    lin = nn.Linear(8, 4)
    packed = PackedLinear(lin)
    x = torch.randn(3, 8, requires_grad=True)
    packed(x).sum().backward()
    assert x.grad is not None and lin.weight.grad is not None
    torch.testing.assert_close(x.grad, lin.weight.sum(0).expand(3, 8).detach())


def test_prepack_keeps_parameters_state_dict_and_tying():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.inner = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
            self.head = nn.Linear(16, 50, bias=False)
            self.head.weight = self.emb.weight  # tied, as in SmolLM2

    m = M()
    keys = list(m.state_dict())
    x = torch.randint(0, 50, (5,))
    with torch.inference_mode():
        want = m.head(m.inner(m.emb(x)))
    assert prepack_linears(m) == 3
    assert prepack_linears(m) == 0  # idempotent
    assert isinstance(m.head, PackedLinear) and m.head.weight is m.emb.weight
    assert list(m.state_dict()) == keys
    with torch.inference_mode():
        torch.testing.assert_close(m.head(m.inner(m.emb(x))), want, rtol=1e-5, atol=1e-5)


def test_env_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv("LORAMUX_CPU_PREPACK", "0")
    assert not prepack_supported(torch.device("cpu"), torch.float32)
    assert prepack_linears(nn.Sequential(nn.Linear(4, 4))) == 0
    monkeypatch.setenv("LORAMUX_CPU_PREPACK", "1")
    assert not prepack_supported(torch.device("cpu"), torch.float16)  # only fp32 / bf16 are packed


def test_skips_packing_when_memory_is_short():
    m = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    need = 2 * 64 * 64 * 4
    assert prepack_linears(m, available=need) == 0  # the copy would take all of it: refuse
    assert all(type(c) is nn.Linear for c in m)
    assert prepack_linears(m, available=4 * need) == 2


def test_weights_made_under_inference_mode():
    """A model built inside torch.inference_mode has inference-tensor weights (no version counter)."""
    with torch.inference_mode():
        lin = nn.Linear(16, 8)
        packed = PackedLinear(lin)
        x = torch.randn(3, 16)
        torch.testing.assert_close(packed(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
