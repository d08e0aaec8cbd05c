"""Fused forwards for norm modules, written against the module's own attributes.

Each takes the module first (it is bound onto an instance by :mod:`mmfast.patching`) and reads the
parameters and epsilon the module already owns, so nothing is copied and ``state_dict`` is unchanged.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..ops.norm import layer_norm, rms_norm


def llama_rms_norm_forward(module: nn.Module, hidden_states: Tensor) -> Tensor:
    """``LlamaRMSNorm.forward`` semantics (weight, variance_epsilon); output in the input's dtype."""
    return rms_norm(hidden_states, module.weight, module.variance_epsilon)


def layer_norm_forward(module: nn.LayerNorm, input: Tensor) -> Tensor:
    """``nn.LayerNorm.forward`` semantics for a 1-D ``normalized_shape``; output in the input's dtype."""
    return layer_norm(input, module.weight, module.bias, module.eps)
