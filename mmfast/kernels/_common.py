"""Jit helpers and small kernels shared by the op families."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._device import COMPILE_OPTIONS, cdiv, interpreting, next_pow2, sm_count


@triton.jit
def round_to(x, dtype: tl.constexpr, SOFT_RNE: tl.constexpr):
    """Round fp32 ``x`` to ``dtype``, to nearest even.

    The Triton interpreter truncates fp32 -> bf16 casts; under it (``SOFT_RNE``) the rounding is done
    exactly with integer arithmetic, so interpreted runs round the way the GPU does.
    """
    if SOFT_RNE and dtype == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        r = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
        return r.to(dtype)
    else:
        return x.to(dtype)


@triton.jit
def _sum_partials_kernel(PART, OUT, P, N, CHUNK, STEP, OUT_STRIDE,
                         BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, SOFT_RNE: tl.constexpr):
    """OUT[c * OUT_STRIDE + n] = sum of PART[p * STEP, n] over the rows p of chunk c = program_id(1)
    (c * CHUNK up to P), in a fixed order, rounded once to OUT's dtype. OUT may be PART itself, at the
    first row of each chunk: a program reads its rows before it writes, and no other program reads them."""
    c = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    first = c * CHUNK
    end = tl.minimum(first + CHUNK, P)
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for p0 in range(first, end, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        mask = (ps < end)[:, None] & col_mask[None, :]
        acc += tl.load(PART + (ps.to(tl.int64) * STEP)[:, None] * N + cols[None, :], mask=mask, other=0.0)
    tl.store(OUT + c.to(tl.int64) * OUT_STRIDE + cols, round_to(tl.sum(acc, axis=0), OUT.dtype.element_ty, SOFT_RNE),
             mask=col_mask)


#: rows of partials a program of the sum reads per step
SUM_BLOCK_P = 32


def sum_block_n(N: int) -> int:
    return min(256, max(16, next_pow2(N)))


def sum_chunk_rows(P: int, N: int, sms: int) -> int:
    """Rows of the [P, N] partials one program sums in a first pass (P: a single pass). The persistent
    backwards leave P of several per SM, and a pass over column blocks alone runs N / 256 programs (4 at
    N = 1024): a few SMs then read megabytes at the latency of their loads. Where the column blocks fill
    fewer than two programs per SM, the rows are split too, in chunks of whole steps, enough for two per SM;
    a second pass adds the chunks' sums. Fixed for (P, N, sms): the order, and so the bits, do not change
    run to run."""
    programs = cdiv(N, sum_block_n(N))
    if P <= 4 * SUM_BLOCK_P or programs >= 2 * sms:
        return P
    chunks = min(cdiv(2 * sms, programs), cdiv(P, SUM_BLOCK_P))
    return max(SUM_BLOCK_P, cdiv(P, chunks) // SUM_BLOCK_P * SUM_BLOCK_P)


def sum_partials(part: torch.Tensor, out: torch.Tensor, chunk: int | None = None) -> None:
    """out = part.sum(0) over a [P, N] fp32 buffer, in a fixed order (deterministic), rounded to out's dtype.
    ``part`` is consumed (a first pass may write its chunks' sums into it); ``chunk``: the rows one program of
    that pass sums (default :func:`sum_chunk_rows` of the device)."""
    P, N = part.shape
    block_n = sum_block_n(N)
    if chunk is None:
        chunk = sum_chunk_rows(P, N, sm_count(part.device))
    common = dict(BLOCK_P=SUM_BLOCK_P, BLOCK_N=block_n, SOFT_RNE=interpreting(), num_warps=4, **COMPILE_OPTIONS)
    step = 1
    if 0 < chunk < P:  # the chunks' sums, in place, at the first row of each: then a pass over those rows
        chunks = cdiv(P, chunk)
        _sum_partials_kernel[(cdiv(N, block_n), chunks)](part, part, P, N, chunk, 1, chunk * N, **common)
        P, step = chunks, chunk
    _sum_partials_kernel[(cdiv(N, block_n), 1)](part, out, P, N, max(P, 1), step, 0, **common)
