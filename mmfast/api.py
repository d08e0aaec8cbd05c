"""``mmfast.patch`` / ``mmfast.unpatch``: the one call users make on an already-built model."""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional

from torch import nn

from ._zero import full_numel
from .ops.backend import requested_backend
from .patching import PatchReport, patch_norms, unpatch_norms
from .patching.core import (EXTRA_KWARGS_ATTR, hide_extra_kwargs, is_patched, kernelize_problem, name_patch,
                            show_extra_kwargs,
                            unwatch_patches, watch_patches)
from .patching.loss import patch_loss, unpatch_loss
from .patching.mlp import patch_mlps, unpatch_mlps
from .tuning import LN_RECIPES, apply_ln_recipe, remove_tuning_hooks, restore_master_weights
from .tuning.recipes import recipe_modules, watch_recipe
from .tuning.state import distributed_holder
from .tuning.mma import MMAOptions, added_modules, insert_mma, remove_mma
from .tuning.optimizers import unwatch_optimizers, watch_optimizers

class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the message (not at import)."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


logger = logging.getLogger("mmfast")
if not logger.handlers:
    _handler = _StderrHandler()
    _handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

TUNINGS = (None, *LN_RECIPES, "mma")


def _is_rank0() -> bool:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts; shared parameters are counted once, and bitsandbytes' 4-bit weights
    as the values they hold (two to each byte of their packed storage), as PEFT counts them."""
    trainable = total = 0
    for p in model.parameters():
        n = full_numel(p)
        if type(p).__name__ == "Params4bit":
            n *= 2 * p.element_size()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def patch(
    model: nn.Module,
    tuning: Optional[str] = None,
    *,
    final_norm: bool = False,
    master_weights: bool = True,
    mma: Optional[MMAOptions] = None,
    fused_loss: bool = True,
    fused_mlp: bool = True,
    verbose: bool = True,
) -> PatchReport:
    """Swap mmfast's fused kernels into ``model``'s norm modules and, with ``tuning``, apply a recipe.

    Call it before creating the optimizer and before DDP / FSDP / DeepSpeed / ``torch.compile``
    wrapping. ``tuning``: None (kernels only), ``"layernorm"``, ``"layernorm-simp"`` or
    ``"layernorm+projector"`` (LayerNorm tuning), or ``"mma"`` (Mixture-of-Modality adapters, with
    ``mma`` options; METHODS.md). ``final_norm`` adds the LLM's final norm to a LayerNorm recipe;
    ``master_weights`` keeps trainable norm weights in fp32. ``fused_loss`` computes a causal LM's
    training loss without materialising the logits (LLaMA / LLaVA; :mod:`mmfast.patching.loss`): a
    forward with ``labels`` under autograd then returns ``logits=None``. ``fused_mlp`` fuses the SwiGLU
    gate of LLaMA-style MLPs (:func:`mmfast.swiglu`: it keeps two of the three gate activations the
    unfused MLP keeps for backward) and CLIP's QuickGELU (:func:`mmfast.quick_gelu`: it keeps one of
    two). Returns a :class:`PatchReport`; with
    ``verbose`` its summary and trainable-parameter line are logged once, on rank 0.
    """
    if tuning not in TUNINGS:
        raise ValueError(f"tuning={tuning!r} is not one of {TUNINGS}")
    if mma is not None and tuning != "mma":
        raise ValueError("mma options need tuning='mma'")
    if final_norm and tuning not in LN_RECIPES:
        raise ValueError(f"final_norm=True adds the final norm to a LayerNorm recipe ({', '.join(LN_RECIPES)}); "
                         f"tuning={tuning!r} has none")
    if tuning in LN_RECIPES and added_modules(model):
        raise ValueError(f"tuning={tuning!r}: the model has MMA adapters from tuning='mma', which would keep running "
                         f"(frozen) under a LayerNorm recipe; save them if needed (mmfast.save_trainable), then "
                         f"mmfast.unpatch(model) before patching with another recipe")
    problem = kernelize_problem(model)
    if problem is not None:
        raise ValueError(f"mmfast.patch: {problem}")
    name_patch(model)  # (how this patch's warnings name the model)
    dtypes = {id(p): p.dtype for p in model.parameters()}  # (what the recipe widens: said to older optimizers)
    # a recipe that cannot apply is refused before the model is changed: MMA's insertion checks everything
    # before it changes anything (and changes nothing the kernel patches below read), the LayerNorm recipes
    # are looked up first
    if tuning == "mma":
        skipped = insert_mma(model, mma)
    elif tuning is not None:
        recipe_modules(model, tuning, final_norm=final_norm)
    report = patch_norms(model, PatchReport(backend=requested_backend(), tuning=tuning))
    if fused_mlp:
        patch_mlps(model, report)
    else:
        unpatch_mlps(model)
    if tuning == "mma":
        report.skipped.extend(skipped)
        report.adapters = added_modules(model)
    elif tuning is not None:
        apply_ln_recipe(model, tuning, final_norm=final_norm, master_weights=master_weights)
    if tuning is not None:
        watch_recipe(model, tuning)
        widened = {id(p): dtypes[id(p)] for p in model.parameters() if dtypes.get(id(p), p.dtype) != p.dtype}
        watch_optimizers(model, widened)  # (one built before this patch: said at its next step)
    # a PEFT model calls its base model's forward: that is where the fused loss goes
    hf = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    if fused_loss:  # a pass-through forward of an earlier patch would keep the fused loss off
        hide_extra_kwargs(hf)
    if not fused_loss:
        unpatch_loss(hf)
    elif not isinstance(getattr(hf, "lm_head", None), nn.Module):
        inner = next((path for path, m in hf.named_modules() if path.endswith("lm_head")), None)
        report.fused_loss = "n/a (no lm_head)" if inner is None else (
            f"not installed: the LM head is {inner}, below the model ({type(hf).__name__}: not a LLaMA / LLaVA "
            f"causal-LM forward the fused loss knows)")
    else:
        reason = patch_loss(hf, outermost=hf is model)
        report.fused_loss = "on" if reason is None else f"not installed: {reason}"
    for m in model.modules():  # signatures name mma_has_image (Trainer's column filter, generate)
        if EXTRA_KWARGS_ATTR in m.__dict__:
            show_extra_kwargs(m)
    # a few of what was patched, to notice a bulk replacement of the forwards since (Liger's, at train())
    top = next((path for path, m in model.named_modules() if m is hf), None) if is_patched(hf) else None
    watch_patches(model, [path for path in (next(iter(report.patched), None), next(iter(report.mlps or ()), None), top)
                          if path is not None])
    report.trainable_params, report.all_params = count_parameters(model)
    if verbose and _is_rank0():
        logger.info("%s\n%s", report.summary(), report.trainable_line())
        for path, reason in report.skipped:
            logger.info("  skipped %s: %s", path, reason)
    return report


def _wrapped_unpatch_problem(model: nn.Module) -> Optional[str]:
    wrapper = distributed_holder(model)
    if wrapper is None:
        return None
    changes = []
    if restore_master_weights(model, dry_run=True):
        changes.append("round the fp32 master norm weights back to their dtype")
    if wrapper != "FSDP2 (fully_shard)" and added_modules(model):
        changes.append("remove the MMA adapters and modality embedding")
    if not changes:
        return None
    return (f"mmfast.unpatch would {' and '.join(changes)} of a model inside {wrapper}, which holds those "
            "parameters (its next steps would fail, or compute in another dtype). Unpatch the model before "
            "wrapping it; to keep what trained, mmfast.save_trainable first, then load it into a fresh model "
            "(or patch with master_weights=False).")


def unpatch(model: nn.Module) -> int:
    """Restore the original forwards of every patched module, remove mmfast's hooks and the MMA
    adapters and modality embedding ``tuning="mma"`` added.

    Norm weights that ``master_weights`` kept in fp32 go back to their original dtype (rounded; save
    them with :func:`save_trainable` first to keep the fp32 values); other parameters keep their current
    values, dtypes and ``requires_grad``. Returns the number of modules restored or removed.

    Given a model inside DDP, FSDP or DeepSpeed (the wrapper itself, or an FSDP2-sharded model), which hold
    the parameters they were given, a change of their dtype or the removal of MMA's modules is refused
    (before anything changes): unpatch before wrapping. (The module inside a DDP wrapper, as HF Trainer's
    ``trainer.model`` hands it out, shows no sign of the wrapper: pass the wrapper.)"""
    problem = _wrapped_unpatch_problem(model)
    if problem is not None:
        raise ValueError(problem)
    remove_tuning_hooks(model)
    unwatch_patches(model)
    unwatch_optimizers(model)
    restore_master_weights(model)
    return (unpatch_loss(model) + hide_extra_kwargs(model) + remove_mma(model) + unpatch_mlps(model)
            + unpatch_norms(model))
