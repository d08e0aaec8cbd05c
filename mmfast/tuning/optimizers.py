"""An optimizer built before ``mmfast.patch`` applied a recipe: said at its first step after the patch.

``mmfast.patch`` must come before the optimizer (README). Built the other way round, two things went wrong
without a word of mmfast's:

* ``tuning="mma"`` adds parameters (the adapters, the modality embedding) that the optimizer does not
  hold: they get gradients every step and never change, and the method trains nothing of its own;
* ``master_weights=True`` widens trainable norm weights to fp32 in place (and a patch again after a cast
  widens them and MMA's modules back), while an optimizer that already stepped keeps its state in their old
  dtype: AdamW's next step fails with "expected dtype c10::BFloat16
  for 'end' but got dtype float", naming nothing of mmfast.

One global optimizer step pre-hook (registered at the first patch with a recipe) looks at each optimizer
against the models patched since it last looked: a dict lookup per step otherwise. It warns; it changes
nothing. A compiled optimizer step is not looked at (the hook runs in its graph).
"""

from __future__ import annotations

import warnings
import weakref

import torch
from torch import nn

from ..patching.core import patch_name

#: The models a recipe was applied to (while alive): the patch count when it was (last) applied, and the
#: parameters its patches widened (by id: their dtype before, and the count of the patch that widened them)
_MODELS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
#: Optimizers looked at: the patch count then (each is looked at again after a later patch)
_CHECKED: "weakref.WeakKeyDictionary[torch.optim.Optimizer, int]" = weakref.WeakKeyDictionary()
_PATCHES = 0
_HANDLE = None


def watch_optimizers(model: nn.Module, widened: dict) -> None:
    """Have the first step of every optimizer after this patch check it against ``model``'s trainables
    (``widened``: the parameters this patch made fp32, by id, with their dtype before). A patch again keeps
    what earlier patches widened: it widens nothing more, and an optimizer that stepped before the first one
    has yet to be told."""
    global _PATCHES, _HANDLE
    _PATCHES += 1
    _, record = _MODELS.get(model, (0, {}))
    record.update((i, (before, _PATCHES)) for i, before in widened.items())
    _MODELS[model] = (_PATCHES, record)
    if _HANDLE is None:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        _HANDLE = register_optimizer_step_pre_hook(_first_step_after_a_patch)


def unwatch_optimizers(model: nn.Module) -> None:
    _MODELS.pop(model, None)


def _first_step_after_a_patch(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    if torch.compiler.is_compiling():
        return None
    last = _CHECKED.get(optimizer, 0)
    if last >= _PATCHES or not _MODELS:
        return None
    _CHECKED[optimizer] = _PATCHES
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for model, (patched, widened) in list(_MODELS.items()):
        if patched > last:  # (a model patched before this optimizer's last check was checked then)
            message = _problem(optimizer, held, model, widened, last)
            if message is not None:
                warnings.warn(message, RuntimeWarning, stacklevel=3)
    return None


def _problem(optimizer: torch.optim.Optimizer, held: set[int], model: nn.Module, widened: dict, last: int):
    from .mma import added_modules

    opt, owner = type(optimizer).__name__, patch_name(model)
    # tuning="mma" added parameters: an optimizer that holds every other parameter of the model (built over
    # model.parameters() before the patch) but not the added ones it trains. (Optimizers split by module, or
    # over the trainables alone, hold the added ones or not the rest.)
    added = {id(p) for path in added_modules(model) for p in model.get_submodule(path).parameters()}
    if added:
        params = list(model.named_parameters())
        missing = [n for n, p in params if id(p) in added and p.requires_grad and id(p) not in held]
        if missing and all(id(p) in held for _, p in params if id(p) not in added):
            return (f"mmfast: this {opt} holds the parameters of {owner} but not {len(missing)} that tuning='mma' "
                    f"added and trains ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): it was built "
                    "before mmfast.patch, so they would never change. Build the optimizer after mmfast.patch.")
    # the patch widened weights to fp32 (master_weights' norms; MMA's modules, a patch again after a cast): an
    # optimizer that stepped them before keeps its state in their old dtype (one that keeps 16-bit state by
    # design for fp32 weights the patch did not widen is not asked about; nor is one looked at after the patch
    # that widened them: its state came later)
    stale, old = [], None
    for name, p in model.named_parameters():
        before, widened_at = widened.get(id(p), (None, 0))
        if before is None or widened_at <= last or id(p) not in held or p.dtype == before:
            continue
        if any(isinstance(v, torch.Tensor) and v.dtype == before and v.shape == p.shape
               for v in optimizer.state.get(p, {}).values()):
            stale.append(name)
            old = before
    if stale:
        return (f"mmfast: this {opt} stepped {len(stale)} parameters of {owner} ({', '.join(stale[:3])}"
                f"{', ...' if len(stale) > 3 else ''}) while they were {str(old).removeprefix('torch.')}; "
                "mmfast.patch has made them float32 since (master_weights=True keeps trainable norm weights in "
                "float32, and MMA's modules are float32), and its state is still in the old dtype, which its next "
                "step may refuse ('expected dtype ... but got dtype float'). Build the optimizer after "
                "mmfast.patch, or after a cast and a patch again (or patch with master_weights=False).")
    return None
