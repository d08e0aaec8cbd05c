"""MLP-activation providers timed side by side.

SwiGLU gate (:class:`SwiGLUCase`), each ``fn(gate, up) -> silu(gate) * up``:

* ``hf-eager``: what ``LlamaMLP`` runs between its projections, ``act_fn(gate) * up`` (two kernels each
  way, keeps silu(gate) for backward);
* ``torch.compile``: ``torch.compile`` of ``hf-eager``;
* ``liger``: Liger-Kernel's ``LigerSiLUMulFunction`` (GPU, when importable). Its backward writes the
  gradients into its saved inputs, so repeated timed calls after the first compute on those values:
  the times are right, the outputs of later repetitions are not (nothing here reads them);
* ``mmfast-triton`` (on CPU: the backend the device selects): :func:`mmfast.swiglu`.

QuickGELU (:class:`QuickGELUCase`), each ``fn(x) -> x * sigmoid(1.702 x)``: ``hf-eager`` (transformers'
``QuickGELUActivation``: three kernels forward, keeps x and the sigmoid), ``torch.compile`` of it, and
``mmfast-triton`` (:func:`mmfast.quick_gelu`); Liger has no QuickGELU.
"""

from __future__ import annotations

import importlib.util
from typing import Callable

import torch
import torch.nn.functional as F

import mmfast
from ..ops.quick_gelu import quick_gelu_unfused
from .cases import QuickGELUCase, SwiGLUCase
from .norm import _under, mmfast_provider_name, provider_backend


def providers(device: torch.device, case: SwiGLUCase | QuickGELUCase | None = None) -> list[str]:
    names = ["hf-eager", "torch.compile"]
    liger = device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None
    if liger and not isinstance(case, QuickGELUCase):
        names.append("liger")
    return names + [mmfast_provider_name(device)]


def _eager(gate, up):
    return F.silu(gate) * up


def build_provider(name: str, case: SwiGLUCase | QuickGELUCase,
                   device: torch.device) -> tuple[Callable, list[torch.Tensor]]:
    """``(fn, params)``: the activations have no parameters of their own."""
    quick = isinstance(case, QuickGELUCase)
    eager = quick_gelu_unfused if quick else _eager
    if name == "hf-eager":
        return eager, []
    if name == "torch.compile":
        return torch.compile(eager), []
    if name == "liger" and not quick:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        return LigerSiLUMulFunction.apply, []
    if name.startswith("mmfast-"):
        return _under(lambda: provider_backend(name), mmfast.quick_gelu if quick else mmfast.swiglu), []
    raise ValueError(f"unknown {case.op} provider {name!r}")


def make_inputs(case: SwiGLUCase | QuickGELUCase, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(gate, up), or (x,) for QuickGELU."""
    count = 1 if isinstance(case, QuickGELUCase) else 2
    return tuple(torch.randn(case.M, case.I, device=device, dtype=case.dtype, requires_grad=True) for _ in range(count))
