"""MMA adapter providers timed side by side. Each is ``fn(x, route) -> y`` over the same fp32 adapter
parameters (the tuning recipe keeps adapters in fp32) and bf16 activations, router included:

* ``lavin-eager``: a LaVIN-style eager module: everything in x's dtype, one expert at a time;
* ``torch-native``: the best unfused composition: ``z = x A^T + a`` (one GEMM), then one ``addmm`` into
  x whose inner dimension holds every expert's router-weighted hidden activations and the router
  weights themselves (for the biases), against a block-diagonal up-projection;
* ``torch.compile``: ``torch.compile`` of ``lavin-eager``;
* ``mmfast-<backend>``: the fused op (``MMAdapter``); on a GPU both ``mmfast-triton`` and ``mmfast-cuda``
  (the CUDA C++ kernels) where the extension loads.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..nn.adapter import MMAdapter
from ..ops.adapter import mma_adapter_lavin_style
from .cases import AdapterCase
from .norm import _under, mmfast_providers, provider_backend


def providers(device: torch.device) -> list[str]:
    return ["lavin-eager", "torch-native", "torch.compile", *mmfast_providers(device)]


def _composed(adapter: MMAdapter) -> Callable:
    """x A^T + a, then one addmm: y = x + s * [mix_e z, mix_e] @ [blockdiag(U_e); c_e]^T."""

    def fn(x, route):
        dt = x.dtype
        B, S, D = x.shape
        E, _, RG = adapter.up_weight.shape
        G = adapter.groups
        mix = adapter.mix(route).to(dt)  # [B, E]
        z = F.linear(x, adapter.down.weight.to(dt), adapter.down.bias.to(dt))  # [B, S, R]
        zw = (mix[:, None, :, None] * z[:, :, None, :]).flatten(2)  # [B, S, E * R]
        ones = mix[:, None, :].expand(B, S, E)  # the router weights multiply the biases
        inner = torch.cat([zw, ones], dim=-1).reshape(B * S, -1)
        # block-diagonal up-projection [D, E * R] (output group g reads hidden group g) and biases [D, E]
        u = adapter.up_weight.to(dt).view(E, G, D // G, RG)
        blocks = torch.zeros(D, E, G, RG, dtype=dt, device=x.device)
        for g in range(G):
            blocks[g * (D // G):(g + 1) * (D // G), :, g, :] = u[:, g].transpose(0, 1)
        weight = torch.cat([blocks.reshape(D, -1), adapter.up_bias.to(dt).T], dim=1)  # [D, E * R + E]
        return torch.addmm(x.reshape(B * S, D), inner, weight.T, alpha=adapter.scale).view(B, S, D)

    return fn


def _lavin(adapter: MMAdapter) -> Callable:
    def fn(x, route):
        return mma_adapter_lavin_style(x, adapter.down.weight, adapter.down.bias, adapter.up_weight,
                                       adapter.up_bias, adapter.mix(route), adapter.scale, adapter.groups)

    return fn


def build_provider(name: str, case: AdapterCase, device: torch.device) -> tuple[Callable, list[torch.Tensor]]:
    adapter = MMAdapter(case.D, hidden_dim=case.R, groups=case.G, experts=case.E, dropout=0.0).to(device)
    with torch.no_grad():  # a trained adapter (a new one has zero up weights)
        adapter.up_weight.normal_(0, 0.02)
        adapter.up_bias.normal_(0, 0.02)
    params = list(adapter.parameters())
    if name == "lavin-eager":
        return _lavin(adapter), params
    if name == "torch-native":
        return _composed(adapter), params
    if name == "torch.compile":
        return torch.compile(_lavin(adapter)), params
    if name == "mmfast-cuda":
        from ..kernels import cuda_ext

        reason = cuda_ext.adapter_unsupported(case.R, case.E)
        if reason is not None:  # it would run Triton under this name
            raise ValueError(reason)
    if name.startswith("mmfast-"):
        return _under(lambda: provider_backend(name), adapter), params
    raise ValueError(f"unknown adapter provider {name!r}")


def make_inputs(case: AdapterCase, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(case.B, case.S, case.D, device=device, dtype=case.dtype, requires_grad=True)
    route = torch.randn(case.B, case.D, device=device, dtype=case.dtype)
    return x, route
