"""LM-head + cross-entropy without the full logits: ``linear_cross_entropy``.

A causal LM's training loss computes ``logits = hidden @ W^T`` for every position, upcasts them to fp32
and takes the cross-entropy. At LLaVA widths that is the step's largest single tensor family: fp32
logits kept for backward, their gradient, and the low-precision logits in the output, all
``tokens x vocab``. And LLaVA computes logits for every image position, which the labels ignore.

``linear_cross_entropy`` computes the same loss over the rows whose target is not ``ignore_index``
only, in row chunks whose logits live just long enough to give the chunk's loss and its gradients. It
keeps for backward the gradient with respect to the kept rows of ``hidden`` (``rows x hidden`` in the
activation dtype; fp32 for fp16) and, when ``weight`` is trained, what its gradient needs: the logits'
gradient and the kept rows in the activation dtype when those are the smaller (``rows x (vocab + hidden)``),
else an fp32 accumulator (``vocab x hidden``). The matmuls are cuBLAS's, in the dtype ``F.linear`` would
use; the softmax statistics are fp32.

Rounding follows the unfused computation: logits rounded to the activation dtype, then fp32; the logits'
gradient rounded to the activation dtype before the products, with the reduction's scale applied before
that rounding (the backward's incoming gradient, 1 for ``loss.backward()``, multiplies afterwards, in
fp32). For fp16 the products take the logits' gradient at a power-of-two lift (unfused, a loss scaler
keeps that gradient in fp16's range): the hidden gradient is kept in fp32 (:func:`_kept_hidden_dtype`),
and a trained weight's is summed in fp32 (the accumulator, whatever its size) and scaled back once.

The kept rows are found with one ``nonzero`` (a host sync). Plain eager calls run it in a
``torch.autograd.Function`` that keeps only the kept rows' gradients; ``torch.compile``, modes and tensor
subclasses see the custom op ``mmfast::linear_cross_entropy_fwd``, which does the same inside one opaque
call with fixed-shape outputs (the hidden gradient at the hidden's shape, a trained weight's as an fp32
``vocab x hidden`` accumulator), so a compiled graph holds it without a break.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import (TIES_ATTR, batched, no_forward_ad, once_differentiable, plain_eager, records_grad,
                      refuse_functorch_ad, warn_once)

#: Rows per chunk are chosen so that one chunk's fp32 logits take at most this many bytes.
CHUNK_BYTES = 128 * 2**20
_REDUCTIONS = ("mean", "sum")


def _chunk_rows(vocab: int, rows: int, chunk_rows: Optional[int]) -> int:
    if chunk_rows is not None:
        if chunk_rows < 1:
            raise ValueError(f"linear_cross_entropy: chunk_rows must be >= 1, got {chunk_rows}")
        return chunk_rows
    c = max(64, CHUNK_BYTES // (4 * vocab))
    return max(1, min(rows, 1 << (c.bit_length() - 1)))


def keeps_logit_gradients(rows: int, vocab: int, hidden: int, itemsize: int) -> bool:
    """Whether a trained weight's gradient is kept as the rows' logits' gradient and the rows themselves
    (``rows x (vocab + hidden)`` in the activation dtype) rather than an fp32 ``vocab x hidden`` accumulator:
    the smaller of the two (``grad_w_mode="auto"``)."""
    return rows * (vocab + hidden) * itemsize <= vocab * hidden * 4


def _autocast_on(device_type: str) -> bool:
    """Whether autocast is on for tensors of this device type (the meta device has none: it raised)."""
    return device_type != "meta" and torch.is_autocast_enabled(device_type)


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    dev = hidden.device.type
    # autocast casts fp32 / fp16 / bf16 operands only, never float64 ones
    if _autocast_on(dev) and torch.float64 not in (hidden.dtype, weight.dtype):
        return torch.get_autocast_dtype(dev)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"linear_cross_entropy: hidden is {hidden.dtype} but weight is {weight.dtype}; "
                        "F.linear needs one dtype (or an autocast region)")
    return hidden.dtype


@dataclasses.dataclass
class _Grads:
    """What :func:`_loss_and_grads` returns: the scalar loss and what the gradients need (None where not
    asked for). ``g_h``: the kept rows' hidden gradient [n, H] in the compute dtype (fp32 for fp16: see
    :func:`_kept_hidden_dtype`); the weight's gradient
    either as ``g_logits`` [n, V] (with ``hv``, the kept rows of hidden) or as ``g_w32`` [V, H] fp32;
    ``g_b`` [V] fp32. All carry the reduction's scale, not the backward's incoming gradient."""

    loss: Tensor
    rows: Tensor
    g_h: Optional[Tensor]
    g_logits: Optional[Tensor]
    hv: Optional[Tensor]
    g_w32: Optional[Tensor]
    g_b: Optional[Tensor]


def _kept_hidden_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the hidden gradient is kept in until the backward multiplies it by the incoming gradient.

    fp16 keeps it in fp32: the logits' gradient carries the reduction's scale (1/n for a mean over n
    rows), which puts it below fp16's normal range at training batch sizes, and the backward's loss scale
    (GradScaler's, which would lift it there unfused) only arrives later. So for fp16 the logits' gradient
    is rounded at a power-of-two multiple that cancels the reduction's scale, the product with the weight
    taken in fp16 as unfused, and the result scaled back exactly in fp32. bf16 has fp32's range."""
    return torch.float32 if dtype == torch.float16 else dtype


class TargetOutOfRange(IndexError, ValueError):
    """A target outside ``[0, V)`` that is not ``ignore_index``: an IndexError, as ``F.cross_entropy``'s
    ("Target ... is out of bounds"), and a ValueError, as the argument checks' errors are."""


def _loss_and_grads(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, ignore_index: int,
                    scale, chunk_rows: Optional[int], need_h: bool, need_w: bool, need_b: bool,
                    grad_w_mode: str, dtype: torch.dtype) -> _Grads:
    """The chunked loss with its gradients taken on the way (module docstring); autocast off."""
    H, V = hidden.shape[-1], weight.shape[0]
    h2 = hidden.reshape(-1, H)
    t = target.reshape(-1)
    kept = t != ignore_index
    bad = (kept & ((t < 0) | (t >= V))).any()  # queued before the nonzero's sync, read after it for free
    rows = kept.nonzero().squeeze(1)
    if bad.item():
        lo, hi = torch.aminmax(t[kept])
        raise TargetOutOfRange(f"linear_cross_entropy: target values must be in [0, {V}) or equal "
                               f"ignore_index={ignore_index}; got values in [{int(lo)}, {int(hi)}]")
    n = rows.numel()
    tv = t.index_select(0, rows)
    w = weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    need_any = need_h or need_w or need_b
    # the reduction's scale (None: the mean over the kept rows), applied to the logits' gradient before
    # it is rounded, as autograd would
    if scale is None:
        scale = 1.0 / n if n else float("nan")
    sc64 = scale.to(device=hidden.device, dtype=torch.float64) if isinstance(scale, Tensor) else \
        torch.tensor(float(scale), device=hidden.device, dtype=torch.float64)
    sc = sc64.float()
    # fp16 (see _kept_hidden_dtype): 2**k near 1 / |scale|, and its inverse, both exact powers of two; the
    # weight's gradient then sums the lifted products in fp32 (accumulate mode) and is scaled back once
    lift = torch.exp2(-torch.round(torch.log2(sc.abs()))) if dtype == torch.float16 and (need_h or need_w) else None
    if lift is not None:
        lift = torch.where(torch.isfinite(lift) & (lift > 0), lift, torch.ones_like(lift))
    if need_w and (grad_w_mode == "auto" or lift is not None):
        # (logits mode keeps the kept rows beside their logits' gradient, [n, V + H]; accumulate, [V, H] fp32)
        grad_w_mode = "logits" if lift is None and keeps_logit_gradients(n, V, H, dtype.itemsize) else "accumulate"
    logits_mode = need_w and grad_w_mode == "logits"
    # the kept rows in the compute dtype: whole where logits mode keeps them for the backward, else a
    # chunk at a time (no [n, H] copy beside the hidden gradient at the forward's peak); all rows kept
    # and no cast: slices of hidden itself
    everyone = n == h2.shape[0] and h2.dtype == dtype
    hv = h2.index_select(0, rows).to(dtype) if logits_mode else None
    g_h = h2.new_empty(n, H, dtype=_kept_hidden_dtype(dtype)) if need_h else None
    g_logits = h2.new_empty(n, V, dtype=dtype) if logits_mode else None
    g_w32 = torch.zeros(V, H, device=hidden.device, dtype=torch.float32) \
        if need_w and grad_w_mode == "accumulate" else None
    g_b = torch.zeros(V, device=hidden.device, dtype=torch.float32) if need_b else None
    # per-row losses are fp32 (as PyTorch's); their sum and the scale are taken in fp64, so the scalar
    # is rounded once
    total = torch.zeros((), device=hidden.device, dtype=torch.float64)
    step = _chunk_rows(V, n, chunk_rows)
    for s in range(0, n, step):
        e = min(n, s + step)
        hc = hv[s:e] if hv is not None else h2[s:e] if everyone else h2.index_select(0, rows[s:e]).to(dtype)
        tc = tv[s:e]
        z = F.linear(hc, w, b).float()  # rounded to the activation dtype first, as F.linear returns
        lse = torch.logsumexp(z, dim=-1)
        total += (lse - z.gather(1, tc[:, None]).squeeze(1)).sum(dtype=torch.float64)
        if not need_any:
            continue
        g = z.sub_(lse[:, None]).exp_()  # softmax, in place of the fp32 logits
        g.scatter_add_(1, tc[:, None], g.new_full((e - s, 1), -1.0))
        g.mul_(sc)
        if need_b:
            g_b += g.sum(0)
        if lift is not None:  # the lifted gradient rounded straight into fp16 (no fp32 temporary)
            lifted = torch.mul(g, lift, out=hc.new_empty(e - s, V))
            del z, g
            if need_h:
                torch.mul(torch.mm(lifted, w).float(), 1.0 / lift, out=g_h[s:e])
            if g_w32 is not None:  # a sum over the chunk's rows: fp32 out (a lifted fp16 sum could overflow)
                g_w32 += _mm_fp32(lifted.t(), hc)
            del lifted
            continue
        g = g.to(dtype)
        if need_h and lift is None:
            torch.mm(g, w, out=g_h[s:e])
        if g_logits is not None:
            g_logits[s:e] = g
        elif g_w32 is not None:
            g_w32 += torch.mm(g.t(), hc).float()
        del z, g
    if lift is not None and g_w32 is not None:
        g_w32.mul_(1.0 / lift)
    return _Grads((total * sc64).float(), rows, g_h, g_logits, hv if g_logits is not None else None, g_w32, g_b)


_MM_OUT_DTYPE = [True]  # whether torch.mm(..., out_dtype=) works here (CUDA); asked once


def _mm_fp32(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for fp16 ``a`` and ``b`` with fp32 accumulation and an fp32 result: cuBLAS's fp16 GEMM with an
    fp32 output where PyTorch has it (``mm`` with ``out_dtype``, CUDA), else the product of fp32 copies."""
    if a.is_cuda and _MM_OUT_DTYPE[0]:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except torch.OutOfMemoryError:  # says nothing about out_dtype; the fallback would need more
            raise
        except (TypeError, RuntimeError, NotImplementedError) as e:
            _MM_OUT_DTYPE[0] = False
            warn_once(f"mmfast linear_cross_entropy: torch.mm(..., out_dtype=float32) is not available here "
                      f"({type(e).__name__}); fp16 LM-head weight gradients use an fp32 matmul (slower)",
                      key="mm-out-dtype")
    return torch.mm(a.float(), b.float())


def _scaled(g: Tensor, go: Tensor, dtype: torch.dtype, own: bool = False) -> Tensor:
    """A kept gradient times the backward's incoming gradient (0-dim), in the parameter's dtype.

    The product is taken in fp32 and rounded once. Multiplying a 16-bit ``g`` by the factor directly
    would round the factor to ``g``'s dtype first wherever it is a device tensor (a loss scale of 2**16
    is inf in fp16; 1/3 in bf16 is 0.33398). The product is written a block at a time (at most
    ``_SCALE_BLOCK`` elements, a 16-bit block widened to fp32 first) straight into the output, so the
    backward's first step, at the step's memory peak, needs the output and one block, not a whole fp32
    temporary of a gradient that can be a whole LM head's. ``own``: ``g`` is this call's to overwrite (a
    product made for it), and is the output where it has the output's dtype."""
    go = go.float()
    # is_grads_batched (vmap): out-of-place only. Traced with a symbolic size (AOTAutograd's trace of a
    # compiled backward): one product, which the compiler fuses with its rounding; a loop over the size
    # would guard on it and compile again for every new sequence length
    if batched(go) or not isinstance(g.numel(), int):
        return (g.float() * go).to(dtype)
    out = g if own and g.dtype == dtype and g.is_contiguous() else torch.empty(g.shape, dtype=dtype, device=g.device)
    flat, out_flat = g.reshape(-1), out.view(-1)
    for i in range(0, flat.numel(), _SCALE_BLOCK):  # (a block of g is widened before its slot is written)
        torch.mul(flat[i:i + _SCALE_BLOCK].float(), go, out=out_flat[i:i + _SCALE_BLOCK])
    return out


#: Elements :func:`_scaled` widens to fp32 at a time (64 MiB).
_SCALE_BLOCK = 16 * 2**20


class _LinearCrossEntropyFn(torch.autograd.Function):
    """The eager path: keeps the kept rows' gradients only ([n, H], and [n, V] logits' gradient or an
    fp32 [V, H] accumulator for a trained weight)."""

    jvp = no_forward_ad("linear_cross_entropy")

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, ignore_index, scale, chunk_rows, grad_w_mode, dtype):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        r = _loss_and_grads(hidden, weight, bias, target, ignore_index, scale, chunk_rows, need_h, need_w,
                            need_b, grad_w_mode, dtype)
        ctx.hidden_shape, ctx.hidden_dtype = hidden.shape, hidden.dtype
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(r.rows, r.g_h, r.g_logits, r.hv, r.g_w32, r.g_b)
        return r.loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        rows, g_h, g_logits, hv, g_w32, g_b = ctx.saved_tensors
        go = grad_out.float()
        d_hidden = d_weight = d_bias = None
        if g_h is not None:
            H = ctx.hidden_shape[-1]
            d2 = torch.zeros(ctx.hidden_shape.numel() // H, H, device=g_h.device, dtype=ctx.hidden_dtype)
            if batched(go):  # is_grads_batched: vmap takes the out-of-place copy only
                d2 = d2.index_copy(0, rows, _scaled(g_h, go, ctx.hidden_dtype))
            else:
                d2.index_copy_(0, rows, _scaled(g_h, go, ctx.hidden_dtype))
            d_hidden = d2.view(ctx.hidden_shape)
        if g_logits is not None:
            d_weight = _scaled(torch.mm(g_logits.t(), hv), go, ctx.weight_dtype, own=True)
        elif g_w32 is not None:
            d_weight = _scaled(g_w32, go, ctx.weight_dtype)
        if g_b is not None:
            d_bias = _scaled(g_b, go, ctx.bias_dtype)
        return d_hidden, d_weight, d_bias, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------
# the custom op: what torch.compile, modes and subclasses see
# ---------------------------------------------------------------------------------------------
#
# The row selection (a nonzero and a range check) happens inside the op, so a compiled graph holds it as
# one opaque call with fixed-shape outputs: the loss, the hidden gradient at the hidden's full shape (zero
# on the ignored rows), the weight's gradient as an fp32 [V, H] accumulator, the bias's as fp32 [V]. An
# output that is not asked for is an empty tensor. The host sync makes it unsafe to capture in a CUDA graph:
# the ``cudagraph_unsafe`` tag tells Inductor (``mode="reduce-overhead"``) to leave the graph that holds it
# uncaptured, or with ``graph_partition`` to capture around it, instead of failing in the capture.

_TAGS = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()


@torch.library.custom_op("mmfast::linear_cross_entropy_fwd", mutates_args=(), tags=_TAGS)
def linear_cross_entropy_fwd(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                             ignore_index: int, scale: Optional[Tensor], chunk_rows: int, need_hidden: bool,
                             need_weight: bool, need_bias: bool, dtype: torch.dtype
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(loss, g_hidden, g_weight, g_bias)``; ``scale`` None: the mean over the kept rows;
    ``chunk_rows`` 0: the default."""
    with torch.autocast(hidden.device.type, enabled=False):
        r = _loss_and_grads(hidden, weight, bias, target, ignore_index, scale, chunk_rows or None, need_hidden,
                            need_weight, need_bias, "accumulate", dtype)

    def empty():
        return hidden.new_empty(0, dtype=torch.float32)

    g_h = empty()
    if r.g_h is not None:
        H = hidden.shape[-1]
        g_h = hidden.new_zeros(hidden.shape.numel() // H, H, dtype=_kept_hidden_dtype(dtype))
        g_h.index_copy_(0, r.rows, r.g_h)
        g_h = g_h.view(hidden.shape)
    return (r.loss, g_h, empty() if r.g_w32 is None else r.g_w32, empty() if r.g_b is None else r.g_b)


@linear_cross_entropy_fwd.register_fake
def _(hidden, weight, bias, target, ignore_index, scale, chunk_rows, need_hidden, need_weight, need_bias, dtype):
    f32 = dict(dtype=torch.float32)
    return (hidden.new_empty((), **f32),
            hidden.new_empty(hidden.shape, dtype=_kept_hidden_dtype(dtype)) if need_hidden else hidden.new_empty(0, **f32),
            hidden.new_empty(weight.shape, **f32) if need_weight else hidden.new_empty(0, **f32),
            hidden.new_empty(weight.shape[:1], **f32) if need_bias else hidden.new_empty(0, **f32))


def _op_setup_context(ctx, inputs, output):
    hidden, weight, bias = inputs[:3]
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    ctx.needs = inputs[7:10]
    ctx.save_for_backward(*output[1:])
    ctx.mark_non_differentiable(*output[1:])  # what the backward needs, not results to differentiate
    ctx.set_materialize_grads(False)  # (their missing gradients made as zeros: an fp32 [V, H] at the peak)


@once_differentiable  # a second derivative raises, as the eager path's
def _op_backward(ctx, grad_loss, *_):
    go = grad_loss.float()
    grads = [_scaled(g, go, dt) if need else None
             for g, dt, need in zip(ctx.saved_tensors, ctx.dtypes, ctx.needs)]
    return (*grads, None, None, None, None, None, None, None, None)


linear_cross_entropy_fwd.register_autograd(_op_backward, setup_context=_op_setup_context)


#: target dtypes taken: F.cross_entropy's (int64, uint8) and int32
_TARGET_DTYPES = (torch.int64, torch.int32, torch.uint8)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None, *,
                         ignore_index: int = -100, reduction: str = "mean",
                         num_items_in_batch: Union[Tensor, int, None] = None,
                         chunk_rows: Optional[int] = None) -> Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias).float().view(-1, V), target.view(-1), ...)``
    without materialising the logits; fp32 scalar.

    ``hidden`` [..., H], ``weight`` [V, H], ``bias`` [V] or None, ``target`` [...] (int64, int32 or uint8) with the leading
    shape of ``hidden``. ``reduction``: ``"mean"`` over the rows whose target is not ``ignore_index``
    (NaN when there are none, as PyTorch), or ``"sum"``. ``num_items_in_batch`` (HF's gradient-accumulation
    normaliser) overrides it: sum / num_items_in_batch. ``chunk_rows`` bounds the rows of logits alive at
    once (default: fp32 logits of at most :data:`CHUNK_BYTES`).
    """
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} "
                         "must be [..., H] and [V, H]")
    if target.shape != hidden.shape[:-1]:
        raise ValueError(f"linear_cross_entropy: target shape {tuple(target.shape)} must equal hidden's leading "
                         f"shape {tuple(hidden.shape[:-1])}")
    if target.dtype not in _TARGET_DTYPES:
        raise TypeError(f"linear_cross_entropy: target must be int64, int32 or uint8 (F.cross_entropy takes int64 "
                        f"and uint8), got {target.dtype}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"linear_cross_entropy: bias {tuple(bias.shape)} must be [{weight.shape[0]}]")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"linear_cross_entropy: chunk_rows must be >= 1, got {chunk_rows}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not hidden.is_floating_point():
        raise TypeError(f"linear_cross_entropy: hidden must be floating point, got {hidden.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"linear_cross_entropy: {name} is on {t.device} but hidden is on {hidden.device}")
    dtype = _compute_dtype(hidden, weight)
    if bias is not None and not bias.is_floating_point():
        raise TypeError(f"linear_cross_entropy: bias must be floating point, got {bias.dtype}")
    autocast = _autocast_on(hidden.device.type) and torch.float64 not in (hidden.dtype, weight.dtype)
    if bias is not None and bias.dtype != dtype and not autocast:  # (autocast casts it, as F.linear's)
        raise TypeError(f"linear_cross_entropy: bias is {bias.dtype} but hidden and weight are {dtype}; "
                        "F.linear needs one dtype (or an autocast region)")
    target = target.to(hidden.device, torch.int64)
    if num_items_in_batch is not None:
        # a number as a float64 tensor too: a count of 0 (a batch with every label ignored) gives inf and a
        # NaN loss, as PyTorch's sum / 0 does, rather than Python's ZeroDivisionError
        scale = 1.0 / torch.as_tensor(num_items_in_batch, dtype=torch.float64).to(hidden.device)
    else:
        scale = 1.0 if reduction == "sum" else None
    return _apply(hidden, weight, bias, target, ignore_index, scale, chunk_rows, "auto", dtype)


def _apply(hidden, weight, bias, target, ignore_index, scale, chunk_rows, grad_w_mode, dtype):
    """Plain eager calls run :class:`_LinearCrossEntropyFn`, the rest the custom op (``grad_w_mode``:
    ``"auto"``, or ``"logits"`` / ``"accumulate"`` to pick how the eager path keeps the weight's gradient,
    for the tests)."""
    if plain_eager(hidden, weight, bias, target, scale if isinstance(scale, Tensor) else None):
        if not records_grad(hidden, weight, bias):  # (no_grad, an evaluation: the loss alone, no gradient taken)
            with torch.autocast(hidden.device.type, enabled=False):
                return _loss_and_grads(hidden, weight, bias, target, ignore_index, scale, chunk_rows, False, False,
                                       False, grad_w_mode, dtype).loss
        with torch.autocast(hidden.device.type, enabled=False):
            loss = _LinearCrossEntropyFn.apply(hidden, weight, bias, target, ignore_index, scale, chunk_rows,
                                               grad_w_mode, dtype)
        return _tie_inputs(loss, hidden, weight, bias)
    refuse_functorch_ad("linear_cross_entropy", hidden, weight, bias)
    need = [x is not None and torch.is_grad_enabled() and x.requires_grad for x in (hidden, weight, bias)]
    if scale is not None and not isinstance(scale, Tensor):
        scale = torch.tensor(float(scale), device=hidden.device, dtype=torch.float64)
    loss = torch.ops.mmfast.linear_cross_entropy_fwd(hidden, weight, bias, target, ignore_index, scale,
                                                     chunk_rows or 0, *need, dtype)[0]
    return _tie_inputs(loss, hidden, weight, bias)


def _tie_inputs(loss: Tensor, *inputs: Optional[Tensor]) -> Tensor:
    """Give the loss's backward node ``TIES_ATTR``: an empty sum of each input that requires grad (no
    storage kept). The node saves the gradients its forward computed, not the inputs, so a second derivative
    that asks for chosen inputs found no path through :func:`once_differentiable`'s error to them."""
    if torch.compiler.is_compiling() or loss.grad_fn is None:  # (compiled: AOTAutograd refuses it itself)
        return loss
    node = loss.grad_fn
    # a __torch_function__ subclass's result is the op's output re-wrapped (as_subclass): an alias node of
    # PyTorch's own, which takes no attributes, above the op's node
    while type(node).__name__ == "AliasBackward0" and len(node.next_functions) == 1:
        node = node.next_functions[0][0]
    setattr(node, TIES_ATTR, tuple(t.narrow(-1, 0, 0).sum() for t in inputs if t is not None and t.requires_grad))
    return loss


def linear_cross_entropy_reference(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None,
                                   *, ignore_index: int = -100, reduction: str = "mean",
                                   num_items_in_batch: Union[Tensor, int, None] = None) -> Tensor:
    """The unfused computation (HF's causal-LM loss after the LM head): full logits, upcast, cross-entropy."""
    logits = F.linear(hidden, weight, bias).float()
    if num_items_in_batch is not None:
        loss = F.cross_entropy(logits.view(-1, weight.shape[0]), target.reshape(-1), ignore_index=ignore_index,
                               reduction="sum")
        return loss / num_items_in_batch
    return F.cross_entropy(logits.view(-1, weight.shape[0]), target.reshape(-1), ignore_index=ignore_index,
                           reduction=reduction)
