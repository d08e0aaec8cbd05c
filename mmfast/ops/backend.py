"""Which implementation runs an op: ``cuda`` (the CUDA C++ extension), ``triton``, ``reference``
(pure PyTorch), chosen per call.

``MMFAST_BACKEND`` forces one (``auto`` is the default):

* ``auto``: CUDA tensors run the Triton kernels, or the CUDA C++ kernels where the backend table of
  the device (written by the benchmark, see :mod:`mmfast.ops.backend_table`) measured them faster for
  that op, direction, dtype and width; no table, no CUDA C++. CPU tensors run the reference, or the
  Triton kernels through the interpreter when ``TRITON_INTERPRET=1``;
* ``cuda``: the CUDA C++ kernels for the ops that have them (the norms and the MMA adapter; other ops
  run Triton). When
  the extension cannot be built or loaded, or the tensors are not on a GPU, one warning says why and
  the op runs as ``auto`` would without it;
* ``triton``: always the Triton kernels; an error (not a fallback) where they cannot run;
* ``reference``: always the pure-PyTorch reference.

Nothing falls back silently: a fallback warns once with the reason, a forced Triton that cannot run raises.

Plain eager calls of an op skip the custom-op dispatcher (:func:`plain_eager`); ``MMFAST_EAGER=ops``
sends them through the custom ops too.

``with mmfast.use_backend("cuda"):`` does what ``MMFAST_BACKEND=cuda`` does, for the calls (forward and
backward) made inside the block, and takes precedence over the variable.

``with mmfast.backends_used() as used:`` counts what actually ran: one entry per op, direction,
backend, dtype and width (``auto`` decides per call, so only a run can say).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib.util
import os
import re
import threading
import warnings
from typing import Iterator, NamedTuple, Optional

import torch
from torch import Tensor

from ..kernels import _device

ENV_VAR = "MMFAST_BACKEND"
BACKENDS = ("auto", "cuda", "triton", "reference")


class KernelKey(NamedTuple):
    """One op call's kind: op, direction, activation dtype, width. The backend table is keyed by it for
    the ops with a CUDA C++ implementation."""

    op: str  # "rms_norm" | "layer_norm" | "mma_adapter" (CUDA C++ too) | "swiglu" | "quick_gelu"
    direction: str  # "fwd" | "bwd"
    dtype: torch.dtype
    N: int
    residual: bool = False  # the norms' residual variant (forward: a residual; backward: its gradient)


class BackendUse(NamedTuple):
    """A key of :func:`backends_used`'s counts."""

    op: str
    direction: str
    backend: str  # "cuda" | "triton" | "reference"
    dtype: torch.dtype
    N: int


#: The open :func:`backends_used` blocks' counters (process-wide: backward runs on autograd's threads).
_recorders: list[collections.Counter] = []
_recorders_lock = threading.Lock()


@contextlib.contextmanager
def backends_used() -> Iterator[collections.Counter]:
    """Count the mmfast op calls made while the block runs, forward and backward, by what ran them:
    ``{BackendUse(op, direction, backend, dtype, N): calls}``. ``MMFAST_BACKEND=auto`` chooses per call
    (device, shape, the backend table), so this is where to see it::

        with mmfast.backends_used() as used:
            model(**batch).loss.backward()
        for use, calls in sorted(used.items(), key=str):
            print(use, calls)

    Blocks nest; each counts every call made while it is open."""
    counts: collections.Counter = collections.Counter()
    with _recorders_lock:
        _recorders.append(counts)
    try:
        yield counts
    finally:
        with _recorders_lock:  # by identity: two blocks' counts can be equal
            del _recorders[next(i for i, c in enumerate(_recorders) if c is counts)]


def _record(use: KernelKey, backend: str) -> str:
    with _recorders_lock:
        for counts in _recorders:
            counts[BackendUse(use.op, use.direction, backend, use.dtype, use.N)] += 1
    return backend


#: The open :func:`use_backend` blocks, oldest first, as ``(token, backend)``: process-wide, because
#: backward runs on autograd's own threads. Each block removes its own entry on exit, so blocks that
#: overlap on different threads and exit out of order leave the others' choices as they were.
_overrides: list[tuple[object, str]] = []
_overrides_lock = threading.Lock()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the mmfast ops called inside the block (and their backward, when it runs inside the block)
    on backend ``name``, as if ``MMFAST_BACKEND=name``. Blocks nest; the innermost (the most recently
    entered one still open) wins."""
    value = name.strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"use_backend: {name!r} is not one of {', '.join(BACKENDS)}")
    token = object()
    with _overrides_lock:
        _overrides.append((token, value))
    try:
        yield
    finally:
        with _overrides_lock:  # by identity: exits need not come in the order of entries
            del _overrides[next(i for i, (t, _) in enumerate(_overrides) if t is token)]


def _asked(name: str) -> str:
    """How backend ``name`` was asked for, as a message names it: a :func:`use_backend` block or the variable."""
    return f"use_backend({name!r})" if _overrides else f"{ENV_VAR}={name}"


def requested_backend() -> str:
    """The backend asked for: :func:`use_backend`, else ``MMFAST_BACKEND`` (``auto`` when unset)."""
    if _overrides:
        try:
            return _overrides[-1][1]
        except IndexError:  # the last block closed on another thread since the check
            pass
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r} is not one of {', '.join(BACKENDS)}")
    return value


@functools.lru_cache(maxsize=None)
def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_can_run(device: torch.device) -> str | None:
    """None when the Triton kernels can run on ``device``, else the reason they cannot."""
    if not _triton_available():
        return "Triton is not installed (pip install triton)"
    if device.type == "cuda":
        return None
    if _device.interpreting():
        if device.type != "cpu":
            return f"the Triton interpreter runs CPU tensors, not {device.type}"
        return _device.interpreter_problem()
    return (
        f"Triton kernels need CUDA tensors (got a {device.type} tensor); "
        "set TRITON_INTERPRET=1 to run them on CPU through the interpreter"
    )


def cuda_can_run(device: torch.device) -> str | None:
    """None when the CUDA C++ kernels can run on ``device`` (building them on first use), else why not."""
    if device.type != "cuda":
        return f"the CUDA C++ kernels run CUDA tensors, not {device.type} tensors"
    from ..kernels import cuda_ext

    return cuda_ext.unavailable_reason()


_warned: set[str] = set()
_warn_lock = threading.Lock()


def warn_once(message: str, key: str | None = None) -> None:
    """Warn ``message`` (a RuntimeWarning) once per process, or once per ``key`` where given (a message
    that names sizes, say, whose other sizes should not warn again)."""
    with _warn_lock:
        if (key or message) in _warned:
            return
        _warned.add(key or message)
    warnings.warn(message, RuntimeWarning, stacklevel=4)


#: Why the Triton interpreter cannot run an op call: its bf16 ``tl.dot`` products are wrong (off by orders
#: of magnitude), and the adapter's kernels multiply with it.
_INTERPRETER_BF16_DOT = "the Triton interpreter's bf16 tl.dot gives wrong products, and the adapter's kernels use it"


def _interpreter_cannot(device: torch.device, key: KernelKey | None) -> Optional[str]:
    if device.type == "cpu" and key is not None and key.op == "mma_adapter" and key.dtype == torch.bfloat16 \
            and _device.interpreting():
        return _INTERPRETER_BF16_DOT
    return None


def _without_cuda(device: torch.device, forced_triton: bool, key: KernelKey | None = None) -> str:
    if forced_triton:
        reason = _triton_can_run(device) or _interpreter_cannot(device, key)
        if reason is not None:
            raise RuntimeError(f"{_asked('triton')} cannot run: {reason}")
        return "triton"
    if device.type == "cuda":
        reason = _triton_can_run(device)
        if reason is not None:
            raise RuntimeError(f"no GPU backend for CUDA tensors: {reason} (or set {ENV_VAR}=reference)")
        return "triton"
    if device.type == "cpu" and _device.interpreting():
        problem = _device.interpreter_problem() if _triton_available() else "Triton is not installed (pip install triton)"
        if problem is not None:  # TRITON_INTERPRET=1 asks for the kernels: say why they cannot run
            raise RuntimeError(f"TRITON_INTERPRET=1 runs the Triton kernels on CPU, but {problem}; or unset "
                               f"TRITON_INTERPRET (or set {ENV_VAR}=reference) for the PyTorch reference")
        # a bf16 adapter call runs the reference: the interpreter's products would be wrong (counted as such)
        return "reference" if _interpreter_cannot(device, key) else "triton"
    return "reference"


def resolve_backend(device: torch.device, key: KernelKey | None = None, cuda_unsupported: str | None = None, *,
                    has_cuda: bool = True, count: bool = True) -> str:
    """The backend that runs an op call of kind ``key`` on ``device`` now (counted for
    :func:`backends_used`; no ``key``: not an op call, as for an op without a CUDA C++ implementation,
    and not counted). ``has_cuda``: the op has a CUDA C++ implementation; ``cuda_unsupported`` says
    why that implementation does not take this call's shape (None: it does). Such a call runs as if the
    CUDA C++ kernels could not run: with one warning where ``MMFAST_BACKEND=cuda`` asked for them,
    silently where only the backend table would have chosen them (its entries are timed at shapes they
    take). ``count=False``: a question about a call counted elsewhere (which backend ran a forward
    whose backward is about to run), not counted again."""
    backend = _resolve(device, key if has_cuda else None, cuda_unsupported)
    return _record(key, backend) if count and _recorders and key is not None else backend


def _resolve(device: torch.device, key: KernelKey | None, cuda_unsupported: str | None) -> str:
    wanted = requested_backend()
    if wanted == "reference":
        return "reference"
    if wanted == "triton":
        return _without_cuda(device, forced_triton=True, key=key)
    if key is not None:
        if wanted == "cuda":
            reason = cuda_unsupported or cuda_can_run(device)
            if reason is None:
                return "cuda"
            # once per kind of reason: an op that meets many shapes it cannot take (adapters of several
            # sizes) says so once, not once per size
            warn_once(f"mmfast: {_asked('cuda')}, but the CUDA C++ kernels cannot run: {reason}. "
                      "Running the Triton kernels (or the reference on CPU) instead.",
                      key=f"{ENV_VAR}=cuda/{key.op}/" + re.sub(r"\d+(\.\d+)?", "#", reason))
        elif device.type == "cuda" and cuda_unsupported is None:
            from .backend_table import table_winner

            if table_winner(device, key) == "cuda":
                reason = cuda_can_run(device)
                if reason is None:
                    return "cuda"
                warn_once(f"mmfast: the backend table prefers the CUDA C++ kernels on this GPU, but they cannot "
                           f"run: {reason}. Running the Triton kernels instead.")
    return _without_cuda(device, forced_triton=False, key=key)


def as_rows(t: Tensor) -> Tensor:
    """``t`` as [rows, last dim] with a unit column stride, the layout every kernel launcher takes: a view
    where one exists (row strides allowed), else a contiguous copy."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


#: ``MMFAST_EAGER=ops`` routes eager calls through the custom ops (the path compile traces); ``eager`` (or
#: unset, or empty) keeps the eager fast path. Another value is refused, as a bad ``MMFAST_BACKEND`` is.
EAGER_ENV = "MMFAST_EAGER"


def _custom_ops_asked() -> bool:
    value = os.environ.get(EAGER_ENV)
    if not value:
        return False
    value = value.strip().lower()
    if value in ("ops", "eager", ""):
        return value == "ops"
    raise ValueError(f"{EAGER_ENV}={os.environ[EAGER_ENV]!r}: expected 'ops' (eager calls through the custom ops) "
                     "or 'eager' (the default)")


def plain_eager(*tensors: Optional[Tensor]) -> bool:
    """Whether an op call with these tensors may take the eager fast path (a ``torch.autograd.Function``
    running the same forward and backward) instead of the custom op: nothing would see the difference.
    Not compiling or tracing, no torch_function / dispatch mode, no functorch transform, plain Tensors, none
    on the meta device (shapes only: the custom ops' fake implementations answer for it, as for compile,
    whatever backend is set; the eager path would ask a backend to run it)."""
    if _custom_ops_asked() or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if torch._C._is_torch_function_mode_enabled() or torch._C._len_torch_dispatch_stack():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    return all(t is None or ((type(t) is Tensor or type(t) is torch.nn.Parameter) and not t.is_meta) for t in tensors)


def _traced() -> bool:
    """Whether a backward runs under tracing (compile's AOTAutograd, make_fx): fake, proxy or functional
    tensors, where AOTAutograd refuses a double backward by itself."""
    key = torch._C._TorchDispatchModeKey
    return torch.compiler.is_compiling() or any(
        torch._C._get_dispatch_mode(k) is not None for k in (key.FAKE, key.PROXY, key.FUNCTIONAL))


def batched(*tensors) -> bool:
    """Whether any of ``tensors`` is a gradient of ``autograd.grad(..., is_grads_batched=True)`` (its
    vmap's batched tensors): the kernels cannot read those; the custom ops run them slice by slice."""
    return any(isinstance(t, Tensor) and "Batched" in str(torch._C._dispatch_keys(t)) for t in tensors)


#: An op's backward node attribute: tensors that reach the op's inputs, where its saved tensors do not
#: (:func:`once_differentiable`).
TIES_ATTR = "mmfast_ties"


class _UnpackedContext:
    """An op's ``ctx`` whose saved tensors were unpacked once already (non-reentrant checkpointing refuses
    a second unpack): the backward reads them from here, everything else from ``ctx``."""

    def __init__(self, ctx, saved: tuple):
        self.__dict__.update(_ctx=ctx, saved_tensors=saved)

    def __getattr__(self, name):
        return getattr(self.__dict__["_ctx"], name)


def once_differentiable(backward):
    """Mark an op's backward as not differentiable itself: a second derivative through it (a gradient
    penalty: ``grad(..., create_graph=True)`` then ``backward``) raises instead of coming out wrong.

    PyTorch's ``torch.autograd.function.once_differentiable`` marks the gradients only when an incoming
    gradient requires grad. A loss linear in the op's output (``(y * c).sum()``) gives a constant ``dy``;
    the inputs saved for the backward still require grad, so the terms through them were dropped without
    a word. Here every gradient computed with ``create_graph=True`` carries the error, on a node that
    also reaches the saved inputs: a second derivative that asks for chosen inputs only
    (``autograd.grad(..., inputs)``, ``backward(inputs=...)``, ``hessian``) runs every node between the
    gradient and them, this one included (on fresh leaves alone it was skipped and the terms through the
    op dropped). Traced backwards (compile) and functorch's batched gradients (``is_grads_batched``) run
    as they are: AOTAutograd refuses a double backward by itself, and the custom ops' backward ops have
    no autograd formula, so differentiating them raises there too."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if not torch.is_grad_enabled() or _traced() or torch._C._functorch.peek_interpreter_stack() is not None \
                or batched(*grads):
            return backward(ctx, *grads)
        saved = tuple(ctx.saved_tensors)
        with torch.no_grad():
            out = backward(_UnpackedContext(ctx, saved), *grads)
        outs = out if isinstance(out, tuple) else (out,)
        ties = [t for t in (*saved, *grads, *getattr(ctx, TIES_ATTR, ())) if isinstance(t, Tensor) and t.requires_grad]
        err = torch._C._functions.DelayedError(
            b"mmfast: a second derivative through a fused op's backward is not supported (the kernels' "
            b"backward is not differentiable). Run the model under mmfast.disabled() for a gradient penalty",
            len(outs) + len(ties))
        marked = err(*[g.detach().requires_grad_() if isinstance(g, Tensor) and g.is_floating_point() else g
                       for g in outs], *ties)
        marked = (marked if isinstance(marked, tuple) else (marked,))[:len(outs)]
        return marked if isinstance(out, tuple) else marked[0]

    return wrapper


def records_grad(*tensors: Optional[Tensor]) -> bool:
    """Whether autograd might record a call with these tensors (grad mode on and one of them requires
    grad, or a forward-mode AD level is open, where the op's missing jvp must raise, not vanish). When it
    would not, the eager fast path runs the forward alone: no autograd node, nothing saved."""
    from torch.autograd import forward_ad

    if getattr(forward_ad, "_current_level", -1) >= 0:
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def savable(*tensors: Optional[Tensor]) -> tuple:
    """``tensors`` as ``save_for_backward`` takes them: an inference tensor (made under
    ``torch.inference_mode``: a frozen encoder's cached features) cannot be saved, so a copy of it is. The
    modules the fused ops stand in for (HF's RMSNorm, the SwiGLU gate's product) save only tensors they
    computed, and train on such inputs; the copy is made in that case only."""
    return tuple(t.clone() if t is not None and t.is_inference() else t for t in tensors)


def _ad_refusal(op: str, how: str, why: str) -> NotImplementedError:
    return NotImplementedError(
        f"mmfast.{op} does not support {how}: {why}. Differentiate with .backward() or torch.autograd.grad, "
        f"or run a patched model under mmfast.disabled() (its original modules) for these transforms.")


_FORWARD_MODE = "it has a backward and no forward-mode derivative"


def no_forward_ad(op: str) -> staticmethod:
    """The ``jvp`` of an eager fast path's autograd function: forward-mode AD (``torch.autograd.forward_ad``
    with dual inputs) raises as on the custom-op path (:func:`refuse_functorch_ad`), not with PyTorch's
    generic message."""
    def jvp(ctx, *tangents):
        raise _ad_refusal(op, "forward-mode AD (torch.autograd.forward_ad)", _FORWARD_MODE)

    return staticmethod(jvp)


def refuse_functorch_ad(op: str, *tensors: Optional[Tensor]) -> None:
    """Raise where an op call on the custom-op path would be differentiated in a way the ops do not
    support, instead of a wrong answer or PyTorch's internal message.

    * forward mode (``torch.func.jvp`` / ``jacfwd``, ``torch.autograd.forward_ad`` with dual inputs): the
      ops have no jvp, and PyTorch runs a custom op whose inputs do not require grad without its autograd,
      so the tangent would come out zero (or None), silently;
    * ``torch.func.grad`` / ``vjp`` / ``jacrev``: custom ops with registered autograd do not run under
      functorch's reverse-mode transforms.

    ``torch.vmap`` is fine, and so is reverse mode through ``backward`` / ``torch.autograd.grad``."""
    if torch.compiler.is_compiling():
        return
    from torch.autograd import forward_ad

    keys = {ci.key() for ci in (torch._C._functorch.get_interpreter_stack() or ())}
    TT = torch._C._functorch.TransformType
    if TT.Jvp in keys or (getattr(forward_ad, "_current_level", -1) >= 0 and any(
            t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)):
        how = ("forward-mode AD (torch.func.jvp / jacfwd)" if TT.Jvp in keys else
               "forward-mode AD (torch.autograd.forward_ad)")
        why = f"{_FORWARD_MODE}, and its tangent would come out zero"
    elif TT.Grad in keys:
        how, why = "torch.func.grad / vjp / jacrev", "PyTorch's custom ops do not run under those transforms"
    else:
        return
    raise _ad_refusal(op, how, why)

