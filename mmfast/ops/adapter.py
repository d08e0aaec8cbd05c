"""The Mixture-of-Modality adapter as a ``torch.library`` custom op with autograd, and its reference.

:func:`mma_adapter` ``(x, down_w, down_b, up_w, up_b, mix, scale, groups, dropout, seed)``:

    z  = x down_w^T + down_b                        x [B, S, D], down_w [R, D]
    zd = dropout(z)                                  keep mask from ``seed``, scaled by 1 / (1 - p)
    y  = x + scale * sum_e mix[:, e] * (zd ._G up_w[e]^T + up_b[e])      up_w [E, D, R/G], mix [B, E]

``._G`` is the grouped up-projection (output channels of group g read hidden channels of group g).
The router (``mix = softmax(router(route) / t)``) stays outside the op, in autograd, so d(route) and
the router's gradients come from its ``d mix`` output. Ops: ``mmfast::mma_adapter_fwd`` and
``mmfast::mma_adapter_bwd``. Plain eager calls take the same forward and backward through a
``torch.autograd.Function`` instead (the eager fast path of :mod:`mmfast.ops.norm`, same rules and the
same ``MMFAST_EAGER=ops`` switch).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backend import KernelKey, as_rows, batched, no_forward_ad, once_differentiable, plain_eager, refuse_functorch_ad, resolve_backend
from .checks import check_activation, check_device, check_like, check_tensor

# ---------------------------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------------------------


def check_adapter_inputs(x, down_w, down_b, up_w, up_b, mix, scale, groups, dropout, seed) -> None:
    fn = "mma_adapter"
    named = dict(x=x, down_w=down_w, down_b=down_b, up_w=up_w, up_b=up_b, mix=mix)
    for name, t in named.items():
        check_tensor(fn, name, t)
    check_activation(fn, "x", x)
    for name in ("down_w", "down_b", "up_w", "up_b"):
        if named[name].dtype not in (x.dtype, torch.float32):
            raise TypeError(f"{fn}: {name} must be in x's dtype ({x.dtype}) or float32, got {named[name].dtype}")
    if not mix.dtype.is_floating_point:
        raise TypeError(f"{fn}: mix must be floating point, got {mix.dtype}")
    for name, t in named.items():
        check_device(fn, name, t, "x", x)
    if x.dim() != 3:
        raise ValueError(f"{fn}: x must be [batch, seq, dim], got shape {tuple(x.shape)}")
    B, S, D = x.shape
    if down_w.dim() != 2 or down_w.shape[1] != D:
        raise ValueError(f"{fn}: down_w must be [hidden, {D}], got {tuple(down_w.shape)}")
    R = down_w.shape[0]
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{fn}: groups must be a positive int, got {groups!r}")
    if R % groups or D % groups:
        raise ValueError(f"{fn}: groups={groups} must divide hidden ({R}) and dim ({D})")
    if down_b.shape != (R,):
        raise ValueError(f"{fn}: down_b must have shape ({R},), got {tuple(down_b.shape)}")
    if up_w.dim() != 3 or up_w.shape[1:] != (D, R // groups):
        raise ValueError(f"{fn}: up_w must be [experts, {D}, {R // groups}], got {tuple(up_w.shape)}")
    E = up_w.shape[0]
    if up_b.shape != (E, D):
        raise ValueError(f"{fn}: up_b must have shape ({E}, {D}), got {tuple(up_b.shape)}")
    if mix.shape != (B, E):
        raise ValueError(f"{fn}: mix must have shape ({B}, {E}) (batch, experts), got {tuple(mix.shape)}")
    for name, v in (("scale", scale), ("dropout", dropout)):
        if isinstance(v, bool) or not isinstance(v, (float, int)):  # a tensor's autograd would be lost
            raise TypeError(f"{fn}: {name} must be a Python float, got {type(v).__name__}")
    if not abs(scale) < float("inf"):
        raise ValueError(f"{fn}: scale must be finite, got {scale}")
    if not 0 <= dropout < 1:
        raise ValueError(f"{fn}: dropout must be in [0, 1), got {dropout}")
    if dropout > 0:
        if not isinstance(seed, Tensor) or seed.numel() != 1 or seed.dtype != torch.int64 or seed.device != x.device:
            raise ValueError(f"{fn}: dropout > 0 needs seed, a one-element int64 tensor on {x.device}")
    if B * S * R >= 2**31:
        raise ValueError(f"{fn}: batch * seq * hidden = {B * S * R} must stay below 2**31 (dropout offsets)")


def check_adapter_bwd_inputs(dy, x, z, down_w, down_b, up_w, up_b, mix, scale, groups, dropout, seed) -> None:
    """The backward op's arguments: the forward's, dy like x, z the forward's float32 [B * S, hidden]."""
    check_adapter_inputs(x, down_w, down_b, up_w, up_b, mix, scale, groups, dropout, seed)
    fn = "mma_adapter"
    check_like(fn, "dy", dy, "x", x)
    check_tensor(fn, "z", z)
    rows = (x.shape[0] * x.shape[1], down_w.shape[0])
    if z.dtype != torch.float32 or z.shape != rows:
        raise ValueError(f"{fn}: z must be the forward's float32 {rows}, got {z.dtype} {tuple(z.shape)}")
    check_device(fn, "z", z, "x", x)


# ---------------------------------------------------------------------------------------------
# reference (pure PyTorch)
# ---------------------------------------------------------------------------------------------


def mma_adapter_reference(x, down_w, down_b, up_w, up_b, mix, scale=1.0, groups=2, keep=None):
    """The formula, differentiable, computed in fp32 (float64 for float64 inputs); ``keep`` is the
    scaled dropout mask [B, S, R] (0 or 1 / (1 - p)) or None. Output in x's dtype."""
    cdt = torch.promote_types(x.dtype, torch.float32)
    E, D, RG = up_w.shape
    z = x.to(cdt) @ down_w.to(cdt).T + down_b.to(cdt)
    if keep is not None:
        z = z * keep.to(cdt)
    zg = z.unflatten(-1, (groups, RG))  # [B, S, G, RG]
    ug = up_w.to(cdt).view(E, groups, D // groups, RG)  # [E, G, D/G, RG]
    out = torch.einsum("bsgj,egdj->bsegd", zg, ug).flatten(-2) + up_b.to(cdt)  # [B, S, E, D]
    y = x.to(cdt) + scale * (mix.to(cdt)[:, None, :, None] * out).sum(2)
    return y.to(x.dtype)


def mma_adapter_lavin_style(x, down_w, down_b, up_w, up_b, mix, scale=1.0, groups=2, keep=None):
    """What an eager LaVIN-style module computes: everything in x's dtype, one expert at a time
    (fp32 weights are cast to x's dtype, as autocast would)."""
    dt = x.dtype
    z = torch.nn.functional.linear(x, down_w.to(dt), down_b.to(dt))
    if keep is not None:
        z = z * keep.to(dt)
    E, D, RG = up_w.shape
    zg = z.unflatten(-1, (groups, RG))
    y = x
    for e in range(E):
        ug = up_w[e].to(dt).view(groups, D // groups, RG)
        out = torch.einsum("bsgj,gdj->bsgd", zg, ug).flatten(-2) + up_b[e].to(dt)
        y = y + scale * mix[:, e, None, None].to(dt) * out
    return y


def reference_keep_mask(seed: Tensor, M: int, R: int, p: float, device) -> Tensor:
    """The reference backend's dropout mask (its own random stream: torch's generator seeded by seed)."""
    g = torch.Generator(device="cpu").manual_seed(int(seed.item()))
    return (torch.rand(M, R, generator=g) >= p).to(device)


def dropout_keep_mask(seed: Tensor, M: int, R: int, p: float) -> Tensor:
    """The keep mask [M, R] the backend selected for ``seed``'s device draws for ``seed`` (rows are
    tokens, b * S + s; columns hidden channels). The Triton and CUDA C++ kernels draw the same mask."""
    if resolve_backend(seed.device) == "triton":
        from ..kernels import adapter as kernels

        return kernels.keep_mask(seed, M, R, p)
    return reference_keep_mask(seed, M, R, p, seed.device)


def _reference_fwd(x, down_w, down_b, up_w, up_b, mix, scale, groups, p, seed):
    B, S, D = x.shape
    R = down_w.shape[0]
    keep = reference_keep_mask(seed, B * S, R, p, x.device).view(B, S, R) / (1 - p) if p > 0 else None
    z = (x.float() @ down_w.float().T + down_b.float()).reshape(B * S, R)
    return mma_adapter_reference(x, down_w, down_b, up_w, up_b, mix, scale, groups, keep), z


def _reference_bwd(dy, x, down_w, down_b, up_w, up_b, mix, scale, groups, p, seed):
    """Explicit gradients of :func:`mma_adapter_reference` (in fp32), in the order
    (dx, d_down_w, d_down_b, d_up_w, d_up_b, d_mix)."""
    B, S, D = x.shape
    E, _, RG = up_w.shape
    R, G, DG = down_w.shape[0], groups, D // groups
    f = torch.float32
    xf, A, U, c, w, g = x.to(f), down_w.to(f), up_w.to(f), up_b.to(f), mix.to(f), dy.to(f)
    keep = reference_keep_mask(seed, B * S, R, p, x.device).view(B, S, R).to(f) / (1 - p) if p > 0 else None
    z = xf @ A.T + down_b.to(f)
    zd = z * keep if keep is not None else z
    ug = U.view(E, G, DG, RG)
    zg = zd.view(B, S, G, RG)
    out = torch.einsum("bsgj,egdj->bsegd", zg, ug).flatten(-2) + c  # [B, S, E, D]
    d_out = scale * w[:, None, :, None] * g[:, :, None, :]  # [B, S, E, D]
    dmix = scale * torch.einsum("bsd,bsed->be", g, out)
    dc = d_out.sum((0, 1))
    dU = torch.einsum("bsegd,bsgj->egdj", d_out.view(B, S, E, G, DG), zg).reshape(E, D, RG)
    dzd = torch.einsum("bsegd,egdj->bsgj", d_out.view(B, S, E, G, DG), ug).reshape(B, S, R)
    dz = dzd * keep if keep is not None else dzd
    dx = g + dz @ A
    return dx, torch.einsum("bsr,bsd->rd", dz, xf), dz.sum((0, 1)), dU, dc, dmix


# ---------------------------------------------------------------------------------------------
# custom ops
# ---------------------------------------------------------------------------------------------


def _backend(x: Tensor, down_w: Tensor, up_w: Tensor, p: float, direction: str, count: bool = True) -> str:
    """The backend that runs this call's ``direction`` (an adapter beyond the CUDA C++ kernels' limits is
    one they do not take: :func:`resolve_backend`); ``count=False`` for the dropout-mask bookkeeping,
    which asks again about a call already counted."""
    from ..kernels import cuda_ext

    return resolve_backend(x.device, KernelKey("mma_adapter", direction, x.dtype, x.shape[-1]),
                           cuda_unsupported=cuda_ext.adapter_unsupported(down_w.shape[0], up_w.shape[0], p),
                           count=count)


def _launchers(backend: str):
    """The module whose ``adapter_fwd`` / ``adapter_bwd`` run ``backend`` ("cuda" or "triton"): the same
    signatures in both."""
    if backend == "cuda":
        from ..kernels import cuda_ext

        return cuda_ext
    from ..kernels import adapter

    return adapter


def _fwd(x, down_w, down_b, up_w, up_b, mix, scale, groups, p, seed):
    """``(y [B, S, D], z [B * S, R] fp32)`` on the backend selected now."""
    B, S, D = x.shape
    backend = _backend(x, down_w, up_w, p, "fwd")
    if backend == "reference":
        return _reference_fwd(x, down_w, down_b, up_w, up_b, mix, scale, groups, p, seed)
    y, z = _launchers(backend).adapter_fwd(as_rows(x), S, down_w, down_b, up_w, up_b, mix.float().contiguous(),
                                           scale, groups, p, seed)
    return y.view(B, S, D), z


def _bwd(dy, x, z, down_w, down_b, up_w, up_b, mix, scale, groups, p, seed, need_dx, need_dw, need_dmix):
    """``(dx, d_down_w, d_down_b, d_up_w, d_up_b, d_mix)`` in the inputs' shapes and dtypes, None where
    not requested."""
    backend = _backend(x, down_w, up_w, p, "bwd")
    if backend == "reference":
        grads = _reference_bwd(dy, x, down_w, down_b, up_w, up_b, mix, scale, groups, p, seed)
        grads = [g if want else None for g, want in zip(grads, (need_dx,) + (need_dw,) * 4 + (need_dmix,))]
    else:
        grads = _launchers(backend).adapter_bwd(as_rows(dy), as_rows(x), z, x.shape[1], down_w, up_w, up_b,
                                                mix.float().contiguous(), scale, groups, p, seed, need_dx, need_dw,
                                                need_dmix)
    targets = (x, down_w, down_b, up_w, up_b, mix)
    return tuple(None if g is None else g.reshape(t.shape).to(t.dtype) for g, t in zip(grads, targets))


@torch.library.custom_op("mmfast::mma_adapter_fwd", mutates_args=())
def mma_adapter_fwd(x: Tensor, down_w: Tensor, down_b: Tensor, up_w: Tensor, up_b: Tensor, mix: Tensor,
                    scale: float, groups: int, p: float, seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Returns ``(y [B, S, D], z [B * S, R] fp32)``; z (before dropout) is saved for backward."""
    check_adapter_inputs(x, down_w, down_b, up_w, up_b, mix, scale, groups, p, seed)
    return _fwd(x, down_w, down_b, up_w, up_b, mix, scale, groups, p, seed)


@mma_adapter_fwd.register_fake
def _(x, down_w, down_b, up_w, up_b, mix, scale, groups, p, seed):
    check_adapter_inputs(x, down_w, down_b, up_w, up_b, mix, scale, groups, p, seed)
    B, S, D = x.shape
    return x.new_empty((B, S, D)), x.new_empty((B * S, down_w.shape[0]), dtype=torch.float32)


@torch.library.custom_op("mmfast::mma_adapter_bwd", mutates_args=())
def mma_adapter_bwd(dy: Tensor, x: Tensor, z: Tensor, down_w: Tensor, down_b: Tensor, up_w: Tensor,
                    up_b: Tensor, mix: Tensor, scale: float, groups: int, p: float, seed: Optional[Tensor],
                    need_dx: bool, need_dw: bool, need_dmix: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(dx, d_down_w, d_down_b, d_up_w, d_up_b, d_mix)``; the ones not requested are empty."""
    check_adapter_bwd_inputs(dy, x, z, down_w, down_b, up_w, up_b, mix, scale, groups, p, seed)
    grads = _bwd(dy, x, z, down_w, down_b, up_w, up_b, mix, scale, groups, p, seed, need_dx, need_dw, need_dmix)
    return tuple(dy.new_empty(0) if g is None else g for g in grads)


@mma_adapter_bwd.register_fake
def _(dy, x, z, down_w, down_b, up_w, up_b, mix, scale, groups, p, seed, need_dx, need_dw, need_dmix):
    check_adapter_bwd_inputs(dy, x, z, down_w, down_b, up_w, up_b, mix, scale, groups, p, seed)
    like = lambda t, want: t.new_empty(t.shape) if want else dy.new_empty(0)  # noqa: E731
    return (like(x, need_dx), like(down_w, need_dw), like(down_b, need_dw), like(up_w, need_dw),
            like(up_b, need_dw), like(mix, need_dmix))


def _mask_stream(backend: str) -> str:
    """Which dropout masks a backend draws for a seed: the kernels (Triton and CUDA C++) draw the same
    Philox masks, the reference its own (torch's generator)."""
    return "reference" if backend == "reference" else "philox"


def _save(ctx, inputs, z):
    x, down_w, down_b, up_w, up_b, mix, scale, groups, p, seed = inputs
    ctx.save_for_backward(x, z, down_w, down_b, up_w, up_b, mix, seed)
    ctx.args = (scale, groups, p)
    # with dropout the backward must redraw the forward's mask: note whose it was (the backend of a call
    # is chosen when it runs, and the forward has just run under the choice made now)
    ctx.fwd_backend = _backend(x, down_w, up_w, p, "fwd", count=False) if p > 0 else None


def _check_mask_stream(ctx, x, down_w, up_w) -> None:
    if ctx.fwd_backend is None:
        return
    bwd_backend = _backend(x, down_w, up_w, ctx.args[2], "bwd", count=False)
    if _mask_stream(bwd_backend) != _mask_stream(ctx.fwd_backend):
        raise RuntimeError(
            f"mma_adapter: the forward ran on the {ctx.fwd_backend} backend and the backward would run on "
            f"{bwd_backend}, which draws a different dropout mask for the same seed, so its gradients would not "
            f"be the forward's. Run the backward under the forward's backend (put loss.backward() inside the "
            f"same mmfast.use_backend block, or keep MMFAST_BACKEND unchanged between them).")


def _setup_context(ctx, inputs, output):
    _save(ctx, inputs, output[1])
    ctx.mark_non_differentiable(output[1])


def _grads(ctx, dy, bwd):
    """The gradients of the forward's inputs from ``bwd`` (the custom op or the eager call)."""
    x, z, down_w, down_b, up_w, up_b, mix, seed = ctx.saved_tensors
    _check_mask_stream(ctx, x, down_w, up_w)
    need = ctx.needs_input_grad
    grads = bwd(dy, x, z, down_w, down_b, up_w, up_b, mix, *ctx.args, seed, need[0], any(need[1:5]), need[5])
    return tuple(g if need[i] else None for i, g in enumerate(grads)) + (None, None, None, None)


@once_differentiable  # a second derivative raises with the reason (not "no autograd formula")
def _backward(ctx, dy, _dz):
    return _grads(ctx, dy, torch.ops.mmfast.mma_adapter_bwd)


mma_adapter_fwd.register_autograd(_backward, setup_context=_setup_context)


class _MMAdapterFn(torch.autograd.Function):
    """The eager fast path (see :mod:`mmfast.ops.norm`): the same forward and backward as the custom ops,
    without the dispatcher's per-call cost."""

    jvp = no_forward_ad("mma_adapter")

    @staticmethod
    def forward(ctx, x, down_w, down_b, up_w, up_b, mix, scale, groups, p, seed):
        y, z = _fwd(x, down_w, down_b, up_w, up_b, mix, scale, groups, p, seed)
        _save(ctx, (x, down_w, down_b, up_w, up_b, mix, scale, groups, p, seed), z)
        return y

    @staticmethod
    @once_differentiable  # a second derivative raises, as the custom op's
    def backward(ctx, dy):
        return _grads(ctx, dy, torch.ops.mmfast.mma_adapter_bwd if batched(dy) else _bwd)


def mma_adapter(x: Tensor, down_w: Tensor, down_b: Tensor, up_w: Tensor, up_b: Tensor, mix: Tensor,
                scale: float = 1.0, groups: int = 2, dropout: float = 0.0, seed: Optional[Tensor] = None) -> Tensor:
    """The fused MMA adapter (module docstring). ``seed`` (one-element int64 tensor on x's device) is
    needed when ``dropout > 0``; the same seed gives the same mask."""
    check_adapter_inputs(x, down_w, down_b, up_w, up_b, mix, scale, groups, dropout, seed)
    args = (x, down_w, down_b, up_w, up_b, mix, float(scale), groups, float(dropout), seed if dropout > 0 else None)
    if plain_eager(x, down_w, down_b, up_w, up_b, mix, args[-1]):
        return _MMAdapterFn.apply(*args)
    refuse_functorch_ad("mma_adapter", x, down_w, down_b, up_w, up_b, mix)
    y, _ = torch.ops.mmfast.mma_adapter_fwd(*args)
    return y
