"""End-to-end parity with PEFT: one mixed-adapter prefill batch through our model + slot pool.

A tiny random HF Llama (2 layers, hidden 64, GQA) and five random non-zero PEFT adapters (ranks 4
and 8, rsLoRA, rank/alpha patterns, q+v only, layers_to_transform) are saved with save_pretrained,
loaded by us from disk through validation, made resident via the SlotPool and applied by
LoRALinear in ONE flattened batch that also holds base-model rows. Every sequence's logits must
equal PEFT's for its adapter and our base model with that adapter merged into the weights.
"""
from __future__ import annotations

import pytest
import torch

import kernels
from adapters.registry import AdapterRegistry
from adapters.slots import SlotPool
from adapters.spec import BaseModelSpec
from adapters.validate import ValidationLimits, validate_dir
from kernels.batch import LoRABatch

ADAPTERS = {
    "r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                   "gate_proj", "up_proj", "down_proj"]),
    "r8_rslora": dict(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear"),
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                     rank_pattern={"q_proj": 8, "down_proj": 2},
                     alpha_pattern={"v_proj": 32, r"layers\.1\.mlp\.up_proj": 3}),
    "qv": dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    "layer1": dict(r=8, lora_alpha=8, target_modules=["o_proj", "gate_proj", "k_proj"], layers_to_transform=[1]),
}
# (adapter or None for base, prompt length); several sequences share an adapter.
SEQUENCES = [(None, 5), ("r4", 7), ("r8_rslora", 3), ("patterns", 6), (None, 4), ("qv", 5),
             ("layer1", 8), ("r4", 2), ("patterns", 1)]
BLOCK = 4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from tokenizers import Tokenizer, models

    root = tmp_path_factory.mktemp("parity")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(root / "base")
    Tokenizer(models.WordLevel({f"t{i}": i for i in range(96)}, unk_token="t0")).save(str(root / "base/tokenizer.json"))

    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 96, (n,), generator=g) for _, n in SEQUENCES]
    with torch.no_grad():
        expected = {None: [hf(p[None]).logits[0] for p in prompts]}
        for i, (name, kw) in enumerate(ADAPTERS.items()):
            model = transformers.LlamaForCausalLM.from_pretrained(root / "base").eval()
            pm = peft.get_peft_model(model, peft.LoraConfig(**kw))
            gen = torch.Generator().manual_seed(100 + i)
            for pname, p in pm.named_parameters():
                if "lora_A" in pname or "lora_B" in pname:  # PEFT inits B to zero: make the delta real
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            pm.save_pretrained(root / name)
            expected[name] = [pm(p[None]).logits[0] for p in prompts]
    return root, prompts, expected


def _our_model(root, device):
    from server.model.loader import load_model

    return load_model(str(root / "base"), dtype="float32", device=device).model


def _run(model, prompts, token_slots, device, backend=None):
    """One flattened prefill of all prompts through a fresh paged KV cache; logits per prompt.
    `backend` prepares the step's LoRA plan, as the runner does."""
    from server.model.attention import allocate_kv_cache
    from server.model.context import make_context

    blocks = [-(-len(p) // BLOCK) for p in prompts]
    model.bind_kv_cache(allocate_kv_cache(model.config, sum(blocks), BLOCK, torch.float32, device))
    starts = [sum(blocks[:i]) for i in range(len(blocks))]
    tables = [list(range(s, s + b))[::-1] for s, b in zip(starts, blocks, strict=True)]  # non-contiguous
    ctx = make_context([list(range(len(p))) for p in prompts], tables, BLOCK, torch.device(device))
    ctx.lora = backend.prepare(LoRABatch.build(token_slots, device)) if token_slots is not None else None
    with torch.inference_mode():
        logits = model.compute_logits(model(torch.cat(prompts).to(device), ctx))
    return [t.cpu() for t in logits.split([len(p) for p in prompts])]


# (kernel backend, device, atol): Triton's fp32 dots may run in TF32 on the GPU, hence its looser bound.
BACKEND_CASES = [
    ("reference", "cpu", 1e-4),
    ("torch", "cpu", 1e-4),
    ("torch+prepack", "cpu", 1e-4),  # the engine's CPU set-up: base linears pre-packed for oneDNN
    pytest.param("triton", "cuda", 2e-3, marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("backend,device,atol", BACKEND_CASES)
def test_mixed_batch_matches_peft_and_merged_weights(world, backend, device, atol):
    from server.model.lora import attach_lora

    root, prompts, expected = world
    model = _our_model(root, device)
    if backend == "torch+prepack":
        from server.model.cpu_linear import prepack_linears

        assert prepack_linears(model) > 0
        backend = "torch"
    spec = BaseModelSpec(num_layers=model.config.num_hidden_layers, module_dims=model.config.projection_dims())
    registry = AdapterRegistry()
    for name in ADAPTERS:
        registry.register(validate_dir(root / name, name, spec, ValidationLimits(max_rank=8)))
    pool = SlotPool(spec, num_slots=len(ADAPTERS), max_rank=8, dtype=torch.float32, device=device,
                    host_cache_size=2, fetch=registry.weights)
    lora_backend = kernels.make_backend(device, backend)
    attach_lora(model, pool, lora_backend)
    refs = {name: registry.acquire(name) for name in dict.fromkeys(n for n, _ in SEQUENCES if n)}
    slots = pool.prepare(list(refs.values()))
    token_slots = [slots[refs[name].id] if name else -1 for (name, _), p in zip(SEQUENCES, prompts, strict=True)
                   for _ in range(len(p))]
    ours = _run(model, prompts, token_slots, device, lora_backend)

    for i, (name, _) in enumerate(SEQUENCES):
        torch.testing.assert_close(ours[i], expected[name][i], atol=atol, rtol=0, msg=f"seq {i} ({name})")
        if name:  # the adapter really changes the output, so the comparison can fail
            assert (expected[name][i] - expected[None][i]).abs().max() > 1e-2

    # Against our own base model with each adapter merged: W[slice] += scaling * B @ A.
    merged = _our_model(root, device)
    pristine = {k: v.clone() for k, v in merged.state_dict().items()}
    for name in ADAPTERS:
        merged.load_state_dict(pristine)
        loaded = registry.weights(refs[name])
        for t in merged.lora_targets():
            weight = getattr(t.parent, t.attr).weight
            offset = 0
            for module, width in t.slices:
                w = loaded.weights.get((t.layer_idx, module))
                if w is not None:
                    weight.data[offset : offset + width] += (w.scaling * (w.b.float() @ w.a.float())).to(device)
                offset += width
        idx = [i for i, (n, _) in enumerate(SEQUENCES) if n == name]
        base_logits = _run(merged, [prompts[i] for i in idx], None, device)
        for j, i in enumerate(idx):
            torch.testing.assert_close(ours[i], base_logits[j], atol=atol, rtol=0, msg=f"merged {name}")
    for ref in refs.values():
        registry.release(ref)
