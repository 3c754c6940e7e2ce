"""The fused CPU layer ops (kernels/csrc/model_cpu.cpp) as module substitutions, chosen at build time.

`enable_cpu_ops(model)` builds (or loads the cached) extension of kernels/cpu_ext.py and swaps, in
place, every `RMSNorm`, `SiluAndMul` and `PagedAttention` of the model for its fused subclass
below (same parameters, same numerics, one C++ call each):
  FusedRMSNorm          residual add (in place) + RMSNorm
  FusedSiluAndMul       silu(gate) * up
  FusedPagedAttention   rotary in place on q|k, KV write, decode rows read straight from the paged
                        cache (no gather copy, no padding); a prefill chunk after cached tokens
                        (chunked prefill, prefix-cache hit) also reads its context in place
                        (kernels/csrc/chunk_attention.cpp, where AVX2 is compiled in); a prefill
                        that holds its whole context keeps SDPA (`server.model.attention.prefill_one`)
While an autograd graph is recorded (training) each falls back to its torch parent: the C++ ops
record no graph. `disable_cpu_ops(model)` swaps the torch modules back. Returns False (nothing
swapped) when the model is not on the CPU, is not a float/bf16/fp16 model, or the build is
disabled or failed (`LORAMUX_CPU_KERNEL=0`, no compiler): the reason is in `kernels.cpu_ext.status()`.
The all-layers decode loop that also uses these kernels is an executor on the runner's side
(server/engine/cpu_decode_loop.py).
"""
from __future__ import annotations

import torch
from torch import nn

from kernels import cpu_ext
from server.model.attention import AttentionPlan, PagedAttention, prefill_one
from server.model.context import ForwardContext
from server.model.layers import RMSNorm, SiluAndMul

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _chunk_kernel_pays(dtype: torch.dtype, query_len: int) -> bool:
    """chunk_attention.cpp or SDPA for a chunk after cached tokens: fp32 always (measured at an 8k
    context: 3.0x faster for 1 token, equal from 32); bf16 only for short chunks (11x for 1 token, 1.2x
    for 8, but 0.5-0.6x from 32, where torch's bf16 SDPA wins); fp16 never (not compiled)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and query_len <= 16)


class FusedRMSNorm(RMSNorm):
    def __init__(self, norm: RMSNorm, ops) -> None:
        nn.Module.__init__(self)
        self.weight, self.eps, self.ops = norm.weight, norm.eps, ops  # shared Parameter

    def residual_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """As the parent's, with the sum written into `residual` in place (one call for add and norm)."""
        if torch.is_grad_enabled():
            return super().residual_norm(x, residual)
        out = torch.empty_like(x)
        self.ops.rms_norm(out, x, self.weight, self.eps, residual)
        return out, x if residual is None else residual

    def unfused(self) -> RMSNorm:
        norm = RMSNorm.__new__(RMSNorm)
        nn.Module.__init__(norm)
        norm.weight, norm.eps = self.weight, self.eps
        return norm


class FusedSiluAndMul(SiluAndMul):
    def __init__(self, ops) -> None:
        super().__init__()
        self.ops = ops

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return super().forward(gate_up)
        out = gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)  # [T, 2*I] -> [T, I]
        self.ops.silu_and_mul(out, gate_up)
        return out

    def unfused(self) -> SiluAndMul:
        return SiluAndMul()


class FusedPagedAttention(PagedAttention):
    def __init__(self, attn: PagedAttention, ops) -> None:
        super().__init__(attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.scale)
        self.ops = ops
        # The chunk kernel only where it is vectorized (its scalar path is slower than SDPA's).
        self.chunk_kernel = bool(ops.chunk_attention_vectorized()) and attn.head_dim % 8 == 0

    def forward(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                ctx: ForwardContext, plan: AttentionPlan) -> torch.Tensor:
        if torch.is_grad_enabled():
            return super().forward(qkv, cos, sin, kv_cache, ctx, plan)
        ops, T = self.ops, qkv.shape[0]
        H, D, qs, kvs = self.num_heads, self.head_dim, self.q_size, self.kv_size
        ops.rotary_(qkv, cos, sin, H + self.num_kv_heads, D)  # in place; q|k|v read as column ranges below
        ops.kv_write(kv_cache, qkv[:, qs : qs + kvs], qkv[:, qs + kvs :], ctx.slot_mapping)
        if plan.decode_q_rows is not None:
            od = qkv.new_empty(plan.decode_q_rows.shape[0], H, D)  # [B, H, D]
            ops.decode_attention(od, qkv[:, :qs], plan.decode_q_rows, kv_cache, plan.decode_tables,
                                 plan.decode_lens, H, self.scale)
            if plan.all_decode:
                return od
            out = qkv.new_empty(T, H, D)
            out.index_copy_(0, plan.decode_rows, od)
        else:
            out = qkv.new_empty(T, H, D)
        q = qkv[:, :qs].view(T, H, D)
        k = qkv[:, qs : qs + kvs].view(T, -1, D)
        v = qkv[:, qs + kvs :].view(T, -1, D)
        for p in plan.prefills:
            if p.table is not None and self.chunk_kernel and _chunk_kernel_pays(qkv.dtype, p.query_len):
                # a chunk after cached tokens: its context read in place, no gather copy
                ops.chunk_attention(out[p.start : p.start + p.query_len], qkv[p.start : p.start + p.query_len, :qs],
                                    kv_cache, p.table, p.context_len, H, self.scale)
            else:
                prefill_one(out, q, k, v, kv_cache, p, self.scale)
        return out

    def unfused(self) -> PagedAttention:
        return PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, self.scale)


def _swap(model: nn.Module, make) -> int:
    """Replace every child for which `make(child)` returns a module; returns how many."""
    swaps = [(parent, name, new) for parent in list(model.modules()) for name, child in list(parent.named_children())
             if (new := make(child)) is not None]
    for parent, name, new in swaps:
        setattr(parent, name, new)
    return len(swaps)


def enable_cpu_ops(model: nn.Module) -> bool:
    """Substitute the fused modules into a CPU model (see the module docstring); idempotent."""
    p = next(model.parameters())
    if p.device.type != "cpu" or p.dtype not in SUPPORTED_DTYPES:
        return False
    ops = cpu_ext.load()
    if ops is None:
        return False

    def make(child):
        if type(child) is RMSNorm:
            return FusedRMSNorm(child, ops)
        if type(child) is SiluAndMul:
            return FusedSiluAndMul(ops)
        if type(child) is PagedAttention:
            return FusedPagedAttention(child, ops)
        return None

    _swap(model, make)
    return True


def disable_cpu_ops(model: nn.Module) -> None:
    """Put the torch modules back."""
    _swap(model, lambda c: c.unfused() if isinstance(c, (FusedRMSNorm, FusedSiluAndMul, FusedPagedAttention)) else None)


def cpu_ops_enabled(model: nn.Module) -> bool:
    return any(isinstance(m, FusedPagedAttention) for m in model.modules())
