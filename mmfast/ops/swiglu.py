"""The SwiGLU gate of LLaMA-style MLPs as a ``torch.library`` custom op with autograd, and its reference.

:func:`swiglu` ``(gate, up) -> silu(gate) * up``, the product ``LlamaMLP`` feeds its down projection.

Why fuse it: the unfused gate keeps three activations of width ``intermediate_size`` for backward
(``silu`` keeps the gate, the product keeps ``silu(gate)`` and ``up``); this op keeps the gate and up
only, recomputing ``silu`` in the backward, and reads / writes each tensor once in each direction. At
LLaMA-7B widths that is 21.5 KiB less kept per token per layer, a third of the MLP's share.

Rounding: computed in fp32, rounded once to the inputs' dtype (the unfused bf16 composition rounds
``silu(gate)`` first, then the product); the gradients likewise.

Ops: ``mmfast::swiglu_fwd`` and ``mmfast::swiglu_bwd`` (opaque to ``torch.compile``, fake impls
registered). Plain eager calls take the same forward and backward through a ``torch.autograd.Function``
(the eager fast path of :mod:`mmfast.ops.norm`, the same rules and the same ``MMFAST_EAGER=ops``
switch). Backends: Triton on CUDA tensors (and on CPU under ``TRITON_INTERPRET=1``), the reference
otherwise (:mod:`mmfast.ops.backend`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backend import (KernelKey, as_rows, batched, no_forward_ad, once_differentiable, plain_eager, records_grad,
                      refuse_functorch_ad, resolve_backend, savable)
from .checks import check_activation, check_like

# ---------------------------------------------------------------------------------------------
# input checks and reference
# ---------------------------------------------------------------------------------------------


def check_swiglu_inputs(gate: object, up: object) -> None:
    check_activation("swiglu", "gate", gate)
    check_like("swiglu", "up", up, "gate", gate)
    if gate.dim() == 0:
        raise ValueError("swiglu: gate and up must have at least one dimension")


def swiglu_reference(gate: Tensor, up: Tensor) -> Tensor:
    """The definition, differentiable: ``silu(gate) * up`` in fp32 (float64 for float64 inputs), rounded
    once to the inputs' dtype."""
    cdt = torch.promote_types(gate.dtype, torch.float32)
    g = gate.to(cdt)
    return (g * torch.sigmoid(g) * up.to(cdt)).to(gate.dtype)


def swiglu_unfused(gate: Tensor, up: Tensor) -> Tensor:
    """What ``LlamaMLP`` computes in the activation dtype: ``act_fn(gate) * up``, two roundings."""
    return torch.nn.functional.silu(gate) * up


def _reference_bwd(dh: Tensor, g: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    f = torch.float32
    dh, g32, u32 = dh.to(f), g.to(f), u.to(f)
    s = torch.sigmoid(g32)
    du = dh * g32 * s
    dg = dh * u32 * s * (1 + g32 * (1 - s))
    return dg.to(g.dtype), du.to(u.dtype)


# ---------------------------------------------------------------------------------------------
# backend dispatch on 2-D row views
# ---------------------------------------------------------------------------------------------


def _fwd(gate: Tensor, up: Tensor) -> Tensor:
    if gate.numel() and resolve_backend(gate.device, KernelKey("swiglu", "fwd", gate.dtype, gate.shape[-1]),
                                        has_cuda=False) == "triton":
        from ..kernels import swiglu as kernels

        return kernels.swiglu_fwd(as_rows(gate), as_rows(up)).view(gate.shape)
    return swiglu_reference(gate, up).contiguous()  # the layout the fake impl promises


def _bwd(dh: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    if gate.numel() and resolve_backend(gate.device, KernelKey("swiglu", "bwd", gate.dtype, gate.shape[-1]),
                                        has_cuda=False) == "triton":
        from ..kernels import swiglu as kernels

        dg, du = kernels.swiglu_bwd(as_rows(dh), as_rows(gate), as_rows(up))
        return dg.view(gate.shape), du.view(up.shape)
    return tuple(t.contiguous() for t in _reference_bwd(dh, gate, up))


# ---------------------------------------------------------------------------------------------
# custom ops and the eager fast path
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("mmfast::swiglu_fwd", mutates_args=())
def swiglu_fwd(gate: Tensor, up: Tensor) -> Tensor:
    check_swiglu_inputs(gate, up)
    return _fwd(gate, up)


@swiglu_fwd.register_fake
def _(gate, up):
    check_swiglu_inputs(gate, up)
    return gate.new_empty(gate.shape)


@torch.library.custom_op("mmfast::swiglu_bwd", mutates_args=())
def swiglu_bwd(dh: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """Returns ``(dgate, dup)``."""
    check_swiglu_inputs(gate, up)
    check_like("swiglu", "dh", dh, "gate", gate)
    return _bwd(dh, gate, up)


@swiglu_bwd.register_fake
def _(dh, gate, up):
    check_swiglu_inputs(gate, up)
    check_like("swiglu", "dh", dh, "gate", gate)
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*savable(*inputs))


def _grads(ctx, dh, bwd):
    gate, up = ctx.saved_tensors
    dg, du = bwd(dh, gate, up)
    need = ctx.needs_input_grad
    return (dg if need[0] else None, du if need[1] else None)


@once_differentiable  # a second derivative raises with the reason (not "no autograd formula")
def _backward(ctx, dh):
    return _grads(ctx, dh, torch.ops.mmfast.swiglu_bwd)


swiglu_fwd.register_autograd(_backward, setup_context=_setup_context)


class _SwiGLUFn(torch.autograd.Function):
    """The eager fast path: the same forward and backward as the custom ops, without the dispatcher."""

    jvp = no_forward_ad("swiglu")

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(*savable(gate, up))
        return _fwd(gate, up)

    @staticmethod
    @once_differentiable  # a second derivative raises, as the custom op's
    def backward(ctx, dh):
        return _grads(ctx, dh, torch.ops.mmfast.swiglu_bwd if batched(dh) else _bwd)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` in one pass, keeping only ``gate`` and ``up`` for backward (module docstring)."""
    check_swiglu_inputs(gate, up)
    if plain_eager(gate, up):
        return _SwiGLUFn.apply(gate, up) if records_grad(gate, up) else _fwd(gate, up)
    refuse_functorch_ad("swiglu", gate, up)
    return torch.ops.mmfast.swiglu_fwd(gate, up)
