"""What adapters/ needs to know about the base model, without importing server/.

The server builds a `BaseModelSpec` from its `ModelConfig` (`projection_dims()`); validation checks
adapter tensors against it and the slot pool sizes its buffers from it. Module names are the Hugging
Face ones; `module_path` gives the dotted path PEFT uses for matching target/rank/alpha patterns.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

# Order fixed by contract: scaling[layer, 0:3] is q|k|v, scaling[layer, 4:6] is gate|up.
MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODULE_INDEX: Mapping[str, int] = MappingProxyType({m: i for i, m in enumerate(MODULES)})
# Projections the model fuses into one linear (share their input): q|k|v, o, gate|up, down.
FUSED_GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))
# Parent block of each projection inside a decoder layer (HF Llama layout).
MODULE_PARENT: Mapping[str, str] = MappingProxyType(
    {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
     "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
)


def module_path(layer: int, module: str) -> str:
    """PEFT's key for a projection, relative to the causal-LM model: model.layers.3.self_attn.q_proj."""
    return f"model.layers.{layer}.{MODULE_PARENT[module]}.{module}"


@dataclass(frozen=True)
class BaseModelSpec:
    """Base model facts for adapter validation: layer count and (in, out) of every projection."""

    num_layers: int
    module_dims: Mapping[str, tuple[int, int]] = field(hash=False)  # hf module name -> (in, out)
    architecture: str = "LlamaForCausalLM"

    def __post_init__(self):
        if self.num_layers <= 0:
            raise ValueError(f"num_layers must be positive, got {self.num_layers}")
        missing = [m for m in MODULES if m not in self.module_dims]
        if missing:
            raise ValueError(f"module_dims lacks {missing}")
        dims = {}
        for m in MODULES:
            d_in, d_out = (int(v) for v in self.module_dims[m])
            if d_in <= 0 or d_out <= 0:
                raise ValueError(f"bad dims for {m}: {(d_in, d_out)}")
            dims[m] = (d_in, d_out)
        # Freeze a private copy so nobody mutates the spec through the caller's dict.
        object.__setattr__(self, "module_dims", MappingProxyType(dims))

    def in_features(self, module: str) -> int:
        return self.module_dims[module][0]

    def out_features(self, module: str) -> int:
        return self.module_dims[module][1]
