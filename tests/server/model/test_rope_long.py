"""Rotary scaling at long positions: our logits vs Hugging Face `transformers` up to position 8191.

For each rope type we serve (default, linear, dynamic, llama3, yarn) a tiny random Llama (2 layers,
hidden 64, head_dim 32, fp32) whose original context is 2048 with a scaling factor of 4, so that an
8192-token prompt runs far beyond the original context and the scaling decides every logit past
position 2047. One prompt, two ways through our paged KV cache:
  (a) one pass: all 8192 tokens in one step;
  (b) chunked: 2048-token steps, each reading the earlier chunks from the cache, the way the engine's
      scheduler prefills a long prompt under its token budget.
Both are compared with HF's one-pass forward (sdpa attention) at every position.

`dynamic` (NTK) rescales the rotary base by the longest sequence of the step, as HF does: a chunk's
keys are rotated with the scaling of the length known when that chunk ran, and are not re-rotated
later. So (a) equals HF's one pass, while (b) equals HF fed the same chunks through its own KV cache,
and differs from any one-pass forward by O(1) logits (see docs/long_context.md).

Tolerances (fp32): |ours - HF| <= 1e-4 + 1e-4 * |HF| per logit (|logits| reach ~6 here), at every
position. What is left is summation order (SDPA's flash kernel vs our kernels over up to 8192 keys,
matmul blocking), measured at <= 1.5e-5. A rotary difference shows far above it at long positions,
where an angle reaches ~8000 rad: on this model one ulp more in every inverse frequency moved logits
by 4e-3 past position 6144 (5e-4 below 2048), and a 1e-4 relative error in the attention scaling
(yarn's mscale) by 5e-3.
"""
from __future__ import annotations

import random

import pytest
import torch

from server.model.attention import allocate_kv_cache
from server.model.context import make_context
from server.model.loader import load_model
from tests.server.model import tiny
from tests.server.model.tiny import VOCAB, save_tiny_hf

ORIGINAL_CTX = 2048  # the context the (pretend) base was trained at
FACTOR = 4.0
PROMPT_LEN = 8192  # = ORIGINAL_CTX * FACTOR
CHUNK = 2048  # chunked-prefill step: 4 chunks, dynamic's scaling differs in each
BLOCK = 16  # the engine's default KV block size
TOL = dict(atol=1e-4, rtol=1e-4)

pytestmark = pytest.mark.slow  # ~50 s of CPU: 5 models x 8192^2 attention, 3 times each

ROPE_SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": FACTOR},
    "dynamic": {"rope_type": "dynamic", "factor": FACTOR},
    "llama3": {"rope_type": "llama3", "factor": FACTOR, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": ORIGINAL_CTX},
    "yarn": {"rope_type": "yarn", "factor": FACTOR, "original_max_position_embeddings": ORIGINAL_CTX},
}


@pytest.fixture(scope="module")
def prompt() -> list[int]:
    rng = random.Random(17)
    return [rng.randrange(VOCAB) for _ in range(PROMPT_LEN)]


@pytest.fixture(scope="module", params=list(ROPE_SCALINGS))
def pair(request, tmp_path_factory, prompt):
    """(rope type, HF model, our loaded model, HF one-pass logits [PROMPT_LEN, vocab])."""
    rope_type = request.param
    root = tmp_path_factory.mktemp(f"rope_{rope_type}")
    # llama3 and yarn name the original context themselves and (as real checkpoints do, and HF's
    # config validation asks) declare max_position_embeddings = original * factor; default, linear
    # and dynamic have only max_position_embeddings, which dynamic scales from. Positions beyond
    # max_position_embeddings also take our on-the-fly rotary path instead of the cached table.
    max_pos = PROMPT_LEN if rope_type in ("llama3", "yarn") else ORIGINAL_CTX
    with pytest.MonkeyPatch.context() as mp:  # `save_tiny_hf` takes its rope settings from this table
        mp.setitem(tiny.ROPE_VARIANTS, rope_type, ROPE_SCALINGS[rope_type])
        # One head of 32 dims: 16 frequencies for the scalings to act on. One head because our
        # prefill attention's CPU time grows with heads x 8192^2 (GQA is test_hf_parity's concern).
        hf = save_tiny_hf(root, rope_type, num_attention_heads=1, num_key_value_heads=1, head_dim=32,
                          max_position_embeddings=max_pos)
    hf.set_attn_implementation("sdpa")  # eager would hold [heads, 8192, 8192] scores per layer
    ours = load_model(str(root), dtype="float32", device="cpu")
    ours.root = root
    with torch.inference_mode():
        ref = hf(torch.tensor([prompt])).logits[0]
    return rope_type, hf, ours, ref


@torch.inference_mode()
def _paged_logits(model, ids: list[int], chunk: int) -> torch.Tensor:
    """Logits [len(ids), vocab] of `ids` prefilled through the paged KV cache in steps of `chunk`
    tokens (shuffled, non-contiguous block table), as the engine's runner builds each step."""
    num_blocks = -(-len(ids) // BLOCK)
    table = list(range(num_blocks))
    random.Random(0).shuffle(table)
    model.bind_kv_cache(allocate_kv_cache(model.config, num_blocks, BLOCK, torch.float32, "cpu"))
    out = []
    for start in range(0, len(ids), chunk):
        positions = list(range(start, min(start + chunk, len(ids))))
        ctx = make_context([positions], [table], BLOCK, torch.device("cpu"))
        hidden = model(torch.tensor(ids[start : positions[-1] + 1]), ctx)
        out.append(model.compute_logits(hidden))
    return torch.cat(out)


@torch.inference_mode()
def _hf_chunked_logits(root, ids: list[int], chunk: int) -> torch.Tensor:
    """HF fed `ids` in chunks through its own KV cache: the reference for chunked `dynamic`.

    A fresh model, because HF's dynamic rotary keeps state between calls: after the one-pass forward
    it would keep the 8192 scaling until it sees a sequence shorter than max_position_embeddings."""
    from transformers import DynamicCache, LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(root, attn_implementation="sdpa").float().eval()
    cache = DynamicCache(config=hf.config)
    out = []
    for start in range(0, len(ids), chunk):
        step = torch.tensor([ids[start : start + chunk]])
        out.append(hf(step, cache=cache, use_cache=True).logits[0])
    assert cache.get_seq_length() == len(ids)
    return torch.cat(out)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_one_pass_matches_hf(pair, prompt):
    rope_type, _, ours, ref = pair
    logits = _paged_logits(ours.model, prompt, PROMPT_LEN)
    print(f"{rope_type}: one pass, max |ours - HF| = {_max_err(logits, ref):.2e}")
    torch.testing.assert_close(logits, ref, **TOL)


def test_chunked_matches_hf(pair, prompt):
    rope_type, _, ours, ref = pair
    logits = _paged_logits(ours.model, prompt, CHUNK)
    gap = _max_err(logits, ref)
    print(f"{rope_type}: chunks of {CHUNK}, max |ours - HF one pass| = {gap:.2e}")
    if rope_type != "dynamic":
        torch.testing.assert_close(logits, ref, **TOL)
        return
    # dynamic: each chunk was rotated with the scaling of the length known when it ran. That is
    # what HF computes when fed the same chunks through its KV cache: equal at the fp32 tolerance.
    hf_chunked = _hf_chunked_logits(ours.root, prompt, CHUNK)
    print(f"dynamic: chunks of {CHUNK}, max |ours - HF chunked| = {_max_err(logits, hf_chunked):.2e}")
    torch.testing.assert_close(logits, hf_chunked, **TOL)
    # Against a one-pass forward no numerical tolerance holds: the gap is the size of the logits
    # themselves (measured 8.0 with |logits| <= 6), a different function, not rounding. Kept as an
    # assertion so that docs/long_context.md is revisited if chunked dynamic ever changes meaning.
    assert gap > 100 * TOL["atol"]
