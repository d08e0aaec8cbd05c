"""Fused forwards for norm modules, written against the module's own attributes.

Each takes the module first (it is bound onto an instance by :mod:`mmfast.patching`) and reads the
parameters and epsilon the module already owns, so nothing is copied and ``state_dict`` is unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops.norm import layer_norm, rms_norm


#: On a norm module whose weights ``mmfast.patch(master_weights=True)`` keeps in fp32: {parameter name:
#: (its dtype before, the dtype of the parameters around the norm then)}
MASTER_ATTR = "_mmfast_master_dtypes"


def output_dtype_as_built(module: nn.Module, x: Tensor) -> torch.dtype | None:
    """For a norm whose 16-bit weights master_weights widened to fp32: the dtype its own forward returned for
    ``x`` before (x's dtype promoted with each such weight's earlier dtype: bf16 for bf16 x). None for any
    other norm (weights that were fp32 or float64 already), or for one whose weights a cast since patching
    took out of fp32: its forward's own dtype stands."""
    kept = module.__dict__.get(MASTER_ATTR)
    if not kept:
        return None
    want = x.dtype
    for name, (before, _) in kept.items():
        p = getattr(module, name, None)
        if isinstance(p, Tensor):
            if p.dtype != torch.float32 or before.itemsize >= 4:
                return None
            want = torch.promote_types(want, before)
    return want


def cast_as_built(module: nn.Module, x, out) -> Tensor | None:
    """``out`` of a norm's own forward cast to :func:`output_dtype_as_built`, or None where it has that dtype
    already, there is none, or input or output is no tensor (a forward hook's "leave it")."""
    if not isinstance(x, Tensor) or not isinstance(out, Tensor):
        return None
    want = output_dtype_as_built(module, x)
    return out.to(want) if want is not None and out.dtype != want and out.is_floating_point() else None


def _rms_norm_as_hf(module: nn.Module, hidden_states: Tensor, eps: float) -> Tensor:
    w = module.weight
    want = output_dtype_as_built(module, hidden_states) or torch.promote_types(hidden_states.dtype, w.dtype)
    if want != hidden_states.dtype:
        # 16-bit activations into a weight of another dtype (an fp32 model fed bf16 embeddings; an fp32
        # master weight counts as the dtype it had): HF rounds the normalised input to the activations'
        # dtype, then multiplies by the weight in the promoted dtype, so the output is not x's dtype
        return w * rms_norm(hidden_states, None, eps)
    if w.dtype not in (hidden_states.dtype, torch.float32):
        # fp32 activations into a 16-bit model (an fp32 projector's or soft prompt's output): HF promotes
        # the weight's product with them to fp32, which is the fused op with the weight in fp32, exactly
        w = w.float()
    return rms_norm(hidden_states, w, eps)


def llama_rms_norm_forward(module: nn.Module, hidden_states: Tensor) -> Tensor:
    """``LlamaRMSNorm.forward`` semantics (weight, variance_epsilon), its output dtype included (the input's,
    promoted with the weight's; an fp32 master weight counts as the dtype it had)."""
    return _rms_norm_as_hf(module, hidden_states, module.variance_epsilon)


def llama4_rms_norm_forward(module: nn.Module, x: Tensor) -> Tensor:
    """``Llama4TextRMSNorm.forward`` semantics: LLaMA's, with its epsilon named ``eps`` (transformers 5.17)
    or ``variance_epsilon`` (5.25)."""
    return _rms_norm_as_hf(module, x, module.variance_epsilon if hasattr(module, "variance_epsilon") else module.eps)


def layer_norm_forward(module: nn.LayerNorm, input: Tensor) -> Tensor:
    """``nn.LayerNorm.forward`` semantics for a 1-D ``normalized_shape``; output in the input's dtype."""
    if input.shape[-1:] != tuple(module.normalized_shape):  # (the weight's length says it too, where there is one)
        raise RuntimeError(f"Given normalized_shape={list(module.normalized_shape)}, expected input with shape "
                           f"[*, {module.normalized_shape[0]}], but got input of size{list(input.shape)}")
    return layer_norm(input, module.weight, module.bias, module.eps)
