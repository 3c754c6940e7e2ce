"""Penalties, logit_bias and grammar bitmasks in the batched sampler vs a plain per-token reference.

The reference walks each row's tokens in Python with the documented formulas:
  OpenAI:  logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty  (generated tokens)
  vLLM:    for j in prompt + generated: logit[j] = logit[j] / p if logit[j] > 0 else logit[j] * p
  bias:    logit[j] += logit_bias[j]
and the sampler must produce the same processed logits (and hence greedy tokens and logprobs).
"""
from __future__ import annotations

import math
import random

import pytest
import torch

from server.engine.sampler import Sampler, SamplingMetadata, bitmask_to_bool
from server.engine.sampling_params import SamplingParams

V = 50


def reference(logits: list[float], sp: SamplingParams, prompt: list[int], output: list[int]) -> list[float]:
    out = list(logits)
    if sp.repetition_penalty != 1.0:
        for j in set(prompt) | set(output):
            out[j] = out[j] / sp.repetition_penalty if out[j] > 0 else out[j] * sp.repetition_penalty
    for j in set(output):
        c = output.count(j)
        out[j] -= c * sp.frequency_penalty + sp.presence_penalty
    for j, b in sp.logit_bias:
        out[j] += b
    return out


def _meta(params, prompts, outputs, bitmask=None):
    return SamplingMetadata.from_params(params, [len(o) for o in outputs], None, (0,), "cpu",
                                        output_token_ids=outputs, prompt_token_ids=prompts, vocab_size=V,
                                        allowed_bitmask=bitmask)


def test_penalties_and_bias_match_the_reference_formulas():
    rng = random.Random(0)
    torch.manual_seed(0)
    params, prompts, outputs = [], [], []
    for i in range(12):
        params.append(SamplingParams(
            temperature=0.0, logprobs=3, max_tokens=64,
            presence_penalty=rng.choice([0.0, 0.5, -1.0, 2.0]), frequency_penalty=rng.choice([0.0, 0.3, 1.5, -0.7]),
            repetition_penalty=rng.choice([1.0, 1.3, 0.8]),
            logit_bias=tuple(sorted({rng.randrange(V): rng.uniform(-100, 100) for _ in range(i % 4)}.items()))))
        prompts.append([rng.randrange(V) for _ in range(rng.randrange(1, 20))])
        outputs.append([rng.randrange(V) for _ in range(rng.randrange(0, 30))])
    logits = torch.randn(12, V) * 3
    processed = Sampler.process(logits, _meta(params, prompts, outputs))
    expected = torch.tensor([reference(logits[i].tolist(), params[i], prompts[i], outputs[i]) for i in range(12)])
    assert torch.allclose(processed, expected, atol=1e-5)
    out = Sampler()(logits, _meta(params, prompts, outputs))
    assert out.token_ids.tolist() == expected.argmax(-1).tolist()
    ref_lp = torch.log_softmax(expected, -1)
    assert torch.allclose(out.logprobs, ref_lp.gather(1, out.token_ids[:, None]).squeeze(1), atol=1e-5)


def test_neutral_rows_are_untouched_next_to_penalised_ones():
    logits = torch.randn(2, V)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, presence_penalty=1.0)]
    processed = Sampler.process(logits, _meta(params, [[1, 2], [1, 2]], [[3, 3], [3, 3]]))
    assert torch.equal(processed[0], logits[0])
    assert processed[1, 3].item() == pytest.approx(logits[1, 3].item() - 1.0)


def test_bitmask_rows_and_masking():
    rng = random.Random(1)
    allowed = [[rng.random() < 0.3 for _ in range(V)] for _ in range(3)]
    words = (V + 31) // 32
    bm = torch.zeros(3, words, dtype=torch.int32)
    for i, row in enumerate(allowed):
        for t, ok in enumerate(row):
            if ok:
                w = int(bm[i, t // 32]) & 0xFFFFFFFF | (1 << (t % 32))
                bm[i, t // 32] = w - (1 << 32) if w >= 1 << 31 else w
    assert bitmask_to_bool(bm, V).tolist() == allowed
    assert not bitmask_to_bool(bm, V + 40)[:, V:].any()  # tokens past the mask are not allowed
    logits = torch.randn(3, V)
    params = [SamplingParams(temperature=0.0, logprobs=1)] * 3
    out = Sampler()(logits, _meta(params, [[1]] * 3, [[]] * 3, bitmask=bm))
    for i in range(3):
        masked = torch.where(torch.tensor(allowed[i]), logits[i], torch.tensor(-math.inf))
        assert out.token_ids[i].item() == masked.argmax().item()
        assert out.logprobs[i].item() == pytest.approx(torch.log_softmax(masked, -1).max().item(), abs=1e-5)


def test_sampling_params_bounds():
    for kw in ({"presence_penalty": 2.1}, {"frequency_penalty": -2.1}, {"repetition_penalty": 0.0},
               {"logit_bias": ((1, 101.0),)}, {"logit_bias": tuple((i, 1.0) for i in range(301))},
               {"presence_penalty": float("nan")}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            SamplingParams(**kw)
