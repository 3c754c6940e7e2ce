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
def test_matches_f_linear(dtype, rows, monkeypatch):
    monkeypatch.setenv("LORAMUX_CPU_GEMM", "0")  # oneDNN here; our GEMMs have their own tests below
    if not prepack_supported(torch.device("cpu"), dtype):
        pytest.skip("oneDNN packs bf16 only with AVX-512 (this CPU has AVX2): bf16 linears stay unpacked")
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


@pytest.fixture()
def ext():
    from kernels import cpu_ext

    mod = cpu_ext.load()
    assert mod is not None, cpu_ext.status()
    if not mod.bf16_gemm_available():
        pytest.skip("no AVX512-BF16 on this CPU")
    return mod


@pytest.mark.parametrize("rows", [1, 7, 8, 9, 32, 33, 300])
@pytest.mark.parametrize(("n", "k", "bias"), [(96, 64, False), (50, 38, True), (3 * 48 + 17, 1536, True)])
def test_bf16_gemm_matches_an_fp32_reference(ext, rows, n, k, bias):
    """The AVX512-BF16 GEMM: every row tile size (8 and tails), output widths that are no multiple of
    the 48-column panel, long K, bias: equal to the fp32 product rounded once to bf16 (up to the
    summation order: at most one bf16 step apart), and close to F.linear."""
    g = torch.Generator().manual_seed(rows + n)
    w = torch.randn(n, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    x = torch.randn(rows, k, generator=g).bfloat16()
    got = ext.bf16_gemm(x, ext.pack_bf16_weight(w), n, b).float()
    ref = x.float() @ w.float().t() + (b.float() if bias else 0)
    # one bf16 step at the reference's magnitude, plus fp32 summation-order noise where terms cancel
    bound = ref.abs() * 2.0**-7 + 2.0**-20 * (x.float().abs() @ w.float().abs().t())
    assert bool(((got - ref).abs() <= bound).all()), ((got - ref).abs() - bound).max()
    torch.testing.assert_close(got, F.linear(x, w, b).float(), rtol=2**-7, atol=1e-2)


def test_bf16_gemm_refuses_bad_shapes(ext):
    with pytest.raises(RuntimeError, match="even"):
        ext.pack_bf16_weight(torch.randn(8, 5).bfloat16())
    packed = ext.pack_bf16_weight(torch.randn(8, 6).bfloat16())
    with pytest.raises(RuntimeError, match="columns"):
        ext.bf16_gemm(torch.randn(2, 8).bfloat16(), packed, 8)
    with pytest.raises(RuntimeError, match="n_out"):
        ext.bf16_gemm(torch.randn(2, 6).bfloat16(), packed, 100)


def test_packed_linear_uses_the_bf16_gemm_once_loaded(ext, monkeypatch):
    g = torch.Generator().manual_seed(3)
    lin = nn.Linear(64, 80, bias=True).bfloat16()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(80, 64, generator=g))
    x = torch.randn(5, 64, generator=g).bfloat16()
    packed = PackedLinear(lin)
    with torch.inference_mode():
        got = packed(x)
    assert packed.kind == "bf16_gemm"
    assert torch.equal(got, ext.bf16_gemm(x, ext.pack_bf16_weight(lin.weight.detach()), 80, lin.bias.detach()))
    with torch.inference_mode():
        torch.testing.assert_close(packed(x.view(1, 5, 64)), got.view(1, 5, 80))  # leading dims
    monkeypatch.setenv("LORAMUX_CPU_GEMM", "0")
    off = PackedLinear(lin)
    with torch.inference_mode():
        off(x)
    assert off.kind == "onednn"


@pytest.mark.parametrize("rows", [1, 8, 9, 33])
@pytest.mark.parametrize(("n", "k", "bias"), [(96, 64, False), (50, 37, True), (3 * 48 + 17, 1536, True)])
def test_f32_gemm_matches_f_linear(ext, rows, n, k, bias):
    """The fp32 GEMM (any K, output widths that are no multiple of 48, row tails, bias) against F.linear."""
    g = torch.Generator().manual_seed(rows * n)
    w, x = torch.randn(n, k, generator=g), torch.randn(rows, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    got = ext.f32_gemm(x, ext.pack_f32_weight(w), n, b)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-4)


def test_packed_linear_uses_the_f32_gemm_once_loaded(ext):
    lin = nn.Linear(40, 70, bias=True)
    x = torch.randn(6, 40)
    packed = PackedLinear(lin)
    with torch.inference_mode():
        got = packed(x)
    assert packed.kind == "f32_gemm"
    torch.testing.assert_close(got, F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
