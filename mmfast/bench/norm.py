"""Norm providers timed side by side (each a function ``(x, residual) -> y`` or ``(y, residual_out)``
with its own parameters):

* ``hf-eager``: the module a HuggingFace model runs (``LlamaRMSNorm``; ``nn.LayerNorm`` as in CLIP),
  with the residual added in eager PyTorch first;
* ``torch-native``: ``F.rms_norm`` / ``F.layer_norm``;
* ``torch.compile``: ``torch.compile`` of the ``hf-eager`` function; ``torch.compile-nomix`` the same
  with Inductor's fused norm backward (``triton.mix_order_reduction``) off, where torch has it (GPU);
* ``liger``: Liger-Kernel's ``LigerRMSNorm`` / ``LigerLayerNorm`` (GPU, when importable); with a residual,
  its fused ``LigerFusedAddRMSNorm`` (the add in the norm's pass, as mmfast's) and ``LigerLayerNorm`` after an
  eager add (Liger has no fused add + LayerNorm);
* ``mmfast-<backend>``: ``mmfast.rms_norm`` / ``mmfast.layer_norm`` with the backend forced: on a GPU
  ``mmfast-triton`` and ``mmfast-cuda`` (the CUDA C++ kernels, when they build here; otherwise the run
  says why it has no such column), on CPU the backend the device selects.
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import mmfast
from ..ops.backend import resolve_backend
from .cases import NormCase

EPS = {"rms_norm": 1e-6, "layer_norm": 1e-5}


def mmfast_provider_name(device: torch.device) -> str:
    return f"mmfast-{resolve_backend(device)}"


def mmfast_providers(device: torch.device) -> list[str]:
    """mmfast's own providers on ``device``: both GPU backends side by side where both can run."""
    if device.type != "cuda":
        return [mmfast_provider_name(device)]
    from ..kernels import cuda_ext

    names = ["mmfast-triton"]
    if cuda_ext.load():
        names.append("mmfast-cuda")
    else:
        _say_once(f"mmfast-cuda: not benchmarked, the CUDA C++ kernels are unavailable: {cuda_ext.unavailable_reason()}")
    return names


_said: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        import sys

        print(message, file=sys.stderr)


def has_mix_order_switch() -> bool:
    import torch._inductor.config as cfg

    return hasattr(cfg.triton, "mix_order_reduction")


def providers(device: torch.device) -> list[str]:
    names = ["hf-eager", "torch-native", "torch.compile"]
    if device.type == "cuda" and has_mix_order_switch():
        names.append("torch.compile-nomix")
    if device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None:
        names.append("liger")
    return names + mmfast_providers(device)


def _hf_module(case: NormCase) -> nn.Module:
    if case.op == "rms_norm":
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        return LlamaRMSNorm(case.N, eps=EPS[case.op])
    return nn.LayerNorm(case.N, eps=EPS[case.op])


def _liger_module(case: NormCase) -> nn.Module:
    from liger_kernel.transformers import LigerFusedAddRMSNorm, LigerLayerNorm, LigerRMSNorm

    if case.op == "rms_norm" and case.residual:  # forward(x, r) -> (y, x + r), as mmfast's
        return LigerFusedAddRMSNorm(case.N, eps=EPS[case.op], offset=0.0, casting_mode="llama", in_place=False)
    if case.op == "rms_norm":
        return LigerRMSNorm(case.N, eps=EPS[case.op], offset=0.0, casting_mode="llama")
    return LigerLayerNorm(case.N, eps=EPS[case.op])


def _with_residual(norm: Callable, residual: bool) -> Callable:
    if not residual:
        return lambda x, r: norm(x)

    def fn(x, r):
        h = x + r
        return norm(h), h

    return fn


def _under(ctx_factory, fn: Callable) -> Callable:
    """``fn`` run inside a fresh ``ctx_factory()`` each call (compile-time config must be active at
    the first call, which is when torch.compile compiles)."""

    def wrapped(*args):
        with ctx_factory():
            return fn(*args)

    return wrapped


def build_provider(name: str, case: NormCase, device: torch.device) -> tuple[Callable, list[torch.Tensor]]:
    """``(fn, params)`` for provider ``name``: ``fn(x, residual)`` and the trainable parameters it uses."""
    module = (_liger_module(case) if name == "liger" else _hf_module(case)).to(device=device, dtype=case.dtype)
    with torch.no_grad():
        module.weight.normal_(1.0, 0.1)
        if getattr(module, "bias", None) is not None:
            module.bias.normal_(0.0, 0.1)
    params = list(module.parameters())
    w, b, eps, N = module.weight, getattr(module, "bias", None), EPS[case.op], case.N
    rms = case.op == "rms_norm"

    if name == "liger" and rms and case.residual:
        return module, params  # (its own fused add)
    if name in ("hf-eager", "liger"):
        return _with_residual(module, case.residual), params
    if name == "torch.compile":
        return torch.compile(_with_residual(module, case.residual)), params
    if name == "torch.compile-nomix":
        # As a compile option, not a config patch around the call: AOTAutograd compiles the backward at
        # the first backward call, outside any context the forward ran in, and Dynamo would reuse
        # torch.compile's artifact (options make another backend, so another cache entry).
        return torch.compile(_with_residual(module, case.residual),
                             options={"triton.mix_order_reduction": False}), params
    if name == "torch-native":
        norm = (lambda h: F.rms_norm(h, (N,), w, eps)) if rms else (lambda h: F.layer_norm(h, (N,), w, b, eps))
        return _with_residual(norm, case.residual), params
    if name.startswith("mmfast-"):
        ctx = (lambda: provider_backend(name))
        if rms:
            return _under(ctx, lambda x, r: mmfast.rms_norm(x, w, eps, residual=r)), params
        return _under(ctx, lambda x, r: mmfast.layer_norm(x, w, b, eps, residual=r)), params
    raise ValueError(f"unknown norm provider {name!r}")


def provider_backend(provider: str):
    """The context a provider's calls run under: ``mmfast-<backend>`` pins mmfast's backend (forward and,
    when it runs inside, backward: the backend is resolved when a kernel runs); others need none."""
    from ..ops.backend import BACKENDS, use_backend

    name = provider.removeprefix("mmfast-")
    if provider.startswith("mmfast-") and name in BACKENDS:
        return use_backend(name)
    return contextlib.nullcontext()
