"""Triton dequantize-matmul: y [M, N] = x [M, K] @ W.T (+ bias) with W kept quantized (kernels/quant.py).

One program owns a BLOCK_M x BLOCK_N tile of y and walks K in BLOCK_K steps: it gathers the
tile's weight bytes ([BLOCK_K, BLOCK_N], i.e. W.T), decodes them in registers to fp32 with their
scales (the formulas of kernels/quant_reference.py), and feeds tl.dot in x's dtype with an fp32
accumulator. K is a multiple of the format's block (32; 64 for nf4); ragged M and N are masked.

    q8_0  byte n*row_bytes + (k//32)*34 + 2 + k%32 (int8), d = fp16 at the group's first byte
    q4_0  byte n*row_bytes + (k//32)*18 + 2 + k%16, high nibble for k%32 >= 16, w = (q - 8) d
    q4_1  byte n*row_bytes + (k//32)*20 + 4 + k%16, w = q d + m (m = fp16 at byte 2)
    nf4   byte n*K/2 + k//2, high nibble for even k; w = NF4[q] * absmax[(n*K + k)//64], absmax
          from the double quantization (dynamic map, per-256 scale, offset)

The @triton.jit decoration is lazy (`_kernel()`), keyed on TRITON_INTERPRET at first use, as in
kernels/triton_sgmv.py. The K loop's bound is a constexpr (one compile per in_features: a model has
a few); the triton 3.6 interpreter rejects a plain int argument there.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from kernels import quant_reference as ref

FMT_IDS = {"q8_0": 0, "q4_0": 1, "q4_1": 2, "nf4": 3}


def _qmatmul_kernel(
    x_ptr, w_ptr, y_ptr, bias_ptr,
    code_ptr, absmax_ptr, scale_ptr, dyn_ptr, absmax_offset,  # nf4 only (others: dummies)
    M, N, row_bytes,
    stride_xm, stride_ym,
    K: tl.constexpr,  # constexpr: the loop bound (the triton 3.6 interpreter rejects an int argument there)
    FMT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask, cmask = rows < M, cols < N
    row_base = cols.to(tl.int64)[None, :] * row_bytes  # [1, BLOCK_N] byte offset of each weight row
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < K
        xt = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :],
                     mask=rmask[:, None] & kmask[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        k2 = kk[:, None]  # [BLOCK_K, 1]
        wmask = kmask[:, None] & cmask[None, :]  # [BLOCK_K, BLOCK_N]
        if FMT == 3:  # nf4: two weights per byte, element 2j in the high nibble of byte j
            byte = tl.load(w_ptr + row_base + k2 // 2, mask=wmask, other=0).to(tl.int32)
            q = tl.where(k2 % 2 == 0, byte >> 4, byte & 15)
            blk = (cols.to(tl.int64)[None, :] * K + k2) // 64
            aq = tl.load(absmax_ptr + blk, mask=wmask, other=0).to(tl.int32)
            d = tl.load(dyn_ptr + aq) * tl.load(scale_ptr + blk // 256, mask=wmask, other=0.0) + absmax_offset
            w = tl.load(code_ptr + q) * d
        else:
            gbytes = 34 if FMT == 0 else (18 if FMT == 1 else 20)
            gbase = row_base + (k2 // 32) * gbytes  # [BLOCK_K, BLOCK_N] first byte of each group
            # the group's fp16 scale from its two little-endian bytes (inlined: no jitted helpers)
            d_lo = tl.load(w_ptr + gbase, mask=wmask, other=0).to(tl.uint16)
            d_hi = tl.load(w_ptr + gbase + 1, mask=wmask, other=0).to(tl.uint16)
            d = (d_lo | (d_hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
            if FMT == 0:
                q8 = tl.load(w_ptr + gbase + 2 + k2 % 32, mask=wmask, other=0).to(tl.int8, bitcast=True)
                w = q8.to(tl.float32) * d
            else:
                qoff = 2 if FMT == 1 else 4
                byte = tl.load(w_ptr + gbase + qoff + k2 % 16, mask=wmask, other=0).to(tl.int32)
                q = tl.where(k2 % 32 < 16, byte & 15, byte >> 4)
                if FMT == 1:
                    w = (q - 8).to(tl.float32) * d
                else:
                    m_lo = tl.load(w_ptr + gbase + 2, mask=wmask, other=0).to(tl.uint16)
                    m_hi = tl.load(w_ptr + gbase + 3, mask=wmask, other=0).to(tl.uint16)
                    m = (m_lo | (m_hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
                    w = d * q.to(tl.float32) + m
        if UPCAST:  # interpreter only: its bf16 tl.dot is wrong (triton 3.9), fp32 is exact
            acc += tl.dot(xt.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(xt, w.to(xt.dtype), input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@functools.cache
def _jitted(interpret: bool):
    # `interpret` is only the cache key: triton.jit reads TRITON_INTERPRET itself at decoration.
    return triton.jit(_qmatmul_kernel)


def _kernel():
    return _jitted(os.environ.get("TRITON_INTERPRET", "0") == "1")


@functools.cache
def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return ref.NF4_CODE.to(device), ref.DYNAMIC_MAP.to(device)


def qmatmul(x: torch.Tensor, qweight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y [..., N] = x [..., K] @ W.T (+ bias) in x's dtype; x and qweight on the same device."""
    N, K = qweight.out_features, qweight.in_features
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {K}")
    if qweight.data.device != x.device:
        raise ValueError(f"the weight is on {qweight.data.device}, x on {x.device}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y.view(*lead, N)
    fmt = FMT_IDS[qweight.format]
    code, dyn = _tables(x.device)
    nf4 = fmt == 3
    absmax = qweight.absmax if nf4 else qweight.data
    scale = qweight.absmax_scale if nf4 else code
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    block_m = 16 if M <= 16 else (32 if M <= 32 else 64)
    block_n = 64
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _kernel()[grid](
        x2, qweight.data, y, bias if bias is not None else y,
        code, absmax, scale, dyn, float(qweight.absmax_offset),
        M, N, qweight.data.shape[1],
        x2.stride(0), y.stride(0),
        K=K, FMT=fmt, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=64 if nf4 or K % 64 == 0 else 32,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        UPCAST=interpret and x.dtype == torch.bfloat16,
    )
    return y.view(*lead, N)
