"""Wiring: model + adapters + slot pool + scheduler + runner -> `LLMEngine` / `AsyncEngine`.

`build_llm_engine` is what tests and the in-process benchmark use (explicit sizes);
`build_async_engine(settings)` is what `loramux serve` uses (sizes from `ServerSettings`).
The KV pool is allocated once here: `kv_cache_tokens` tokens, or on CUDA a fraction of free
device memory when not given.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch

from adapters.manager import AdapterManager
from adapters.slots import SlotPool
from adapters.spec import BaseModelSpec
from adapters.validate import ValidationLimits
from server.adapter_service import AdapterService
from server.async_engine import AsyncEngine
from server.config import CacheConfig, LoRASettings, SchedulerConfig, check_compatible
from server.engine import LLMEngine
from server.engine_thread import EngineThread
from server.model.cpu_linear import prepack_linears
from server.model.loader import LoadedModel, load_model
from server.model.lora import attach_lora
from server.runner import ModelRunner, kv_bytes_per_block
from server.scheduler import Scheduler

log = logging.getLogger("loramux.engine")

DEFAULT_CPU_KV_TOKENS = 65536


def base_spec(loaded: LoadedModel) -> BaseModelSpec:
    cfg = loaded.config
    return BaseModelSpec(cfg.num_hidden_layers, cfg.projection_dims(), cfg.architecture)


def model_info(loaded: LoadedModel, max_lora_rank: int) -> dict:
    cfg = loaded.config
    return {
        "architecture": cfg.architecture,
        "num_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "projections": {m: list(d) for m, d in cfg.projection_dims().items()},
        "max_lora_rank": max_lora_rank,
        "dtype": str(loaded.dtype).replace("torch.", ""),
        "device": str(loaded.device),
    }


def cpu_fast_paths(engine: LLMEngine) -> dict:
    """What the CPU fast paths are doing, for operators (`GET /v1/models`): empty on other devices."""
    if engine.runner.device.type != "cpu":
        return {}
    from kernels import cpu_ext
    from server.model.cpu_linear import PackedLinear

    packed = [m for m in engine.runner.model.modules() if isinstance(m, PackedLinear)]
    fused = getattr(getattr(engine.runner.model, "model", None), "cpu_ops", None) is not None
    return {"cpu_prepacked_linears": len(packed), "cpu_own_gemm_linears": sum(m.kind != "onednn" for m in packed),
            "cpu_lora_kernel": cpu_ext.status(), "cpu_fused_layer_ops": fused}


def build_llm_engine(
    loaded: LoadedModel,
    *,
    manager: AdapterManager | None = None,
    kv_cache_tokens: int | None = None,
    block_size: int = 16,
    max_num_seqs: int = 64,
    max_num_batched_tokens: int = 2048,
    max_slots: int = 8,
    max_lora_rank: int = 64,
    host_cache_size: int = 64,
    max_model_len: int | None = None,
    max_waiting: int = 1024,
    starvation_steps: int = 16,
) -> LLMEngine:
    """An engine over `loaded`; LoRA is enabled when `manager` is given."""
    model, cfg = loaded.model, loaded.config
    num_blocks = _num_blocks(loaded, kv_cache_tokens, block_size)
    cache_cfg = CacheConfig(block_size=block_size, num_blocks=num_blocks)
    model_len = min(cfg.max_position_embeddings, cache_cfg.max_tokens())
    if max_model_len is not None:
        model_len = min(model_len, max_model_len)
    sched_cfg = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max(max_num_batched_tokens, max_num_seqs),
        max_adapters_per_batch=max_slots,
        max_model_len=model_len,
        max_waiting=max_waiting,
        starvation_steps=starvation_steps,
    )
    if loaded.device.type == "cpu":  # build (or load the cached) C++ ops first: the bf16 packing uses them
        from kernels import cpu_ext

        cpu_ext.load()
    packed = prepack_linears(model, batch_hint=max_num_seqs)  # CPU only; a no-op elsewhere
    if packed:
        log.info("pre-packed %d linear weights for oneDNN", packed)
    pool = None
    if manager is not None:
        lora = LoRASettings(max_slots=max_slots, max_lora_rank=max_lora_rank,
                            host_cache_size=max(host_cache_size, max_slots))
        check_compatible(sched_cfg, lora)
        pool = SlotPool(manager.spec, lora.max_slots, lora.max_lora_rank, loaded.dtype, loaded.device,
                        lora.host_cache_size, fetch=manager.registry.weights)
        manager.registry.add_retire_listener(lambda ref: pool.evict(ref.id))
        attach_lora(model, pool)
    if loaded.device.type == "cpu":  # build (or load the cached) fused CPU ops now, not on a request
        from kernels import cpu_ext
        from server.model.cpu_ops import enable_cpu_ops

        enable_cpu_ops(model)
        log.info("fused CPU ops (LoRA kernel, decoder-layer ops): %s", cpu_ext.status())
    runner = ModelRunner(model, num_blocks, block_size, pool, loaded.tokenizer.eos_token_ids)
    return LLMEngine(Scheduler(sched_cfg, cache_cfg), runner, loaded.tokenizer)


def _num_blocks(loaded: LoadedModel, kv_cache_tokens: int | None, block_size: int) -> int:
    if kv_cache_tokens is not None:
        return max(1, -(-kv_cache_tokens // block_size))
    if loaded.device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(loaded.device)
        per_block = kv_bytes_per_block(loaded.model, block_size, loaded.dtype)
        return max(1, int(free * 0.85) // per_block)
    return DEFAULT_CPU_KV_TOKENS // block_size


def build_async_engine(settings) -> AsyncEngine:
    """Load and wire everything on a fresh engine thread, which then runs the step loop."""
    worker = EngineThread()
    try:
        return worker.call(lambda: _build_async_engine(settings, worker))
    except BaseException:
        worker.stop()
        raise


def _build_async_engine(settings, worker: EngineThread) -> AsyncEngine:
    loaded = load_model(settings.model, settings.dtype, settings.device)
    spec = base_spec(loaded)
    adapter_dir = settings.adapter_dir or str(Path(tempfile.gettempdir()) / "loramux-adapters")
    Path(adapter_dir).mkdir(parents=True, exist_ok=True)
    manager = AdapterManager(adapter_dir, spec, ValidationLimits(max_rank=settings.max_lora_rank))
    for name, err in manager.load_all():
        log.warning("skipping adapter %r: %s", name, err)
    engine = build_llm_engine(
        loaded,
        manager=manager,
        kv_cache_tokens=settings.kv_cache_tokens,
        max_num_seqs=settings.max_batch_size,
        max_slots=settings.max_adapters_per_batch,
        max_lora_rank=settings.max_lora_rank,
        max_waiting=settings.max_waiting,
    )
    return AsyncEngine(
        engine,
        AdapterService(manager),
        model_name=loaded.name,
        info={**model_info(loaded, settings.max_lora_rank), **cpu_fast_paths(engine)},
        max_model_len=engine.scheduler.cfg.max_model_len,
        max_waiting=settings.max_waiting,
        step_stall_s=settings.step_stall_s,
        worker=worker,
    )
