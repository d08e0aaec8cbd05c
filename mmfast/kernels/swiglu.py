"""Triton kernels for the SwiGLU gate of LLaMA-style MLPs, forward and backward, and their host launchers.

Contracts (the public function is ``mmfast.ops.swiglu``):

* inputs are 2-D ``[M, I]`` views whose last dimension is contiguous; rows may be strided (a gate and an
  up projection sliced out of one fused ``[M, 2I]`` output run without a copy);
* forward: ``h = silu(g) * u``, computed in fp32 from one read of g and u, rounded once to the inputs'
  dtype. Nothing but g and u is needed for backward;
* backward: from one read of dh, g and u, ``du = dh * silu(g)`` and
  ``dg = dh * u * sigmoid(g) * (1 + g * (1 - sigmoid(g)))`` in fp32, each rounded once. The inputs are
  never written (a second backward through a retained graph sees them unchanged).

The launch shape lives in :func:`launch`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import round_to as _round
from ._device import cdiv, interpreting, next_pow2

#: Largest column block one program covers.
MAX_BLOCK = 2048


def launch(n: int) -> tuple[int, int]:
    """(column block, warps) of both kernels for rows of ``n`` elements."""
    block = min(MAX_BLOCK, max(16, next_pow2(n)))
    return block, (8 if block >= 2048 else 4)


@triton.jit
def _sigmoid(g):
    """sigmoid(g) from exp(-|g|), which cannot overflow."""
    e = tl.exp(-tl.abs(g))
    return tl.where(g >= 0, 1.0, e) / (1.0 + e)


@triton.jit
def _silu(g):
    """g * sigmoid(g) with one division (g / (1 + exp(-g)) for g >= 0, as PyTorch computes it)."""
    e = tl.exp(-tl.abs(g))
    return tl.where(g >= 0, g, g * e) / (1.0 + e)


@triton.jit
def _swiglu_fwd_kernel(G, U, H, n, stride_g, stride_u, stride_h, BLOCK: tl.constexpr, SOFT_RNE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    h = _silu(g) * u
    tl.store(H + row * stride_h + cols, _round(h, H.dtype.element_ty, SOFT_RNE), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DH, G, U, DG, DU, n, stride_dh, stride_g, stride_u, stride_dg, stride_du,
                       BLOCK: tl.constexpr, SOFT_RNE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    dh = tl.load(DH + row * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    s = _sigmoid(g)
    du = dh * (g * s)
    dg = dh * u * s * (1.0 + g * (1.0 - s))
    tl.store(DG + row * stride_dg + cols, _round(dg, DG.dtype.element_ty, SOFT_RNE), mask=mask)
    tl.store(DU + row * stride_du + cols, _round(du, DU.dtype.element_ty, SOFT_RNE), mask=mask)


def _grid(M: int, n: int, block: int) -> tuple[int, int]:
    return (M, cdiv(n, block))


def swiglu_fwd(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``silu(g) * u`` of two ``[M, n]`` row views (last dimension contiguous), as a new contiguous tensor."""
    M, n = g.shape
    h = torch.empty((M, n), dtype=g.dtype, device=g.device)
    if M and n:
        block, warps = launch(n)
        _swiglu_fwd_kernel[_grid(M, n, block)](g, u, h, n, g.stride(0), u.stride(0), h.stride(0),
                                               BLOCK=block, SOFT_RNE=interpreting(), num_warps=warps)
    return h


def swiglu_bwd(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dg, du)`` as new contiguous ``[M, n]`` tensors in g's dtype."""
    M, n = g.shape
    dg = torch.empty((M, n), dtype=g.dtype, device=g.device)
    du = torch.empty((M, n), dtype=u.dtype, device=u.device)
    if M and n:
        block, warps = launch(n)
        _swiglu_bwd_kernel[_grid(M, n, block)](dh, g, u, dg, du, n, dh.stride(0), g.stride(0), u.stride(0),
                                               dg.stride(0), du.stride(0), BLOCK=block, SOFT_RNE=interpreting(),
                                               num_warps=warps)
    return dg, du
