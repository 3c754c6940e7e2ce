"""The CPU decode executor: every layer of an all-decode step in one C++ call (kernels/csrc/decode_loop.cpp).

The runner owns one `CPUDecodeLoop` when the model runs on the CPU with the fused ops substituted
(server/model/cpu_ops.py). It is built explicitly by the engine builder after LoRA is attached and
the weights are packed: `build()` walks the layers once and hands the C++ `DecodeLoop` each layer's
norm weights, KV cache and four projections (packed weight + kind, bias, and the LoRA kernel's bound
tables from the layer's CPU backend binding); a quantized projection (`QuantLinear`) goes in as kind 4,
its blocks and format set by `set_quant`, and runs the same qgemm_cpu.cpp kernel as its module. Per step, `run(input_ids, ctx)` returns the final
hidden states `[T, hidden]`, or None when the step is not all-decode or does not suit the loop (a
LoRA plan that is not the CPU kernel's, segments long enough for GEMMs); the runner then calls the
model's own forward. Both paths call the same kernels in the same order: bit-identical results.

Staleness: the loop holds references taken at build time. Each run checks, cheaply, that the model
still holds the same modules, caches and norm weights (identity) and that no pre-packed weight was
edited in place (version counters); if anything moved it rebuilds before running.
"""
from __future__ import annotations

import torch
from torch import nn

from kernels import cpu_ext, quant_reference
from kernels import quant as kq
from kernels.cpu import CPUPlan
from server.model.context import ForwardContext
from server.model.cpu_linear import PackedLinear
from server.model.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP
from server.model.lora import LoRALinear
from server.model.quant_linear import QuantLinear

_KIND = {"bf16_gemm": 2, "f32_gemm": 3}  # PackedLinear.kind -> DecodeLoop's weight kind (0 plain, 1 oneDNN)
_QUANT_KIND = 4  # kernels/quant.py QuantizedWeight blocks through qgemm_cpu.cpp's quant_linear


def _quant_args(qw):
    """DecodeLoop.set_quant's (format id, in_features, absmax, absmax_scale, offset, dynamic map)."""
    empty = torch.empty(0, dtype=torch.uint8)
    nf4 = qw.format == "nf4"
    return (kq._CPP_FORMAT_IDS[qw.format], qw.in_features, qw.absmax if nf4 else empty,
            qw.absmax_scale if nf4 else empty.float(), qw.absmax_offset, quant_reference.DYNAMIC_MAP)


def _proj_args(module: nn.Module):
    """(DecodeLoop.add_layer's projection tuple, the PackedLinear whose weight it copied or None), or
    None when the projection does not suit the loop."""
    lora = (None, [], [], None, 0)
    if isinstance(module, LoRALinear):
        bound = module.lora.kernel_args
        if bound is None:
            return None
        a_tab, b_tabs, offs, r = bound
        lora = (a_tab, b_tabs, offs, module.scaling, r)
        module = module.base
    if isinstance(module, PackedLinear):
        packed = module.packed_weight()
        return (packed, module.bias, _KIND.get(module.kind, 1), module.out_features, *lora), module
    if type(module) is nn.Linear:
        return (module.weight, module.bias, 0, module.out_features, *lora), None
    if isinstance(module, QuantLinear) and module.qweight.data.device.type == "cpu":
        return (module.qweight.data, module.bias, _QUANT_KIND, module.out_features, *lora), module
    return None


class CPUDecodeLoop:
    def __init__(self, model: LlamaForCausalLM) -> None:
        self.model = model
        self.enabled = True  # tests and A/B runs turn it off to compare with the layer path
        self.builds = 0
        self._loop = None
        self._parts: list[tuple[dict, str, object]] = []  # what the loop was built from, checked by identity
        self._packed: list[PackedLinear] = []
        self._versions = 0

    # --- build ------------------------------------------------------------------------------------
    def _snapshot(self) -> list[tuple[dict, str, object]]:
        """(container dict, key, object) for everything the loop copies a reference of: checking
        `d.get(key) is obj` is a plain dict lookup (about 25 us per step for 30 layers)."""
        inner = self.model.model
        out: list[tuple[dict, str, object]] = [(inner._modules, "layers", inner.layers),
                                               (inner._modules, "norm", inner.norm)]
        out.append((inner.norm._parameters, "weight", inner.norm.weight))
        for i, layer in enumerate(inner.layers):
            out.append((inner.layers._modules, str(i), layer))
            for name in ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp"):
                out.append((layer._modules, name, layer._modules[name]))
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                out.append((norm._parameters, "weight", norm.weight))
            attn, mlp = layer.self_attn, layer.mlp
            out.append((attn.__dict__, "kv_cache", attn.__dict__.get("kv_cache")))
            for parent, name in ((attn, "qkv_proj"), (attn, "o_proj"), (mlp, "gate_up_proj"), (mlp, "down_proj")):
                m = parent._modules.get(name)
                out.append((parent._modules, name, m))
                if isinstance(m, LoRALinear):
                    out += [(m._modules, "base", m.base), (m.__dict__, "lora", m.lora)]
        return out

    def build(self) -> bool:
        """(Re)build the C++ loop from the model as it is now; False when some part does not suit it
        (a replaced attention module, a LoRA layout the kernel cannot take, mixed norm epsilons)."""
        self._loop, self._packed, self._versions, self.builds = None, [], 0, self.builds + 1
        self._parts = self._snapshot()
        ops = cpu_ext.loaded()
        inner = self.model.model
        layers = list(inner.layers)
        if ops is None or not layers or not isinstance(layers[0].self_attn, LlamaAttention):
            return False
        geo, eps = layers[0].self_attn.attn, inner.norm.eps
        loop = ops.DecodeLoop(geo.num_heads, geo.num_kv_heads, geo.head_dim, self.model.config.intermediate_size,
                              eps, geo.scale, inner.norm.weight)
        packed = []
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            if (not isinstance(attn, LlamaAttention) or not isinstance(mlp, LlamaMLP) or attn.kv_cache is None
                    or layer.input_layernorm.eps != eps or layer.post_attention_layernorm.eps != eps):
                return False
            projs, quant = [], []
            for j, m in enumerate((attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)):
                got = _proj_args(m)
                if got is None:
                    return False
                projs.append(got[0])
                if isinstance(got[1], QuantLinear):
                    quant.append((j, got[1].qweight))
                elif got[1] is not None:
                    packed.append(got[1])
            loop.add_layer(layer.input_layernorm.weight, layer.post_attention_layernorm.weight, attn.kv_cache, projs)
            for j, qw in quant:
                loop.set_quant(loop.num_layers() - 1, j, *_quant_args(qw))
        self._loop, self._packed, self._versions = loop, packed, _versions(packed)
        return True

    def _stale(self) -> bool:
        return (not self._parts or any(d.get(k) is not o for d, k, o in self._parts)
                or _versions(self._packed) != self._versions)

    # --- one step ------------------------------------------------------------------------------
    def run(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor | None:
        """The final hidden states of an all-decode step, or None (the runner runs the model)."""
        if not self.enabled or not ctx.is_decode_only:
            return None
        slots = None
        lora = ctx.lora
        if lora is not None and lora.has_lora:
            if not isinstance(lora, CPUPlan) or not lora.use_kernel:
                return None  # another formulation this step (long segments, a forced backend)
            slots = lora.token_slots
        if self._stale():
            self.build()
        if self._loop is None:
            return None
        x, cos, sin, plan = self.model.model.step_inputs(input_ids, ctx)
        if plan is None or not plan.all_decode or plan.decode_q_rows is None:
            return None
        return self._loop.forward(x, cos, sin, ctx.slot_mapping, plan.decode_q_rows, plan.decode_tables,
                                  plan.decode_lens, slots)


def _versions(packed: list[PackedLinear]) -> int:
    """Sum of the packed weights' version counters: moves when one is edited in place."""
    return sum(0 if m.weight.is_inference() else m.weight._version for m in packed)
