"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM): math only.

Data flow of one step: `forward(input_ids [T], ctx)` installs the step's `ForwardContext`, embeds
the flattened tokens to `[T, hidden]`, builds the per-step rotary rows and `AttentionPlan` once, runs
every decoder layer (pre-norm attention + pre-norm gated MLP, residual adds) and returns the final
normed hidden states `[T, hidden]`; `compute_logits` maps the rows the sampler needs to fp32 logits.

Projections are fused (`qkv_proj` = q|k|v, `gate_up_proj` = gate|up) and called as plain
`self.<name>(x)`, so a LoRA-aware wrapper with the same call signature can replace them;
`lora_targets()` lists those substitution points with the HF names of their output slices.

The residual stream is carried beside the sublayer output (`h, residual`), so each RMSNorm also
does the residual add before it. Norms, the activation and the attention (`attn`: rotary + paged
attention) are modules too, so faster implementations are substituted at build time (pre-packed
linears, LoRA wrappers, the fused CPU ops) without a branch here; whatever runs the model in
another way (the C++ all-layers decode loop) is an executor on the runner's side.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from server.model.attention import AttentionPlan, PagedAttention, build_attention_plan
from server.model.config import ModelConfig
from server.model.context import ForwardContext, get_context, use_context
from server.model.layers import RMSNorm, SiluAndMul
from server.model.rope import RotaryEmbedding


@dataclass(frozen=True)
class LoRATarget:
    """One substitutable projection: `getattr(parent, attr)` is an nn.Linear whose output is the
    concatenation of `slices` (HF projection name, width), in order."""

    layer_idx: int
    parent: nn.Module
    attr: str
    slices: tuple[tuple[str, int], ...]


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.q_size = cfg.q_size
        self.qkv_proj = nn.Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=cfg.o_proj_bias)
        self.attn = PagedAttention(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                                   cfg.head_dim ** -0.5)
        self.kv_cache: torch.Tensor | None = None  # bound by LlamaForCausalLM.bind_kv_cache

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan: AttentionPlan | None) -> torch.Tensor:
        if self.kv_cache is None or plan is None:
            raise RuntimeError("bind_kv_cache() must be called before forward()")
        qkv = self.qkv_proj(x)  # [T, q + 2*kv]
        o = self.attn(qkv, cos, sin, self.kv_cache, get_context(), plan)  # [T, H, D]
        return self.o_proj(o.reshape(x.shape[0], self.q_size))  # [T, H, D] -> [T, q_size] -> [T, hidden]


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                plan: AttentionPlan | None) -> tuple[torch.Tensor, torch.Tensor]:
        """h: the previous sublayer's output (the embeddings, with residual None, for layer 0) ->
        (this layer's MLP output, the residual stream before it is added)."""
        h, residual = self.input_layernorm.residual_norm(h, residual)
        h = self.self_attn.forward(h, cos, sin, plan)
        h, residual = self.post_attention_layernorm.residual_norm(h, residual)
        return self.mlp.forward(h), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)

    def step_inputs(self, input_ids: torch.Tensor, ctx: ForwardContext
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionPlan | None]:
        """What every layer of a step shares: the embeddings [T, hidden], the rotary rows and the
        attention plan (None when no KV cache is bound: the trainer's dense attention needs none)."""
        x = self.embed_tokens(input_ids)  # [T] -> [T, hidden]
        cos, sin = self.rotary_emb.cos_sin(ctx.positions, max(ctx.context_lens), x.dtype)
        cache = getattr(self.layers[0].self_attn, "kv_cache", None)
        plan = build_attention_plan(ctx, cache) if cache is not None else None
        return x, cos, sin, plan

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        h, cos, sin, plan = self.step_inputs(input_ids, ctx)
        residual = None
        for layer in self.layers:  # .forward: ~330 module calls per step, no hooks to run
            h, residual = layer.forward(h, residual, cos, sin, plan)
        return self.norm.residual_norm(h, residual)[0]


class LlamaForCausalLM(nn.Module):
    """`forward(input_ids [T] int64, ctx) -> hidden [T, hidden]`; `compute_logits(h) -> [N, vocab] fp32`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if input_ids.dim() != 1 or input_ids.shape[0] != ctx.slot_mapping.shape[0]:
            raise ValueError(f"input_ids must be [num_tokens] matching the context, got {tuple(input_ids.shape)}")
        with use_context(ctx):
            return self.model(input_ids, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def bind_kv_cache(self, caches: list[torch.Tensor]) -> None:
        """Give each layer its `[2, kv_heads, num_blocks, block_size, head_dim]` cache tensor."""
        if len(caches) != len(self.model.layers):
            raise ValueError(f"expected {len(self.model.layers)} KV caches, got {len(caches)}")
        for layer, cache in zip(self.model.layers, caches, strict=True):
            layer.self_attn.kv_cache = cache

    def lora_targets(self) -> list[LoRATarget]:
        cfg = self.config
        targets = []
        for i, layer in enumerate(self.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            targets += [
                LoRATarget(i, attn, "qkv_proj", (("q_proj", cfg.q_size), ("k_proj", cfg.kv_size),
                                                 ("v_proj", cfg.kv_size))),
                LoRATarget(i, attn, "o_proj", (("o_proj", cfg.hidden_size),)),
                LoRATarget(i, mlp, "gate_up_proj", (("gate_proj", cfg.intermediate_size),
                                                    ("up_proj", cfg.intermediate_size))),
                LoRATarget(i, mlp, "down_proj", (("down_proj", cfg.hidden_size),)),
            ]
        return targets
