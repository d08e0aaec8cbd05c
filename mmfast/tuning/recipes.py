"""LayerNorm-tuning recipes (METHODS.md, section 1): which parameters train, everything else frozen.

| recipe | trainable |
|---|---|
| ``layernorm`` | every LLM block's ``input_layernorm`` and ``post_attention_layernorm``; the multimodal projector; the input embeddings and the LM head |
| ``layernorm-simp`` | only those LLM block norms |
| ``layernorm+projector`` | the block norms and the projector |

``final_norm=True`` adds the LLM's final norm. Trainable norm weights become fp32 master weights
(``master_weights=True``): an update of 1e-4 to a bf16 weight near 1.0 rounds away. When the input
embeddings are frozen, a forward hook makes the embedding output require grad so gradients still
reach blocks under (reentrant) activation checkpointing.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import warnings
from typing import Optional

import torch
from torch import nn

from .._zero import partitioned
from ..nn.norm import MASTER_ATTR as _MASTER_ATTR, cast_as_built
from ..patching.core import is_patched, patch_name

LN_RECIPES = ("layernorm", "layernorm-simp", "layernorm+projector")
#: Submodule names that hold a vision-language projector (the module that maps vision features into the
#: LLM's embedding space), in the order they are looked for: LLaVA and most HF VLMs, LLaVA's original
#: code, Idefics2/3 and SmolVLM, PaddleOCR-VL, VideoLLaMA3 and HyperCLOVAX (``projector``), the Qwen-VL
#: and GLM-4V families (the vision tower's patch merger), DeepSeek-VL and Janus, BLIP-2 and InstructBLIP
#: (the Q-Former's output into the LLM), LightOnOCR and MuseGlimmer, Gemma 3n and 4 (their vision
#: embedder), HunYuan-VL (the tower's patch merger), Ovis2 (its visual embedding table). A name that other
#: connectors hold inside them comes after theirs (Mistral 3's projector holds a ``patch_merger``).
PROJECTOR_NAMES = ("multi_modal_projector", "mm_projector", "connector", "projector", "merger", "aligner",
                   "language_projection", "vision_projection", "embed_vision", "patch_merger", "visual_embeddings_table")
#: Siblings (paths from the module that holds the projector) that project vision features into the LLM too
#: and train with the projector: Qwen3-VL's mergers for the features it adds to early LLM layers,
#: HyperCLOVAX's merger ahead of its projector, MuseGlimmer's adapter ahead of its projection, and the head
#: of Ovis2's visual tokenizer ahead of its visual embedding table.
PROJECTOR_SIBLINGS = {"merger": ("deepstack_merger_list",), "projector": ("vision_model.merger",),
                      "vision_projection": ("vision_adapter",),
                      "visual_embeddings_table": ("vision_tower.head_linear", "vision_tower.head_norm")}
#: Parameters beside the projector (on the module that holds it) that the projected features go through,
#: trained with it: LLaVA-NeXT's, LLaVA-NeXT-Video's and LLaVA-OneVision's learned end-of-row embedding.
PROJECTOR_PARAMS = ("image_newline",)
_HOOK_ATTR = "_mmfast_tuning_hooks"


@dataclasses.dataclass
class ModelParts:
    """The parts of a (multimodal) causal LM that the recipes refer to."""

    hf_model: nn.Module  # the outermost transformers PreTrainedModel
    decoder: nn.Module  # the language model's decoder (``get_decoder()``), with ``.layers``
    projector: Optional[nn.Module]
    input_embeddings: Optional[nn.Module]
    output_embeddings: Optional[nn.Module]
    projector_siblings: tuple[nn.Module, ...] = ()  # trained with the projector (PROJECTOR_SIBLINGS)
    projector_params: tuple[nn.Parameter, ...] = ()  # trained with the projector (PROJECTOR_PARAMS)

    def projector_modules(self) -> list[nn.Module]:
        return [] if self.projector is None else [self.projector, *self.projector_siblings]

    def train_projector(self) -> None:
        """Make the projector's parameters (its siblings' and :data:`PROJECTOR_PARAMS` included) trainable."""
        for m in self.projector_modules():
            active_copy(m).requires_grad_(True)
        for p in self.projector_params:
            p.requires_grad_(True)


def _hf_model(model: nn.Module) -> nn.Module:
    from transformers import PreTrainedModel

    for m in model.modules():  # the wrapped model of a PEFT/DDP/compile wrapper
        if isinstance(m, PreTrainedModel):
            return m
    raise ValueError(f"tuning recipes need a transformers PreTrainedModel inside {type(model).__name__}")


def find_parts(model: nn.Module) -> ModelParts:
    hf = _hf_model(model)
    decoder = hf.get_decoder() if hasattr(hf, "get_decoder") else None
    # a language model that is itself a causal LM (Blip2's) hands out that model: its decoder is one down
    while decoder is not None and getattr(decoder, "layers", None) is None and hasattr(decoder, "get_decoder"):
        inner = decoder.get_decoder()
        if inner is decoder:  # a causal LM whose get_decoder hands back itself (Llama 4's): its ``model``
            inner = getattr(decoder, "model", None)
        decoder = inner if isinstance(inner, nn.Module) and inner is not decoder else None
    layers = getattr(decoder, "layers", None)
    if decoder is None or layers is None or not all(
        hasattr(layer, "input_layernorm") and (hasattr(layer, "post_attention_layernorm")
                                               or hasattr(layer, "pre_feedforward_layernorm")) for layer in layers
    ):
        raise ValueError(
            f"LayerNorm tuning needs a LLaMA-style language model (get_decoder().layers with input_layernorm and "
            f"post_attention_layernorm, or Gemma's pre_feedforward_layernorm); {type(hf).__name__} has none"
        )
    modules = dict(hf.named_modules())
    found = next(((path, key) for key in PROJECTOR_NAMES for path in modules if path.split(".")[-1] == key), None)
    projector, siblings, params = None, (), ()
    if found is not None:
        path, key = found
        projector = modules[path]
        owner = path.rpartition(".")[0]
        siblings = tuple(modules[f"{owner}.{s}" if owner else s] for s in PROJECTOR_SIBLINGS.get(key, ())
                         if (f"{owner}.{s}" if owner else s) in modules)
        params = tuple(p for name in PROJECTOR_PARAMS
                       if isinstance(p := modules[owner]._parameters.get(name), nn.Parameter))
    return ModelParts(hf, decoder, projector, hf.get_input_embeddings(), hf.get_output_embeddings(), siblings,
                      params)


def active_copy(module: nn.Module) -> nn.Module:
    """The module that runs in ``module``'s place: for PEFT's ``modules_to_save`` wrapper (``original_module``
    beside trained copies) the active adapter's copy, or ``original_module`` where PEFT's forward runs that
    (adapters disabled, or none of this wrapper's active); else ``module`` itself."""
    copies, original = getattr(module, "modules_to_save", None), getattr(module, "original_module", None)
    merged = False
    if not (isinstance(copies, nn.ModuleDict) and isinstance(original, nn.Module)):
        # PEFT's LNTuningLayer (LNTuningConfig): a copy of the norm per adapter in ``ln_tuning_layers`` beside
        # ``base_layer``; the active copy runs, ``base_layer`` when disabled or merged (merging swaps the two)
        copies, original = getattr(module, "ln_tuning_layers", None), getattr(module, "base_layer", None)
        if not (isinstance(copies, nn.ModuleDict) and isinstance(original, nn.Module)):
            return module
        merged = bool(getattr(module, "merged_adapters", None))
    names = getattr(module, "active_adapters", None)
    if names is None:
        names = getattr(module, "active_adapter", None)
    names = [names] if isinstance(names, str) else list(names or ())
    if merged or getattr(module, "disable_adapters", False) or not names or names[0] not in copies:
        return original
    return copies[names[0]]


def peft_trainables(model: nn.Module) -> list[nn.Parameter]:
    """The parameters PEFT added that train now: its tuner layers' adapter weights (LoRA's ``lora_A`` /
    ``lora_B``, DoRA's magnitudes, IA3's vectors, ...), a prompt-learning model's prompt encoder and the
    active copies of ``modules_to_save`` modules. A recipe
    freezes the model around its own parameters and keeps these training: the user added them."""
    kept = []
    for m in model.modules():
        prompts = getattr(m, "prompt_encoder", None)  # prompt learning (prompt / prefix / p-tuning)
        if isinstance(prompts, nn.ModuleDict) and hasattr(m, "peft_config"):
            kept += [p for p in prompts.parameters() if p.requires_grad]
        names = getattr(type(m), "adapter_layer_names", None)
        if isinstance(names, tuple) and hasattr(m, "base_layer"):  # a PEFT tuner layer
            kept += [p for name in names if isinstance(getattr(m, name, None), nn.Module)
                     for p in getattr(m, name).parameters() if p.requires_grad]
        copy = active_copy(m)
        if copy is not m:
            kept += [p for p in copy.parameters() if p.requires_grad]
    return kept


def mlp_norms(layer: nn.Module) -> tuple[nn.Module, ...]:
    """The norms in front of a decoder layer's feed-forward: ``post_attention_layernorm`` in LLaMA-style
    layers; ``pre_feedforward_layernorm`` where a layer has one (Gemma 2/3/3n: sandwich norms, where
    ``post_attention_layernorm`` normalises the attention's output before the residual add); and where a
    layer runs a second feed-forward beside its MLP (Gemma 4's mixture of experts, which reads the residual
    stream through ``pre_feedforward_layernorm_2``) that one's input norm too."""
    pre = getattr(layer, "pre_feedforward_layernorm", None)
    if not isinstance(pre, nn.Module):
        return (layer.post_attention_layernorm,)
    second = getattr(layer, "pre_feedforward_layernorm_2", None)
    return (pre, second) if isinstance(second, nn.Module) else (pre,)


def block_norms(parts: ModelParts, final_norm: bool) -> list[nn.Module]:
    """Each block's attention-input and feed-forward-input norms (the two LLaMA has), plus the final norm."""
    norms = [n for layer in parts.decoder.layers for n in (layer.input_layernorm, *mlp_norms(layer))]
    if final_norm:
        norm = getattr(parts.decoder, "norm", None)
        if norm is None:
            raise ValueError(f"final_norm=True but {type(parts.decoder).__name__} has no final `norm`")
        norms.append(norm)
    return norms


def _input_grads_hook(parts: ModelParts) -> None:
    """Frozen input embeddings: make their output require grad in grad mode.

    Under reentrant activation checkpointing (HF's, FSDP's or DeepSpeed's checkpoint wrappers) a
    block whose inputs do not require grad is skipped by backward entirely, so its norms would get no
    gradient. The price is the input-gradient work of the first block only. Skipped while compiling.
    """
    emb, hf = parts.input_embeddings, parts.hf_model
    if emb is None or any(h is _output_requires_grad for h in emb._forward_hooks.values()):
        return
    hf.__dict__[_HOOK_ATTR] = hf.__dict__.get(_HOOK_ATTR, []) + [emb.register_forward_hook(_output_requires_grad)]


def _output_requires_grad(module, args, output):
    """The frozen input embeddings' forward hook (module level, so a patched model pickles)."""
    # Not inside torch.compile: it cannot return such a tensor, and compiled code checkpoints with the
    # non-reentrant implementation, which does not need it.
    if torch.is_grad_enabled() and not output.requires_grad and not torch.compiler.is_compiling():
        output.requires_grad_(True)


def _output_as_before(module: nn.Module, args, out):
    """Forward hook of a norm mmfast did not patch (its own forward runs) whose weights ``master_weights``
    widened to fp32: a forward that multiplies in the weight's dtype (Llama 4's text norm: the normalised
    input, rounded, times the weight) returned fp32 into bf16 layers, which failed. Its output goes back to
    the dtype it had (:func:`output_dtype_as_built`; the fused norms return x's dtype with fp32 weights too);
    after a cast since patching, the dtype its forward gives."""
    return cast_as_built(module, args[0] if args else None, out)


def warn_cast_trainables(what: str, dtype: torch.dtype, said: dict) -> None:
    """Warn (once per model and patch: ``said`` is a record the model holds, whose ``"owner"`` names the model
    in the message, which Python's default filter would otherwise show once per process) that trainable weights mmfast.patch keeps in float32 (``what``, a plural noun) are in ``dtype`` now. Not in a
    distributed run: FSDP2's mixed precision runs the forward on 16-bit copies of fp32 shards, and DeepSpeed's
    bf16 engines cast the model while their optimizers keep fp32 masters: there a 16-bit weight in the forward
    says nothing, and this check cannot tell those runs from a cast that lost the masters."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    if dtype.itemsize >= 4:  # float64 (a reference run in double): nothing rounds away
        return
    if said.get("said"):
        return
    said["said"] = True
    warnings.warn(f"mmfast: {what} ({said['owner']}) are {str(dtype).removeprefix('torch.')} now: the model was cast after patching "
              "(Lightning's precision='bf16-true', model.to(dtype), Trainer's bf16_full_eval), or its weights were "
              "loaded after patching in the checkpoint's dtype (load_checkpoint_and_dispatch into a model patched "
              "on the meta device). Small updates round away in that dtype and they stop learning. Cast or load "
              "before mmfast.patch (patching again widens them back), and train with mixed precision (Lightning "
              "'bf16-mixed', Trainer bf16=True) instead.", RuntimeWarning, stacklevel=4)


#: On a norm whose weights master_weights widened: the cast warning's record, one dict for the norms of one
#: patch call (so once per model). On the norm, not in the hook's arguments: compiled code guards what a hook
#: holds, and a record per model compiled every new model's layers again.
_SAID_ATTR = "_mmfast_cast_said"
#: The record of norms patched by an earlier version, which hold none
_SAID_EARLIER = {"owner": "a model patched by an earlier mmfast"}


def _master_weights_kept(module: nn.Module, args) -> None:
    """Forward pre-hook of a norm whose weights ``master_weights`` widened: warn (once per model) when a
    cast since patching (Lightning's ``precision="bf16-true"``, ``model.to(torch.bfloat16)``, HF Trainer's
    ``bf16_full_eval``) took them out of fp32 while they train: small updates then round away and the norm
    stops learning, with nothing else to show it."""
    if not (module.training and torch.is_grad_enabled()) or torch.compiler.is_compiling():
        return
    for name in module.__dict__.get(_MASTER_ATTR, ()):
        p = getattr(module, name, None)
        if isinstance(p, nn.Parameter) and p.requires_grad and p.dtype != torch.float32:
            warn_cast_trainables("the trainable norm weights mmfast.patch kept in float32 (master_weights=True)",
                                 p.dtype, module.__dict__.get(_SAID_ATTR, _SAID_EARLIER))
            return


def _surrounding_dtype(model: nn.Module, path: str, skip: set[int]) -> Optional[torch.dtype]:
    """The dtype (most elements) of the floating parameters around the module at ``path``: those of its
    nearest ancestor that has any besides the ``skip`` ones (a decoder layer's projections, say)."""
    parts = path.split(".") if path else []
    for depth in range(len(parts) - 1, -1, -1):
        counts: dict[torch.dtype, int] = {}
        for p in model.get_submodule(".".join(parts[:depth])).parameters():
            if p.is_floating_point() and id(p) not in skip:
                counts[p.dtype] = counts.get(p.dtype, 0) + max(p.numel(), 1)  # a ZeRO-3 partition: numel 0
        if counts:
            return max(counts, key=counts.get)
    return None


def restore_master_weights(model: nn.Module, dry_run: bool = False) -> int:
    """Round fp32 master weights back to the dtype they had before ``master_weights`` widened them (the
    module's own forward, once unpatched, expects it: HF's RMSNorm would return fp32 into bf16
    projections); returns how many parameters were restored (with ``dry_run``: would be, changing
    nothing).

    A model cast since patching (``model.half()``, ``.float()``) is what the weights follow instead: they
    take the dtype the parameters around them have now (left as the cast made them)."""
    masters = {id(getattr(m, name)) for m in model.modules() for name in m.__dict__.get(_MASTER_ATTR, ())}
    restored = 0
    for path, m in list(model.named_modules()):
        kept = m.__dict__.get(_MASTER_ATTR, {}) if dry_run else m.__dict__.pop(_MASTER_ATTR, {})
        if not dry_run:
            m.__dict__.pop(_SAID_ATTR, None)
        for name, (before, around) in kept.items():
            p = getattr(m, name, None)
            if not isinstance(p, nn.Parameter):
                continue
            now = _surrounding_dtype(model, path, masters)
            cast_since = p.dtype != torch.float32 or (now is not None and now != around)
            target = (now or p.dtype) if cast_since else before
            if p.dtype != target:
                if not dry_run:
                    p.data = p.data.to(target)
                restored += 1
    return restored


def _recipe_kept(tuning: str, params: list, module: nn.Module, args) -> None:
    """Forward pre-hook of a patched model: warn (once per model) when nothing ``tuning`` made trainable trains
    any more in a training forward. PEFT's ``get_peft_model`` freezes every parameter outside its own
    adapters, so wrapping a patched model (TRL's ``SFTTrainer(peft_config=...)`` does) trains LoRA alone
    and leaves the recipe's norms or adapters at their starting values, with nothing else to show it; its
    ``prepare_model_for_kbit_training`` (for a quantized model) freezes every parameter, and the step then
    trains nothing at all (its input-grad hook still gives the loss a grad_fn, so backward does not fail).
    ``params``: (module path, parameter name) pairs, looked up at each call: a wrapper that replaces the
    parameter objects (FSDP2, ``load_state_dict(assign=True)``) is followed, the old objects are not kept
    alive, and a copy of the model (deepcopy, pickle) watches its own."""
    if not params or not (module.training and torch.is_grad_enabled()) or torch.compiler.is_compiling():
        return
    found = False
    for path, name in params:
        try:
            p = module.get_submodule(path)._parameters.get(name)
        except AttributeError:
            p = None
        if p is None:  # moved (PEFT wraps a module it trains or adapts: modules_to_save, LoRA's base_layer)
            continue
        if p.requires_grad:
            return
        found = True
    if not found:
        return
    others = any(p.requires_grad for p in module.parameters())
    params.clear()  # said once (for this model and patch): no more checks
    warnings.warn(f"mmfast: none of the parameters tuning={tuning!r} made trainable ({patch_name(module)}) requires "
              "grad any more, "
              f"{'while other parameters train' if others else 'nor does any other'}: something froze them after "
              "mmfast.patch. PEFT's get_peft_model freezes every parameter outside its adapters (TRL's "
              "SFTTrainer(peft_config=...) calls it), and prepare_model_for_kbit_training every parameter. Call "
              "those first, then mmfast.patch; with TRL, pass that PEFT model and no peft_config.",
              RuntimeWarning, stacklevel=3)


def watch_recipe(model: nn.Module, tuning: str) -> None:
    """Register :func:`_recipe_kept` on ``model`` for the parameters trainable now (a patch again
    replaces the earlier watch)."""
    hooks = []
    for h in model.__dict__.get(_HOOK_ATTR, []):
        if _is_watch(model, h):
            h.remove()
        else:
            hooks.append(h)
    params = [(path, name) for path, m in model.named_modules() for name, p in m._parameters.items()
              if p is not None and p.requires_grad]
    if params:
        hooks.append(model.register_forward_pre_hook(functools.partial(_recipe_kept, tuning, params)))
    model.__dict__[_HOOK_ATTR] = hooks


def _is_watch(model: nn.Module, handle) -> bool:
    hook = model._forward_pre_hooks.get(handle.id)
    return isinstance(hook, functools.partial) and hook.func is _recipe_kept


def remove_tuning_hooks(model: nn.Module) -> None:
    for m in model.modules():
        for h in m.__dict__.pop(_HOOK_ATTR, []):
            h.remove()


def untrainable_problem(hf: nn.Module, tuning: str, modules, params=()) -> Optional[str]:
    """Why ``tuning`` cannot make ``modules``' parameters (and ``params``) trainable, or None: a quantized weight
    (bitsandbytes' 4-bit and 8-bit formats store integers) cannot require grad. Asked before anything changes."""
    names = {id(p): name for name, p in hf.named_parameters(remove_duplicate=False)}
    seen, bad = set(), []
    for p in [p for m in modules for p in m.parameters()] + list(params):
        if id(p) not in seen and not (p.is_floating_point() or p.is_complex()):
            bad.append(p)
        seen.add(id(p))
    if not bad:
        return None
    owners = sorted({names.get(id(p), "?").rpartition(".")[0] for p in bad})
    kinds = sorted({f"{type(p).__name__} of {p.dtype}" for p in bad})
    return (f"tuning={tuning!r} trains {', '.join(owners)}, whose weights are quantized ({', '.join(kinds)}) and "
            f"cannot require grad. Load the model with them left unquantized (bitsandbytes: "
            f"BitsAndBytesConfig(..., llm_int8_skip_modules={owners!r})), or choose a recipe that leaves them "
            f"frozen" + (" (tuning='layernorm-simp' trains the norms alone)" if tuning != "layernorm-simp" else ""))


def recipe_modules(model: nn.Module, recipe: str, *, final_norm: bool = False
                   ) -> tuple[ModelParts, list[nn.Module], list[nn.Module]]:
    """``(parts, norms, trained modules)`` of the recipe on ``model``, changing nothing; a ValueError says why the
    recipe cannot apply (``patch`` asks before it changes anything)."""
    if recipe not in LN_RECIPES:
        raise ValueError(f"unknown LayerNorm-tuning recipe {recipe!r}; choose from {LN_RECIPES}")
    parts = find_parts(model)
    norms = [active_copy(n) for n in block_norms(parts, final_norm)]
    train: list[nn.Module] = list(norms)
    if recipe in ("layernorm", "layernorm+projector"):
        if parts.projector is None and recipe == "layernorm+projector":
            raise ValueError(f"tuning={recipe!r} needs a multimodal projector; {type(parts.hf_model).__name__} has none")
        train.extend(active_copy(m) for m in parts.projector_modules())
    if recipe == "layernorm":
        for emb, what in ((parts.input_embeddings, "input embeddings"), (parts.output_embeddings, "LM head")):
            if emb is None:
                raise ValueError(f"tuning='layernorm' trains the {what}, which {type(parts.hf_model).__name__} lacks")
            train.append(active_copy(emb))
    extra = parts.projector_params if recipe in ("layernorm", "layernorm+projector") else ()
    problem = untrainable_problem(parts.hf_model, recipe, train, extra)
    if problem is not None:
        raise ValueError(problem)
    return parts, norms, train


def apply_ln_recipe(model: nn.Module, recipe: str, *, final_norm: bool = False, master_weights: bool = True) -> None:
    """Freeze ``model`` and make the recipe's parameters trainable (and PEFT's adapters, which the user
    added: :func:`peft_trainables`)."""
    parts, norms, train = recipe_modules(model, recipe, final_norm=final_norm)
    kept = peft_trainables(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for m in train:
        for p in m.parameters():
            p.requires_grad_(True)
    if recipe in ("layernorm", "layernorm+projector"):  # (the projector's modules are in train)
        for p in parts.projector_params:
            p.requires_grad_(True)
    for p in kept:
        p.requires_grad_(True)
    if not master_weights:  # a patch again without them: the fp32 weights an earlier patch kept go back
        owners = [m for m in model.modules() if _MASTER_ATTR in m.__dict__]
        restore_master_weights(model)
        for m in owners:  # (their hooks: what keeps them in fp32, and casts their output back)
            for h in m.__dict__.pop(_HOOK_ATTR, []):
                h.remove()
    if master_weights:
        left = 0
        paths = {id(m): path for path, m in model.named_modules()}
        # the weights kept in fp32: these norms', and any an earlier patch kept (a PEFT modules_to_save
        # wrapper's original_module beside its active copy), which say nothing of the model's dtype
        skip = {id(p) for norm in norms for p in norm.parameters(recurse=False)}
        skip |= {id(getattr(m, n)) for m in model.modules() for n in m.__dict__.get(_MASTER_ATTR, ())
                 if isinstance(getattr(m, n, None), torch.Tensor)}
        said = {"owner": patch_name(model)}  # the cast warning, once for these norms until a patch again
        for norm in norms:
            for name, p in norm.named_parameters(recurse=False):
                if partitioned(p):  # ZeRO-3 holds the partition (ds_tensor); its optimizer keeps fp32 masters
                    left += p.ds_tensor.dtype != torch.float32
                    continue
                # fp32 already (a model built in fp32) or widened now: either way a later cast is warned about
                around = _surrounding_dtype(model, paths[id(norm)], skip)
                if _MASTER_ATTR not in norm.__dict__:
                    norm.__dict__[_HOOK_ATTR] = norm.__dict__.get(_HOOK_ATTR, []) + [
                        norm.register_forward_pre_hook(_master_weights_kept)]
                norm.__dict__[_SAID_ATTR] = said
                kept = norm.__dict__.setdefault(_MASTER_ATTR, {})
                # recorded when first kept, when widened now from 16 bits (after a cast to 16 bits too: the
                # output keeps the cast's), or when the model was cast since (the parameters around it are in
                # another dtype now, fp32 after .float()): then the weight's own dtype is the model's
                if p.dtype.itemsize < 4 or name not in kept or kept[name][1] != around:
                    kept[name] = (p.dtype, around)
                if p.dtype.itemsize < 4:  # (a float64 model, a reference run in double, keeps its precision)
                    p.data = p.data.to(torch.float32)
                    if not is_patched(norm) and not any(  # its own forward: it may compute in the weight's dtype
                            norm._forward_hooks.get(h.id) is _output_as_before for h in norm.__dict__[_HOOK_ATTR]):
                        norm.__dict__[_HOOK_ATTR].append(norm.register_forward_hook(_output_as_before))
        if left:
            logging.getLogger("mmfast").info(
                "master_weights: %d norm weights are partitioned by DeepSpeed ZeRO-3 and keep their dtype; "
                "DeepSpeed's bf16/fp16 optimizer keeps their fp32 master copies", left)
    if recipe != "layernorm":
        _input_grads_hook(parts)
