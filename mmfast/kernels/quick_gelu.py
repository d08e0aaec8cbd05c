"""Triton kernels for QuickGELU (``x * sigmoid(1.702 x)``, CLIP's MLP activation), forward and backward.

Contracts (the public function is ``mmfast.ops.quick_gelu``):

* the input is a 2-D ``[M, n]`` view whose last dimension is contiguous; rows may be strided;
* forward: ``y = x * sigmoid(1.702 x)`` in fp32 from one read of x, rounded once to x's dtype. Only x is
  needed for backward;
* backward: from one read of dy and x, ``dx = dy * (s + 1.702 x s (1 - s))`` with ``s = sigmoid(1.702 x)``
  in fp32, rounded once. x is never written.

Launch shapes are those of the SwiGLU kernels (:func:`mmfast.kernels.swiglu.launch`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import round_to as _round
from ._device import on_tensor_device
from .swiglu import _sigmoid, _tile, run_rows

#: The constant of CLIP's QuickGELU.
ALPHA = 1.702


@triton.jit
def _quick_gelu_fwd_kernel(X, Y, M, n, stride_x, stride_y, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                           SOFT_RNE: tl.constexpr, ALPHA_: tl.constexpr):
    row, cols, mask = _tile(M, n, ROWS, BLOCK)
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    y = x * _sigmoid(ALPHA_ * x)
    tl.store(Y + row * stride_y + cols, _round(y, Y.dtype.element_ty, SOFT_RNE), mask=mask)


@triton.jit
def _quick_gelu_bwd_kernel(DY, X, DX, M, n, stride_dy, stride_x, stride_dx, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                           SOFT_RNE: tl.constexpr, ALPHA_: tl.constexpr):
    row, cols, mask = _tile(M, n, ROWS, BLOCK)
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    s = _sigmoid(ALPHA_ * x)
    dx = dy * (s + x * (ALPHA_ * s * (1.0 - s)))  # the vanishing factor first: ALPHA * x overflows near 2e38
    tl.store(DX + row * stride_dx + cols, _round(dx, DX.dtype.element_ty, SOFT_RNE), mask=mask)


@on_tensor_device
def quick_gelu_fwd(x: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(1.702 x)`` of an ``[M, n]`` row view (last dimension contiguous), as a new contiguous tensor."""
    return run_rows(_quick_gelu_fwd_kernel, (x,), (x.dtype,), ALPHA_=ALPHA)[0]


@on_tensor_device
def quick_gelu_bwd(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``dx`` as a new contiguous ``[M, n]`` tensor in x's dtype."""
    return run_rows(_quick_gelu_bwd_kernel, (dy, x), (x.dtype,), ALPHA_=ALPHA)[0]
