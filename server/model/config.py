"""`ModelConfig`: the shape and hyper-parameters of one Llama-family decoder.

Built once at load time from a Hugging Face `config.json` dict (`from_hf_dict`) or from GGUF
metadata (the GGUF loader fills the fields directly), validated in `__post_init__`, never mutated.
Adapters use `projection_dims()` to check LoRA shapes against the base model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from server.model.errors import ModelLoadError

# HF architectures this runtime implements (all share the Llama block; Qwen2 adds q/k/v biases).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False, compare=True)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections
    o_proj_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"unsupported architecture {self.architecture!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ModelLoadError(f"config field {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelLoadError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ModelLoadError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not (self.rms_norm_eps > 0 and self.rope_theta > 0):
            raise ModelLoadError("rms_norm_eps and rope_theta must be positive")
        if self.rope_scaling is not None:
            # Keep a private copy so that the caller's dict can't mutate a frozen config.
            scaling = dict(self.rope_scaling)
            rope_type = scaling.get("rope_type", scaling.get("type", "default"))
            if rope_type not in ROPE_TYPES:
                raise ModelLoadError(f"unsupported rope_scaling type {rope_type!r} (supported: {', '.join(ROPE_TYPES)})")
            scaling["rope_type"] = rope_type
            if rope_type != "default" and not isinstance(scaling.get("factor"), (int, float)):
                raise ModelLoadError(f"rope_scaling of type {rope_type!r} needs a numeric 'factor'")
            object.__setattr__(self, "rope_scaling", None if rope_type == "default" else scaling)
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))

    # Derived sizes ----------------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def projection_dims(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of every LoRA-targetable projection, by its HF name."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_size),
            "k_proj": (h, self.kv_size),
            "v_proj": (h, self.kv_size),
            "o_proj": (self.q_size, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face `config.json` dict (transformers 4.x and 5.x layouts)."""
        archs = d.get("architectures") or []
        arch = archs[0] if archs else {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                       "qwen2": "Qwen2ForCausalLM"}.get(d.get("model_type", ""), "")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"unsupported architecture {arch or d.get('model_type')!r} "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        try:
            hidden = int(d["hidden_size"])
            heads = int(d["num_attention_heads"])
            # transformers 5 stores rope_theta inside `rope_parameters`; 4.x uses rope_theta + rope_scaling.
            rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
            rope = dict(rope)
            theta = float(rope.pop("rope_theta", d.get("rope_theta", 10000.0)))
            eos = d.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            # Note: Mistral's sliding window is not implemented; it only matters past the window length.
            if d.get("mlp_bias"):
                raise ModelLoadError("mlp_bias=true is not supported")
            qwen2 = arch == "Qwen2ForCausalLM"
            return cls(
                architecture=arch,
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_hidden_layers=int(d["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or hidden // heads),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                rope_scaling=rope or None,
                max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                # Qwen2 always has q/k/v biases and no o_proj bias; Llama's flag covers q/k/v and o.
                attention_bias=qwen2 or bool(d.get("attention_bias", False)),
                o_proj_bias=not qwen2 and bool(d.get("attention_bias", False)),
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=eos_ids,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"invalid config.json: {type(e).__name__}: {e}") from None
