"""Norm benchmark cases, their byte model, and the providers timed side by side.

Providers (each a function ``(x, residual) -> y`` or ``(y, residual_out)`` with its own parameters):

* ``hf-eager``: the module a HuggingFace model runs (``LlamaRMSNorm``; ``nn.LayerNorm`` as in CLIP),
  with the residual added in eager PyTorch first;
* ``torch-native``: ``F.rms_norm`` / ``F.layer_norm``;
* ``torch.compile``: ``torch.compile`` of the ``hf-eager`` function;
* ``mmfast-<backend>``: ``mmfast.rms_norm`` / ``mmfast.layer_norm`` on the backend the device selects.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import mmfast
from ..ops.backend import resolve_backend

EPS = {"rms_norm": 1e-6, "layer_norm": 1e-5}


@dataclasses.dataclass(frozen=True)
class NormCase:
    op: str  # "rms_norm" | "layer_norm"
    M: int
    N: int
    dtype: torch.dtype
    residual: bool = False

    @property
    def name(self) -> str:
        return self.op + ("+residual" if self.residual else "")

    def bytes_moved(self, direction: str) -> int:
        """Fewest bytes the op must move (activations; per-row statistics and the N-long parameters
        are below 0.1% at the benchmarked sizes and not counted).

        fwd: read x (+ residual), write y (+ residual_out); bwd: read x and dy (+ the gradient of
        residual_out), write dx."""
        unit = self.M * self.N * torch.finfo(self.dtype).bits // 8
        fwd = unit * (4 if self.residual else 2)
        bwd = unit * (4 if self.residual else 3)
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction]


def mmfast_provider_name(device: torch.device) -> str:
    return f"mmfast-{resolve_backend(device)}"


def _hf_module(case: NormCase) -> nn.Module:
    if case.op == "rms_norm":
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        return LlamaRMSNorm(case.N, eps=EPS[case.op])
    return nn.LayerNorm(case.N, eps=EPS[case.op])


def _with_residual(norm: Callable, residual: bool) -> Callable:
    if not residual:
        return lambda x, r: norm(x)

    def fn(x, r):
        h = x + r
        return norm(h), h

    return fn


def build_provider(name: str, case: NormCase, device: torch.device) -> tuple[Callable, list[torch.Tensor]]:
    """``(fn, params)`` for provider ``name``: ``fn(x, residual)`` and the trainable parameters it uses."""
    module = _hf_module(case).to(device=device, dtype=case.dtype)
    with torch.no_grad():
        module.weight.normal_(1.0, 0.1)
        if getattr(module, "bias", None) is not None:
            module.bias.normal_(0.0, 0.1)
    params = list(module.parameters())
    w, b, eps, N = module.weight, getattr(module, "bias", None), EPS[case.op], case.N
    rms = case.op == "rms_norm"

    if name == "hf-eager":
        return _with_residual(module, case.residual), params
    if name == "torch.compile":
        return torch.compile(_with_residual(module, case.residual)), params
    if name == "torch-native":
        norm = (lambda h: F.rms_norm(h, (N,), w, eps)) if rms else (lambda h: F.layer_norm(h, (N,), w, b, eps))
        return _with_residual(norm, case.residual), params
    if name.startswith("mmfast-"):
        if rms:
            return (lambda x, r: mmfast.rms_norm(x, w, eps, residual=r)), params
        return (lambda x, r: mmfast.layer_norm(x, w, b, eps, residual=r)), params
    raise ValueError(f"unknown norm provider {name!r}")


def providers(device: torch.device) -> list[str]:
    return ["hf-eager", "torch-native", "torch.compile", mmfast_provider_name(device)]
