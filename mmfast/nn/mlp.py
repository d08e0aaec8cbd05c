"""Fused forwards for MLP modules, written against the module's own submodules.

Bound onto instances by :mod:`mmfast.patching.mlp`; the projections stay the module's own (plain
``nn.Linear``, PEFT's LoRA wrappers, quantised linears), only the activation between them is fused.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops.quick_gelu import quick_gelu
from ..ops.swiglu import swiglu


def llama_mlp_forward(module: nn.Module, x: Tensor) -> Tensor:
    """``LlamaMLP.forward`` with a SiLU ``act_fn``: ``down_proj(silu(gate_proj(x)) * up_proj(x))`` (the
    parameter named as the class's).
    Projections that return different dtypes meet in the promoted one, as the unfused product would."""
    gate, up = module.gate_proj(x), module.up_proj(x)
    if gate.dtype != up.dtype:
        dt = torch.promote_types(gate.dtype, up.dtype)
        gate, up = gate.to(dt), up.to(dt)
    return module.down_proj(swiglu(gate, up))


def clip_mlp_forward(module: nn.Module, hidden_states: Tensor) -> Tensor:
    """``CLIPMLP.forward`` with a QuickGELU ``activation_fn``: ``fc2(quick_gelu(fc1(hidden_states)))``
    (the parameter named as the class's, which callers may pass by keyword)."""
    return module.fc2(quick_gelu(module.fc1(hidden_states)))
