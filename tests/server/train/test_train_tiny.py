"""The trainer on a tiny random HF Llama (2 layers, hidden 64): loss falls, PEFT loads the output,
and PEFT's logits with it equal our server's (loader + AdapterManager validation + SlotPool +
LoRALinear over the paged KV cache) and our training-time forward (dense attention, padded batch).
"""
from __future__ import annotations

import json

import pytest
import torch

from server.train import trainer as T
from tests.server.model.tiny import save_tiny_hf

CFG = T.TrainConfig(rank=4, alpha=8.0, steps=25, lr=1e-2, batch_size=4, seq_len=48, seed=0, warmup=2)


def _records():
    """Prompt/completion and chat records with a learnable rule (completion = reversed prompt)."""
    words = ["cat", "dog", "sun", "tree", "fish", "bird", "moon", "rain"]
    recs = [{"prompt": f"say {w}: ", "completion": w[::-1].upper()} for w in words]
    recs += [{"messages": [{"role": "user", "content": w}, {"role": "assistant", "content": w[::-1]}]}
             for w in words]
    return recs


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    pytest.importorskip("peft")
    from server.model.loader import load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: extra threads only spin against other jobs on a shared box
    root = tmp_path_factory.mktemp("tiny")
    save_tiny_hf(root / "base", "untied")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    loaded = load_model(str(root / "base"), "float32", "cpu")
    examples = T.tokenize_records(loaded.tokenizer, _records(), CFG.seq_len)
    result = T.train_lora(loaded.model, examples, CFG)
    out = T.save_peft(root / "adapter", result.weights, CFG, str(root / "base"), torch.float32)
    yield root, loaded, examples, result, out
    torch.set_num_threads(threads)


def _hf(root):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(root / "base", torch_dtype=torch.float32).eval()
    model.config._attn_implementation = "eager"
    return model


def test_loss_goes_down(world):
    losses = world[3].losses
    assert len(losses) == CFG.steps and all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0], losses


def test_peft_format_and_keys(world):
    out, weights = world[4], world[3].weights
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8.0 and cfg["bias"] == "none"
    # 2 layers x 7 modules x (A, B)
    assert len(weights) == 28
    a = weights["base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight"]
    b = weights["base_model.model.model.layers.1.mlp.gate_proj.lora_B.weight"]
    assert a.shape == (4, 64) and b.shape == (96, 4)  # [r, in], [out, r]
    assert all(w.abs().max() > 0 for k, w in weights.items() if "lora_B" in k)  # B moved off its zero init


def test_peft_logits_equal_our_server_and_training_forward(world, tmp_path):
    from peft import PeftModel

    from adapters.manager import AdapterManager
    from adapters.slots import SlotPool
    from kernels import make_backend
    from kernels.batch import LoRABatch
    from server.engine.builder import base_spec
    from server.model.attention import allocate_kv_cache
    from server.model.context import make_context
    from server.model.loader import load_model
    from server.model.lora import attach_lora

    root, trained, examples, _, out = world
    ids = torch.tensor(examples[0].ids + examples[9].ids[:5])
    with torch.no_grad():
        base_logits = _hf(root)(ids[None]).logits[0]
        peft_model = PeftModel.from_pretrained(_hf(root), out).eval()
        expected = peft_model(ids[None]).logits[0]
    assert (expected - base_logits).abs().max() > 1e-2  # the adapter matters, so parity can fail

    # Our serving path: upload through validation, make resident, one prefill through the paged cache.
    loaded = load_model(str(root / "base"), "float32", "cpu")
    manager = AdapterManager(tmp_path / "store", base_spec(loaded))
    ref = manager.upload("tiny", (out / "adapter_config.json").read_bytes(),
                         (out / "adapter_model.safetensors").read_bytes())
    pool = SlotPool(manager.spec, 1, 8, torch.float32, "cpu", 1, fetch=manager.registry.weights)
    backend = make_backend("cpu")
    attach_lora(loaded.model, pool, backend)
    slot = pool.prepare([ref])[ref.id]
    n, bs = len(ids), 4
    loaded.model.bind_kv_cache(allocate_kv_cache(loaded.config, -(-n // bs), bs, torch.float32, "cpu"))
    ctx = make_context([list(range(n))], [list(range(-(-n // bs)))], bs, torch.device("cpu"))
    ctx.lora = backend.prepare(LoRABatch.build([slot] * n))
    with torch.inference_mode():
        ours = loaded.model.compute_logits(loaded.model(ids, ctx))
    assert (ours - expected).abs().max() <= 1e-4

    # The trainer's own forward (dense attention, right-padded batch of two lengths) agrees too.
    batch = [examples[3], examples[12]]
    flat, _, tctx = T.batch_context(batch, 0, "cpu")
    S = tctx.query_lens[0]
    with torch.no_grad():
        hidden = trained.model(flat, tctx)
        for i, ex in enumerate(batch):
            got = trained.model.compute_logits(hidden[i * S : i * S + len(ex.ids)])
            want = peft_model(torch.tensor(ex.ids)[None]).logits[0]
            assert (got - want).abs().max() <= 1e-4, i

    # ... and its loss is PEFT's own causal-LM loss on the same padded batch (labels -100 off-target).
    batch = [examples[1], examples[8], examples[15]]
    S = max(len(e.ids) for e in batch)
    pad = [[0] * (S - len(e.ids)) for e in batch]
    hf_ids = torch.tensor([e.ids + p for e, p in zip(batch, pad, strict=True)])
    labels = torch.tensor([[t if m else -100 for t, m in zip(e.ids, e.mask, strict=True)] + [-100] * len(p)
                           for e, p in zip(batch, pad, strict=True)])
    with torch.no_grad():
        attention = torch.tensor([[1] * len(e.ids) + [0] * len(p) for e, p in zip(batch, pad, strict=True)])
        want = peft_model(input_ids=hf_ids, attention_mask=attention, labels=labels).loss
        got = T.batch_loss(trained.model, batch, pad_id=0)
    assert abs(float(got) - float(want)) <= 1e-5, (float(got), float(want))


def test_cli_trains_saves_and_peft_loads(world, tmp_path, capsys):
    from peft import PeftModel

    root = world[0]
    rc = T.main(["--model", str(root / "base"), "--data", str(root / "data.jsonl"), "--out", str(tmp_path / "a"),
                 "--rank", "2", "--target-modules", "q_proj,v_proj", "--steps", "3", "--batch-size", "2",
                 "--dtype", "float32", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["target_modules"] == ["q_proj", "v_proj"]
    from safetensors.torch import load_file

    w = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert len(w) == 2 * 2 * 2 and all(t.dtype == torch.float16 for t in w.values())
    pm = PeftModel.from_pretrained(_hf(root), tmp_path / "a")
    q = pm.base_model.model.model.layers[1].self_attn.q_proj  # PEFT put our tensors where HF reads them
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_{}.weight"
    assert torch.equal(q.lora_A["default"].weight, w[key.format("A")].float())
    assert torch.equal(q.lora_B["default"].weight, w[key.format("B")].float())
