"""The PEFT baseline of `python -m server.bench`: Hugging Face transformers + PEFT mixed-adapter
`generate` on the same weights, adapters and batch as the engine points (what a user would run instead).

`to_hf_model` rebuilds a transformers `LlamaForCausalLM` from our loaded model (fused projections split
back into q/k/v and gate/up); `peft_point` writes the bench's adapters as PEFT directories, loads them
all into one `PeftModel` and times one greedy `generate` with per-row `adapter_names`.
"""
from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path

import torch

from server.model.device import synchronize
from server.model.loader import LoadedModel


def peft_point(loaded: LoadedModel, adapters, adapter_files, names, prompt_len, new_tokens, seed):
    """transformers + PEFT mixed-adapter generate on the same weights, adapters and batch."""
    hf = to_hf_model(loaded)
    rng = random.Random(seed)
    ids = torch.tensor([[rng.randrange(3, loaded.config.vocab_size) for _ in range(prompt_len)] for _ in names],
                       device=loaded.device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    model = hf
    if any(names):
        from peft import PeftModel

        with tempfile.TemporaryDirectory() as tmp:
            used = sorted({n for n in names if n})
            for n in used:
                cfg, tensors = adapter_files[n]
                d = Path(tmp) / n
                d.mkdir()
                (d / "adapter_config.json").write_text(json.dumps(cfg))
                save_file(tensors, d / "adapter_model.safetensors")
            model = PeftModel.from_pretrained(hf, str(Path(tmp) / used[0]), adapter_name=used[0])
            for n in used[1:]:
                model.load_adapter(str(Path(tmp) / n), adapter_name=n)
        kwargs["adapter_names"] = [n or "__base__" for n in names]
    with torch.inference_mode():
        model.generate(ids[:, :4], **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
        t = time.perf_counter()
        model.generate(ids, **kwargs)
        synchronize(loaded.device)
        total = time.perf_counter() - t
    return {"output_tokens_per_s": len(names) * new_tokens / total, "step_ms": 1000 * total / new_tokens,
            "total_s": total, "steps": new_tokens}


def to_hf_model(loaded: LoadedModel):
    """The same weights as a transformers LlamaForCausalLM (fused projections split back)."""
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM as HFLlama

    cfg = loaded.config
    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                         num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                         num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                         rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings,
                         tie_word_embeddings=cfg.tie_word_embeddings, rope_theta=cfg.rope_theta,
                         rope_scaling=cfg.rope_scaling, attention_bias=cfg.attention_bias,
                         bos_token_id=cfg.bos_token_id, eos_token_id=list(cfg.eos_token_ids))
    state = {}
    q, kv = cfg.q_size, cfg.kv_size
    for name, t in loaded.model.state_dict().items():
        name = name.replace(".base.", ".")  # LoRA wrappers hold the base linear as `.base`
        if ".qkv_proj." in name:
            for part, piece in zip(("q_proj", "k_proj", "v_proj"), t.split([q, kv, kv]), strict=True):
                state[name.replace("qkv_proj", part)] = piece
        elif ".gate_up_proj." in name:
            for part, piece in zip(("gate_proj", "up_proj"), t.chunk(2), strict=True):
                state[name.replace("gate_up_proj", part)] = piece
        else:
            state[name] = t
    with torch.device(loaded.device):
        hf = HFLlama(hf_cfg).to(loaded.dtype)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    assert not missing and not unexpected, (missing, unexpected)
    return hf.eval()


def save_file(tensors, path):
    from safetensors.torch import save_file as _save

    _save(tensors, str(path))
