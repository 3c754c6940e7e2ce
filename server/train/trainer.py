"""`loramux train`: fit a LoRA adapter on the base model with OUR model code and plain torch autograd.

Data flow: JSONL records (`{"prompt", "completion"}` or `{"messages": [...]}`) -> `tokenize_records`
(token ids + a loss mask that is True only on completion / assistant tokens) -> `train_lora`:
the base model is loaded frozen and changed by module substitution only:
  * every chosen fused projection (`qkv_proj`, `o_proj`, `gate_up_proj`, `down_proj`) is wrapped by
    `TrainLoRALinear`, which adds `scaling * (x @ A.T) @ B.T` to each selected HF slice (q|k|v, ...);
  * every `self_attn` is replaced by `DenseCausalAttention`, which reuses the layer's projections
    but attends densely and causally over a padded `[B, S]` batch. Training needs no KV cache: a
    batch is B right-padded sequences of equal length S, flattened to `[B*S]` tokens exactly like an
    engine step of B fresh prefills, so the model's own forward (embedding, rotary rows from
    `ctx.positions`, norms, MLP) runs unchanged and no serving cache is touched. Padding sits after
    each sequence's real tokens, so causality keeps it invisible to them; its loss is masked.
Each step: forward -> hidden rows of masked tokens only -> `compute_logits` -> cross entropy on the
next token -> AdamW on the LoRA parameters (warmup + cosine). bf16 autocast where the device has
native bf16 (CUDA, avx512_bf16/amx CPUs), fp32 otherwise. `save_peft` writes a PEFT directory
(`adapter_config.json` + `adapter_model.safetensors`); `upload_adapter` POSTs it to a server.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from adapters.spec import MODULE_PARENT, MODULES
from server.model.context import ForwardContext, get_context
from server.model.rope import apply_rotary
from server.train.data import Example, TrainDataError, read_jsonl, tokenize_record, tokenize_records  # noqa: F401

DEFAULT_HF_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded GGUF was converted from


@dataclass(frozen=True)
class TrainConfig:
    """What to train and how: LoRA shape (rank, alpha = scaling * rank, HF target modules) and the
    optimiser schedule (AdamW, `warmup` linear steps then cosine down to 10% of `lr`)."""

    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = MODULES
    steps: int = 100
    lr: float = 1e-3
    batch_size: int = 8
    seq_len: int = 256
    seed: int = 0
    warmup: int = 10

    def __post_init__(self):
        bad = [m for m in self.target_modules if m not in MODULES]
        if bad or not self.target_modules:
            raise ValueError(f"target modules must be a non-empty subset of {list(MODULES)}, got {bad}")
        for name in ("rank", "steps", "batch_size", "seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0 or self.alpha <= 0:
            raise ValueError("lr and alpha must be positive")


@dataclass
class TrainResult:
    losses: list[float]
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # PEFT key -> fp32 tensor


# --- training-only module substitutions ---------------------------------------------------------
class TrainLoRALinear(nn.Module):
    """base(x) + per-slice `scaling * (x @ A.T) @ B.T` for the selected HF slices of a fused linear."""

    def __init__(self, base: nn.Linear, slices: Sequence[tuple[str, int]], modules: Sequence[str],
                 rank: int, alpha: float) -> None:
        super().__init__()
        self.base, self.slices, self.scaling = base, tuple(slices), alpha / rank
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        dev = base.weight.device
        for name, width in self.slices:
            if name in modules:  # PEFT's init: A kaiming-uniform, B zero (the delta starts at 0)
                a = torch.empty(rank, base.in_features, device=dev)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                self.lora_A[name] = nn.Parameter(a)  # [r, in]
                self.lora_B[name] = nn.Parameter(torch.zeros(width, rank, device=dev))  # [out_i, r]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        parts = list(y.split([w for _, w in self.slices], dim=-1))  # [T, out] -> per-slice [T, out_i]
        for i, (name, _) in enumerate(self.slices):
            if name in self.lora_A:
                parts[i] = parts[i] + self.scaling * ((x @ self.lora_A[name].t()) @ self.lora_B[name].t())
        return torch.cat(parts, dim=-1)


class DenseCausalAttention(nn.Module):
    """Stands in for a `LlamaAttention` during training: same projections, dense causal SDPA over
    the step's B equal-length sequences (read from the ForwardContext), no KV cache."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.attn = attn

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan) -> torch.Tensor:
        a, p, ctx = self.attn, self.attn.attn, get_context()  # p: the layer's PagedAttention (head geometry)
        T, B = x.shape[0], ctx.num_seqs
        S, H, KV, D = T // B, p.num_heads, p.num_kv_heads, p.head_dim
        q, k, v = a.qkv_proj(x).split([p.q_size, p.kv_size, p.kv_size], dim=-1)
        q = apply_rotary(q.view(T, H, D), cos, sin)
        k = apply_rotary(k.view(T, KV, D), cos, sin)
        # [T, heads, D] -> [B, S, heads, D] -> [B, heads, S, D]; KV heads repeated for their query group
        q = q.view(B, S, H, D).transpose(1, 2)
        k = k.reshape(B, S, KV, D).transpose(1, 2).repeat_interleave(H // KV, dim=1)
        v = v.reshape(B, S, KV, D).transpose(1, 2).repeat_interleave(H // KV, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=p.scale)
        return a.o_proj(o.transpose(1, 2).reshape(T, p.q_size))  # [B, H, S, D] -> [T, q_size]


def prepare_model(model: nn.Module, cfg: TrainConfig) -> list[tuple[int, str, TrainLoRALinear]]:
    """Freeze `model`, substitute LoRA wrappers and dense attention; return (layer, parent, wrapper)."""
    model.requires_grad_(False)
    wrappers = []
    for t in model.lora_targets():
        if any(name in cfg.target_modules for name, _ in t.slices):
            w = TrainLoRALinear(getattr(t.parent, t.attr), t.slices, cfg.target_modules, cfg.rank, cfg.alpha)
            setattr(t.parent, t.attr, w)
            wrappers.append((t.layer_idx, w))
    for layer in model.model.layers:
        if not isinstance(layer.self_attn, DenseCausalAttention):
            layer.self_attn = DenseCausalAttention(layer.self_attn)
    return wrappers


def peft_weights(wrappers) -> dict[str, torch.Tensor]:
    """PEFT keys -> fp32 CPU tensors: `base_model.model.model.layers.{i}.{parent}.{m}.lora_A.weight`."""
    out = {}
    for layer, w in wrappers:
        for name in w.lora_A:
            prefix = f"base_model.model.model.layers.{layer}.{MODULE_PARENT[name]}.{name}"
            out[f"{prefix}.lora_A.weight"] = w.lora_A[name].detach().float().cpu().contiguous()
            out[f"{prefix}.lora_B.weight"] = w.lora_B[name].detach().float().cpu().contiguous()
    return out


def batch_context(batch: Sequence[Example], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, ForwardContext]:
    """Right-pad to the longest example: ids [B*S], target mask [B*S], and the step's context."""
    B, S = len(batch), max(len(e.ids) for e in batch)
    ids = torch.tensor([e.ids + [pad_id] * (S - len(e.ids)) for e in batch], device=device)  # [B, S]
    mask = torch.tensor([e.mask + [False] * (S - len(e.mask)) for e in batch], device=device)
    T = B * S
    ctx = ForwardContext(
        positions=torch.arange(S, device=device).repeat(B), slot_mapping=torch.arange(T, device=device),
        query_lens=[S] * B, context_lens=[S] * B,
        block_tables=torch.zeros(B, 1, dtype=torch.int32, device=device),
        query_start_loc=torch.arange(0, T + 1, S, device=device),
        context_lens_t=torch.full((B,), S, dtype=torch.int64, device=device), block_size=S)
    return ids.view(T), mask.view(T), ctx


def batch_loss(model, batch: Sequence[Example], pad_id: int) -> torch.Tensor:
    """Mean next-token cross entropy over the batch's target tokens."""
    device = model.lm_head.weight.device
    ids, mask, ctx = batch_context(batch, pad_id, device)
    hidden = model(ids, ctx)  # [B*S, hidden]
    S = ctx.query_lens[0]
    # Row t predicts token t+1 of the same sequence: column c of mask[:, 1:] is target position
    # c + 1, predicted by flat row seq * S + c.
    pred = mask.view(-1, S)[:, 1:].nonzero()  # [N, 2] (seq, c)
    rows = pred[:, 0] * S + pred[:, 1]
    logits = model.compute_logits(hidden.index_select(0, rows))  # [N, vocab] fp32
    return F.cross_entropy(logits, ids[rows + 1])


def use_autocast(device: torch.device, dtype: str) -> bool:
    from server.model.device import cpu_has_native_bf16

    if dtype not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"--dtype must be auto, float32 or bfloat16, got {dtype!r}")
    if dtype == "auto":
        return device.type == "cuda" or cpu_has_native_bf16()
    return dtype == "bfloat16"


def train_lora(model, examples: Sequence[Example], cfg: TrainConfig, *, pad_id: int = 0,
               autocast: bool = False, progress: bool = False) -> TrainResult:
    """Train LoRA on `model` (modified in place by substitution); returns per-step losses + weights."""
    torch.manual_seed(cfg.seed)
    wrappers = prepare_model(model, cfg)
    params = [p for _, w in wrappers for p in w.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    warm = min(cfg.warmup, cfg.steps // 5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / (warm + 1) if s < warm else
                                              0.1 + 0.45 * (1 + math.cos(math.pi * (s - warm) / max(1, cfg.steps - warm))))
    gen = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    device = model.lm_head.weight.device
    bar = range(cfg.steps)
    if progress:
        from tqdm import tqdm

        bar = tqdm(bar, desc="train", unit="step", file=sys.stderr)
    losses = []
    model.train()
    for _ in bar:
        while len(order) < cfg.batch_size:  # epochs of shuffled examples, cycled
            order += torch.randperm(len(examples), generator=gen).tolist()
        batch, order = [examples[i] for i in order[: cfg.batch_size]], order[cfg.batch_size :]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = batch_loss(model, batch, pad_id)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if progress:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    model.eval()
    return TrainResult(losses, peft_weights(wrappers))


# --- output --------------------------------------------------------------------------------------
def save_peft(out_dir: str | Path, weights: dict[str, torch.Tensor], cfg: TrainConfig, base_name: str,
              dtype: torch.dtype = torch.float16) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` (PEFT LoRA layout) into `out_dir`."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
              "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": 0.0, "bias": "none",
              "target_modules": list(cfg.target_modules), "use_rslora": False, "fan_in_fan_out": False,
              "inference_mode": True}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.to(dtype).contiguous() for k, v in sorted(weights.items())},
              str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def upload_adapter(url: str, out_dir: str | Path, name: str, admin_key: str | None = None,
                   replace: bool = False, client=None) -> dict:
    """Hot-upload a saved adapter: multipart POST {url}/v1/adapters (name, config, weights)."""
    import httpx

    out = Path(out_dir)
    files = {"config": ("adapter_config.json", (out / "adapter_config.json").read_bytes(), "application/json"),
             "weights": ("adapter_model.safetensors", (out / "adapter_model.safetensors").read_bytes(),
                         "application/octet-stream")}
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    data = {"name": name, "replace": "true" if replace else "false"}
    own = client is None  # close only a client we opened (tests pass their own)
    client = httpx.Client(timeout=60.0) if own else client
    try:
        resp = client.post(f"{url.rstrip('/')}/v1/adapters", data=data, files=files, headers=headers)
    finally:
        if own:
            client.close()
    if resp.status_code >= 400:
        try:
            detail = resp.json().get("error", {}).get("message", resp.text)
        except ValueError:
            detail = resp.text
        raise RuntimeError(f"upload to {url} failed ({resp.status_code}): {str(detail)[:300]}")
    return resp.json()


# --- CLI -----------------------------------------------------------------------------------------
def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="HF model dir, .gguf file or 'default' (embedded SmolLM2)")
    p.add_argument("--data", required=True, help="JSONL of {prompt, completion} or {messages} records")
    p.add_argument("--out", required=True, help="output directory (PEFT format)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--target-modules", default=",".join(MODULES), help="comma-separated HF module names")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", help="auto (bf16 where native, else fp32) | float32 | bfloat16")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--save-dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--upload", metavar="URL", help="hot-upload the result to a running server")
    p.add_argument("--admin-key", help="admin API key for --upload")
    p.add_argument("--name", help="adapter name for --upload (default: the --out directory name)")
    p.add_argument("--replace", action="store_true", help="with --upload: replace an adapter of that name")


def run_train(args: argparse.Namespace) -> int:
    """Train, save, optionally upload. User errors: one stderr line, exit status 2."""
    from server.model.errors import ModelLoadError
    from server.model.loader import load_model

    try:
        modules = tuple(m.strip() for m in args.target_modules.split(",") if m.strip())
        cfg = TrainConfig(rank=args.rank, alpha=args.alpha, target_modules=modules, steps=args.steps, lr=args.lr,
                          batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed)
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise ValueError(f"--out {args.out!r} exists and is not a directory")
        records = read_jsonl(args.data)
        if args.threads > 0:  # on shared CPUs one thread can beat two that spin against other jobs
            torch.set_num_threads(args.threads)
        loaded = load_model(args.model, "float32", args.device)
        autocast = use_autocast(loaded.device, args.dtype)
        if autocast:  # bf16 base weights: what the server runs, and no per-step weight casts
            loaded.model.to(torch.bfloat16)
        examples = tokenize_records(loaded.tokenizer, records, cfg.seq_len)
        print(f"training {len(examples)} examples on {loaded.name} ({loaded.device}, "
              f"{'bf16 autocast' if autocast else 'fp32'})", file=sys.stderr)
        result = train_lora(loaded.model, examples, cfg, autocast=autocast, progress=not args.no_progress)
        base_name = DEFAULT_HF_NAME if args.model == "default" else args.model
        save_dtype = torch.float16 if args.save_dtype == "float16" else torch.float32
        out = save_peft(args.out, result.weights, cfg, base_name, save_dtype)
        print(f"saved {out} (loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f})", file=sys.stderr)
        if args.upload:
            info = upload_adapter(args.upload, out, args.name or out.resolve().name, args.admin_key, args.replace)
            print(f"uploaded to {args.upload}: {json.dumps(info)[:200]}", file=sys.stderr)
    except (ValueError, ModelLoadError, OSError, RuntimeError) as e:
        print(f"loramux train: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # httpx transport errors and the like: still one line
        print(f"loramux train: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loramux train", description="Train a LoRA adapter (PEFT format).")
    add_train_arguments(parser)
    return run_train(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
