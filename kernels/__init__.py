"""loramux kernels: the multi-LoRA add-on (shrink/expand over stacked slot buffers) for a mixed batch.

Public API (see kernels/dispatch.py for the contract, kernels/reference.py for the spec):
    add_lora, BoundLoRA (add_lora with the buffers bound once), lora_shrink, lora_expand, set_backend,
    get_backend, use_backend, LoRABatch,
    alloc_lora_a, alloc_lora_b (slot buffers in the layout the CPU path is fastest with).
"""
from kernels.batch import LoRABatch
from kernels.dispatch import (
    BACKENDS,
    BoundLoRA,
    add_lora,
    get_backend,
    lora_expand,
    lora_shrink,
    set_backend,
    use_backend,
)
from kernels.layout import alloc_lora_a, alloc_lora_b

__all__ = [
    "BACKENDS",
    "BoundLoRA",
    "LoRABatch",
    "add_lora",
    "alloc_lora_a",
    "alloc_lora_b",
    "get_backend",
    "lora_expand",
    "lora_shrink",
    "set_backend",
    "use_backend",
]
