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
from ._device import COMPILE_OPTIONS, cdiv, interpreting, next_pow2, on_tensor_device

#: Largest column block one program covers.
MAX_BLOCK = 2048
#: CUDA's limit on a grid's y dimension (the column blocks of one launch); wider rows take more launches.
MAX_GRID_Y = 65535


def launch(n: int) -> tuple[int, int, int]:
    """(rows, column block, warps) of both kernels for rows of ``n`` elements. A program covers at least
    ``MAX_BLOCK`` elements: rows of up to ``MAX_BLOCK`` take one block each, and rows of up to
    ``MAX_BLOCK // 2`` are stacked (rows of 64: 32 to a program); wider rows take one program each."""
    block = min(MAX_BLOCK, max(16, next_pow2(n)))
    return MAX_BLOCK // block, block, (8 if block >= 2048 else 4)


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
def _tile(M, n, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """The program's [ROWS, BLOCK] tile: row indices (int64, a column), column indices (a row), and mask."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)[None, :]
    return rows, cols, (rows < M) & (cols < n)


@triton.jit
def _swiglu_fwd_kernel(G, U, H, M, n, stride_g, stride_u, stride_h, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                       SOFT_RNE: tl.constexpr):
    row, cols, mask = _tile(M, n, ROWS, BLOCK)
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    h = _silu(g) * u
    tl.store(H + row * stride_h + cols, _round(h, H.dtype.element_ty, SOFT_RNE), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DH, G, U, DG, DU, M, n, stride_dh, stride_g, stride_u, stride_dg, stride_du,
                       ROWS: tl.constexpr, BLOCK: tl.constexpr, SOFT_RNE: tl.constexpr):
    row, cols, mask = _tile(M, n, ROWS, BLOCK)
    dh = tl.load(DH + row * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    s = _sigmoid(g)
    du = dh * (g * s)
    dg = dh * u * s * (1.0 + g * (1.0 - s))
    tl.store(DG + row * stride_dg + cols, _round(dg, DG.dtype.element_ty, SOFT_RNE), mask=mask)
    tl.store(DU + row * stride_du + cols, _round(du, DU.dtype.element_ty, SOFT_RNE), mask=mask)


def run_rows(kernel, inputs: tuple[torch.Tensor, ...], out_dtypes: tuple[torch.dtype, ...], **constexprs
             ) -> list[torch.Tensor]:
    """Launch an element-wise row kernel over ``[M, n]`` row views (last dimension contiguous) and return
    its new contiguous outputs. The kernel's parameters are ``(*inputs, *outputs, M, n, *row strides of the
    inputs then the outputs, ROWS, BLOCK, SOFT_RNE, **constexprs)``; one program per (block of rows, column
    block), shaped by :func:`launch`.

    Rows of more than ``MAX_GRID_Y`` blocks (a flattened tensor is one row: 134M elements at the largest
    block) go in column spans of at most that many blocks, one launch each, so that no grid exceeds CUDA's
    y limit."""
    M, n = inputs[0].shape
    outs = [torch.empty((M, n), dtype=dt, device=inputs[0].device) for dt in out_dtypes]
    if M and n:
        rows, block, warps = launch(n)
        tensors = (*inputs, *outs)
        span = MAX_GRID_Y * block
        for c0 in range(0, n, span):
            width = min(span, n - c0)
            views = tensors if width == n else tuple(t[:, c0:c0 + width] for t in tensors)
            kernel[(cdiv(M, rows), cdiv(width, block))](*views, M, width, *(t.stride(0) for t in views), ROWS=rows,
                                                        BLOCK=block, SOFT_RNE=interpreting(), num_warps=warps,
                                                        **COMPILE_OPTIONS, **constexprs)
    return outs


@on_tensor_device
def swiglu_fwd(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``silu(g) * u`` of two ``[M, n]`` row views (last dimension contiguous), as a new contiguous tensor."""
    return run_rows(_swiglu_fwd_kernel, (g, u), (g.dtype,))[0]


@on_tensor_device
def swiglu_bwd(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dg, du)`` as new contiguous ``[M, n]`` tensors in g's and u's dtypes."""
    dg, du = run_rows(_swiglu_bwd_kernel, (dh, g, u), (g.dtype, u.dtype))
    return dg, du
