"""Sampler against hand-computed distributions and torch's own argmax / log_softmax / topk."""
from __future__ import annotations

import math

import pytest
import torch

from server.engine.sampler import Sampler, SamplingMetadata, make_generator
from server.engine.sampling_params import SamplingParams

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
P5 = [0.1, 0.4, 0.2, 0.05, 0.25]  # sorted: ids 1 (0.4), 4 (0.25), 2 (0.2), 0 (0.1), 3 (0.05)


def sample(logits, params, output_lens=None, generators=None, eos=(0,)):
    meta = SamplingMetadata.from_params(
        params, output_lens or [0] * len(params), generators, eos, device=logits.device
    )
    return Sampler()(logits, meta)


def draws(probs, n=8000, **sp):
    """Token frequencies of `n` independent rows sharing one distribution."""
    logits = torch.tensor(probs).log().expand(n, -1).contiguous()
    out = sample(logits, [SamplingParams(**sp)] * n)
    return torch.bincount(out.token_ids, minlength=len(probs)).float() / n


def test_greedy_is_argmax_even_in_a_mixed_batch():
    logits = torch.randn(6, 40)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=1)] * 3
    gens = [None, make_generator(1, "cpu")] * 3
    out = sample(logits, params, generators=gens)
    assert out.token_ids.dtype == torch.long and out.token_ids.shape == (6,)
    assert torch.equal(out.token_ids[0::2], logits[0::2].argmax(-1))
    assert out.logprobs is None and out.top_ids is None


@pytest.mark.parametrize(
    ("sp", "nucleus"),
    [
        (dict(top_k=2), {1: 0.4, 4: 0.25}),
        (dict(top_k=1), {1: 0.4}),
        (dict(top_p=0.3), {1: 0.4}),  # the top token alone reaches 0.3
        (dict(top_p=0.6), {1: 0.4, 4: 0.25}),  # 0.4 < 0.6 <= 0.65: minimal set is two tokens
        (dict(top_p=0.7), {1: 0.4, 4: 0.25, 2: 0.2}),
        (dict(top_k=3, top_p=0.5), {1: 0.4, 4: 0.25}),  # after top-k: 0.4/0.85 = 0.47 < 0.5
    ],
)
def test_top_k_and_top_p_keep_exactly_the_expected_tokens(sp, nucleus):
    freq = draws(P5, **sp)
    kept = {i for i in range(5) if freq[i] > 0}
    assert kept == set(nucleus)
    total = sum(nucleus.values())
    for i, p in nucleus.items():  # renormalized over the kept tokens (loose: ~6 sigma)
        assert abs(freq[i].item() - p / total) < 0.035


def test_temperature_sampling_matches_the_distribution():
    p = [0.5, 0.3, 0.2]
    freq = draws(p, n=20000, temperature=1.0)
    assert torch.allclose(freq, torch.tensor(p), atol=0.02)
    # T = 0.5 squares the probabilities before renormalizing.
    sq = torch.tensor(p) ** 2
    freq = draws(p, n=20000, temperature=0.5)
    assert torch.allclose(freq, sq / sq.sum(), atol=0.02)


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_tokens_batched_or_alone(device):
    steps, v = 12, 64
    torch.manual_seed(1)
    logits = [torch.randn(4, v, device=device) for _ in range(steps)]  # row 1 is "our" request
    params = [SamplingParams(top_p=0.9), SamplingParams(seed=7, top_k=20), SamplingParams(seed=8),
              SamplingParams(temperature=0.0)]
    gens = [None, make_generator(7, device), make_generator(8, device), None]
    alone_gen = make_generator(7, device)
    batched, alone = [], []
    for t in range(steps):
        batched.append(sample(logits[t], params, generators=gens).token_ids[1].item())
        alone.append(sample(logits[t][1:2], params[1:2], generators=[alone_gen]).token_ids[0].item())
    assert batched == alone
    # A different seed gives a different sequence (12 draws over ~20 tokens: collision is negligible).
    other = make_generator(9, device)
    assert alone != [sample(logits[t][1:2], params[1:2], generators=[other]).token_ids[0].item()
                     for t in range(steps)]


def test_min_tokens_bans_eos_and_stop_ids():
    # EOS (0) and stop id 1 are by far the most likely; token 2 comes next.
    logits = torch.tensor([[9.0, 8.0, 1.0, 0.5, 0.0]]).expand(6, -1).contiguous()
    greedy = SamplingParams(temperature=0.0, max_tokens=8, min_tokens=3, stop_token_ids=(1,))
    rand = SamplingParams(temperature=1.5, max_tokens=8, min_tokens=3, stop_token_ids=(1,))
    no_eos = SamplingParams(temperature=0.0, max_tokens=8, min_tokens=3, stop_token_ids=(1,), ignore_eos=True)
    out = sample(logits, [greedy, greedy, greedy, rand, no_eos, no_eos], output_lens=[0, 2, 3, 0, 0, 3])
    # rows under min_tokens never get 0 or 1; at min_tokens the ban is lifted; ignore_eos keeps
    # EOS allowed (it is not a stop) but still bans the stop id.
    assert out.token_ids.tolist()[:3] == [2, 2, 0]
    assert out.token_ids[3].item() not in (0, 1)
    assert out.token_ids.tolist()[4:] == [0, 0]
    many = sample(logits[:1].expand(4000, -1).contiguous(), [rand] * 4000).token_ids
    assert not torch.isin(many, torch.tensor([0, 1])).any()


def test_grammar_overrules_min_tokens_when_it_allows_only_banned_tokens():
    # Row 0: the grammar allows only EOS (4), e.g. a complete JSON value, while min_tokens bans it:
    # the grammar wins (EOS), no NaN. Row 1: the grammar allows EOS and token 3: the ban holds (3).
    logits = torch.tensor([[1.0, 9.0, 8.0, 2.0, 0.5]]).expand(2, -1).contiguous()
    bitmask = torch.tensor([[1 << 4], [(1 << 4) | (1 << 3)]], dtype=torch.int32)
    for temperature in (0.0, 1.0):
        sp = SamplingParams(temperature=temperature, max_tokens=8, min_tokens=5, logprobs=1)
        meta = SamplingMetadata.from_params([sp, sp], [0, 0], None, (4,), device="cpu", allowed_bitmask=bitmask)
        out = Sampler()(logits, meta)
        assert out.token_ids.tolist() == [4, 3]
        assert torch.isfinite(out.logprobs).all()


def test_per_row_eos_ids():
    logits = torch.tensor([[5.0, 4.0, 3.0]]).expand(2, -1).contiguous()
    sp = SamplingParams(temperature=0.0, min_tokens=1)
    out = sample(logits, [sp, sp], eos=[(0,), (1,)])
    assert out.token_ids.tolist() == [1, 0]


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_are_log_softmax_of_the_processed_logits(device):
    torch.manual_seed(3)
    logits = torch.randn(3, 30, device=device)
    params = [SamplingParams(temperature=0.7, logprobs=5), SamplingParams(temperature=0.0, logprobs=2),
              SamplingParams(top_k=3, min_tokens=2, stop_token_ids=(4,))]
    out = sample(logits, params)
    banned = logits.clone()
    banned[2, [0, 4]] = float("-inf")  # row 2's min_tokens bans (EOS 0, stop id 4) are part of its distribution
    ref = torch.log_softmax(banned, dim=-1)  # raw where nothing is banned; never temperature / top-k
    assert torch.allclose(out.logprobs, ref.gather(1, out.token_ids[:, None]).squeeze(1))
    top_lp, top_ids = ref.topk(5, dim=-1)  # k = the largest request in the batch
    assert torch.equal(out.top_ids, top_ids) and torch.allclose(out.top_logprobs, top_lp)
    # a hand-computed case: logits log([0.5, 0.25, 0.25]) -> logprobs log p
    out = sample(torch.tensor([[0.5, 0.25, 0.25]], device=device).log() + 3.0, [SamplingParams(temperature=0.0, logprobs=1)])
    assert out.token_ids.tolist() == [0]
    assert out.logprobs.item() == pytest.approx(math.log(0.5), abs=1e-6)
    assert out.top_ids.tolist() == [[0]]


def test_from_params_rejects_mismatched_rows():
    sp = [SamplingParams(), SamplingParams()]
    with pytest.raises(ValueError, match="output_lens"):
        SamplingMetadata.from_params(sp, [0], None, (0,), "cpu")
    with pytest.raises(ValueError, match="generators"):
        SamplingMetadata.from_params(sp, [0, 0], [None], (0,), "cpu")
    with pytest.raises(ValueError, match="eos_token_ids"):
        SamplingMetadata.from_params(sp, [0, 0], None, [(0,)], "cpu")
    meta = SamplingMetadata.from_params(sp, [0, 0], None, (0,), "cpu")
    with pytest.raises(ValueError, match="logits"):
        Sampler()(torch.zeros(3, 5), meta)
