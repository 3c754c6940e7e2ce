"""A counter of structural edits to the model, so that anything built from its modules can tell
when it is stale.

Every `Tracked` module bumps `GENERATION` when a module or tensor is assigned to one of its
attributes: a projection swapped for a LoRA wrapper or a pre-packed linear, an attention module
replaced, a KV cache bound, a weight repacked. The fused CPU decode loop (server/model/cpu_ops.py)
holds references taken when it was built and rebuilds itself when the count has moved.
"""
from __future__ import annotations

import torch
from torch import nn

GENERATION = [0]


class Tracked(nn.Module):
    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, (nn.Module, torch.Tensor)):
            GENERATION[0] += 1
        super().__setattr__(name, value)
