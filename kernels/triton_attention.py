"""Triton paged attention for CUDA: decode (split along the context) and varlen chunked prefill.

Both kernels read K and V in place from the paged cache (no gather copy, no padding to a common length):
    kv_cache      [2, KVH, num_blocks, block_size, D]   0 = K, 1 = V; a token's slot is block * block_size + offset
    block_tables  [S, max_blocks] int32                 sequence i's blocks, in position order
    context_lens  [S]                                   keys of sequence i: positions 0 .. context_lens[i] - 1
The new tokens' K/V are written into the cache before these kernels run. Query head h reads KV head
h // G (G = H / KVH); the G query heads of one KV group are rows of one program, so each K/V tile is loaded
once for all of them. Scores, softmax and the output accumulator are fp32 (exp2 with log2(e) folded into
the scale); the output is written in q's dtype. `kernels/reference.py::paged_attention_reference` is the spec.

Decode (one query per sequence), grid (S, KVH, P): program p covers keys [p * PART, (p + 1) * PART)
(flash-decoding). With P = 1 it writes the output; otherwise each partition writes its running max, sum and
unnormalised accumulator to fp32 scratch and `_combine_kernel`, grid (S, H), merges the partitions.

Prefill, grid (S, query tiles of the longest query, KVH): a program holds BLOCK_Q consecutive queries of one
sequence x the G heads of one KV group (BLOCK_M = BLOCK_Q * BLOCK_G rows) and walks the keys up to its last
query's position, masking causally per row. Tiles past a sequence's query length exit early.

Loop bounds: compiled Triton takes runtime trip counts (DYNAMIC=True: only the tiles that hold keys are
visited). Triton 3.6's interpreter cannot (its range() converts the bound with int(<1-element array>),
which numpy 2.4 rejects), so there the loops run a constexpr count and the tiles past the end are masked.

The @triton.jit decoration is lazy (`_kernels()`), as in kernels/triton_sgmv.py, so TRITON_INTERPRET is
read when the kernels are first needed; the kernels use builtins only (tl.reduce with the standard combine
functions rather than tl.max/tl.sum, tl.full rather than tl.zeros) for the same reason.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
NEG_INF = tl.constexpr(float("-inf"))  # jitted code may only read constexpr globals


def _decode_kernel(
    q_ptr, kv_ptr, bt_ptr, ctx_ptr, out_ptr, m_ptr, l_ptr, acc_ptr,
    stride_qs, stride_qh,  # q [S, H, D], D contiguous
    stride_kv, stride_kh, stride_kb, stride_kt,  # kv_cache [2, KVH, blocks, block_size, D], D contiguous
    stride_bt,  # block_tables [S, max_blocks]
    stride_os, stride_oh,  # out [S, H, D]
    stride_ms, stride_mh,  # m, l [S, H, P] fp32, P contiguous; acc [S, H, P, D] fp32 contiguous
    scale_log2, head_dim,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    PART: tl.constexpr, PAGE: tl.constexpr, SPLIT: tl.constexpr, DYNAMIC: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """One sequence's query (the G heads of KV head kvh) over keys [part * PART, (part + 1) * PART)."""
    seq, kvh, part = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ctx = tl.load(ctx_ptr + seq)
    lo = part * PART
    g = tl.arange(0, BLOCK_G)
    dd = tl.arange(0, BLOCK_D)
    gmask, dmask = g < GROUP, dd < head_dim
    heads = kvh * GROUP + g
    m = tl.full((BLOCK_G,), NEG_INF, tl.float32)  # running max of scores * log2(e)
    lsum = tl.full((BLOCK_G,), 0.0, tl.float32)
    acc = tl.full((BLOCK_G, BLOCK_D), 0.0, tl.float32)
    if lo < ctx:  # else: a partition past this sequence's end (its max stays -inf, the combine skips it)
        hi = tl.minimum(ctx, lo + PART)
        q = tl.load(q_ptr + seq.to(tl.int64) * stride_qs + heads[:, None] * stride_qh + dd[None, :],
                    mask=gmask[:, None] & dmask[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
        k_base = kv_ptr + kvh.to(tl.int64) * stride_kh
        v_base = k_base + stride_kv
        # Trip count inline, not assigned: 3.6's interpreter turns every assigned value into a tensor.
        for t in range((hi - lo + BLOCK_N - 1) // BLOCK_N if DYNAMIC else PART // BLOCK_N):
            pos = lo + t * BLOCK_N + tl.arange(0, BLOCK_N)
            pmask = pos < hi
            blk = tl.load(bt_ptr + seq.to(tl.int64) * stride_bt + pos // PAGE, mask=pmask, other=0)
            slot = blk.to(tl.int64) * stride_kb + (pos % PAGE) * stride_kt  # [BLOCK_N]
            kt = tl.load(k_base + slot[None, :] + dd[:, None],
                         mask=pmask[None, :] & dmask[:, None], other=0.0)  # [BLOCK_D, BLOCK_N] = K.T
            v = tl.load(v_base + slot[:, None] + dd[None, :],
                        mask=pmask[:, None] & dmask[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
            if UPCAST:  # interpreter only: its bf16 tl.dot is wrong (triton 3.9), fp32 is exact
                s = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
            else:
                s = tl.dot(q, kt, input_precision=PRECISION)  # [BLOCK_G, BLOCK_N] fp32
            s = tl.where(pmask[None, :], s * scale_log2, NEG_INF)
            m_new = tl.maximum(m, tl.reduce(s, 1, tl.standard._elementwise_max))
            alpha = tl.exp2(m - m_new)  # the first tile always holds key `lo`, so m_new is finite
            p = tl.exp2(s - m_new[:, None])
            lsum = lsum * alpha + tl.reduce(p, 1, tl.standard._sum_combine)
            pv = p.to(v.dtype)  # half models: P rounded to V's type for the tensor-core product
            if UPCAST:
                acc = acc * alpha[:, None] + tl.dot(pv.to(tl.float32), v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(pv, v, input_precision=PRECISION)
            m = m_new
    if SPLIT:  # partial results for the combine kernel
        row = seq.to(tl.int64) * stride_ms + heads * stride_mh + part  # [BLOCK_G]
        tl.store(m_ptr + row, m, mask=gmask)
        tl.store(l_ptr + row, lsum, mask=gmask)
        tl.store(acc_ptr + row[:, None] * head_dim + dd[None, :], acc, mask=gmask[:, None] & dmask[None, :])
    else:  # the only partition: normalise and write the output
        o_ptrs = out_ptr + seq.to(tl.int64) * stride_os + heads[:, None] * stride_oh + dd[None, :]
        tl.store(o_ptrs, (acc / lsum[:, None]).to(out_ptr.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])


def _combine_kernel(
    m_ptr, l_ptr, acc_ptr, out_ptr,
    stride_ms, stride_mh,  # m, l [S, H, P] fp32; acc [S, H, P, D] fp32 (contiguous)
    stride_os, stride_oh,  # out [S, H, D]
    head_dim, num_parts,
    BLOCK_D: tl.constexpr, MAX_PARTS: tl.constexpr,
):
    """out[seq, head] = the partitions' accumulators, rescaled to the global max and normalised."""
    seq, head = tl.program_id(0), tl.program_id(1)
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < head_dim
    row = seq.to(tl.int64) * stride_ms + head * stride_mh
    m = tl.load(m_ptr + row)  # partition 0 always holds key 0: finite
    lsum = tl.load(l_ptr + row)
    acc = tl.load(acc_ptr + row * head_dim + dd, mask=dmask, other=0.0)
    # MAX_PARTS = next power of 2 of P (a constexpr trip count: see the module docstring), masked at P.
    for p in range(1, MAX_PARTS):
        # A partition past this sequence's keys was written as max -inf, sum 0, accumulator 0: beta = 0.
        live = p < num_parts
        m_p = tl.load(m_ptr + row + p, mask=live, other=NEG_INF)
        m_new = tl.maximum(m, m_p)
        alpha, beta = tl.exp2(m - m_new), tl.exp2(m_p - m_new)
        lsum = lsum * alpha + tl.load(l_ptr + row + p, mask=live, other=0.0) * beta
        # (dd < where(...), not dmask & live: the interpreter cannot `&` a vector with a scalar mask)
        acc_p = tl.load(acc_ptr + (row + p) * head_dim + dd, mask=dd < tl.where(live, head_dim, 0), other=0.0)
        acc = acc * alpha + acc_p * beta
        m = m_new
    o_ptrs = out_ptr + seq.to(tl.int64) * stride_os + head * stride_oh + dd
    tl.store(o_ptrs, (acc / lsum).to(out_ptr.dtype.element_ty), mask=dmask)


def _prefill_kernel(
    q_ptr, kv_ptr, bt_ptr, ctx_ptr, qsl_ptr, out_ptr,
    stride_qt, stride_qh,  # q [T, H, D], D contiguous
    stride_kv, stride_kh, stride_kb, stride_kt,  # kv_cache [2, KVH, blocks, block_size, D], D contiguous
    stride_bt,  # block_tables [S, max_blocks]
    stride_ot, stride_oh,  # out [T, H, D]
    scale_log2, head_dim,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE: tl.constexpr, MAX_TILES: tl.constexpr, DYNAMIC: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """BLOCK_Q queries of one sequence x the G heads of KV head kvh, causally over the cached keys."""
    seq, qb, kvh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    if qb * BLOCK_Q >= q_len:  # past this sequence's queries
        return
    ctx = tl.load(ctx_ptr + seq)
    r = tl.arange(0, BLOCK_Q * BLOCK_G)
    tok = qb * BLOCK_Q + r // BLOCK_G  # query index within the sequence; row r = (query, head in group)
    g = r % BLOCK_G
    dd = tl.arange(0, BLOCK_D)
    rmask, dmask = (tok < q_len) & (g < GROUP), dd < head_dim
    pos = ctx - q_len + tok  # each query's absolute position: it sees keys 0 .. pos
    heads = kvh * GROUP + g
    tok64 = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + tok64[:, None] * stride_qt + heads[:, None] * stride_qh + dd[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    hi = ctx - q_len + tl.minimum(qb * BLOCK_Q + BLOCK_Q, q_len)  # keys seen by this tile's last query
    k_base = kv_ptr + kvh.to(tl.int64) * stride_kh
    v_base = k_base + stride_kv
    m = tl.full((BLOCK_Q * BLOCK_G,), NEG_INF, tl.float32)
    lsum = tl.full((BLOCK_Q * BLOCK_G,), 0.0, tl.float32)
    acc = tl.full((BLOCK_Q * BLOCK_G, BLOCK_D), 0.0, tl.float32)
    # (the trip count inline, not assigned: 3.6's interpreter turns every assigned value into a tensor)
    for t in range((hi + BLOCK_N - 1) // BLOCK_N if DYNAMIC else MAX_TILES):
        kpos = t * BLOCK_N + tl.arange(0, BLOCK_N)
        kmask = kpos < hi
        blk = tl.load(bt_ptr + seq.to(tl.int64) * stride_bt + kpos // PAGE, mask=kmask, other=0)
        slot = blk.to(tl.int64) * stride_kb + (kpos % PAGE) * stride_kt  # [BLOCK_N]
        kt = tl.load(k_base + slot[None, :] + dd[:, None],
                     mask=kmask[None, :] & dmask[:, None], other=0.0)  # [BLOCK_D, BLOCK_N] = K.T
        v = tl.load(v_base + slot[:, None] + dd[None, :],
                    mask=kmask[:, None] & dmask[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        if UPCAST:  # interpreter only: its bf16 tl.dot is wrong (triton 3.9), fp32 is exact
            s = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
        else:
            s = tl.dot(q, kt, input_precision=PRECISION)  # [BLOCK_M, BLOCK_N] fp32
        visible = kmask[None, :] & (kpos[None, :] <= pos[:, None])  # causal, per row
        s = tl.where(visible, s * scale_log2, NEG_INF)
        m_new = tl.maximum(m, tl.reduce(s, 1, tl.standard._elementwise_max))
        # A row may see no key of this tile yet (m_new = -inf): exponentiate against 0 so p = 0, not NaN.
        m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        lsum = lsum * alpha + tl.reduce(p, 1, tl.standard._sum_combine)
        pv = p.to(v.dtype)
        if UPCAST:
            acc = acc * alpha[:, None] + tl.dot(pv.to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(pv, v, input_precision=PRECISION)
        m = m_new
    o_ptrs = out_ptr + tok64[:, None] * stride_ot + heads[:, None] * stride_oh + dd[None, :]
    # Every real row sees key 0 at least, so lsum > 0 there; padded rows are masked out of the store.
    tl.store(o_ptrs, (acc / tl.where(rmask, lsum, 1.0)[:, None]).to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])


@functools.cache
def _jitted(interpret: bool):
    # `interpret` is only the cache key: triton.jit reads TRITON_INTERPRET itself at decoration.
    return triton.jit(_decode_kernel), triton.jit(_combine_kernel), triton.jit(_prefill_kernel)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernels():
    return _jitted(_interpreting())


def _dynamic_loops() -> bool:
    """Runtime loop trip counts: always when compiled; in the interpreter only from triton 3.9 on (known
    good; 3.6's breaks, see the module docstring). Tests under both versions cover both loop forms."""
    if not _interpreting():
        return True
    major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    return (major, minor) >= (3, 9)


def _common(q: torch.Tensor, kv_cache: torch.Tensor, scale: float | None) -> dict:
    """Checks shared by both launchers; the constexprs and strides they share."""
    _, h, d = q.shape
    two, kvh, _, page, dk = kv_cache.shape
    if two != 2 or dk != d or h % kvh:
        raise ValueError(f"kv_cache {tuple(kv_cache.shape)} does not fit q {tuple(q.shape)}")
    if q.stride(2) != 1 or kv_cache.stride(4) != 1:
        raise ValueError("q and kv_cache need a contiguous head_dim")
    if kv_cache.dtype != q.dtype:
        raise ValueError(f"kv_cache dtype {kv_cache.dtype} != q dtype {q.dtype}")
    group = h // kvh
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    interp = _interpreting()
    return dict(
        group=group, page=page, scale_log2=scale * LOG2E, block_d=max(16, triton.next_power_of_2(d)),
        precision="ieee" if q.dtype == torch.float32 else "tf32",
        upcast=interp and q.dtype != torch.float32, dynamic=_dynamic_loops(),
        kv_strides=(kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3)),
    )


def _check_out(out: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty_like(q)
    if out.shape != q.shape or out.dtype != q.dtype or out.stride(2) != 1:
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} does not match q {tuple(q.shape)} {q.dtype}")
    return out


def paged_decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    max_context_len: int | None = None,
    partition_size: int = 512,
) -> torch.Tensor:
    """Decode attention: one query token per sequence over its paged context. Returns out [S, H, D].

    q [S, H, D]; kv_cache [2, KVH, num_blocks, block_size, D] (same dtype as q, H % KVH == 0);
    block_tables [S, max_blocks] int32; context_lens [S] int32, each >= 1 (the query is the last key).
    scale defaults to 1/sqrt(D). max_context_len (max of context_lens) sizes the split without a host
    sync; partition_size (a multiple of 16) is the keys per split program: contexts longer than it are
    split and merged by a second kernel.
    """
    kernels = _kernels()
    c = _common(q, kv_cache, scale)
    s, h, d = q.shape
    out = _check_out(out, q)
    if s == 0:
        return out
    if max_context_len is None:
        max_context_len = int(context_lens.max())  # a host sync: pass it when known
    if partition_size < 16 or partition_size % 16:
        raise ValueError(f"partition_size {partition_size} must be a positive multiple of 16")
    block_n = next(n for n in (64, 32, 16) if partition_size % n == 0)  # keys per tile: a power of 2
    parts = max(1, triton.cdiv(max_context_len, partition_size))
    if parts > 1:  # per-partition running max, sum and accumulator (fp32) for the combine kernel
        m_buf = torch.empty(s, h, parts, dtype=torch.float32, device=q.device)
        l_buf = torch.empty_like(m_buf)
        acc_buf = torch.empty(s, h, parts, d, dtype=torch.float32, device=q.device)
    else:
        m_buf = l_buf = acc_buf = out  # not read or written (SPLIT=False)
    decode_k, combine_k, _ = kernels
    kvh = kv_cache.shape[1]
    decode_k[(s, kvh, parts)](
        q, kv_cache, block_tables, context_lens, out, m_buf, l_buf, acc_buf,
        q.stride(0), q.stride(1), *c["kv_strides"], block_tables.stride(0), out.stride(0), out.stride(1),
        h * parts, parts, c["scale_log2"], d,
        GROUP=c["group"], BLOCK_G=max(16, triton.next_power_of_2(c["group"])), BLOCK_D=c["block_d"],
        BLOCK_N=block_n, PART=partition_size, PAGE=c["page"], SPLIT=parts > 1, DYNAMIC=c["dynamic"],
        PRECISION=c["precision"], UPCAST=c["upcast"],
    )
    if parts > 1:
        combine_k[(s, h)](
            m_buf, l_buf, acc_buf, out, h * parts, parts, out.stride(0), out.stride(1), d, parts,
            BLOCK_D=c["block_d"], MAX_PARTS=triton.next_power_of_2(parts),
        )
    return out


def paged_prefill_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    max_query_len: int | None = None,
    max_context_len: int | None = None,
    block_m: int = 64,
) -> torch.Tensor:
    """Varlen (chunked) prefill attention for many sequences in one launch. Returns out [T, H, D].

    q [T, H, D]: sequence i's q_i = query_start_loc[i+1] - query_start_loc[i] new tokens (q_i may be 0),
    at positions context_lens[i] - q_i .. context_lens[i] - 1, their K/V already in the cache; each sees
    every key up to its own position. query_start_loc [S + 1] int32; context_lens [S] int32 (>= q_i);
    kv_cache, block_tables as in `paged_decode_attention`. max_query_len / max_context_len avoid host
    syncs when given (max_context_len is only needed by the interpreter's fixed loop count).
    block_m: rows per program (queries x the heads of one KV group), a power of 2 >= 16.
    """
    kernels = _kernels()
    c = _common(q, kv_cache, scale)
    t, h, d = q.shape
    out = _check_out(out, q)
    num_seqs = context_lens.shape[0]
    if t == 0 or num_seqs == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())  # host sync
    block_g = triton.next_power_of_2(c["group"])
    block_q = max(1, block_m // block_g)
    block_n = 64 if c["block_d"] <= 64 else 32
    if c["dynamic"]:
        max_tiles = 1  # unused: one compiled variant for all lengths
    else:
        if max_context_len is None:
            max_context_len = int(context_lens.max())
        max_tiles = triton.cdiv(max_context_len, block_n)
    _, _, prefill_k = kernels
    prefill_k[(num_seqs, triton.cdiv(max_query_len, block_q), kv_cache.shape[1])](
        q, kv_cache, block_tables, context_lens, query_start_loc, out,
        q.stride(0), q.stride(1), *c["kv_strides"], block_tables.stride(0), out.stride(0), out.stride(1),
        c["scale_log2"], d,
        GROUP=c["group"], BLOCK_G=block_g, BLOCK_Q=block_q, BLOCK_D=c["block_d"], BLOCK_N=block_n,
        PAGE=c["page"], MAX_TILES=max_tiles, DYNAMIC=c["dynamic"], PRECISION=c["precision"],
        UPCAST=c["upcast"],
    )
    return out
