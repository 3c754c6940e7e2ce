"""Wiring: model + adapters + slot pool + scheduler + runner -> `LLMEngine` / `AsyncEngine`.

`build_llm_engine(loaded, manager, scheduler=, cache=, lora=)` is what tests and the in-process
benchmark use (one config object per concern, server/engine/config.py); `build_async_engine(settings)`
is what `loramux serve` uses (`engine_configs(settings)` maps the flags onto those objects).
The KV pool is allocated once here: `kv_cache_tokens` tokens, or on CUDA a fraction
(`CacheConfig.memory_fraction`) of free device memory when not given. The LoRA backend (one per
device kind, kernels/backend.py; env LORAMUX_LORA_BACKEND forces one) and, on the CPU, the fused
layer ops and the all-layers decode executor are chosen here, once.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from pathlib import Path

import torch

from adapters.manager import AdapterManager
from adapters.slots import SlotPool
from adapters.spec import BaseModelSpec
from adapters.validate import ValidationLimits
from kernels import cpu_ext, make_backend
from server.engine.async_engine import AsyncEngine
from server.engine.config import CacheConfig, LoRASettings, SchedulerConfig, check_compatible
from server.engine.cpu_decode_loop import CPUDecodeLoop
from server.engine.engine_thread import EngineThread
from server.engine.llm_engine import LLMEngine
from server.engine.runner import ModelRunner, kv_bytes_per_block
from server.engine.scheduler import Scheduler
from server.model.cpu_linear import PackedLinear, prepack_linears
from server.model.cpu_ops import cpu_ops_enabled, enable_cpu_ops
from server.model.loader import LoadedModel, load_model
from server.model.lora import attach_lora
from server.model.quant_linear import apply_quantization, weight_report
from server.settings import ServerSettings

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
        "quantize": loaded.quantize,
        **weight_report(loaded.model),  # weight_format, resident_weight_bytes, weight_bytes_by_format
    }


def kv_cache_info(engine: LLMEngine) -> dict:
    """The KV cache as operators size it (`GET /v1/models`): bytes per token (all layers, K and V),
    capacity, block size, the resolved max model length and whether prefix caching is on."""
    runner, bm = engine.runner, engine.scheduler.block_manager
    per_block = kv_bytes_per_block(runner.model, bm.block_size, runner.dtype)
    return {"kv_bytes_per_token": per_block // bm.block_size, "kv_cache_tokens": bm.num_blocks * bm.block_size,
            "kv_block_size": bm.block_size, "max_model_len": engine.scheduler.cfg.max_model_len,
            "prefix_caching": bm.enable_caching}


def cpu_fast_paths(engine: LLMEngine) -> dict:
    """What the CPU fast paths are doing, for operators (`GET /v1/models`): empty on other devices."""
    if engine.runner.device.type != "cpu":
        return {}
    packed = [m for m in engine.runner.model.modules() if isinstance(m, PackedLinear)]
    return {"cpu_prepacked_linears": len(packed), "cpu_own_gemm_linears": sum(m.kind != "onednn" for m in packed),
            "cpu_lora_kernel": cpu_ext.status(), "cpu_fused_layer_ops": cpu_ops_enabled(engine.runner.model),
            "cpu_decode_loop": engine.runner.decode_executor is not None}


def build_llm_engine(
    loaded: LoadedModel,
    manager: AdapterManager | None = None,
    *,
    scheduler: SchedulerConfig | None = None,
    cache: CacheConfig | None = None,
    lora: LoRASettings | None = None,
    kv_cache_tokens: int | None = None,
    lora_backend: str = "auto",
) -> LLMEngine:
    """An engine over `loaded`; LoRA is enabled when `manager` is given. Each concern's settings come
    as its own config object (defaults: the dataclasses' own); `kv_cache_tokens` sizes the KV pool
    (None: DEFAULT_CPU_KV_TOKENS on the CPU, a share of free memory on CUDA). Order matters and is
    fixed here: C++ ops loaded -> linears packed -> LoRA attached -> fused ops substituted -> the
    decode executor built from the finished model."""
    if loaded.quant:  # quantized base weights: substituted before anything binds the modules
        apply_quantization(loaded)
    model, cfg = loaded.model, loaded.config
    scheduler, lora = scheduler or SchedulerConfig(), lora or LoRASettings()
    cache = cache or CacheConfig()
    num_blocks = cache.num_blocks or _num_blocks(loaded, kv_cache_tokens, cache)
    cache = cache.resolved(num_blocks)
    model_len = resolve_max_model_len(scheduler.max_model_len, cfg.max_position_embeddings, cache.max_tokens())
    # The per-step adapter cap is the device slot count (LoRASettings.max_slots is its one source).
    scheduler = dataclasses.replace(scheduler, max_model_len=model_len, max_adapters_per_batch=lora.max_slots,
                                    max_num_batched_tokens=max(scheduler.max_num_batched_tokens, scheduler.max_num_seqs),
                                    attention_cost_len=scheduler.attention_cost_len or attention_cost_len(cfg))
    on_cpu = loaded.device.type == "cpu"
    if on_cpu:  # build (or load the cached) C++ ops first: the packed layouts and the fused ops use them
        cpu_ext.load()
    packed = prepack_linears(model, batch_hint=scheduler.max_num_seqs)  # CPU only; a no-op elsewhere
    if packed:
        log.info("pre-packed %d linear weights", packed)
    pool = backend = None
    if manager is not None:
        lora = dataclasses.replace(lora, host_cache_size=max(lora.host_cache_size, lora.max_slots))
        check_compatible(scheduler, lora)
        pool = SlotPool(manager.spec, lora.max_slots, lora.max_lora_rank, loaded.dtype, loaded.device,
                        lora.host_cache_size, fetch=manager.registry.weights)
        manager.registry.add_retire_listener(lambda ref: pool.evict(ref.id))
        backend = make_backend(loaded.device, os.environ.get("LORAMUX_LORA_BACKEND", lora_backend))
        attach_lora(model, pool, backend)
    runner = ModelRunner(model, num_blocks, cache.block_size, pool, loaded.tokenizer.eos_token_ids, backend)
    if loaded.device.type == "cuda":  # attention reads the paged cache in place (Triton)
        from server.model.triton_attention import enable_triton_attention

        enable_triton_attention(model)
    if on_cpu and enable_cpu_ops(model):  # after LoRA: the executor binds the finished layers
        runner.decode_executor = CPUDecodeLoop(model)
        runner.decode_executor.build()
    if on_cpu:
        log.info("fused CPU ops (LoRA kernel, decoder-layer ops): %s", cpu_ext.status())
    return LLMEngine(Scheduler(scheduler, cache), runner, loaded.tokenizer)


def resolve_max_model_len(requested: int | None, model_context: int, kv_tokens: int) -> int:
    """--max-model-len: auto is the model's context, lowered with a warning to what the KV cache
    holds; an explicit value beyond either is refused (one request could never run)."""
    if requested is None:
        if kv_tokens < model_context:
            log.warning("max model length lowered from the model's context (%d) to the KV cache's capacity "
                        "(%d tokens); raise --kv-cache-tokens to serve longer sequences", model_context, kv_tokens)
        return min(model_context, kv_tokens)
    if requested > model_context:
        raise ValueError(f"--max-model-len: {requested} exceeds the model's context ({model_context} tokens)")
    if requested > kv_tokens:
        raise ValueError(f"--max-model-len: {requested} exceeds what the KV cache holds ({kv_tokens} tokens); "
                         "raise --kv-cache-tokens or lower --max-model-len")
    return requested


def attention_cost_len(cfg) -> float:
    """The context length at which one token's attention costs as many FLOPs as its linear layers:
    linear = 2 x (q, k, v, o, gate, up, down weights) per token; attention = 2 x 2 x heads x head_dim
    per context token (QK^T and PV). SmolLM2-135M: 3,072; Llama-3-8B: 26,624 (the scheduler's cost model)."""
    weights = sum(i * o for i, o in cfg.projection_dims().values())
    return 2 * weights / (4 * cfg.num_attention_heads * cfg.head_dim)


def _num_blocks(loaded: LoadedModel, kv_cache_tokens: int | None, cache: CacheConfig) -> int:
    block_size = cache.block_size
    if kv_cache_tokens is not None:
        return max(1, -(-kv_cache_tokens // block_size))
    if loaded.device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(loaded.device)
        per_block = kv_bytes_per_block(loaded.model, block_size, loaded.dtype)
        return max(1, int(free * cache.memory_fraction) // per_block)
    return DEFAULT_CPU_KV_TOKENS // block_size


SLOT_MEMORY_SHARE = 0.10  # auto --max-adapters-per-batch: slot buffers take at most this share of memory


def slot_bytes(spec: BaseModelSpec, max_rank: int, dtype_bytes: int) -> int:
    """Bytes one device adapter slot costs: A [r, in] and B [out, r] of every projection of every layer."""
    return spec.num_layers * max_rank * dtype_bytes * sum(i + o for i, o in spec.module_dims.values())


def auto_adapter_slots(spec: BaseModelSpec, max_rank: int, dtype_bytes: int, memory_bytes: int,
                       max_batch_size: int) -> int:
    """The default --max-adapters-per-batch: one slot per batch row, capped so the slot buffers take
    at most SLOT_MEMORY_SHARE of `memory_bytes`; at least 1."""
    fit = int(memory_bytes * SLOT_MEMORY_SHARE) // max(1, slot_bytes(spec, max_rank, dtype_bytes))
    return max(1, min(max_batch_size, fit))


def _memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def engine_configs(settings: ServerSettings, adapter_slots: int | None = None,
                   ) -> tuple[SchedulerConfig, CacheConfig, LoRASettings]:
    """The engine's config objects from the server's flags (every other value: the configs' defaults).
    `adapter_slots` is the auto slot count (used when --max-adapters-per-batch is auto; without it, 8)."""
    sched = SchedulerConfig(max_num_seqs=settings.max_batch_size, max_waiting=settings.max_waiting,
                            max_num_batched_tokens=settings.max_num_batched_tokens,
                            max_model_len=settings.max_model_len,
                            max_decode_stall=settings.max_decode_stall or None)
    slots = settings.max_adapters_per_batch or adapter_slots or min(8, settings.max_batch_size)
    lora = LoRASettings(max_slots=slots, max_lora_rank=settings.max_lora_rank,
                        host_cache_size=max(settings.max_cpu_adapters, slots))
    cache = CacheConfig(memory_fraction=settings.gpu_memory_utilization,
                        enable_prefix_caching=settings.prefix_caching == "on")
    return sched, cache, lora


def build_async_engine(settings: ServerSettings) -> AsyncEngine:
    """Load and wire everything on a fresh engine thread, which then runs the step loop."""
    worker = EngineThread()
    try:
        return worker.call(lambda: _build_async_engine(settings, worker))
    except BaseException:
        worker.stop()
        raise


def _build_async_engine(settings: ServerSettings, worker: EngineThread) -> AsyncEngine:
    loaded = load_model(settings.model, settings.dtype, settings.device, settings.quantize)
    spec = base_spec(loaded)
    adapter_dir = settings.adapter_dir or str(Path(tempfile.gettempdir()) / "loramux-adapters")
    Path(adapter_dir).mkdir(parents=True, exist_ok=True)
    manager = AdapterManager(adapter_dir, spec, ValidationLimits(max_rank=settings.max_lora_rank))
    for name, err in manager.load_all():
        log.warning("skipping adapter %r: %s", name, err)
    auto_slots = None
    if settings.max_adapters_per_batch is None:
        auto_slots = auto_adapter_slots(spec, settings.max_lora_rank, loaded.dtype.itemsize,
                                        _memory_bytes(loaded.device), settings.max_batch_size)
        log.info("adapter slots (auto): %d, %.1f MB each", auto_slots,
                 slot_bytes(spec, settings.max_lora_rank, loaded.dtype.itemsize) / 1e6)
    sched, cache, lora = engine_configs(settings, auto_slots)
    engine = build_llm_engine(loaded, manager, scheduler=sched, cache=cache, lora=lora,
                              kv_cache_tokens=settings.kv_cache_tokens)
    return AsyncEngine(
        engine,
        manager,
        model_name=loaded.name,
        info={**model_info(loaded, settings.max_lora_rank), **kv_cache_info(engine), **cpu_fast_paths(engine)},
        max_model_len=engine.scheduler.cfg.max_model_len,
        max_waiting=settings.max_waiting,
        step_stall_s=settings.step_stall_s,
        worker=worker,
    )
