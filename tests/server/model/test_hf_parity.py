"""Our runtime vs Hugging Face `transformers` on tiny random checkpoints (fp32, CPU).

A flattened batch of 3 sequences goes through the paged KV cache (block_size 4, shuffled block
tables): mixed steps with a chunked prefill, full prefills and decode rows in varying order. Every
row's logits must equal HF's full-sequence forward at the same position.
"""
from __future__ import annotations

import random

import pytest
import torch

from server.model.attention import allocate_kv_cache
from server.model.context import make_context
from server.model.generate import greedy_generate
from server.model.loader import load_model
from tests.server.model.tiny import ROPE_VARIANTS, VOCAB, save_tiny_hf

BLOCK = 4
# Per step: (sequence, number of new tokens), in the order they appear in the flattened batch.
SCHEDULE = [
    [(0, 6), (1, 7), (2, 5)],  # A: first prefill chunk, B and C: full prefills
    [(1, 1), (0, 5), (2, 1)],  # B decode, A: second chunk (reads its cached chunk), C decode
    [(2, 1), (0, 1), (1, 1)],  # decode-only steps
    [(0, 1), (1, 1), (2, 1)],
    [(1, 1), (2, 1), (0, 1)],
]


@pytest.fixture(scope="module", params=list(ROPE_VARIANTS))
def tiny(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    hf = save_tiny_hf(root, request.param)
    ours = load_model(str(root), dtype="float32", device="cpu")
    ours.root = root
    return hf, ours


def test_config_and_targets(tiny):
    hf, ours = tiny
    cfg = ours.config
    assert cfg.tie_word_embeddings == hf.config.tie_word_embeddings
    if cfg.tie_word_embeddings:
        assert ours.model.lm_head.weight is ours.model.model.embed_tokens.weight
    dims = cfg.projection_dims()
    hf_layer = hf.model.layers[0]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        w = getattr(hf_layer.self_attn, name).weight
        assert dims[name] == (w.shape[1], w.shape[0])
    for name in ("gate_proj", "up_proj", "down_proj"):
        w = getattr(hf_layer.mlp, name).weight
        assert dims[name] == (w.shape[1], w.shape[0])
    targets = ours.model.lora_targets()
    assert len(targets) == 4 * cfg.num_hidden_layers
    for t in targets:
        lin = getattr(t.parent, t.attr)
        assert lin.out_features == sum(width for _, width in t.slices)
        assert all(dims[name][1] == width for name, width in t.slices)
        assert lin.in_features == dims[t.slices[0][0]][0]


@pytest.mark.parametrize("device", ["cpu", "cpu+prepack", "cpu+fused", pytest.param("cuda", marks=pytest.mark.gpu)])
@torch.inference_mode()
def test_paged_mixed_batch_matches_hf(tiny, device):
    hf, ours = tiny
    if device != "cpu":  # a fresh copy: the shared fixture's model stays unpacked
        ours = load_model(str(ours.root), dtype="float32", device=device.split("+")[0])
    if device == "cpu+prepack":  # the engine's CPU set-up: linears pre-packed for oneDNN
        from server.model.cpu_linear import prepack_linears

        assert prepack_linears(ours.model) > 0
    if device == "cpu+fused":  # the engine's full CPU set-up: packed linears and the fused C++ layer ops
        from server.model.cpu_linear import prepack_linears
        from server.model.cpu_ops import enable_cpu_ops

        assert prepack_linears(ours.model) > 0 and enable_cpu_ops(ours.model)
    device = device.split("+")[0]
    model = ours.model
    rng = random.Random(0)
    totals = [0, 0, 0]
    for step in SCHEDULE:
        for seq, n in step:
            totals[seq] += n
    seqs = [[rng.randrange(VOCAB) for _ in range(n)] for n in totals]
    ref = [hf(torch.tensor([s])).logits[0] for s in seqs]  # [L, vocab] per sequence

    num_blocks = 16
    blocks = list(range(num_blocks))
    rng.shuffle(blocks)  # non-contiguous, out-of-order block tables
    tables = [blocks[0:5], blocks[5:10], blocks[10:15]]
    model.bind_kv_cache(allocate_kv_cache(ours.config, num_blocks, BLOCK, torch.float32, device))
    done = [0, 0, 0]
    for step in SCHEDULE:
        positions = [list(range(done[s], done[s] + n)) for s, n in step]
        ctx = make_context(positions, [tables[s] for s, _ in step], BLOCK, torch.device(device))
        ids = torch.tensor([seqs[s][p] for (s, _), pos in zip(step, positions, strict=True) for p in pos])
        logits = model.compute_logits(model(ids.to(device), ctx)).cpu()
        row = 0
        for (s, n), pos in zip(step, positions, strict=True):
            err = (logits[row : row + n] - ref[s][pos[0] : pos[-1] + 1]).abs().max().item()
            assert err <= (1e-4 if device == "cpu" else 1e-3), f"seq {s} positions {pos}: max abs err {err}"
            row += n
            done[s] += n


def test_greedy_generate_matches_hf(tiny):
    hf, ours = tiny
    prompt = [5, 77, 140, 9, 33, 201, 18, 64, 3]
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert greedy_generate(ours, prompt, 8, block_size=BLOCK) == expected
    assert greedy_generate(ours, prompt, 8, block_size=BLOCK, prefill_chunk=4) == expected
