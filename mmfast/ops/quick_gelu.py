"""QuickGELU, CLIP's MLP activation, as a ``torch.library`` custom op with autograd, and its reference.

:func:`quick_gelu` ``(x) -> x * sigmoid(1.702 x)``, what ``CLIPMLP`` applies between ``fc1`` and ``fc2``.

Why fuse it: the unfused activation (``x * torch.sigmoid(1.702 * x)``) keeps two tensors of width
``intermediate_size`` for backward, x and the sigmoid; this op keeps x only, recomputing the sigmoid in
the backward, and reads / writes each tensor once in each direction. In a CLIP-L tower that trains
through its layers (the MMA recipe's vision adapters) that is 8 KiB less kept per image token and layer,
half of the MLP's share.

Rounding: computed in fp32, rounded once to x's dtype (the unfused bf16 composition rounds ``1.702 x``,
the sigmoid and the product); the gradient likewise.

Ops: ``mmfast::quick_gelu_fwd`` and ``mmfast::quick_gelu_bwd`` (opaque to ``torch.compile``, fake impls
registered), with the eager fast path and backends of :mod:`mmfast.ops.swiglu`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backend import KernelKey, as_rows, batched, no_forward_ad, once_differentiable, plain_eager, records_grad, refuse_functorch_ad, resolve_backend
from .checks import check_activation, check_like

ALPHA = 1.702


def check_quick_gelu_input(x: object) -> None:
    check_activation("quick_gelu", "x", x)
    if x.dim() == 0:
        raise ValueError("quick_gelu: x must have at least one dimension")


def quick_gelu_reference(x: Tensor) -> Tensor:
    """The definition, differentiable: ``x * sigmoid(1.702 x)`` in fp32 (float64 for float64 inputs),
    rounded once to x's dtype."""
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))
    return (x32 * torch.sigmoid(ALPHA * x32)).to(x.dtype)


def quick_gelu_unfused(x: Tensor) -> Tensor:
    """What transformers' ``QuickGELUActivation`` computes in the activation dtype."""
    return x * torch.sigmoid(ALPHA * x)


def _reference_bwd(dy: Tensor, x: Tensor) -> Tensor:
    x32 = x.float()
    s = torch.sigmoid(ALPHA * x32)
    return (dy.float() * (s + x32 * (ALPHA * s * (1 - s)))).to(x.dtype)  # ALPHA * x overflows near 2e38


def _fwd(x: Tensor) -> Tensor:
    if x.numel() and resolve_backend(x.device, KernelKey("quick_gelu", "fwd", x.dtype, x.shape[-1]),
                                     has_cuda=False) == "triton":
        from ..kernels import quick_gelu as kernels

        return kernels.quick_gelu_fwd(as_rows(x)).view(x.shape)
    return quick_gelu_reference(x).contiguous()  # the layout the fake impl promises


def _bwd(dy: Tensor, x: Tensor) -> Tensor:
    if x.numel() and resolve_backend(x.device, KernelKey("quick_gelu", "bwd", x.dtype, x.shape[-1]),
                                     has_cuda=False) == "triton":
        from ..kernels import quick_gelu as kernels

        return kernels.quick_gelu_bwd(as_rows(dy), as_rows(x)).view(x.shape)
    return _reference_bwd(dy, x).contiguous()


@torch.library.custom_op("mmfast::quick_gelu_fwd", mutates_args=())
def quick_gelu_fwd(x: Tensor) -> Tensor:
    check_quick_gelu_input(x)
    return _fwd(x)


@quick_gelu_fwd.register_fake
def _(x):
    check_quick_gelu_input(x)
    return x.new_empty(x.shape)


@torch.library.custom_op("mmfast::quick_gelu_bwd", mutates_args=())
def quick_gelu_bwd(dy: Tensor, x: Tensor) -> Tensor:
    """Returns ``dx``."""
    check_quick_gelu_input(x)
    check_like("quick_gelu", "dy", dy, "x", x)
    return _bwd(dy, x)


@quick_gelu_bwd.register_fake
def _(dy, x):
    check_quick_gelu_input(x)
    check_like("quick_gelu", "dy", dy, "x", x)
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


@once_differentiable  # a second derivative raises with the reason (not "no autograd formula")
def _backward(ctx, dy):
    return torch.ops.mmfast.quick_gelu_bwd(dy, ctx.saved_tensors[0])


quick_gelu_fwd.register_autograd(_backward, setup_context=_setup_context)


class _QuickGELUFn(torch.autograd.Function):
    """The eager fast path: the same forward and backward as the custom ops, without the dispatcher."""

    jvp = no_forward_ad("quick_gelu")

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _fwd(x)

    @staticmethod
    @once_differentiable  # a second derivative raises, as the custom op's
    def backward(ctx, dy):
        return (torch.ops.mmfast.quick_gelu_bwd if batched(dy) else _bwd)(dy, ctx.saved_tensors[0])


def quick_gelu(x: Tensor) -> Tensor:
    """``x * sigmoid(1.702 x)`` in one pass, keeping only ``x`` for backward (module docstring)."""
    check_quick_gelu_input(x)
    if plain_eager(x):
        return _QuickGELUFn.apply(x) if records_grad(x) else _fwd(x)
    refuse_functorch_ad("quick_gelu", x)
    return torch.ops.mmfast.quick_gelu_fwd(x)
