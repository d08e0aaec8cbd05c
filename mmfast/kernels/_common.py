"""Jit helpers and small kernels shared by the op families."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._device import cdiv, interpreting, next_pow2


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
def _sum_partials_kernel(PART, OUT, P, N, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, SOFT_RNE: tl.constexpr):
    """OUT[n] = sum_p PART[p, n], in a fixed order, rounded once to OUT's dtype."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        mask = (ps < P)[:, None] & col_mask[None, :]
        acc += tl.load(PART + ps[:, None].to(tl.int64) * N + cols[None, :], mask=mask, other=0.0)
    tl.store(OUT + cols, round_to(tl.sum(acc, axis=0), OUT.dtype.element_ty, SOFT_RNE), mask=col_mask)


def sum_partials(part: torch.Tensor, out: torch.Tensor) -> None:
    """out = part.sum(0) over a [P, N] fp32 buffer, in a fixed order (deterministic), rounded to out's dtype."""
    P, N = part.shape
    block_n = min(256, max(16, next_pow2(N)))
    _sum_partials_kernel[(cdiv(N, block_n),)](
        part, out, P, N, BLOCK_P=32, BLOCK_N=block_n, SOFT_RNE=interpreting(), num_warps=4
    )
