"""The fused SwiGLU gate in LLaMA-style MLPs (:func:`mmfast.ops.swiglu`): an instance-level forward swap.

A module is a candidate when its class's forward is ``LlamaMLP.forward``'s code (LLaMA, Mistral,
Qwen2/3, LLaVA's language model and the other classes copied from it). It is patched when its
``act_fn`` is SiLU (``hidden_act`` "silu" / "swish"); a candidate with another activation (GELU, say)
is reported as skipped with the reason. The projections are left alone: the patched forward calls the
module's own ``gate_proj``, ``up_proj`` and ``down_proj``, so LoRA or other wrappers on them keep
working. Same rules as the norms (:mod:`mmfast.patching.core`): the instance's ``forward`` only, no
stacking on another library's patch, ``mmfast.disabled()`` runs the original, ``unpatch`` restores it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

from torch import nn

from ..nn.mlp import llama_mlp_forward
from .core import _ATTR, PatchReport, _foreign_patch, _install, is_patched, unpatch_where
from .table import _code_key


@dataclasses.dataclass(frozen=True)
class MlpFamily:
    kind: str
    forward: Callable


SWIGLU = MlpFamily("swiglu", llama_mlp_forward)


@functools.lru_cache(maxsize=None)
def _llama_mlp_key() -> tuple:
    from transformers.models.llama.modeling_llama import LlamaMLP

    return _code_key(LlamaMLP.forward)


def is_candidate(m: nn.Module) -> bool:
    """Whether ``m``'s class forward is LlamaMLP's: ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``."""
    fwd = getattr(type(m), "forward", None)
    return fwd is not None and _code_key(fwd) == _llama_mlp_key()


def _is_silu(act: object) -> bool:
    if type(act) is nn.SiLU:
        return True
    from transformers.activations import SiLUActivation

    return type(act) is SiLUActivation and "forward" not in vars(act) \
        and type(act).forward.__module__ == SiLUActivation.__module__


def unsupported_reason(m: nn.Module) -> Optional[str]:
    """None when the candidate ``m`` can take the fused gate, else why not."""
    act = getattr(m, "act_fn", None)
    if not _is_silu(act):
        return f"act_fn is {type(act).__name__}, not SiLU: the fused gate is silu(gate) * up"
    for name in ("gate_proj", "up_proj", "down_proj"):
        if not isinstance(getattr(m, name, None), nn.Module):
            return f"{name} is not a module"
    return _foreign_patch(m)


def patch_mlps(model: nn.Module, report: PatchReport) -> PatchReport:
    """Fuse the gate of every supported MLP in ``model`` (idempotent); paths go to ``report.mlps``,
    candidates that cannot take it to ``report.skipped``."""
    report.mlps = []
    for path, module in model.named_modules(remove_duplicate=True):
        if is_patched(module):
            if module.__dict__[_ATTR].family is SWIGLU:
                report.mlps.append(path)
            continue
        if not is_candidate(module):
            continue
        reason = unsupported_reason(module)
        if reason is not None:
            report.skipped.append((path, reason))
            continue
        _install(module, SWIGLU)
        report.mlps.append(path)
    return report


def unpatch_mlps(model: nn.Module) -> int:
    """Restore the original forward of every MLP with the fused gate; returns how many."""
    return unpatch_where(model, lambda fam: fam is SWIGLU)
