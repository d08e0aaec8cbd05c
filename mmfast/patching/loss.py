"""The fused LM-head loss in HF causal LMs: training steps with ``labels`` never build the logits.

Three instance-level swaps on a supported model (``LlamaForCausalLM``, ``LlavaForConditionalGeneration``
and every class whose forward is the same code), no class is touched:

* the model's ``forward``: when ``labels`` are given in grad mode, it arms the LM head for one call, then
  runs the model's own forward unchanged;
* the LM head's ``forward``: armed, and autograd records its call (its input or parameters require grad), it
  computes :func:`mmfast.ops.loss.linear_cross_entropy` of its input
  (with the weight as the head sees it inside its own call, so wrappers that gather parameters around the
  call keep working) and returns a stand-in for the logits: the loss, broadcast to the logits' shape with
  zero strides (no memory);
* the model's ``loss_function`` (HF's own hook): given the stand-in, it returns the fused loss; anything
  else goes to the model's loss function as before.

A wrapper may hand on the head's output as a new tensor over the same memory (DeepSpeed ZeRO-3 passes
every module output through an autograd function whose backward gathers the module's parameters again
before the module's own backward). The loss is then read back out of that tensor, so its gradient goes
through the wrapper's backward, which gathers the head's weight before the fused loss's backward reads
it. A head output that is neither the stand-in nor such an alias of it raises instead of computing a
loss from the stand-in's values.

Each training call first checks that nothing replaced the fused path since patching (a ``loss_function``
set, a new LM head, a forward or backward hook on the head, or a forward hook for every module, from
outside the sharding and offloading wrappers, which would see the stand-in or its gradient); then it runs
unfused, as unpatched, warning once per reason.

The output then has ``loss`` and ``logits=None`` (the stand-in never leaves the forward). Without labels,
under ``torch.no_grad()`` (evaluation, generation), with ``logits_to_keep``, or inside
``mmfast.disabled()``, the model runs exactly as unpatched and returns its logits. ``torch.compile``
traces all of it without a graph break: the loss is one custom op (:mod:`mmfast.ops.loss`).

Labels follow HF's causal-LM loss: shifted by one (or ``shift_labels``), ``ignore_index`` (default -100),
mean over the labelled positions or ``num_items_in_batch``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import sys
import threading
import warnings
import weakref
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..ops.backend import records_grad, warn_once
from ..ops.loss import linear_cross_entropy
from .core import (_ATTR, ModuleCall, _foreign_patch, _in_wrapper_package, _install, _original_call, defining_module,
                   displaced, foreign_hook, forward_argument, forward_cut, forward_runner, is_disabled,
                   is_patched, reaches_class_forward, remove_hooks, unpatch_where)
from .table import _code_key

_STATE = "_mmfast_loss_state"
_SAID = "_mmfast_loss_off_said"  # the reasons already warned of, on the model
_FUSED = "_mmfast_fused_loss"  # on the model: the fused loss's hooks are on it


@dataclasses.dataclass
class _Call:
    """One armed call: the loss arguments on the way in, the loss and the stand-in on the way out."""

    armed: Optional[dict] = None
    loss: Optional[Tensor] = None
    stand_in: Optional[Tensor] = None
    # what runs the model's forward (None where compiled): the code of the frame that runs it around the arming
    # hook (:func:`_runner`) and the model, by weak reference. A head call with no frame of that code for that
    # model above it is outside the forward, after an interrupt cut it (no hook runs after a
    # KeyboardInterrupt). (Not the frame's id: a freed frame's address is soon a new frame's.)
    runner: Optional[tuple] = None

    def empty(self) -> bool:
        return self.armed is None and self.loss is None and self.stand_in is None


#: The armed calls, innermost last (a fused model's forward run inside another's nests); a fused head holds
#: the index of its own (:class:`_LossState`). The hooks and the head hand the call's tensors on through this
#: global, not through the head: torch.compile runs each hook of a compiled model as a frame of its own and
#: gives a tensor a frame finds on a torch.nn module's attributes (the head is an nn.Linear) a static shape,
#: so every new batch or sequence length compiled the model's forward again, up to the recompile limit
#: (after which it ran uncompiled), and mark_dynamic on the inputs failed. The index, 0 but for nested
#: calls, is what compiled code specialises on: every model shares it (a key per head compiled every new
#: model's forward again).
_STACK: list[_Call] = []
#: Serialises eager changes to :data:`_STACK` (arming takes an index and appends; a release empties and trims):
#: training forwards of different models on several threads otherwise took one index for two calls (one
#: model's head then computed another's loss, or an IndexError). Reentrant: the finalizer of a freed head
#: (:func:`_clear_slot`) may run in a garbage collection inside a locked section. Compiled code takes no lock.
_STACK_LOCK = threading.RLock()


def _stack_locked():
    return contextlib.nullcontext() if torch.compiler.is_compiling() else _STACK_LOCK


class _LossState:
    """What a fused head holds (attribute ``_STATE``): ``slot``, the index of its armed call in
    :data:`_STACK`, or None. A copy of the head (pickle, deepcopy) starts unarmed."""

    def __init__(self):
        self.slot: Optional[int] = None
        # a head freed with its call still armed (a KeyboardInterrupt, then ``del model``): the call's tensors go
        weakref.finalize(self, _clear_slot, [self.__dict__])

    def __reduce__(self):
        return _LossState, ()

    def __setstate__(self, state) -> None:  # an earlier version's (the call's fields, on the head)
        self.__init__()


def _clear_slot(box: list) -> None:
    slot = box[0].get("slot")
    with _STACK_LOCK:
        if slot is not None and slot < len(_STACK):
            _STACK[slot] = _Call()  # (emptied, not removed: the indices of calls nested in it stay right)


def _call_of(st: Optional[_LossState]) -> Optional[_Call]:
    """The armed call of the head holding ``st``, or None."""
    return None if st is None or st.slot is None else _STACK[st.slot]


def _release(st: _LossState) -> None:
    """End the head's call: its entry is emptied, and empty entries at the top leave the stack (a call of
    another model armed after this one keeps its index, whichever ends first)."""
    if st.slot is not None:
        with _stack_locked():
            if st.slot < len(_STACK):
                _STACK[st.slot] = _Call()
            st.slot = None
            _trim()


def _trim() -> None:
    """Empty entries at the top leave the stack (a released call's, a freed head's cut call's)."""
    while _STACK and _STACK[-1].empty():
        _STACK.pop()


@functools.lru_cache(maxsize=None)
def _supported_keys() -> frozenset:
    from transformers.models.llama.modeling_llama import LlamaForCausalLM
    from transformers.models.llava.modeling_llava import LlavaForConditionalGeneration

    return frozenset(_code_key(inspect.unwrap(c.forward)) for c in (LlamaForCausalLM, LlavaForConditionalGeneration))


def _loss_not_causal(model: nn.Module) -> Optional[str]:
    """Why the loss ``model``'s forward computes is not HF's causal-LM loss (what the fused loss computes), or
    None: a class of its own ``loss_function``, or a ``loss_type`` mapped to another loss."""
    # (traced inside a compiled forward: torch 2.11's Dynamo refuses transformers' lazy top-level module as an
    # import result and inspect.getattr_static's MRO helper, so the class comes from its own module and the
    # attribute lookup is a plain walk of the MRO)
    from transformers.loss.loss_utils import ForCausalLMLoss
    from transformers.modeling_utils import PreTrainedModel

    cls = type(model)
    own = next((c.__dict__["loss_function"] for c in cls.__mro__ if "loss_function" in c.__dict__), None)
    if own is not PreTrainedModel.__dict__.get("loss_function"):
        return f"{cls.__name__} defines its own loss_function; the fused loss would bypass it"
    if _hf_loss(model) is not ForCausalLMLoss:
        return f"loss_type={getattr(model, 'loss_type', None)!r} is not the causal-LM loss the fused loss computes"
    return None


def unsupported_reason(model: nn.Module) -> Optional[str]:
    """None when the fused loss can be installed on ``model``, else why not."""
    cls = type(model)
    if _code_key(inspect.unwrap(cls.forward)) not in _supported_keys():
        return f"{cls.__name__}: forward is not one the fused loss knows (LLaMA / LLaVA causal LM)"
    not_causal = _loss_not_causal(model)
    if not_causal is not None:
        return not_causal
    head_reason = _head_reason(getattr(model, "lm_head", None))
    if head_reason is not None:
        return head_reason
    if "_loss_function" in model.__dict__:
        return "a custom loss_function is set on the model; the fused loss would bypass it"
    foreign = _foreign_patch(model)
    return None if foreign is None else f"model: {foreign}"


def _head_reason(head) -> Optional[str]:
    """Why the fused loss cannot go on ``head``, or None."""
    if type(head) is not nn.Linear:
        kind = type(head)  # (by its module: PEFT's LoRA layer is a "Linear" too)
        return f"lm_head is {kind.__module__}.{kind.__qualname__}, not torch.nn.Linear"
    foreign = _foreign_patch(head)
    return None if foreign is None else f"lm_head: {foreign}"


def _install_head(head: nn.Linear) -> None:
    _install(head, _HEAD, _head_forward)
    head.__dict__[_STATE] = _LossState()


class _StandIn(torch.autograd.Function):
    """The loss as a zero-stride tensor of the logits' shape; its gradient is element 0's."""

    @staticmethod
    def forward(ctx, loss: Tensor, shape: tuple) -> Tensor:
        ctx.dims = len(shape)
        return loss.detach().clone().expand(shape)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad[(0,) * ctx.dims], None


class _ReadLoss(torch.autograd.Function):
    """The loss read back from an alias of the stand-in; the gradient goes back with zero strides."""

    @staticmethod
    def forward(ctx, stand_in: Tensor) -> Tensor:
        ctx.shape = stand_in.shape
        return stand_in[(0,) * stand_in.dim()].clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad.expand(ctx.shape)


def _aliases(t: Any, stand_in: Tensor) -> bool:
    """``t`` is the stand-in, or a new tensor over its memory with its shape and strides."""
    return t is stand_in or (isinstance(t, Tensor) and t.shape == stand_in.shape and t.stride() == stand_in.stride()
                             and t.dtype == stand_in.dtype and t.data_ptr() == stand_in.data_ptr())


def _cut(call: _Call) -> bool:
    """Whether ``call``'s forward is no longer running (a KeyboardInterrupt cut it). Eager only."""
    return forward_cut(call.runner)


def _runner(model: nn.Module) -> Optional[tuple]:
    """What runs ``model``'s forward around the arming hook: Module._call_impl (the model its ``self``) or
    :func:`_model_forward` (its ``model``); see :func:`~mmfast.patching.core.forward_runner`."""
    if torch.compiler.is_compiling():  # (no frames to read in a graph)
        return None
    return forward_runner(model, sys._getframe(2), (nn.Module._call_impl.__code__, _model_forward.__code__))


def _head_forward(head: nn.Linear, x: Tensor) -> Tensor:
    st = _call_of(head.__dict__[_STATE])
    if st is not None and _cut(st):  # (a direct call of the head after the cut: logits, not the stale loss)
        _release(head.__dict__[_STATE])
        st = None
    # a call autograd does not record (a frozen model called with labels outside no_grad, a logit lens under
    # no_grad) gives logits and leaves the call armed: the fused loss's only gain is in a backward
    unrecorded = is_disabled() or not records_grad(x, head.weight, head.bias)
    if st is None or st.armed is None or unrecorded:
        if st is not None and st.armed is None and st.stand_in is not None and not unrecorded:
            raise RuntimeError("mmfast fused loss: the LM head was called twice in one training forward (an "
                               "auxiliary head called from a hook: logit lens, early exit); the first call got the "
                               "fused loss's stand-in, not logits. Call it after the forward (or under no_grad), or "
                               "run without the fused loss (mmfast.patch(..., fused_loss=False))")
        return _original_call(head, head.__dict__[_ATTR])(x)
    # (the call stays armed until its loss is in place: a call with neither is an emptied one, which another
    # thread's release would trim off the stack while this head computes the loss)
    args = dict(st.armed)
    target = _target(args.pop("labels"), args.pop("shift_labels"), args["ignore_index"])
    if target.dtype != torch.int64 and target.dtype != torch.uint8:  # (the op takes int32; HF's loss does not)
        raise RuntimeError(f"expected target dtype to be Long or Byte, but got {target.dtype} (the labels of the "
                           "model's loss: F.cross_entropy's message, which the unpatched model gives)")
    if target.shape != x.shape[:-1] and target.numel() == x.shape[:-1].numel():
        target = target.reshape(x.shape[:-1])  # HF's loss flattens both (labels [S] for one sample, say)
    if target.shape != x.shape[:-1]:
        raise ValueError(f"mmfast fused loss: labels {tuple(target.shape)} do not match the LM head's input "
                         f"{tuple(x.shape)}; run without the fused loss (mmfast.patch(..., fused_loss=False))")
    loss = linear_cross_entropy(x, head.weight, target, head.bias, **args)
    st.loss, st.stand_in = loss, _StandIn.apply(loss, (*x.shape[:-1], head.out_features))
    st.armed = None
    return st.stand_in


def _hf_loss(model: nn.Module):
    """The loss HF's ``loss_function`` gives ``model`` now, without mmfast's (its ``loss_type`` may have
    changed since patching): the mapped loss, or the causal-LM loss for a type HF does not know."""
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    return LOSS_MAPPING.get(getattr(model, "loss_type", None), ForCausalLMLoss)


def _loss_function(model: nn.Module, logits=None, labels=None, vocab_size=None, **kwargs):
    st = _call_of(_head_state(model))
    if st is None or st.stand_in is None:  # unfused: what HF's own loss_function would call
        return _hf_loss(model)(logits=logits, labels=labels, vocab_size=vocab_size, **kwargs)
    if logits is st.stand_in:
        return st.loss
    if _aliases(logits, st.stand_in):  # a wrapper's new tensor over the head's output: through its backward
        return _ReadLoss.apply(logits)
    raise RuntimeError(f"mmfast fused loss: the model's loss function got logits {type(logits).__name__} "
                       f"{tuple(getattr(logits, 'shape', ()))} that are not what its patched lm_head returned (a hook "
                       "or wrapper around the head replaced its output); run without the fused loss "
                       "(mmfast.patch(..., fused_loss=False))")


def _arm(labels: Tensor, kwargs: dict) -> dict:
    """The call's loss arguments as given (shifted in the head's call: compiled, the labels are found there as
    the forward's own input, with its dynamic dimensions, not as another frame's output with fixed ones)."""
    return dict(labels=labels, shift_labels=kwargs.get("shift_labels"),
                ignore_index=kwargs.get("ignore_index", -100), num_items_in_batch=kwargs.get("num_items_in_batch"))


def _target(labels: Tensor, shift_labels: Optional[Tensor], ignore_index: int) -> Tensor:
    """The token each position predicts: HF's causal-LM shift (or ``shift_labels``)."""
    if shift_labels is not None:
        return shift_labels
    return nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def _unfused_reason(model: nn.Module) -> Optional[str]:
    """Why this training call cannot take the fused loss any more, or None: the model was changed after
    ``patch`` in a way the fused loss would get wrong."""
    if _FUSED in model.__dict__ and "_hf_hook" in model.__dict__:
        return ("an Accelerate hook was put on the model after patching (dispatch_model, cpu_offload); its "
                "output hook would copy the stand-in logits whole: mmfast.patch(model) again fuses the loss inside it")
    head = _head(model)
    if _STATE not in head.__dict__:
        return ("the model's lm_head was replaced after patching (resize_token_embeddings, a PEFT "
                "modules_to_save wrapper, ...); mmfast.patch(model) again fuses a new nn.Linear head")
    fn = model.__dict__.get("_loss_function")
    # (a functools.partial: a model pickled by an earlier version)
    if not (isinstance(fn, (ModuleCall, functools.partial)) and fn.func is _loss_function):
        return "a loss_function was set on the model after patching; the fused loss would bypass it"
    not_causal = _loss_not_causal(model)
    if not_causal is not None:
        return not_causal
    # hooks that see the head's output or its gradient (a sharding or offloading wrapper's hand the stand-in
    # on); a forward pre-hook sees the head's input, which the fused loss reads after it
    hook = foreign_hook(head, "on lm_head", kinds=("forward hook", "backward hook", "backward pre-hook"),
                        global_hooks=True)
    if hook is not None:
        return (f"{hook} would see a stand-in instead of the logits (or of their gradient); "
                "pass fused_loss=False to mmfast.patch to keep this hook without the warning")
    return None


def _head(model: nn.Module):
    """The model's LM head, inside torch.compile's wrapper where it has one (Accelerate's regional
    compilation compiles the head on its own)."""
    head = getattr(model, "lm_head", None)
    return getattr(head, "_orig_mod", head) if type(head).__name__ == "OptimizedModule" else head


def _head_state(model: nn.Module) -> Optional[_LossState]:
    """The fused loss's state on the model's LM head, or None (no head, or an unfused one)."""
    head = _head(model)
    return head.__dict__.get(_STATE) if isinstance(head, nn.Module) else None


def _arm_hook(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of the model: a training call with labels arms its LM head with the loss arguments
    (the head then computes the loss and returns a stand-in for the logits). Hooks, not a replaced forward:
    a copy of the model's top module (Accelerate's regional compilation makes one) runs them with itself,
    and Accelerate's ``prepare`` wraps the class's forward as it does unpatched."""
    st = _head_state(model)
    if st is not None:  # a call a KeyboardInterrupt cut (no hook runs after it) must not leave the head armed
        _release(st)
    labels = forward_argument(type(model), args, kwargs, "labels")
    keep = forward_argument(type(model), args, kwargs, "logits_to_keep", 0)
    if (labels is None or not torch.is_grad_enabled() or is_disabled()
            or not (isinstance(keep, int) and keep == 0)):
        return None
    reason = _unfused_reason(model)
    if reason is not None:  # the model's own head and loss, as unpatched
        _say_once(model, reason, f"mmfast: the fused LM-head loss is off for this model: {reason}")
        return None
    if not _arms_last(model):  # this call's loss arguments may change after this hook: unfused
        return None
    call = _Call(armed=_arm(labels, kwargs), runner=_runner(model))
    with _stack_locked():  # (the stack is the process's: forwards of other models on other threads arm too)
        _trim()
        st.slot = len(_STACK)
        _STACK.append(call)
    return None


def _arms_last(model: nn.Module) -> bool:
    """Whether :func:`_arm_hook` runs after every forward pre-hook on ``model`` that could change the call's
    labels or loss arguments (one of the user's registered after patching: a prompt mask). Where one follows
    it, it moves to the end, so that later calls read what the model's forward gets, and this call runs
    unfused (it read the arguments before that hook changed them). Hooks of the forward form are inside
    the forward, after every hook."""
    hooks = model._forward_pre_hooks
    keys = list(hooks)
    at = next((i for i, k in enumerate(keys) if hooks[k] is _arm_hook), None)
    if at is None or all(_in_wrapper_package(defining_module(hooks[k])) for k in keys[at + 1:]):
        return True  # (None: the forward form, no hook)
    if torch.compiler.is_compiling():
        # Dynamo cannot reorder a module's hooks: compiled calls run unfused while the hook follows (the code is
        # traced with the hooks it guards on); said at trace time (a warning would break the graph)
        from torch._dynamo.comptime import comptime

        comptime(_say_hook_after_compiled)
        return False
    hooks[keys[at]] = hooks.pop(keys[at])  # (its with_kwargs entry is by key: it stays)
    _say_once(model, "hook after", _HOOK_AFTER + "this call runs unfused and the fused loss reads them after it from "
              "now on (a hook registered for every call keeps every call unfused: register it once, or before "
              "mmfast.patch)")
    return False


_HOOK_AFTER = ("mmfast: a forward pre-hook was registered on the model after patching; it may change the labels "
               "after the fused loss read them, so ")


def _say_once(model: nn.Module, key: str, message: str) -> None:
    """Warn ``message`` once per model and ``key`` (the reasons said are kept on the model)."""
    said = model.__dict__.setdefault(_SAID, set())
    if key not in said:
        said.add(key)
        warnings.warn(message, RuntimeWarning)


def _say_hook_after_compiled(ctx) -> None:
    """(Run by Dynamo while it traces: ``comptime``; once per process.)"""
    warn_once(_HOOK_AFTER + "compiled calls run unfused while it is there (compiled code cannot move the fused "
              "loss's hook behind it: register it before mmfast.patch, or run one call uncompiled first)")


def _disarm_hook(model: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
    """Forward hook of the model (also when the forward raised: ``out`` is None then): the output without
    the stand-in logits, and the head disarmed."""
    handle = _head_state(model)
    st = _call_of(handle)
    if st is None:  # not an armed call
        return None
    loss, stand_in = st.loss, st.stand_in
    _release(handle)
    if out is None or loss is None:
        # the forward raised (that error stands), or never called the head: a forward that another library
        # put on the model since (TRL's fused head takes the hidden states to its own) computed what it
        # returns, unfused
        return None
    return _drop_stand_in(out, stand_in)


def _model_forward(model: nn.Module, *args, **kwargs):
    """The hooks' work as the model's forward, where hooks on the model would be in the wrong place: under
    an Accelerate hook on the model (``device_map`` dispatch, offloading), which moves the inputs before the
    forward and the output after it (the labels must be moved when the head is armed, and a stand-in moved
    to another device becomes a whole logits tensor), and under a PEFT model (some PEFT versions call the
    base model's ``forward`` directly, past its hooks). Earlier versions' pickles name it too."""
    orig = _original_call(model, model.__dict__[_ATTR])
    _arm_hook(model, args, kwargs)
    try:
        out = orig(*args, **kwargs)
    except BaseException:
        _disarm_hook(model, args, kwargs, None)
        raise
    kept = _disarm_hook(model, args, kwargs, out)
    return out if kept is None else kept


def is_fused(model: nn.Module) -> bool:
    """Whether the fused loss is installed on ``model`` (its top module), by hooks or as its forward."""
    return _FUSED in model.__dict__ or (is_patched(model) and model.__dict__[_ATTR].family == _MODEL)


def _as_forward(model: nn.Module, outermost: bool) -> bool:
    """Whether the fused loss goes on ``model`` as its forward rather than as hooks (see _model_forward)."""
    return not outermost or "_hf_hook" in model.__dict__


def _drop_stand_in(out: Any, stand_in: Tensor) -> Any:
    if isinstance(out, tuple):
        return tuple(v for v in out if not _aliases(v, stand_in))
    fields = {k: v for k, v in out.items() if not _aliases(v, stand_in)}
    return type(out)(**fields)


@dataclasses.dataclass(frozen=True)
class _LossPart:
    """What the patch record says a module is (``print(model)`` shows ``mmfast=<kind>``). Their forwards
    handle ``mmfast.disabled()`` themselves: the model's runs unfused, the head is never armed."""

    kind: str


_MODEL = _LossPart("fused_loss")
_HEAD = _LossPart("fused_loss_head")


def patch_loss(model: nn.Module, outermost: bool = True) -> Optional[str]:
    """Install the fused LM-head loss on ``model`` (idempotent; again after the LM head was replaced, it
    installs on the new head): hooks on the model, or its forward (see :func:`_model_forward`; ``outermost``:
    no wrapper such as PEFT's calls ``model``). Returns None, or why it was not installed."""
    if is_fused(model) and (_FUSED in model.__dict__) == _as_forward(model, outermost):
        unpatch_loss(model)  # installed the other way, which no longer fits (an Accelerate hook added since)
    if is_fused(model) and (displaced(model) if is_patched(model) else not reaches_class_forward(model)):
        unpatch_loss(model)  # its forward replaced since (Liger's instance patching): reported below as such
    if is_fused(model):
        fn = model.__dict__.get("_loss_function")
        if isinstance(fn, functools.partial) and fn.func is _loss_function:  # pickled by an earlier version
            model._loss_function = ModuleCall(_loss_function, model)
        head = _head(model)
        if _STATE in head.__dict__:
            return None
        reason = _head_reason(head)  # a head replaced since: fuse the new one where it can be
        if reason is not None:
            return f"{reason}; the fused loss stays off for it"
        _install_head(head)
        model.__dict__.pop(_SAID, None)
        return None
    reason = unsupported_reason(model)
    if reason is not None:
        return reason
    if _as_forward(model, outermost):
        _install(model, _MODEL, _model_forward, top=True)
    else:
        model.register_forward_pre_hook(_arm_hook, with_kwargs=True)
        # first of the model's forward hooks: one of the user's sees the output without the stand-in
        model.register_forward_hook(_disarm_hook, with_kwargs=True, always_call=True, prepend=True)
        model.__dict__[_FUSED] = True
    _install_head(model.lm_head)
    model._loss_function = ModuleCall(_loss_function, model)
    return None


def _drop_loss_state(m: nn.Module, family: _LossPart) -> None:
    m.__dict__.pop(_STATE, None)
    if family == _MODEL:  # the model the fused loss is on (by hooks, or as its forward)
        m.__dict__.pop("_loss_function", None)
        m.__dict__.pop(_SAID, None)


def unpatch_loss(model: nn.Module) -> int:
    """Remove the fused loss from ``model`` and its LM head; returns how many modules were restored."""
    n = 0
    for m in model.modules():
        if m.__dict__.pop(_FUSED, None) is None:
            continue
        remove_hooks(m, lambda h: h in (_arm_hook, _disarm_hook))
        _drop_loss_state(m, _MODEL)
        n += 1
    return n + unpatch_where(model, lambda fam: fam in (_MODEL, _HEAD), _drop_loss_state)
