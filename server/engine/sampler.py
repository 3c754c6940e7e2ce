"""Batched next-token sampling: logits [N, V] + per-row settings -> token ids and logprobs.

The runner gathers the last-position logits of every `do_sample` row into one float32 `[N, V]`
tensor, builds a `SamplingMetadata` with `SamplingMetadata.from_params` (one row per request,
in batch order) and calls `Sampler()(logits, meta)`. Per row, all rows at once (tensors, never a
Python loop over the vocabulary):
  1. penalties (rows that ask for them): vLLM's repetition_penalty over prompt + generated tokens
     (a seen token's logit is divided by p when positive, multiplied by p otherwise), then OpenAI's
     frequency and presence penalties over the generated tokens
     (logit -= count * frequency_penalty + (count > 0) * presence_penalty);
  2. logit_bias added;
  3. bans to -inf: EOS (unless ignore_eos) and stop_token_ids while the output is shorter than
     min_tokens, and every token the row's grammar does not allow (structured output: an int32
     bitmask [N, ceil(V/32)] computed by the runner while the forward pass ran);
  4. greedy rows (temperature 0) take the argmax;
  5. other rows divide by their temperature, keep their top-k, then the minimal top-p nucleus,
     and draw with the exponential race: token = argmax(p / q), q ~ Exp(1) i.i.d. per token,
     which picks token i with probability p_i. Seeded rows draw q from their own
     `torch.Generator` (made once per request with `make_generator`), so their tokens do not
     depend on the other rows of the batch; unseeded rows share one draw from the global RNG.
Logprobs are those of the distribution sampled from, at temperature 1: log_softmax of the logits
after steps 1-3 (penalties, bias, min_tokens bans, grammar masks), before temperature, top-k and
top-p. With none of those in play they are the model's raw log_softmax, as OpenAI reports them.
`top_ids`/`top_logprobs` hold the k best for k = the largest `logprobs` asked in the batch.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kernels import cpu_ext
from server.engine.sampling_params import SamplingParams


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """The per-request RNG of a seeded request: created once, kept across its steps."""
    return torch.Generator(device=device).manual_seed(seed)


@dataclass(slots=True)
class SamplingMetadata:
    """Per-row sampling settings of one step, as tensors on the logits' device."""

    temperature: torch.Tensor  # [N] float32, 0 = greedy
    top_k: torch.Tensor  # [N] long, 0 = off
    top_p: torch.Tensor  # [N] float32, 1 = off
    generators: list[torch.Generator | None]  # [N]; None = global RNG
    banned_rows: torch.Tensor  # [M] long: (row, token) pairs to mask with -inf
    banned_cols: torch.Tensor  # [M] long
    num_logprobs: int | None  # max logprobs asked in the batch; None = nobody asked
    all_greedy: bool
    no_top_k_top_p: bool
    penalties: Penalties | None = None  # None: no row asks for one
    bias_rows: torch.Tensor | None = None  # [B] long: logit_bias entries (row, token, bias)
    bias_cols: torch.Tensor | None = None  # [B] long
    bias_vals: torch.Tensor | None = None  # [B] float32
    allowed_bitmask: torch.Tensor | None = None  # [N, ceil(V/32)] int32, bit t of row i = token t allowed

    @classmethod
    def from_params(
        cls,
        params: Sequence[SamplingParams],
        output_lens: Sequence[int],
        generators: Sequence[torch.Generator | None] | None,
        eos_token_ids: Sequence[int] | Sequence[Sequence[int]],
        device: torch.device | str,
        *,
        output_token_ids: Sequence[Sequence[int]] | None = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        vocab_size: int | None = None,
        allowed_bitmask: torch.Tensor | None = None,
    ) -> SamplingMetadata:
        """Build from one `SamplingParams` per row.

        output_lens: tokens generated so far per row (drives min_tokens bans).
        output_token_ids / prompt_token_ids / vocab_size: each row's tokens, needed only when a row
        asks for a penalty. allowed_bitmask: the rows' grammar masks (all bits set = unconstrained).
        generators: per-row generator or None (global RNG); None for "no generators at all".
        eos_token_ids: one tuple for every row, or one tuple per row.
        """
        n = len(params)
        if len(output_lens) != n:
            raise ValueError("output_lens: one entry per row expected")
        gens = list(generators) if generators is not None else [None] * n
        if len(gens) != n:
            raise ValueError("generators: one entry per row expected")
        # Greedy rows draw nothing, so their generators are left untouched.
        gens = [None if sp.greedy else g for sp, g in zip(params, gens, strict=True)]
        per_row_eos = n > 0 and len(eos_token_ids) > 0 and not isinstance(eos_token_ids[0], int)
        if per_row_eos and len(eos_token_ids) != n:
            raise ValueError("eos_token_ids: one tuple per row expected")

        rows: list[int] = []
        cols: list[int] = []
        for i, (sp, out_len) in enumerate(zip(params, output_lens, strict=True)):
            if out_len >= sp.min_tokens:
                continue
            eos = eos_token_ids[i] if per_row_eos else eos_token_ids
            banned = set(sp.stop_token_ids) | (set() if sp.ignore_eos else set(eos))
            rows.extend([i] * len(banned))
            cols.extend(sorted(banned))

        penalties = None
        if any(sp.has_penalties for sp in params):
            if output_token_ids is None or prompt_token_ids is None or vocab_size is None:
                raise ValueError("penalties need output_token_ids, prompt_token_ids and vocab_size")
            penalties = Penalties.build(params, output_token_ids, prompt_token_ids, vocab_size, device)
        b_rows = [i for i, sp in enumerate(params) for _ in sp.logit_bias]
        b_cols = [t for sp in params for t, _ in sp.logit_bias]
        b_vals = [b for sp in params for _, b in sp.logit_bias]

        asked = [sp.logprobs for sp in params if sp.logprobs is not None]
        top_k = [sp.top_k if sp.top_k > 0 else 0 for sp in params]
        return cls(
            temperature=torch.tensor([sp.temperature for sp in params], dtype=torch.float32, device=device),
            top_k=torch.tensor(top_k, dtype=torch.long, device=device),
            top_p=torch.tensor([sp.top_p for sp in params], dtype=torch.float32, device=device),
            generators=gens,
            banned_rows=torch.tensor(rows, dtype=torch.long, device=device),
            banned_cols=torch.tensor(cols, dtype=torch.long, device=device),
            num_logprobs=max(asked) if asked else None,
            all_greedy=all(sp.greedy for sp in params),
            no_top_k_top_p=all(k == 0 for k in top_k) and all(sp.top_p >= 1.0 for sp in params),
            penalties=penalties,
            bias_rows=torch.tensor(b_rows, dtype=torch.long, device=device) if b_rows else None,
            bias_cols=torch.tensor(b_cols, dtype=torch.long, device=device) if b_rows else None,
            bias_vals=torch.tensor(b_vals, dtype=torch.float32, device=device) if b_rows else None,
            allowed_bitmask=allowed_bitmask,
        )


@dataclass(slots=True)
class Penalties:
    """Per-row penalty factors and token statistics, as tensors."""

    presence: torch.Tensor  # [N, 1] float32
    frequency: torch.Tensor  # [N, 1] float32
    repetition: torch.Tensor  # [N, 1] float32, 1 = off
    output_counts: torch.Tensor  # [N, V] float32: times each token was generated
    seen: torch.Tensor  # [N, V] bool: in the prompt or generated (repetition_penalty's set)

    @classmethod
    def build(cls, params: Sequence[SamplingParams], output_ids: Sequence[Sequence[int]],
              prompt_ids: Sequence[Sequence[int]], vocab: int, device: torch.device | str) -> Penalties:
        n = len(params)
        # Generated tokens of the rows that penalise, padded with the id `vocab` (a scratch column).
        outs = [list(o) if sp.has_penalties else [] for sp, o in zip(params, output_ids, strict=True)]
        counts = _count(outs, n, vocab, device)  # [N, V]
        seen = counts > 0
        if any(sp.repetition_penalty != 1.0 for sp in params):
            prompts = [list(p) if sp.repetition_penalty != 1.0 else [] for sp, p in zip(params, prompt_ids, strict=True)]
            seen |= _count(prompts, n, vocab, device) > 0
        col = lambda xs: torch.tensor(xs, dtype=torch.float32, device=device).unsqueeze(1)  # noqa: E731
        return cls(col([sp.presence_penalty for sp in params]), col([sp.frequency_penalty for sp in params]),
                   col([sp.repetition_penalty for sp in params]), counts, seen)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """[N, V] -> [N, V] (a new tensor)."""
        rep = self.repetition.expand_as(logits)
        scaled = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(self.seen, scaled, logits)
        return logits - self.output_counts * self.frequency - (self.output_counts > 0).float() * self.presence


def _count(rows: list[list[int]], n: int, vocab: int, device) -> torch.Tensor:
    """[N, V] float32 occurrence counts of each row's token ids (ids >= vocab are ignored)."""
    width = max((len(r) for r in rows), default=0)
    counts = torch.zeros(n, vocab + 1, dtype=torch.float32, device=device)
    if width:
        padded = torch.full((n, width), vocab, dtype=torch.long, device=device)  # [N, L]
        for i, r in enumerate(rows):  # a loop over rows, not over the vocabulary
            if r:
                padded[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        padded.clamp_(max=vocab)
        counts.scatter_add_(1, padded, torch.ones(n, width, dtype=torch.float32, device=device))
    return counts[:, :vocab]


def bitmask_to_bool(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """int32 [N, W] -> bool [N, vocab]: bit (t % 32) of word t // 32 says whether token t is allowed;
    tokens past 32 * W are not allowed."""
    n, w = bitmask.shape
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts).bitwise_and_(1).view(n, w * 32).bool()  # [N, 32W]
    if w * 32 >= vocab:
        return bits[:, :vocab]
    return torch.cat([bits, bits.new_zeros(n, vocab - w * 32)], dim=1)


@dataclass(slots=True)
class SamplerOutput:
    token_ids: torch.Tensor  # [N] long
    logprobs: torch.Tensor | None  # [N] float32: raw logprob of the chosen token
    top_ids: torch.Tensor | None  # [N, k] long, best first
    top_logprobs: torch.Tensor | None  # [N, k] float32


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """[N, V] -> [N] index of each row's first maximum (NaN counts as the maximum), as
    `x.argmax(-1)`; on the CPU in fp32, the fused op once it is loaded (about 10x faster at V = 49k)."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and x.shape[1] > 0 and x.stride(-1) == 1:
        ext = cpu_ext.loaded()
        if ext is not None:
            return ext.argmax_rows(x)
    return x.argmax(dim=-1)


class Sampler:
    """Stateless; call it as `Sampler()(logits, meta)`."""

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != meta.temperature.shape[0]:
            raise ValueError(f"logits: expected [{meta.temperature.shape[0]}, V], got {tuple(logits.shape)}")
        logits = self.process(logits, meta)

        greedy_ids = argmax_rows(logits)  # [N]
        if meta.all_greedy:
            token_ids = greedy_ids
        else:
            token_ids = torch.where(meta.temperature == 0, greedy_ids, self._sample(logits, meta))

        if meta.num_logprobs is None:
            return SamplerOutput(token_ids, None, None, None)
        logprobs = torch.log_softmax(logits, dim=-1)  # [N, V]: the processed distribution
        chosen = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)  # [N]
        top_lp, top_ids = logprobs.topk(min(meta.num_logprobs, logprobs.shape[1]), dim=-1)  # [N, k]
        return SamplerOutput(token_ids, chosen, top_ids, top_lp)

    @staticmethod
    def process(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """Penalties, logit_bias, bans and grammar masks: [N, V] -> float32 [N, V] (never in place on
        the caller's tensor)."""
        logits = logits.float()
        copied = False
        if meta.penalties is not None:
            logits, copied = meta.penalties.apply(logits), True
        if meta.bias_rows is not None:
            if not copied:
                logits, copied = logits.clone(), True
            logits.index_put_((meta.bias_rows, meta.bias_cols), meta.bias_vals, accumulate=True)
        unbanned = None
        if meta.banned_rows.numel():
            if meta.allowed_bitmask is not None:
                unbanned = logits  # the grammar may have to overrule the bans (below)
            logits = logits.clone()
            logits[meta.banned_rows, meta.banned_cols] = float("-inf")
        if meta.allowed_bitmask is not None:
            allowed = bitmask_to_bool(meta.allowed_bitmask.to(logits.device), logits.shape[1])  # [N, V]
            logits = logits.masked_fill(~allowed, float("-inf"))
            if unbanned is not None:
                # A row whose grammar allows only tokens min_tokens bans (e.g. only EOS once the JSON
                # is complete) would have nothing left to sample: there the grammar wins, the ban yields.
                dead = torch.isneginf(logits).all(dim=-1)  # [N]
                if bool(dead.any()):
                    logits = torch.where(dead.unsqueeze(1), unbanned.masked_fill(~allowed, float("-inf")), logits)
        return logits

    def _sample(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """Random draw for every row (greedy rows are overwritten by the caller)."""
        temp = torch.where(meta.temperature > 0, meta.temperature, torch.ones_like(meta.temperature))
        scaled = logits / temp.unsqueeze(1)  # [N, V]
        if not meta.no_top_k_top_p:
            scaled = self._top_k_top_p(scaled, meta.top_k, meta.top_p)
        probs = torch.softmax(scaled, dim=-1)  # [N, V]
        return argmax_rows(probs.div_(self._exponential_noise(probs, meta.generators)))

    @staticmethod
    def _top_k_top_p(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
        """Mask to -inf all but each row's top-k tokens, then all but its minimal top-p nucleus."""
        n, v = scaled.shape
        # Stable descending sort: ties keep id order, so a row's result never depends on the batch.
        sorted_vals, sorted_idx = scaled.sort(dim=-1, descending=True, stable=True)  # [N, V] each
        rank = torch.arange(v, device=scaled.device).expand(n, v)  # [N, V]: position in the sort
        k = torch.where(top_k > 0, top_k.clamp(max=v), torch.full_like(top_k, v))  # [N]
        drop = rank >= k.unsqueeze(1)
        sorted_vals = sorted_vals.masked_fill(drop, float("-inf"))
        # Keep token j while the mass strictly before it is < top_p: the smallest set reaching
        # top_p (the first token is always kept). Rows with top_p = 1 skip this (rounding).
        probs = torch.softmax(sorted_vals, dim=-1)  # [N, V]
        mass_before = probs.cumsum(dim=-1) - probs
        drop_p = (mass_before >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
        sorted_vals = sorted_vals.masked_fill(drop_p, float("-inf"))
        # Back to vocabulary order.
        return torch.empty_like(scaled).scatter_(1, sorted_idx, sorted_vals)

    @staticmethod
    def _exponential_noise(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        """q ~ Exp(1), [N, V]; each seeded row from its own generator, the rest from the global RNG."""
        q = torch.empty_like(probs)
        unseeded = [i for i, g in enumerate(generators) if g is None]
        if len(unseeded) == len(generators):
            q.exponential_()
        else:
            if unseeded:
                idx = torch.tensor(unseeded, device=probs.device)
                q[idx] = torch.empty(len(unseeded), probs.shape[1], device=probs.device).exponential_()
            for i, g in enumerate(generators):
                if g is not None:  # the only per-row loop: each seeded row draws its own numbers
                    q[i].exponential_(generator=g)
        # Exp(1) can round to 0; 0/0 would give NaN, which argmax would pick.
        return q.clamp_(min=torch.finfo(q.dtype).tiny)
