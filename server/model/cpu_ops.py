"""Switch a model's decode step onto the fused CPU ops (kernels/csrc/model_cpu.cpp).

`enable_cpu_ops(model)` builds (or loads the cached) extension of kernels/cpu_ext.py and sets
`model.model.cpu_ops`; from then on, while no autograd graph is recorded, each decoder layer runs
its norms (with the residual add), rotary, SiLU-and-mul, KV write and decode attention as one C++
call each, with the torch formulations' numerics. All-decode steps go further: `run_decode_loop`
runs every layer (projections, LoRA kernel and all) in one call of a C++ `DecodeLoop` built from
the model's modules on first use, rebuilt when a `Tracked` module gets a new submodule or tensor
(server/model/tracked.py) or a pre-packed weight is edited in place; `model.model.use_decode_loop =
False` turns it off. Both paths call the same kernels in the same order: same results. Returns False (the torch path stays) when the
model is not on the CPU, is not a float/bf16/fp16 model, or the build is disabled or failed
(`LORAMUX_CPU_KERNEL=0`, no compiler): the reason is in `kernels.cpu_ext.status()`.
"""
from __future__ import annotations

import torch
from torch import nn

from kernels import cpu_ext
from server.model.tracked import GENERATION

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def enable_cpu_ops(model: nn.Module) -> bool:
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "cpu_ops"):
        return False
    p = next(model.parameters())
    if p.device.type != "cpu" or p.dtype not in SUPPORTED_DTYPES:
        return False
    ext = cpu_ext.load()
    inner.cpu_ops = ext
    return ext is not None


def disable_cpu_ops(model: nn.Module) -> None:
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "cpu_ops"):
        inner.cpu_ops = None


# --- the whole decoder stack of an all-decode step in one C++ call ----------------------------------

def _lora_slots(batch):
    """The step's row -> slot tensor for the fused LoRA kernel; None: no adapter rows; False: the
    step needs another LoRA formulation (forced backend, or segments long enough for GEMMs)."""
    from kernels import cpu as kcpu
    from kernels import dispatch

    if batch is None or not batch.has_lora:
        return None
    if dispatch.get_backend() not in ("auto", "torch"):
        return False
    plan = kcpu.plan_for(batch)
    return plan.token_slots if kcpu.kernel_suits(plan) else False


def _proj_args(module: nn.Module):
    """(weight, bias, kind, out_features, a_tab, b_tabs, offs, scaling, r) for DecodeLoop.add_layer, the packed
    weight (or None when it is not pre-packed), or None when the projection does not suit the loop."""
    from kernels import cpu as kcpu
    from server.model.cpu_linear import PackedLinear
    from server.model.lora import LoRALinear

    lora = (None, [], [], None, 0)
    if isinstance(module, LoRALinear):
        bound = kcpu.bind_kernel(module.lora_a, module.lora_b, module.out_slices)
        if bound is None:
            return None
        a_tab, b_tabs, offs, r = bound
        lora = (a_tab, b_tabs, offs, module.scaling, r)
        module = module.base
    if isinstance(module, PackedLinear):
        packed = module._pack()
        kind = {"bf16_gemm": 2, "f32_gemm": 3}.get(module.kind, 1)
        return (packed, module.bias, kind, module.out_features, *lora), module.weight
    if type(module) is nn.Linear:
        return (module.weight, module.bias, 0, module.out_features, *lora), None
    return None


def build_decode_loop(llama_model: nn.Module, ops):
    """A DecodeLoop over `llama_model`'s layers (a LlamaModel with bound KV caches), plus the
    pre-packed weights it copied (to notice in-place edits), or None when some part does not suit it
    (a replaced attention module, a LoRA layout the kernel cannot take, mixed norm epsilons)."""
    from server.model.llama import LlamaAttention, LlamaMLP

    layers = list(llama_model.layers)
    if not layers:
        return None
    cfg = llama_model.rotary_emb.cfg
    eps = llama_model.norm.eps
    first = layers[0].self_attn
    if not isinstance(first, LlamaAttention):
        return None
    loop = ops.DecodeLoop(first.num_heads, first.num_kv_heads, first.head_dim, cfg.intermediate_size, eps,
                          first.scale, llama_model.norm.weight)
    packed_from = []
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        if (not isinstance(attn, LlamaAttention) or not isinstance(mlp, LlamaMLP) or attn.kv_cache is None
                or layer.input_layernorm.eps != eps or layer.post_attention_layernorm.eps != eps):
            return None
        projs = []
        for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
            got = _proj_args(m)
            if got is None:
                return None
            projs.append(got[0])
            if got[1] is not None:
                packed_from.append(got[1])
        loop.add_layer(layer.input_layernorm.weight, layer.post_attention_layernorm.weight, attn.kv_cache, projs)
    return loop, packed_from


def _versions(weights) -> int:
    return sum(0 if w.is_inference() else w._version for w in weights)


def run_decode_loop(llama_model: nn.Module, ops, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx, plan):
    """The final hidden states of an all-decode step from the C++ loop, or None (the caller runs
    the layers itself): disabled, unsuitable model, or a LoRA formulation other than the kernel."""
    if not getattr(llama_model, "use_decode_loop", True):
        return None
    slots = _lora_slots(ctx.lora)
    if slots is False:
        return None
    cached = llama_model.decode_loop
    if cached is None or cached[0] != GENERATION[0] or (cached[1] is not None and cached[2] != _versions(cached[1][1])):
        built = build_decode_loop(llama_model, ops)  # weights swapped, repacked or edited: rebuild
        cached = llama_model.decode_loop = (GENERATION[0], built, _versions(built[1]) if built else 0)
    if cached[1] is None:
        return None
    return cached[1][0].forward(x, cos, sin, ctx.slot_mapping, plan.decode_q_rows, plan.decode_tables,
                                plan.decode_lens, slots)
