"""RMSNorm and LayerNorm as ``torch.library`` custom ops with autograd, and their pure-PyTorch reference.

Public functions:

* :func:`rms_norm` ``(x, weight, eps=1e-6, residual=None)``
* :func:`layer_norm` ``(x, weight, bias, eps=1e-5, residual=None)``

With ``residual`` both return ``(y, residual_out)`` where ``residual_out = x + residual`` (rounded to x's
dtype) and ``y = norm(residual_out)``, computed in one pass; otherwise they return ``y``.

Ops (namespace ``mmfast``): ``rms_norm_fwd``, ``rms_norm_bwd``, ``layer_norm_fwd``, ``layer_norm_bwd``.
They are opaque to ``torch.compile`` (fake impls registered), so compiled graphs trace them without
a break. Each call picks its backend (:mod:`mmfast.ops.backend`).

Plain eager calls (no compile, no tensor subclass, no dispatch / function mode, no functorch
transform) skip the custom-op dispatcher and run the same forward and backward through a
``torch.autograd.Function``: the dispatcher's Python layers cost tens of microseconds per call,
which is longer than the kernel itself for the small activations of a LLaVA step. Both paths call the
same ``_fwd``/``_bwd``; ``MMFAST_EAGER=ops`` sends eager calls through the custom ops too.

The reference (:func:`rms_norm_reference`, :func:`layer_norm_reference`) is the definition the kernels
are tested against: run in float64 it is the test oracle; run in low precision it is what PyTorch/HF
modules compute.
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import Tensor

from .backend import (KernelKey, as_rows, batched, no_forward_ad, once_differentiable, plain_eager, records_grad,
                      refuse_functorch_ad, resolve_backend, savable)
from .checks import check_activation, check_device, check_like, check_tensor

#: Widest normalised dimension supported.
MAX_N = 65536

# ---------------------------------------------------------------------------------------------
# input checks (before anything launches)
# ---------------------------------------------------------------------------------------------


def check_norm_inputs(
    fn: str,
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    eps: float,
) -> None:
    """Raise TypeError/ValueError naming the offending argument; return None when all is well."""
    check_activation(fn, "x", x)
    if x.dim() == 0:
        raise ValueError(f"{fn}: x must have at least one dimension (the normalised one)")
    N = x.shape[-1]
    if N < 1:
        raise ValueError(f"{fn}: x's last dimension (the normalised one) is empty")
    if N > MAX_N:
        raise ValueError(f"{fn}: x's last dimension is {N}, above the supported maximum {MAX_N}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        check_tensor(fn, name, p)
        if p.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"{fn}: {name} must be in x's dtype ({x.dtype}) or float32, got {p.dtype}")
        if p.shape != (N,):
            raise ValueError(f"{fn}: {name} must have shape ({N},) to match x's last dimension, got {tuple(p.shape)}")
        check_device(fn, name, p, "x", x)
    if residual is not None:
        check_like(fn, "residual", residual, "x", x)
    # (a NumPy scalar is a real number too: np.float32 is no float subclass, np.float64 is)
    if isinstance(eps, bool) or not (isinstance(eps, (float, int)) or isinstance(eps, numbers.Real)):
        raise TypeError(f"{fn}: eps must be a real number (a Python float), got {type(eps).__name__}")
    if not (0 <= eps < float("inf")):  # also rejects NaN; plain comparisons trace under torch.compile
        raise ValueError(f"{fn}: eps must be finite and >= 0, got {eps}")


def check_norm_bwd_inputs(fn: str, dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                          mean: Optional[Tensor], rstd: Tensor, dresidual_out: Optional[Tensor], need_dw: bool,
                          need_db: bool) -> None:
    """The backward ops' arguments (``mean`` None for RMSNorm): x, weight and bias as for the forward; dy
    and dresidual_out like x; the statistics float32, one per row of x, on x's device; a weight (bias) for
    its gradient."""
    check_norm_inputs(fn, x, weight, bias, None, 0.0)
    for name, need, p in (("weight", need_dw, weight), ("bias", need_db, bias)):
        if need and p is None:
            raise ValueError(f"{fn}: the {name} gradient was asked for without a {name}")
    check_like(fn, "dy", dy, "x", x)
    if dresidual_out is not None:
        check_like(fn, "dresidual_out", dresidual_out, "x", x)
    for name, t in (("mean", mean), ("rstd", rstd)):
        if t is None:
            continue
        check_tensor(fn, name, t)
        if t.dtype != torch.float32 or t.shape != x.shape[:-1]:
            raise ValueError(f"{fn}: {name} must be float32 of shape {tuple(x.shape[:-1])} (one per row of x), "
                             f"got {t.dtype} {tuple(t.shape)}")
        check_device(fn, name, t, "x", x)


# ---------------------------------------------------------------------------------------------
# reference (pure PyTorch). Differentiable; computes in fp32 (float64 for float64 input).
# ---------------------------------------------------------------------------------------------


def _norm_fwd_reference(x, weight, bias, residual, eps, rms):
    """Same contract as :func:`mmfast.kernels.norm.norm_fwd`, in plain PyTorch (any leading shape)."""
    dtype = x.dtype
    cdt = torch.promote_types(dtype, torch.float32)
    h = x if residual is None else x + residual  # rounds to x's dtype, as the kernels do
    hf = h.to(cdt)
    if rms:
        mean = None
        xc = hf
    else:
        mean = hf.mean(-1)
        xc = hf - mean.unsqueeze(-1)
    var = xc.square().mean(-1)
    rstd = torch.rsqrt(var + eps)
    if not rms:  # a variance past the compute dtype's range would make every y the bias: NaN, as PyTorch's
        rstd = rstd.masked_fill(var.isinf(), float("nan"))
    y = xc * rstd.unsqueeze(-1)
    if rms:
        y = y.to(dtype).to(cdt)  # HF LlamaRMSNorm: round to the input dtype before the weight
    if weight is not None:
        y = y * weight.to(cdt)
    if bias is not None:
        y = y + bias.to(cdt)
    return y.to(dtype), (h if residual is not None else None), mean, rstd


def _norm_bwd_reference(dy, x, weight, mean, rstd, dresidual_out, rms, need_dx, need_dw, need_db,
                        dw_dtype=None, db_dtype=None):
    """Same contract as :func:`mmfast.kernels.norm.norm_bwd`, in plain PyTorch (explicit formulas)."""
    cdt = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(cdt)
    xhat = (xf if rms else xf - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    dyf = dy.to(cdt)
    dx = dw = db = None
    if need_dx:
        wdy = dyf * weight.to(cdt) if weight is not None else dyf
        c1 = (xhat * wdy).mean(-1, keepdim=True)
        proj = xhat * c1 if rms else xhat * c1 + wdy.mean(-1, keepdim=True)
        dxf = (wdy - proj) * rstd.unsqueeze(-1)
        if dresidual_out is not None:
            dxf = dxf + dresidual_out.to(cdt)
        dx = dxf.to(x.dtype).contiguous()
    if need_dw:
        dw = (dyf * xhat).reshape(-1, x.shape[-1]).sum(0).to(dw_dtype or weight.dtype)
    if need_db:
        db = dyf.reshape(-1, x.shape[-1]).sum(0).to(db_dtype or x.dtype)
    return dx, dw, db


def rms_norm_reference(x: Tensor, weight: Optional[Tensor], eps: float = 1e-6, residual: Optional[Tensor] = None):
    """RMSNorm as HF ``LlamaRMSNorm`` computes it (plus the optional residual add), differentiable."""
    y, h, _, _ = _norm_fwd_reference(x, weight, None, residual, eps, rms=True)
    return y if residual is None else (y, h)


def layer_norm_reference(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-5,
                         residual: Optional[Tensor] = None):
    """LayerNorm as ``nn.LayerNorm`` computes it (plus the optional residual add), differentiable."""
    y, h, _, _ = _norm_fwd_reference(x, weight, bias, residual, eps, rms=False)
    return y if residual is None else (y, h)


# ---------------------------------------------------------------------------------------------
# backend dispatch on 2-D row views
# ---------------------------------------------------------------------------------------------


def _flat(t: Optional[Tensor]) -> Optional[Tensor]:
    return t if t is None or t.dim() == 1 else t.reshape(-1)


def _impl(x: Tensor, rms: bool, direction: str, residual: bool):
    backend = resolve_backend(x.device, KernelKey("rms_norm" if rms else "layer_norm", direction, x.dtype, x.shape[-1],
                                                  residual))
    if backend == "cuda":
        from ..kernels import cuda_ext as kernels

        return kernels.norm_fwd, kernels.norm_bwd
    if backend == "triton":
        from ..kernels import norm as kernels

        return kernels.norm_fwd, kernels.norm_bwd
    return _norm_fwd_reference, _norm_bwd_reference


def _fwd_eager(x, weight, bias, residual, eps, rms):
    """``(y, residual_out | None, mean | None, rstd)``, y and residual_out shaped like x, the statistics
    like ``x.shape[:-1]``."""
    fwd, _ = _impl(x, rms, "fwd", residual is not None)
    y, h, mean, rstd = fwd(as_rows(x), weight, bias, None if residual is None else as_rows(residual), eps, rms)
    if x.dim() != 2:
        lead = x.shape[:-1]
        y = _own_tensor(y.reshape(x.shape))
        h = None if h is None else _own_tensor(h.reshape(x.shape))
        mean = None if mean is None else mean.reshape(lead)
        rstd = rstd.reshape(lead)
    return y, h, mean, rstd


def _own_tensor(view: Tensor) -> Tensor:
    """``view`` (of a row-shaped result) as a tensor of its own over the same memory: a norm module's output
    that is a view makes FSDP2 warn that an in-place op on it would drop its pre-backward hook (the
    PyTorch norms return tensors of their own)."""
    if view._base is None:
        return view
    return view.new_empty(0).set_(view.untyped_storage(), view.storage_offset(), view.shape, view.stride())


def _bwd_eager(dy, x, weight, mean, rstd, dres, rms, need_dx, need_dw, need_db, db_dtype):
    """``(dx | None, dweight | None, dbias | None)``."""
    _, bwd = _impl(x, rms, "bwd", dres is not None)
    dx, dw, db = bwd(
        as_rows(dy), as_rows(x), weight, _flat(mean), _flat(rstd), None if dres is None else as_rows(dres),
        rms, need_dx, need_dw, need_db,
        dw_dtype=None if weight is None else weight.dtype, db_dtype=db_dtype,
    )
    if dx is not None and x.dim() != 2:
        dx = dx.reshape(x.shape)
    return dx, dw, db


def _fwd(x, weight, bias, residual, eps, rms):
    """:func:`_fwd_eager` with empty tensors for the missing outputs (custom ops return tensors only)."""
    y, h, mean, rstd = _fwd_eager(x, weight, bias, residual, eps, rms)
    return (
        y,
        x.new_empty(0) if h is None else h,
        x.new_empty(0, dtype=torch.float32) if mean is None else mean,
        rstd,
    )


def _bwd(dy, x, weight, mean, rstd, dres, rms, need_dx, need_dw, need_db, db_dtype):
    dx, dw, db = _bwd_eager(dy, x, weight, mean, rstd, dres, rms, need_dx, need_dw, need_db, db_dtype)
    return tuple(dy.new_empty(0) if t is None else t for t in (dx, dw, db))


# ---------------------------------------------------------------------------------------------
# custom ops: RMSNorm
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("mmfast::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(x: Tensor, weight: Optional[Tensor], residual: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(y, residual_out, rstd)``; ``residual_out`` is empty without a residual."""
    check_norm_inputs("mmfast::rms_norm_fwd", x, weight, None, residual, eps)
    y, h, _, rstd = _fwd(x, weight, None, residual, eps, rms=True)
    return y, h, rstd


@rms_norm_fwd.register_fake
def _(x, weight, residual, eps):
    check_norm_inputs("mmfast::rms_norm_fwd", x, weight, None, residual, eps)
    h = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
    return x.new_empty(x.shape), h, x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("mmfast::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], rstd: Tensor, dresidual_out: Optional[Tensor],
                 need_dx: bool, need_dw: bool) -> tuple[Tensor, Tensor]:
    """Returns ``(dx, dweight)``; each is empty when not requested. ``x`` is the normalised input."""
    check_norm_bwd_inputs("mmfast::rms_norm_bwd", dy, x, weight, None, None, rstd, dresidual_out, need_dw, False)
    dx, dw, _ = _bwd(dy, x, weight, None, rstd, dresidual_out, True, need_dx, need_dw, False, None)
    return dx, dw


@rms_norm_bwd.register_fake
def _(dy, x, weight, rstd, dresidual_out, need_dx, need_dw):
    check_norm_bwd_inputs("mmfast::rms_norm_bwd", dy, x, weight, None, None, rstd, dresidual_out, need_dw, False)
    dx = dy.new_empty(x.shape, dtype=x.dtype) if need_dx else dy.new_empty(0)
    dw = weight.new_empty(weight.shape) if need_dw else dy.new_empty(0)
    return dx, dw


def _rms_setup_context(ctx, inputs, output):
    x, weight, residual, eps = inputs
    _, h, rstd = output
    ctx.has_residual = residual is not None
    ctx.save_for_backward(*savable(h if ctx.has_residual else x, weight, rstd))
    ctx.mark_non_differentiable(rstd)
    ctx.set_materialize_grads(False)


def _grads_wanted(ctx, residual_index: int) -> tuple[bool, bool]:
    """Whether x and the residual need gradients (both get the same one: d(x + residual))."""
    return ctx.needs_input_grad[0], ctx.has_residual and ctx.needs_input_grad[residual_index]


def _residual_only_grads(dh: Tensor, need_x: bool, need_res: bool, params: int) -> tuple:
    """The gradients where only ``residual_out`` was used (no gradient reached ``y``): the add's, and None
    for the norm's parameters, as PyTorch gives them (zeros would still move them under weight decay and
    momentum), with no kernel run on a zero ``dy``."""
    return (dh if need_x else None, *(None,) * (params - 1), dh if need_res else None, None)


def _rms_grads(ctx, dy, dh, bwd):
    """The gradients of (x, weight, residual, eps) from ``bwd`` (the custom op or the eager call)."""
    h, weight, rstd = ctx.saved_tensors
    need_x, need_res = _grads_wanted(ctx, 2)
    need_dw = weight is not None and ctx.needs_input_grad[1]
    if dy is None:
        return _residual_only_grads(dh, need_x, need_res, 2)
    dx, dw = bwd(dy, h, weight, rstd, dh if ctx.has_residual else None, need_x or need_res, need_dw)
    return (dx if need_x else None, dw if need_dw else None, dx if need_res else None, None)


@once_differentiable  # a second derivative raises with the reason (not "no autograd formula")
def _rms_backward(ctx, dy, dh, _drstd):
    return _rms_grads(ctx, dy, dh, torch.ops.mmfast.rms_norm_bwd)


rms_norm_fwd.register_autograd(_rms_backward, setup_context=_rms_setup_context)


# ---------------------------------------------------------------------------------------------
# custom ops: LayerNorm
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("mmfast::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                   eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(y, residual_out, mean, rstd)``; ``residual_out`` is empty without a residual."""
    check_norm_inputs("mmfast::layer_norm_fwd", x, weight, bias, residual, eps)
    return _fwd(x, weight, bias, residual, eps, rms=False)


@layer_norm_fwd.register_fake
def _(x, weight, bias, residual, eps):
    check_norm_inputs("mmfast::layer_norm_fwd", x, weight, bias, residual, eps)
    h = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
    stat = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return x.new_empty(x.shape), h, stat, stat.new_empty(stat.shape)


@torch.library.custom_op("mmfast::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                   rstd: Tensor, dresidual_out: Optional[Tensor], need_dx: bool, need_dw: bool,
                   need_db: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(dx, dweight, dbias)``; each is empty when not requested. ``bias`` gives dbias's dtype."""
    check_norm_bwd_inputs("mmfast::layer_norm_bwd", dy, x, weight, bias, mean, rstd, dresidual_out, need_dw,
                          need_db)
    return _bwd(dy, x, weight, mean, rstd, dresidual_out, False, need_dx, need_dw, need_db,
                None if bias is None else bias.dtype)


@layer_norm_bwd.register_fake
def _(dy, x, weight, bias, mean, rstd, dresidual_out, need_dx, need_dw, need_db):
    check_norm_bwd_inputs("mmfast::layer_norm_bwd", dy, x, weight, bias, mean, rstd, dresidual_out, need_dw,
                          need_db)
    dx = dy.new_empty(x.shape, dtype=x.dtype) if need_dx else dy.new_empty(0)
    dw = weight.new_empty(weight.shape) if need_dw else dy.new_empty(0)
    db = bias.new_empty(bias.shape) if need_db else dy.new_empty(0)
    return dx, dw, db


def _ln_setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps = inputs
    _, h, mean, rstd = output
    ctx.has_residual = residual is not None
    ctx.save_for_backward(*savable(h if ctx.has_residual else x, weight, bias, mean, rstd))
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)


def _ln_grads(ctx, dy, dh, bwd):
    """The gradients of (x, weight, bias, residual, eps) from ``bwd`` (the custom op or the eager call)."""
    h, weight, bias, mean, rstd = ctx.saved_tensors
    need_x, need_res = _grads_wanted(ctx, 3)
    need_dw = weight is not None and ctx.needs_input_grad[1]
    need_db = bias is not None and ctx.needs_input_grad[2]
    if dy is None:
        return _residual_only_grads(dh, need_x, need_res, 3)
    dx, dw, db = bwd(dy, h, weight, bias, mean, rstd, dh if ctx.has_residual else None,
                     need_x or need_res, need_dw, need_db)
    return (dx if need_x else None, dw if need_dw else None, db if need_db else None, dx if need_res else None, None)


@once_differentiable  # a second derivative raises with the reason (not "no autograd formula")
def _ln_backward(ctx, dy, dh, _dmean, _drstd):
    return _ln_grads(ctx, dy, dh, torch.ops.mmfast.layer_norm_bwd)


layer_norm_fwd.register_autograd(_ln_backward, setup_context=_ln_setup_context)


# ---------------------------------------------------------------------------------------------
# eager fast path: the same forward/backward without the custom-op dispatcher
# ---------------------------------------------------------------------------------------------

class _RMSNormFn(torch.autograd.Function):
    jvp = no_forward_ad("rms_norm")

    @staticmethod
    def forward(ctx, x, weight, residual, eps):
        y, h, _, rstd = _fwd_eager(x, weight, None, residual, eps, rms=True)
        ctx.has_residual = residual is not None
        ctx.save_for_backward(*savable(h if ctx.has_residual else x, weight, rstd))
        ctx.set_materialize_grads(False)
        return y, h

    @staticmethod
    @once_differentiable  # a second derivative raises, as the custom op's
    def backward(ctx, dy, dh):
        def bwd(dy, h, weight, rstd, dres, need_dx, need_dw):
            return _bwd_eager(dy, h, weight, None, rstd, dres, True, need_dx, need_dw, False, None)[:2]

        # batched gradients (``is_grads_batched``): the custom op, slice by slice
        return _rms_grads(ctx, dy, dh, torch.ops.mmfast.rms_norm_bwd if batched(dy, dh) else bwd)


class _LayerNormFn(torch.autograd.Function):
    jvp = no_forward_ad("layer_norm")

    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps):
        y, h, mean, rstd = _fwd_eager(x, weight, bias, residual, eps, rms=False)
        ctx.has_residual = residual is not None
        ctx.save_for_backward(*savable(h if ctx.has_residual else x, weight, bias, mean, rstd))
        ctx.set_materialize_grads(False)
        return y, h

    @staticmethod
    @once_differentiable  # a second derivative raises, as the custom op's
    def backward(ctx, dy, dh):
        def bwd(dy, h, weight, bias, mean, rstd, dres, need_dx, need_dw, need_db):
            return _bwd_eager(dy, h, weight, mean, rstd, dres, False, need_dx, need_dw, need_db,
                              None if bias is None else bias.dtype)

        return _ln_grads(ctx, dy, dh, torch.ops.mmfast.layer_norm_bwd if batched(dy, dh) else bwd)


# ---------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------


def rms_norm(x: Tensor, weight: Optional[Tensor], eps: float = 1e-6, residual: Optional[Tensor] = None):
    """Fused RMSNorm over the last dimension, rounding like HF ``LlamaRMSNorm``.

    ``weight`` may be in x's dtype or float32 (master weights); the output is in x's dtype.
    With ``residual``, returns ``(y, residual_out)`` with ``residual_out = x + residual``, ``y = rms_norm(residual_out)``.
    """
    check_norm_inputs("rms_norm", x, weight, None, residual, eps)
    if plain_eager(x, weight, residual):
        if records_grad(x, weight, residual):
            y, h = _RMSNormFn.apply(x, weight, residual, float(eps))
        else:  # a frozen tower, evaluation: the forward kernel alone
            y, h, _, _ = _fwd_eager(x, weight, None, residual, float(eps), rms=True)
    else:
        refuse_functorch_ad("rms_norm", x, weight, residual)
        y, h, _ = torch.ops.mmfast.rms_norm_fwd(x, weight, residual, float(eps))
    return y if residual is None else (y, h)


#: Device types whose autocast runs ``layer_norm`` in float32 (PyTorch's CUDA autocast lists layer_norm
#: among its float32 ops; CPU autocast leaves it in the input's dtype).
AUTOCAST_FP32_LAYER_NORM = ("cuda",)


def _autocast_fp32(x: Tensor) -> bool:
    """Whether autocast, on for ``x``'s device, runs PyTorch's ``layer_norm`` of ``x`` in float32."""
    return isinstance(x, Tensor) and x.device.type in AUTOCAST_FP32_LAYER_NORM \
        and x.dtype in (torch.float16, torch.bfloat16, torch.float32) and torch.is_autocast_enabled(x.device.type)


def _fp32(t: Optional[Tensor]) -> Optional[Tensor]:
    return t.float() if isinstance(t, Tensor) and t.dtype in (torch.float16, torch.bfloat16) else t


def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-5,
               residual: Optional[Tensor] = None):
    """Fused LayerNorm over the last dimension, rounding like ``nn.LayerNorm``.

    ``weight``/``bias`` are optional and may be in x's dtype or float32; the output is in x's dtype.
    With ``residual``, returns ``(y, residual_out)`` with ``residual_out = x + residual``, ``y = layer_norm(residual_out)``.
    Under CUDA autocast, as PyTorch's ``layer_norm`` there: the inputs are cast to float32 and so is the
    output (with ``residual``, ``residual_out = x + residual`` as PyTorch adds them, then the norm of it).
    """
    if _autocast_fp32(x):
        if residual is not None:  # (another dtype is added as PyTorch adds it: an fp32 stream, a bf16 branch)
            if not isinstance(residual, Tensor) or residual.shape != x.shape or residual.device != x.device:
                check_norm_inputs("layer_norm", x, None, None, residual, eps)  # (raises, naming it)
            h = x + residual
            return layer_norm(_fp32(h), _fp32(weight), _fp32(bias), eps), h
        x, weight, bias = _fp32(x), _fp32(weight), _fp32(bias)
    check_norm_inputs("layer_norm", x, weight, bias, residual, eps)
    if plain_eager(x, weight, bias, residual):
        if records_grad(x, weight, bias, residual):
            y, h = _LayerNormFn.apply(x, weight, bias, residual, float(eps))
        else:  # a frozen tower, evaluation: the forward kernel alone
            y, h, _, _ = _fwd_eager(x, weight, bias, residual, float(eps), rms=False)
    else:
        refuse_functorch_ad("layer_norm", x, weight, bias, residual)
        y, h, _, _ = torch.ops.mmfast.layer_norm_fwd(x, weight, bias, residual, float(eps))
    return y if residual is None else (y, h)
