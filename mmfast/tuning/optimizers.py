"""An optimizer built before ``mmfast.patch`` applied a recipe: said at its first step after the patch.

``mmfast.patch`` must come before the optimizer (README). Built the other way round, two things went wrong
without a word of mmfast's:

* ``tuning="mma"`` adds parameters (the adapters, the modality embedding) that the optimizer does not
  hold: they get gradients every step and never change, and the method trains nothing of its own;
* ``master_weights=True`` widens trainable norm weights (and a patch again MMA's cast modules) to fp32 in
  place, while an optimizer that already stepped keeps its state in their old dtype: AdamW's next step
  fails with "expected dtype c10::BFloat16 for 'end' but got dtype float", naming nothing of mmfast.

One global optimizer step pre-hook (registered at the first patch with a recipe) looks at each optimizer
once after each patch: a set lookup per step otherwise. It warns; it changes nothing.
"""

from __future__ import annotations

import warnings
import weakref

import torch
from torch import nn

from ..patching.core import patch_name

#: The models a recipe was applied to (while alive): the patch count when it was (last) applied
_MODELS: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()
#: Optimizers looked at: the patch count then (each is looked at again after a later patch)
_CHECKED: "weakref.WeakKeyDictionary[torch.optim.Optimizer, int]" = weakref.WeakKeyDictionary()
_PATCHES = 0
_HANDLE = None


def watch_optimizers(model: nn.Module) -> None:
    """Have the first step of every optimizer after this patch check it against ``model``'s trainables."""
    global _PATCHES, _HANDLE
    _PATCHES += 1
    _MODELS[model] = _PATCHES
    if _HANDLE is None:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        _HANDLE = register_optimizer_step_pre_hook(_first_step_after_a_patch)


def unwatch_optimizers(model: nn.Module) -> None:
    _MODELS.pop(model, None)


def _first_step_after_a_patch(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    if torch.compiler.is_compiling() or _CHECKED.get(optimizer, 0) >= _PATCHES or not _MODELS:
        return None
    _CHECKED[optimizer] = _PATCHES
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for model in list(_MODELS.keys()):
        message = _problem(optimizer, held, model)
        if message is not None:
            warnings.warn(message, RuntimeWarning, stacklevel=3)
    return None


def _problem(optimizer: torch.optim.Optimizer, held: set[int], model: nn.Module):
    params = list(model.named_parameters())
    if not any(id(p) in held for _, p in params):
        return None  # another model's optimizer (or one of a wrapper that holds copies: DeepSpeed's)
    opt = type(optimizer).__name__
    owner = patch_name(model)
    # holds what the recipe froze (built over model.parameters() before the patch) but not what it trains
    missing = [n for n, p in params if p.requires_grad and id(p) not in held]
    if missing and any(not p.requires_grad and id(p) in held for _, p in params):
        return (f"mmfast: this {opt} holds parameters of {owner} but not {len(missing)} of those its tuning trains "
                f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): it was built before mmfast.patch, "
                "which added them (tuning='mma': the adapters and modality embedding), so they would never change. "
                "Build the optimizer after mmfast.patch.")
    stale, old = [], None
    for name, p in params:
        state = optimizer.state.get(p) if id(p) in held and p.requires_grad else None
        for v in (state or {}).values():
            if isinstance(v, torch.Tensor) and v.is_floating_point() and v.shape == p.shape \
                    and v.element_size() < p.element_size():
                stale.append(name)
                old = old or v.dtype
                break
    if stale:
        return (f"mmfast: this {opt} stepped {len(stale)} parameters of {owner} ({', '.join(stale[:3])}"
                f"{', ...' if len(stale) > 3 else ''}) while they were {str(old).removeprefix('torch.')}; "
                "mmfast.patch has made them float32 since (master_weights=True keeps trainable norm weights in "
                "float32, and MMA's modules are float32), and its state is still in the old dtype, which its next "
                "step may refuse ('expected dtype ... but got dtype float'). Build the optimizer after mmfast.patch "
                "(or patch with master_weights=False).")
    return None
