"""Fused MLP activations (:func:`mmfast.ops.swiglu`, :func:`mmfast.ops.quick_gelu`): instance-level forward swaps.

Two families, each a class-forward code and the activation it needs:

* ``swiglu``: classes whose forward is ``LlamaMLP.forward``'s code (LLaMA, Mistral, Qwen2/3, LLaVA's
  language model and the other classes copied from it), patched when ``act_fn`` is SiLU (``hidden_act``
  "silu" / "swish");
* ``quick_gelu``: classes whose forward is ``CLIPMLP.forward``'s code (CLIP's and LLaVA's vision tower,
  and the many vision MLPs copied from it), patched when ``activation_fn`` is QuickGELU (``hidden_act``
  "quick_gelu").

A candidate with another activation (Gemma's GELU, SigLIP's tanh GELU), or whose activation module
carries hooks (the fused kernel never calls that module, so they would not run), is reported as skipped
with the reason. A patched MLP whose activation gets hooks, or is replaced, after patching runs its
original forward, with one warning. The projections are left alone: the patched forward calls the module's own projections, so LoRA
or other wrappers on them keep working. Same rules as the norms (:mod:`mmfast.patching.core`): the
instance's ``forward`` only, no stacking on another library's patch, ``mmfast.disabled()`` runs the
original, ``unpatch`` restores it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import torch
from torch import nn

from ..nn.mlp import clip_mlp_forward, llama_mlp_forward
from ..ops.backend import warn_once
from .core import (_ATTR, PatchReport, _foreign_patch, _install, _original_call, drop_if_displaced, foreign_hook,
                   has_hooks, is_patched, unpatch_where)
from .table import _code_key


def _plain_instance_of(act: object, cls: type) -> bool:
    """``act`` is exactly ``cls`` with the library's own forward (no subclass, no instance or hub override)."""
    return type(act) is cls and "forward" not in vars(act) and type(act).forward.__module__ == cls.__module__


#: nn.SiLU's own forward (a global override replaces the class attribute, not this reference).
_TORCH_SILU_FORWARD = nn.SiLU.forward


def _is_silu(act: object) -> bool:
    from transformers.activations import SiLUActivation

    if type(act) is nn.SiLU:
        return nn.SiLU.forward is _TORCH_SILU_FORWARD and "forward" not in vars(act)
    return _plain_instance_of(act, SiLUActivation)


def _is_quick_gelu(act: object) -> bool:
    from transformers.activations import QuickGELUActivation

    return _plain_instance_of(act, QuickGELUActivation)


@functools.lru_cache(maxsize=None)
def _llama_mlp_key() -> tuple:
    from transformers.models.llama.modeling_llama import LlamaMLP

    return _code_key(LlamaMLP.forward)


@functools.lru_cache(maxsize=None)
def _clip_mlp_key() -> tuple:
    from transformers.models.clip.modeling_clip import CLIPMLP

    return _code_key(CLIPMLP.forward)


@dataclasses.dataclass(frozen=True)
class MlpFamily:
    kind: str
    forward: Callable
    code_key: Callable[[], tuple]  # the class forward's code this family replaces
    act_attr: str
    act_ok: Callable[[object], bool]
    act_name: str
    projections: tuple[str, ...]

    def matches(self, m: nn.Module) -> bool:
        fwd = getattr(type(m), "forward", None)
        return fwd is not None and _code_key(fwd) == self.code_key()


def _activation_bypassed(m: nn.Module, fam: MlpFamily) -> Optional[str]:
    """Why the fused forward would not compute what ``m``'s activation module does now, or None: it is no
    longer the activation the family fuses, or it has hooks (of any kind, on it or on every module) that
    the fused kernel, which never calls it, would skip."""
    act = getattr(m, fam.act_attr, None)
    if not fam.act_ok(act):
        return f"{fam.act_attr} is {type(act).__name__}, not {fam.act_name}: the fused {fam.kind} needs {fam.act_name}"
    hook = foreign_hook(act, f"on {fam.act_attr}", kinds=("forward hook", "forward pre-hook", "backward hook",
                                                            "backward pre-hook"), global_hooks=True)
    if hook is not None:
        return f"{hook} would not run: the fused {fam.kind} does not call {fam.act_attr}"
    return None


#: Per family, the activation types whose plain instances it fuses, with their forward as it was checked
#: (a class-level override since then takes the full check again). Learnt from the first check of a type.
_FUSABLE: dict[str, dict] = {}


def _unchanged(act, fam: MlpFamily) -> bool:
    """The cheap per-call check: ``act`` is a plain instance of a type this family fused before, with no
    hook of its own and none registered for every module (then the full check has nothing to say)."""
    if not isinstance(act, nn.Module):  # a function put in its place, None: the full check says why
        return False
    fused = _FUSABLE.get(fam.kind, {})
    return fused.get(type(act)) is type(act).forward and "forward" not in vars(act) and not has_hooks(act)


def _checked_forward(fused: Callable, module: nn.Module, args: tuple, kwargs: dict):
    rec = module.__dict__[_ATTR]
    act = getattr(module, rec.family.act_attr, None)
    if _unchanged(act, rec.family):
        return fused(module, *args, **kwargs)
    reason = _activation_bypassed(module, rec.family)
    if reason is not None:
        warn_once(f"mmfast: a patched {type(module).__name__} runs its original forward: {reason}")
        return _original_call(module, rec)(*args, **kwargs)
    if not torch.compiler.is_compiling():  # a plain instance the family fuses (act_ok): its type takes the cheap check
        _FUSABLE.setdefault(rec.family.kind, {})[type(act)] = type(act).forward
    return fused(module, *args, **kwargs)


def _swiglu_mlp_forward(module: nn.Module, *args, **kwargs):
    """:func:`mmfast.nn.mlp.llama_mlp_forward`, unless the activation changed after patching."""
    return _checked_forward(llama_mlp_forward, module, args, kwargs)


def _quick_gelu_mlp_forward(module: nn.Module, *args, **kwargs):
    """:func:`mmfast.nn.mlp.clip_mlp_forward`, unless the activation changed after patching."""
    return _checked_forward(clip_mlp_forward, module, args, kwargs)


SWIGLU = MlpFamily("swiglu", _swiglu_mlp_forward, _llama_mlp_key, "act_fn", _is_silu, "SiLU",
                   ("gate_proj", "up_proj", "down_proj"))
QUICK_GELU = MlpFamily("quick_gelu", _quick_gelu_mlp_forward, _clip_mlp_key, "activation_fn", _is_quick_gelu, "QuickGELU",
                       ("fc1", "fc2"))
FAMILIES = (SWIGLU, QUICK_GELU)


def family_of(m: nn.Module) -> Optional[MlpFamily]:
    """The family whose class forward ``m`` has (whatever its activation), or None."""
    return next((f for f in FAMILIES if f.matches(m)), None)


def unsupported_reason(m: nn.Module, fam: MlpFamily) -> Optional[str]:
    """None when the candidate ``m`` of ``fam`` can take the fused activation, else why not."""
    reason = _activation_bypassed(m, fam)
    if reason is not None:
        return reason
    for name in fam.projections:
        if not isinstance(getattr(m, name, None), nn.Module):
            return f"{name} is not a module"
    return _foreign_patch(m)


def patch_mlps(model: nn.Module, report: PatchReport) -> PatchReport:
    """Fuse the activation of every supported MLP in ``model`` (idempotent); paths go to ``report.mlps``
    (their family in ``report.kinds``), candidates that cannot take it to ``report.skipped``."""
    report.mlps = []
    for path, module in model.named_modules(remove_duplicate=True):
        drop_if_displaced(module, FAMILIES)
        if is_patched(module):
            fam = module.__dict__[_ATTR].family
            if fam in FAMILIES:
                report.mlps.append(path)
                report.kinds[path] = fam.kind
            continue
        fam = family_of(module)
        if fam is None:
            continue
        reason = unsupported_reason(module, fam)
        if reason is not None:
            report.skipped.append((path, reason))
            continue
        _install(module, fam)
        report.mlps.append(path)
        report.kinds[path] = fam.kind
    return report


def unpatch_mlps(model: nn.Module) -> int:
    """Restore the original forward of every MLP with a fused activation; returns how many."""
    return unpatch_where(model, lambda fam: fam in FAMILIES)
