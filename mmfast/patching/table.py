"""Which norm modules mmfast patches, and with which fused forward.

One entry per family. A module belongs to a family when its class computes exactly what the fused
forward computes; anything else that looks like a norm is reported as skipped with the reason.
Adding a family is one ``NormFamily`` entry (and its forward in :mod:`mmfast.nn.norm`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Callable, Optional

from torch import nn

from .._zero import full_shape
from ..nn.norm import layer_norm_forward, llama4_rms_norm_forward, llama_rms_norm_forward
from ..ops.norm import MAX_N


@dataclasses.dataclass(frozen=True)
class NormFamily:
    kind: str  # short label used in reports and repr ("rms_norm", "layer_norm")
    description: str
    matches: Callable[[nn.Module], bool]  # class-level: does this module compute our op exactly?
    forward: Callable  # fused forward: forward(module, input)
    check: Callable[[nn.Module], Optional[str]]  # instance-level: None, or why this instance can't be patched


def _code_key(fn) -> tuple | None:
    """What a function computes, as its compiled code: two functions with the same key run the same
    instructions on the same constants and names. The docstring is left out: a model family that copies
    another's forward (Mistral's and Qwen's causal LMs, LLaMA's) documents it in its own words."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    consts = code.co_consts
    has_doc = getattr(inspect, "CO_HAS_DOCSTRING", None)  # Python 3.14: a flag says whether const 0 is it
    if has_doc is not None:
        consts = consts[1:] if code.co_flags & has_doc else consts
    elif consts and (consts[0] is None or isinstance(consts[0], str)):
        consts = consts[1:]  # before: const 0 is the docstring, or None where there is none
    return code.co_code, consts, code.co_names, code.co_varnames


@functools.lru_cache(maxsize=None)
def _llama_forward_key() -> tuple:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return _code_key(LlamaRMSNorm.forward)


def _is_llama_rms_norm(m: nn.Module) -> bool:
    """LlamaRMSNorm and every class whose forward is the same code (Mistral, Qwen2/3, Phi-3, Granite,
    Idefics3, Qwen2-VL, ...): normalise in fp32, round to the input dtype, multiply by ``weight``."""
    return _code_key(type(m).forward) == _llama_forward_key()


@functools.lru_cache(maxsize=None)
def _llama4_keys() -> tuple | None:
    try:
        from transformers.models.llama4.modeling_llama4 import Llama4TextRMSNorm
    except ImportError:
        return None
    return _code_key(Llama4TextRMSNorm.forward), _code_key(Llama4TextRMSNorm._norm)


def _is_llama4_rms_norm(m: nn.Module) -> bool:
    """Llama 4's text RMSNorm and every class with its code (``forward`` and the ``_norm`` it calls): the
    same computation as LLaMA's, written in two methods (normalise in fp32, round to the input dtype, times
    ``weight``); its epsilon is ``eps`` in some transformers versions and ``variance_epsilon`` in others."""
    keys = _llama4_keys()
    cls = type(m)
    return keys is not None and (_code_key(cls.forward), _code_key(getattr(cls, "_norm", None))) == keys


def _check_rms(m: nn.Module) -> Optional[str]:
    w = getattr(m, "weight", None)
    if not isinstance(w, nn.Parameter) or w.dim() != 1:
        return "weight is not a 1-D parameter"
    width = full_shape(w)[0]  # a ZeRO-3 partition's own shape is empty
    if width > MAX_N:
        return f"width {width} above the supported {MAX_N}"
    return None


def _is_torch_layer_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.LayerNorm) and type(m).forward is nn.LayerNorm.forward


def _check_layer_norm(m: nn.Module) -> Optional[str]:
    if len(m.normalized_shape) != 1:
        return f"normalizes over {len(m.normalized_shape)} dimensions; the fused op normalizes the last one"
    if m.normalized_shape[0] > MAX_N:
        return f"width {m.normalized_shape[0]} above the supported {MAX_N}"
    return None


FAMILIES: tuple[NormFamily, ...] = (
    NormFamily("rms_norm", "LLaMA-style RMSNorm", _is_llama_rms_norm, llama_rms_norm_forward, _check_rms),
    NormFamily("layer_norm", "torch.nn.LayerNorm", _is_torch_layer_norm, layer_norm_forward, _check_layer_norm),
    NormFamily("rms_norm", "Llama 4's text RMSNorm", _is_llama4_rms_norm, llama4_rms_norm_forward, _check_rms),
)

#: Norms with other semantics, left unpatched with a specific reason (class-name predicate, reason).
KNOWN_DIFFERENT: tuple[tuple[Callable[[str], bool], str], ...] = (
    (lambda name: name.startswith("Gemma") and "RMSNorm" in name,
     "scales by (1 + weight) and rounds once in fp32 (Gemma); not the LLaMA rounding the fused RMSNorm keeps"),
)

#: Packages whose norm kernels mmfast will not stack on.
KERNEL_LIBRARIES = ("liger_kernel", "unsloth", "apex", "flash_attn", "xformers", "transformer_engine",
                    "deepspeed", "megatron", "bitsandbytes")


def family_of(m: nn.Module) -> Optional[NormFamily]:
    for fam in FAMILIES:
        if fam.matches(m):
            return fam
    return None


def is_norm_candidate(m: nn.Module) -> bool:
    """Modules worth a line in the report: anything whose class name says it is a norm."""
    return "norm" in type(m).__name__.lower()


def unsupported_reason(m: nn.Module) -> str:
    name = type(m).__name__
    for pred, reason in KNOWN_DIFFERENT:
        if pred(name):
            return reason
    return (f"{name}: a forward the fused norms do not take (they take the code of LLaMA's RMSNorm, Llama 4's "
            f"text RMSNorm and torch.nn.LayerNorm's)")
