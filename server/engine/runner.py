"""The model runner: the only place that turns scheduled requests into tensors.

Per step (`execute(sched_out)`):
  1. order the scheduled requests by adapter slot (stable), so that each adapter's rows form one
     contiguous segment of the flattened batch (SGMV walks segments, BGMV walks rows);
  2. make the step's adapters (the `AdapterRef`s the requests carry) resident in device slots
     (`SlotPool.prepare`, never evicting one this step uses), build one `LoRABatch` (token -> slot
     map, segments) and let the LoRA backend prepare its plan for the step, once;
  3. flatten the step to `[num_tokens]` ids, positions and KV slot mapping plus per-sequence
     block tables in one `ForwardContext`; run it through the decode executor when one is set and
     takes the step (the CPU all-layers loop), else through the model; take logits only at the
     last position of each sequence that samples, and sample all those rows in one batched call.
     Structured-output rows: their grammar masks are started before the model is called and joined
     before sampling (server/engine/grammar_masks.py), so they are computed while the model runs.
Returns `StepResult` (token per request id, logprobs per request id, requests whose grammar
finished). No scheduling decisions here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.batch import LoRABatch
from server.engine.grammar_masks import GrammarMasks
from server.engine.outputs import TokenLogprob
from server.engine.sampler import Sampler, SamplingMetadata, make_generator
from server.engine.schedule_plan import ScheduledRequest, SchedulerOutput
from server.model.attention import allocate_kv_cache
from server.model.context import make_context
from server.model.llama import LlamaForCausalLM


@dataclass(slots=True)
class StepResult:
    sampled: dict[str, int]  # request id -> sampled token (only rows with do_sample)
    logprobs: dict[str, TokenLogprob] | None
    num_tokens: int  # rows in the flattened batch
    grammar_done: frozenset[str] = frozenset()  # structured requests whose grammar has finished

_MIN_LOGPROB = -9999.0  # masked tokens' -inf logprobs are reported as this (JSON has no -inf), as vLLM


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        num_blocks: int,
        block_size: int,
        slot_pool=None,  # adapters.slots.SlotPool or None when LoRA is off
        eos_token_ids: tuple[int, ...] = (),
        lora_backend=None,  # the kernels backend the LoRA layers were bound with (prepare() per step)
    ) -> None:
        self.model = model
        weight = model.model.norm.weight  # a float tensor in the compute dtype (linears may be quantized)
        self.device, self.dtype = weight.device, weight.dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.kv_caches = allocate_kv_cache(model.config, num_blocks, block_size, self.dtype, self.device)
        model.bind_kv_cache(self.kv_caches)
        self.slot_pool = slot_pool
        self.lora_backend = lora_backend
        self.decode_executor = None  # e.g. server.engine.cpu_decode_loop.CPUDecodeLoop, set by the builder
        self.sampler = Sampler()
        self.eos_token_ids = eos_token_ids
        self._generators: dict[str, torch.Generator] = {}  # seeded requests' own RNGs
        self.grammar = GrammarMasks(eos_token_ids)  # structured requests' matchers and the step's masks

    def forget(self, request_id: str) -> None:
        """Drop per-request state (the generator) once a request has finished."""
        self._generators.pop(request_id, None)
        self.grammar.forget(request_id)

    @torch.inference_mode()
    def execute(self, sched_out: SchedulerOutput) -> StepResult:
        """Run one step."""
        slots: dict[int, int] = {}
        if sched_out.adapter_keys:
            if self.slot_pool is None:
                raise RuntimeError("a request names an adapter but LoRA is not enabled")
            # The requests carry their refs: the step's distinct adapters, in a stable order.
            refs = {sr.request.adapter for sr in sched_out.scheduled if sr.request.adapter is not None}
            slots = self.slot_pool.prepare(sorted(refs, key=lambda r: r.id))

        def slot_of(sr: ScheduledRequest) -> int:
            key = sr.request.adapter_key
            return -1 if key is None else slots[key]

        order = sorted(sched_out.scheduled, key=slot_of)  # stable: keeps running-first within a slot
        ctx, input_ids, sample_rows = self._build_inputs(order, slot_of)
        reqs = [sr.request for _, sr in sample_rows]
        pending = self.grammar.start(reqs)  # grammar masks: computed by a worker while the model runs
        try:
            hidden = self.decode_executor.run(input_ids, ctx) if self.decode_executor is not None else None
            if hidden is None:
                hidden = self.model(input_ids, ctx)  # [T, hidden]
        finally:
            bitmask = self.grammar.join(pending)  # [N, W] int32 or None
        if not sample_rows:
            return StepResult({}, None, int(input_ids.shape[0]))
        idx = torch.tensor([row for row, _ in sample_rows], dtype=torch.long, device=self.device)
        logits = self.model.compute_logits(hidden.index_select(0, idx))  # [N, vocab] fp32
        meta = SamplingMetadata.from_params(
            [r.sampling_params for r in reqs],
            [r.num_output_tokens for r in reqs],
            [self._generator(r) for r in reqs],
            [r.eos_token_ids or self.eos_token_ids for r in reqs],
            self.device,
            output_token_ids=[r.output_token_ids for r in reqs],
            prompt_token_ids=[r.prompt_token_ids for r in reqs],
            vocab_size=int(logits.shape[1]),
            allowed_bitmask=bitmask,
        )
        out = self.sampler(logits, meta)
        token_ids = out.token_ids.tolist()  # the step's one host sync
        done = frozenset(self.grammar.advance(reqs, token_ids)) if pending is not None else frozenset()
        sampled = {r.request_id: t for r, t in zip(reqs, token_ids, strict=True)}
        logprobs = None
        if out.logprobs is not None:
            logprobs = {}
            chosen = out.logprobs.clamp(min=_MIN_LOGPROB).tolist()
            top_ids, top_lps = out.top_ids.tolist(), out.top_logprobs.clamp(min=_MIN_LOGPROB).tolist()
            for i, r in enumerate(reqs):
                k = r.sampling_params.logprobs
                if k is None:
                    continue
                top = tuple(zip(top_ids[i][:k], top_lps[i][:k], strict=True))
                logprobs[r.request_id] = TokenLogprob(token_ids[i], chosen[i], top)
        return StepResult(sampled, logprobs, int(input_ids.shape[0]), done)

    # --- helpers -----------------------------------------------------------------------------
    def _generator(self, req) -> torch.Generator | None:
        seed = req.sampling_params.seed
        if seed is None:
            return None
        gen = self._generators.get(req.request_id)
        if gen is None:
            gen = self._generators[req.request_id] = make_generator(seed, self.device)
        return gen

    def _build_inputs(self, order: list[ScheduledRequest], slot_of):
        """Flatten the step: token ids, one ForwardContext (+ LoRABatch), rows that sample."""
        ids: list[int] = []
        positions: list[list[int]] = []
        tables: list[list[int]] = []
        token_slots: list[int] = []
        sample_rows: list[tuple[int, ScheduledRequest]] = []
        for sr in order:
            ids.extend(sr.token_ids)
            positions.append(list(range(sr.start, sr.start + sr.num_new_tokens)))
            tables.append(list(sr.block_ids))
            token_slots.extend([slot_of(sr)] * sr.num_new_tokens)
            if sr.do_sample:
                sample_rows.append((len(ids) - 1, sr))
        ctx = make_context(positions, tables, self.block_size, self.device)
        if any(s >= 0 for s in token_slots):
            ctx.lora = self.lora_backend.prepare(LoRABatch.build(token_slots, self.device))
        return ctx, torch.tensor(ids, dtype=torch.int64, device=self.device), sample_rows


def kv_bytes_per_block(model: LlamaForCausalLM, block_size: int, dtype: torch.dtype) -> int:
    cfg = model.config
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim
    return per_token * block_size * torch.empty((), dtype=dtype).element_size()
