"""loramux kernels: the multi-LoRA add-on (shrink/expand over stacked slot buffers) for a mixed batch,
the fused CPU ops (kernels/cpu_ext.py) and their specs (kernels/reference.py). Imports nothing of ours.

Public API (kernels/backend.py for the backend contract, kernels/reference.py for the spec):
    make_backend(device, name) -> a backend with prepare(batch) / bind(buffers) / shrink / expand
    add_lora, lora_shrink, lora_expand   functional forms (tests, benchmarks)
    LoRABatch                            per-step row -> slot metadata
    alloc_lora_a, alloc_lora_b           slot buffers in the layout the CPU path is fastest with
"""
from kernels.backend import (
    BACKENDS,
    ReferenceBackend,
    TritonBackend,
    add_lora,
    lora_expand,
    lora_shrink,
    make_backend,
)
from kernels.batch import LoRABatch
from kernels.cpu import CPUBackend
from kernels.layout import alloc_lora_a, alloc_lora_b

__all__ = [
    "BACKENDS",
    "CPUBackend",
    "LoRABatch",
    "ReferenceBackend",
    "TritonBackend",
    "add_lora",
    "alloc_lora_a",
    "alloc_lora_b",
    "lora_expand",
    "lora_shrink",
    "make_backend",
]
