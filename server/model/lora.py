"""LoRA as a module substitution: `LoRALinear` wraps a fused base projection and adds every row's
own adapter delta in one backend call; `attach_lora` swaps it in for each `model.lora_targets()`.

Data flow per call: `y = base(x)` ([T, in] -> [T, out], out = concatenated HF slices such as
q|k|v), then, if the step's `ForwardContext.lora` (the plan the engine's LoRA backend prepared once
for the step) has active rows, `self.lora(y, x, plan)` adds in place, for each slice i and row t with
slot s >= 0: `scaling[i, s] * (x[t] @ A_i[s].T) @ B_i[s].T`. `self.lora` is the backend's binding
of this layer's views of the `SlotPool` buffers, made once here: loading an adapter into a slot is
seen without rebinding. The model's forward has no LoRA branches: it just calls `self.qkv_proj(x)`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from adapters.slots import SlotPool
from server.model.context import get_context


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, layer_idx: int, slices: Sequence[tuple[str, int]], pool: SlotPool,
                 backend) -> None:
        super().__init__()
        widths = [w for _, w in slices]
        if sum(widths) != base.out_features:
            raise ValueError(f"slices {list(slices)} do not tile {base.out_features} output features")
        self.base = base
        self.layer_idx = layer_idx
        self.slice_names = tuple(name for name, _ in slices)
        offsets = [sum(widths[:i]) for i in range(len(widths))]
        self.out_slices = list(zip(offsets, widths, strict=True))  # (offset, size) of each slice in y's columns
        # Views into the pool (plain attributes, not buffers: the pool owns and places them).
        self.lora_a = pool.a_views(layer_idx, self.slice_names)  # each [slots, r_max, in]
        self.lora_b = pool.b_views(layer_idx, self.slice_names)  # each [slots, out_i, r_max]
        self.scaling = pool.scaling_view(layer_idx, self.slice_names)  # [num_slices, slots] fp32
        self.lora = backend.bind(self.lora_a, self.lora_b, self.scaling, self.out_slices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base.forward(x)  # no hooks on the wrapped projection: skip the module-call machinery
        plan = get_context().lora
        if plan is None or not plan.has_lora:
            return y
        # The engine runs flattened [T, in]; tolerate extra leading dims by viewing them flat.
        self.lora(y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1]), plan)
        return y

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, slices={self.out_slices}, modules={self.slice_names}"


def attach_lora(model: nn.Module, pool: SlotPool, backend) -> None:
    """Replace every LoRA target of `model` with a LoRALinear bound to `pool` through `backend`
    (a kernels backend: `make_backend(device)`); idempotent."""
    for target in model.lora_targets():
        current = getattr(target.parent, target.attr)
        base = current.base if isinstance(current, LoRALinear) else current
        setattr(target.parent, target.attr, LoRALinear(base, target.layer_idx, target.slices, pool, backend))
