"""SwiGLU-gate providers timed side by side, each ``fn(gate, up) -> silu(gate) * up``:

* ``hf-eager``: what ``LlamaMLP`` runs between its projections, ``act_fn(gate) * up`` (two kernels each
  way, keeps silu(gate) for backward);
* ``torch.compile``: ``torch.compile`` of ``hf-eager``;
* ``liger``: Liger-Kernel's ``LigerSiLUMulFunction`` (GPU, when importable). Its backward writes the
  gradients into its saved inputs, so repeated timed calls after the first compute on those values:
  the times are right, the outputs of later repetitions are not (nothing here reads them);
* ``mmfast-triton`` (on CPU: the backend the device selects): :func:`mmfast.swiglu`.
"""

from __future__ import annotations

import importlib.util
from typing import Callable

import torch
import torch.nn.functional as F

import mmfast
from .cases import SwiGLUCase
from .norm import _under, mmfast_provider_name, provider_backend


def providers(device: torch.device) -> list[str]:
    names = ["hf-eager", "torch.compile"]
    if device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None:
        names.append("liger")
    return names + [mmfast_provider_name(device)]


def _eager(gate, up):
    return F.silu(gate) * up


def build_provider(name: str, case: SwiGLUCase, device: torch.device) -> tuple[Callable, list[torch.Tensor]]:
    """``(fn, params)``: the gate has no parameters of its own."""
    if name == "hf-eager":
        return _eager, []
    if name == "torch.compile":
        return torch.compile(_eager), []
    if name == "liger":
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        return LigerSiLUMulFunction.apply, []
    if name.startswith("mmfast-"):
        return _under(lambda: provider_backend(name), mmfast.swiglu), []
    raise ValueError(f"unknown swiglu provider {name!r}")


def make_inputs(case: SwiGLUCase, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gate = torch.randn(case.M, case.I, device=device, dtype=case.dtype, requires_grad=True)
    up = torch.randn(case.M, case.I, device=device, dtype=case.dtype, requires_grad=True)
    return gate, up
