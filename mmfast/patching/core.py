"""Instance-level forward swap for norm modules: patch, unpatch, disable, report.

Rules:

* only the ``forward`` (and ``extra_repr``) of module *instances* change; parameter names, ``state_dict``
  keys and ``type(module)`` stay as they were, and so do classes, but for one attribute of a class whose
  forward transformers lets the ``kernels`` library replace (:func:`_keep_from_kernelize`);
* a module whose forward some other code already replaced is left alone and reported, except for an
  Accelerate hook, which wraps ``_old_forward``: then ``_old_forward`` is what gets swapped, so the hook
  keeps working; and except for transformers' hub kernels (``use_kernels``, :func:`_kernelized`), which
  mmfast's kernels take the place of;
* patching is idempotent; ``unpatch`` puts back exactly what was there (but for a hub kernel's forward: the
  class's own comes back, and transformers puts the kernel back when it next kernelizes the model);
* ``MMFAST_DISABLE=1`` or ``with mmfast.disabled():`` make patched modules run their original forward.

No tensor data is touched, so models on the meta device patch the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import re
import sys
import types
import warnings
import weakref
from collections import Counter
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..nn.disable import disabled, is_disabled  # noqa: F401 - the switch, re-exported here
from ..nn.norm import cast_as_built
from .table import FAMILIES, KERNEL_LIBRARIES, family_of, is_norm_candidate, unsupported_reason

_ATTR = "_mmfast_patch"
_REPLICATE = "_replicate_for_data_parallel"  # what torch.nn.DataParallel's replicate() calls on each module
_SCRIPTABLE = "__prepare_scriptable__"  # what torch.jit.script calls on each module first
class _Absent:
    """The "nothing was there" marker; one instance, kept through pickle and deepcopy."""

    def __reduce__(self):
        return "_ABSENT"

    def __repr__(self) -> str:
        return "<absent>"


_ABSENT = _Absent()


@dataclasses.dataclass
class _Patch:
    """What mmfast changed on one module instance, and what to put back."""

    family: Any  # a NormFamily, or one of the fused loss's parts: anything with a ``kind``
    slot: str  # "forward", or "_old_forward" under an Accelerate hook
    saved_slot: object  # the instance's own value of ``slot`` before patching, or _ABSENT
    saved_extra_repr: object
    #: under an Accelerate hook: its forward's ``__wrapped__`` before patching (what signature lookups
    #: follow; pointed at the patched forward while patched), or _ABSENT
    saved_wrapped: object = _ABSENT
    #: the installed forward (a :class:`_PatchedForward`), disarmed by unpatching wherever it is held then
    forward: object = None


def _original_call(module: nn.Module, rec: _Patch):
    if rec.saved_slot is not _ABSENT:
        return rec.saved_slot
    return functools.partial(type(module).forward, module)


#: On a module: names of keyword arguments its forward takes through mmfast's hooks (``mma_has_image``),
#: shown in the patched forward's signature.
EXTRA_KWARGS_ATTR = "_mmfast_extra_kwargs"


class ModuleCall:
    """``func(module, ...)``, for a callable the module itself holds (its patched forward, ``extra_repr``,
    the fused loss). The module is held by weak reference: a strong one (a ``functools.partial``, a bound
    method) would make every patched module a reference cycle, freed only by a full garbage collection
    instead of when its last reference goes, as an unpatched one is (a ``del model`` that left a model's
    GPU memory allocated until then). Pickle and deepcopy see ``func`` and the module itself, so a copy
    binds to the copied module. ``func`` and ``args`` read as a partial's do."""

    # (slots: Accelerate's hook copies its wrapped forward's __dict__ onto its own partial)
    __slots__ = ("func", "_ref", "__dict__", "__weakref__")

    def __init__(self, func, module: Optional[nn.Module] = None):
        self.func = func
        self._ref = None if module is None else weakref.ref(module)

    @property
    def args(self) -> tuple:
        return (self._module(),)

    def _module(self) -> nn.Module:
        module = self._ref() if self._ref is not None else None
        if module is None:
            raise ReferenceError(f"mmfast: the module this {_describe(self.func)} was bound to has been freed "
                                 "(a patched module's forward holds it weakly: keep a reference to the model "
                                 "while its forward is used)")
        return module

    def __call__(self, *args, **kwargs):
        return self.func(self._module(), *args, **kwargs)

    def __reduce__(self):
        return type(self), (self.func, self._module()), dict(self.__dict__) or None

    def __setstate__(self, state) -> None:
        if isinstance(state, tuple):  # pickled as a functools.partial by an earlier version
            func, args, _, extra = state
            self.func, self._ref = func, weakref.ref(args[0])
            state = extra or {}
        for k, v in state.items():
            if k not in ("func", "_ref"):
                setattr(self, k, v)

    def __repr__(self) -> str:
        module = self._ref() if self._ref is not None else None
        bound = "freed module" if module is None else type(module).__name__
        return f"<mmfast {_describe(self.func)} bound to {bound}>"


def _forward_signature(module: nn.Module) -> inspect.Signature:
    """The signature a patched forward shows: the original forward's (the one the module's record names, else
    the class's), so that callers that inspect it (HF Trainer's column filter, ``generate``'s argument check)
    see the real parameters, plus the keyword arguments mmfast's hooks take (:data:`EXTRA_KWARGS_ATTR`), so
    that Trainer keeps those columns."""
    rec = module.__dict__.get(_ATTR)
    sig = inspect.signature(_original_call(module, rec) if rec is not None
                            else functools.partial(type(module).forward, module))
    extra = [n for n in module.__dict__.get(EXTRA_KWARGS_ATTR, ()) if n not in sig.parameters]
    if not extra:
        return sig
    params = list(sig.parameters.values())
    at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
    added = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in extra]
    return sig.replace(parameters=params[:at] + added + params[at:])


class _PatchedForward(ModuleCall):
    """A patched forward as a callable object: on a model's top module (the fused loss's forward, the
    signature pass-through), where Accelerate's ``prepare`` and PEFT rebind ``forward.__func__`` to the
    module, and what earlier versions' pickles hold."""

    @property
    def __signature__(self) -> inspect.Signature:
        return _forward_signature(self._module())

    @property
    def __code__(self) -> types.CodeType:
        """The code of the forward this one stands in for, its module class's, for what reads a forward's
        ``__code__`` (non-strict ``torch.export`` names its shape environment after it)."""
        module = self._ref() if self._ref is not None else None
        if module is None:  # (hasattr asks too)
            raise AttributeError("__code__: the module this forward was bound to has been freed")
        return type(module).forward.__code__


def _bound_forward(binding, *args, **kwargs):
    """The body of every patched forward: ``module.forward`` is a bound method of a copy of this function
    (one per module, for its signature) bound to the module's :class:`ForwardBinding`."""
    return binding.func(binding._module(), *args, **kwargs)


class ForwardBinding(ModuleCall):
    """What a patched submodule's forward is bound to. ``module.forward`` is a bound method (of a per-module
    copy of :func:`_bound_forward`), not a callable object: torch.compile guards an instance's method forward
    by its function's code, which all modules share, and any other forward by its identity, which made every
    layer compiled on its own (``layer.compile()``, Accelerate's regional compilation) compile again, past
    the recompile limit, after which the rest ran uncompiled. Pickle rebuilds the method as
    ``getattr(binding, "forward")``. (Not on a model's top module: Accelerate's ``prepare`` rebinds its
    ``forward.__func__`` to the model.)"""

    __slots__ = ()

    @property
    def forward(self) -> types.MethodType:
        fn = types.FunctionType(_bound_forward.__code__, _bound_forward.__globals__, "forward")
        fn.__qualname__ = _describe(self.func)
        fn.__module__ = __name__
        # the signature, through __wrapped__ (what inspect follows; Accelerate's hook copies a wrapped
        # forward's __dict__ onto its own wrapper and then points its __wrapped__ at the forward itself)
        fn.__wrapped__ = _Signature(self)
        return types.MethodType(fn, self)


class _Signature:
    """What a patched method forward's function wraps, for ``inspect``: the signature the forward shows,
    computed when asked (with the bound argument in front, which inspect drops, as for any method).

    ``copy.deepcopy`` rebinds a method to the copied binding but keeps its function, so a copy's forward
    (an EMA model, TRL's reference model) shows the original module's signature, the same as its own (same
    class, same record). The last one computed is kept for when the original has been freed since."""

    __slots__ = ("binding", "last")

    def __init__(self, binding: ModuleCall):
        self.binding, self.last = binding, None

    @property
    def __signature__(self) -> inspect.Signature:
        try:
            module = self.binding._module()
        except ReferenceError:
            if self.last is None:
                raise
            return self.last
        sig = _forward_signature(module)
        first = inspect.Parameter("_mmfast_binding", inspect.Parameter.POSITIONAL_ONLY)
        self.last = sig.replace(parameters=[first, *sig.parameters.values()])
        return self.last


def binding_of(forward) -> Optional[ModuleCall]:
    """The :class:`ModuleCall` behind a patched forward (this version's bound method, or an earlier version's
    callable object), or None for anything else."""
    if isinstance(forward, types.MethodType) and isinstance(forward.__self__, ForwardBinding):
        return forward.__self__
    return forward if isinstance(forward, ModuleCall) else None


#: Attribute set (True) on a hook function that binds nothing per module and reads what it needs per module
#: from the module it is called with (MMA's): compiled code traced through it is right for every module.
SHARED_CODE_HOOK = "_mmfast_shared_code_hook"


def _needs_identity(module: nn.Module) -> bool:
    """Whether the module's patched forward must be a callable object, which torch.compile guards by
    identity, rather than a method, which it guards by its function's code, shared by every layer: a module
    with hooks of its own may hold per-layer state in them, and torch.compile does not guard hooks, so
    compiled code traced through one layer's hooks must not be reused for another's. Hooks marked
    ``SHARED_CODE_HOOK`` hold none."""
    hooks = (*module._forward_hooks.values(), *module._forward_pre_hooks.values())
    return any(not getattr(getattr(h, "func", h), SHARED_CODE_HOOK, False) for h in hooks)


def _fit_forward_form(module: nn.Module) -> None:
    """Install a patched module's forward again where hooks added since patching (ones not marked
    ``SHARED_CODE_HOOK``) need the other form (:func:`_needs_identity`)."""
    rec = module.__dict__[_ATTR]
    if isinstance(rec.forward, types.MethodType) and _needs_identity(module):
        family, forward = rec.family, rec.forward.__self__.func
        _uninstall(module)
        _install(module, family, forward)


def patched_forward(module: nn.Module, *args, **kwargs):
    """The forward installed on patched instances."""
    rec: _Patch = module.__dict__[_ATTR]
    x = args[0] if args else next(iter(kwargs.values()), None)
    if is_disabled():
        out = _original_call(module, rec)(*args, **kwargs)
        # fp32 master weights make the original LlamaRMSNorm of a bf16 model return fp32: its output goes
        # back to the dtype it had (norms only, and only those: an MLP under autocast returns the autocast
        # dtype, and an fp32 norm fed bf16 returns fp32, as they would unpatched)
        cast = cast_as_built(module, x, out) if rec.family in FAMILIES else None
        return out if cast is None else cast
    if isinstance(x, Tensor) and x.dtype == torch.float64:
        raise TypeError(
            f"mmfast: this {type(module).__name__} was patched by mmfast.patch ({rec.family.kind}), whose kernels "
            "take float32, float16 or bfloat16, and got float64; run a float64 model inside "
            "`with mmfast.disabled():` or after mmfast.unpatch(model)")
    return rec.family.forward(module, *args, **kwargs)


@dataclasses.dataclass(frozen=True)
class _SignaturePart:
    """The family of a forward installed only to show :data:`EXTRA_KWARGS_ATTR` in its signature."""

    kind: str


SIGNATURE = _SignaturePart("signature")


def _signature_forward(module: nn.Module, *args, **kwargs):
    return _original_call(module, module.__dict__[_ATTR])(*args, **kwargs)


def show_extra_kwargs(module: nn.Module) -> bool:
    """Make ``module``'s forward signature name its :data:`EXTRA_KWARGS_ATTR` (HF Trainer keeps only the
    columns the forward names; ``generate`` refuses keyword arguments it does not name): where mmfast has
    not patched its forward already, a pass-through forward that shows them is installed (``unpatch``
    removes it). Returns whether the signature names them now."""
    if not module.__dict__.get(EXTRA_KWARGS_ATTR):
        return False
    if is_patched(module):
        return True
    if _foreign_patch(module) is not None:
        return False
    _install(module, SIGNATURE, _signature_forward, top=True)
    return True


def hide_extra_kwargs(model: nn.Module) -> int:
    """Remove the pass-through forwards :func:`show_extra_kwargs` installed (one that something wrapped
    since, Accelerate's ``prepare`` say, is disarmed inside the wrapper: see :func:`_uninstall`)."""
    n = 0
    for m in model.modules():
        rec = m.__dict__.get(_ATTR)
        if rec is not None and rec.family == SIGNATURE:
            _uninstall(m)
            n += 1
    return n


def _patched_extra_repr(module: nn.Module) -> str:
    rec: _Patch = module.__dict__[_ATTR]
    base = type(module).extra_repr(module) if rec.saved_extra_repr is _ABSENT else rec.saved_extra_repr()
    return f"{base}, mmfast={rec.family.kind}" if base else f"mmfast={rec.family.kind}"


def is_patched(module: nn.Module) -> bool:
    return _ATTR in module.__dict__


def drop_if_displaced(module: nn.Module, families) -> None:
    """Forget the patch of ``module`` (one of ``families``) where its forward was replaced since (:func:`displaced`):
    a patch again then installs it anew, or reports the forward as someone else's."""
    if is_patched(module) and module.__dict__[_ATTR].family in families and displaced(module):
        _uninstall(module)


def _wrapper_chain(f):
    """``f`` and what it wraps (``__wrapped__``, as ``functools.wraps`` keeps it), innermost last."""
    for _ in range(16):
        if f is None:
            return
        yield f
        f = getattr(f, "__wrapped__", None)


def displaced(module: nn.Module) -> bool:
    """Whether the forward mmfast installed on patched ``module`` is no longer what runs: something put another
    forward in its slot since (a wrapper that keeps it as ``__wrapped__``, as Accelerate's do, keeps it)."""
    d, rec = module.__dict__, module.__dict__[_ATTR]
    if rec.forward is None:  # a record pickled before it kept its forward: nothing to compare
        return False
    return not any(f is rec.forward for slot in ("forward", "_old_forward") for f in _wrapper_chain(d.get(slot)))


_WATCH_ATTR = "_mmfast_patch_watch"  # on the patched model: the handle of its _patches_in_place pre-hook


def _patches_in_place(paths: list, module: nn.Module, args) -> None:
    """Forward pre-hook of a patched model: warn (once) when a forward ``mmfast.patch`` installed was replaced
    since. HF Trainer's and TRL's ``use_liger_kernel=True`` apply Liger-Kernel to the model at ``train()``,
    over mmfast's forwards: mmfast's kernels stop running there (its fp32 master weights then meet Liger's),
    and nothing else shows it. ``paths``: a few patched modules (the first norm, the first MLP, the model
    itself), looked up at each training forward; what replaces forwards replaces them all."""
    if torch.compiler.is_compiling() or not paths or not (module.training and torch.is_grad_enabled()):
        return
    for path in paths:
        try:
            m = module.get_submodule(path)
        except AttributeError:
            continue
        if is_patched(m) and displaced(m):
            paths.clear()  # said once (for this model and patch): no more checks
            now = m.__dict__.get("forward")
            warnings.warn(f"mmfast: the forward mmfast.patch put on {path or type(m).__name__} ({patch_name(module)}) "
                      "was replaced since"
                      f"{f' by {_describe(now)}' if now is not None else ''}, and mmfast's kernels no longer run "
                      "there. HF Trainer's and TRL's use_liger_kernel=True apply Liger-Kernel to the model at "
                      "train(), over mmfast's forwards: leave it off with mmfast.patch (or mmfast.unpatch the model "
                      "to train with Liger alone). A module given back its class's own forward (transformers' "
                      "kernelize, say) is patched again by mmfast.patch.", RuntimeWarning, stacklevel=3)
            return


setattr(_patches_in_place, SHARED_CODE_HOOK, True)  # reads nothing of a module's when compiled


#: On a model mmfast.patch was given: how its warnings name it (:func:`name_patch`)
_NAME_ATTR = "_mmfast_patch_name"
_patch_serial = itertools.count(1)


def name_patch(model: nn.Module) -> str:
    """Name ``model`` for the warnings of the patch being applied (each is said once per model and patch). The
    name has the patch's number in this process: the model's address alone is a freed model's too, and
    Python's default warning filter shows a text once per place, so a new model at that address (a sweep in
    one process), or the same model after a patch again, would not be told."""
    name = model.__dict__[_NAME_ATTR] = f"{type(model).__name__} at {id(model):#x}, patch #{next(_patch_serial)}"
    return name


def patch_name(model: nn.Module) -> str:
    """The name :func:`name_patch` gave ``model`` (a model patched by an earlier version: its address)."""
    return model.__dict__.get(_NAME_ATTR) or f"{type(model).__name__} at {id(model):#x}"


@functools.lru_cache(maxsize=None)
def _param_index(cls: type, name: str) -> Optional[int]:
    """Position of ``name`` among the forward's positional parameters (after self), or None."""
    params = [p.name for p in inspect.signature(inspect.unwrap(cls.forward)).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][1:]
    return params.index(name) if name in params else None


def forward_argument(cls: type, args: tuple, kwargs: dict, name: str, default: Any = None) -> Any:
    """The forward's argument ``name`` in a call ``(*args, **kwargs)``, by keyword or by position."""
    if name in kwargs:
        return kwargs[name]
    if not args:  # (no signature lookup: compiled code would trace it, with Dynamo's lru_cache warning)
        return default
    idx = _param_index(cls, name)
    return args[idx] if idx is not None and len(args) > idx else default


def _runs(frame, model: nn.Module) -> bool:
    """Whether ``frame`` runs ``model``'s forward: Module._call_impl's ``self``, or a patched forward's ``model``."""
    names = frame.f_locals
    return names.get("self") is model or names.get("model") is model


def forward_runner(model: nn.Module, frame, known: tuple) -> Optional[tuple]:
    """What runs ``model``'s forward around a hook: the code of the frame among the few from ``frame`` (the
    hook's caller) up that runs it (see :func:`_runs`), and the model by weak reference. A frame of a
    ``known`` code (Module._call_impl, a patched forward) wins over any other frame nearer the hook with the
    model as ``self`` / ``model`` (a helper that calls the hooks for _call_impl, a user's wrapper): such a
    frame has returned by the time the hooks' work is taken, and the forward would be taken for cut. None
    where no frame runs it (a hook called by hand: then nothing counts as cut). Eager only: a caller that
    may be compiled asks ``torch.compiler.is_compiling()`` first (a graph has no frames to read).
    (Not the frame's id: a freed frame's address is soon a new frame's.)"""
    other = None
    for _ in range(4):
        if frame is None:
            break
        if _runs(frame, model):
            if frame.f_code in known:
                return frame.f_code, weakref.ref(model)
            other = other or frame.f_code
        frame = frame.f_back
    return None if other is None else (other, weakref.ref(model))


def forward_cut(runner: Optional[tuple]) -> bool:
    """Whether the forward :func:`forward_runner` found is no longer running: no frame of its code runs its
    model above the caller. No hook runs after a KeyboardInterrupt, so what a forward's pre-hooks set up
    for its inner modules outlives a forward the interrupt cut. Eager only (False while compiling, and for
    no runner)."""
    if runner is None or torch.compiler.is_compiling():
        return False
    return not _running(runner, sys._getframe(1))


def forward_running_on(thread: int, runner: Optional[tuple]) -> bool:
    """Whether thread ``thread`` (an ident) still runs the forward :func:`forward_runner` found there: False
    for a thread that ended or left it (a KeyboardInterrupt skips the hooks after it), and for no runner."""
    frame = sys._current_frames().get(thread) if runner is not None else None
    return frame is not None and _running(runner, frame)


def _running(runner: tuple, frame) -> bool:
    """Whether a frame of ``runner``'s code runs its model from ``frame`` up."""
    code, model = runner[0], runner[1]()
    while frame is not None and model is not None:
        if frame.f_code is code and _runs(frame, model):
            return True
        frame = frame.f_back
    return False


def watch_patches(model: nn.Module, paths: list[str]) -> None:
    """Register :func:`_patches_in_place` on ``model`` for the patched modules at ``paths`` (a patch again
    replaces the earlier watch; none: no watch)."""
    unwatch_patches(model)
    if paths:
        model.__dict__[_WATCH_ATTR] = model.register_forward_pre_hook(
            functools.partial(_patches_in_place, list(paths)))


def unwatch_patches(model: nn.Module) -> None:
    for m in model.modules():
        handle = m.__dict__.pop(_WATCH_ATTR, None)
        if handle is not None:
            handle.remove()


def reaches_class_forward(module: nn.Module) -> bool:
    """Whether ``module`` runs its class's forward: no forward of its own, or one that wraps the class's (as
    ``__wrapped__``, or bound: Accelerate's autocast and hooks, ``torch.compile(module.forward)``) or one of
    mmfast's (which runs it, or a fused path in its place; unpatched since, it runs the original)."""
    cls_forward, f = type(module).forward, module.__dict__.get("forward")
    return f is None or any(f is cls_forward or getattr(f, "__func__", None) is cls_forward or binding_of(f) is not None
                            for f in _wrapper_chain(f))


def _inner(fn):
    """The function behind a partial or a bound method."""
    return getattr(fn, "func", None) or getattr(fn, "__func__", None) or fn


def defining_module(fn) -> str:
    """The module that defines ``fn`` (a function, partial or bound method), or "?"."""
    inner = _inner(fn)
    return getattr(inner, "__module__", None) or type(inner).__module__ or "?"


#: Packages whose hooks wrap a module without looking at what it computes (parameter gathering,
#: device placement, mmfast's own; PyTorch's module tracker, which FlopCounterMode and Lightning's
#: measure_flops register for every module to attribute work): a fused path may bypass them.
WRAPPER_PACKAGES = ("torch.distributed", "deepspeed", "accelerate", "mmfast", "torch.utils.module_tracker")

_HOOK_KINDS = (("forward hook", "_forward_hooks"), ("forward pre-hook", "_forward_pre_hooks"),
               ("backward hook", "_backward_hooks"), ("backward pre-hook", "_backward_pre_hooks"))


def foreign_hook(module: nn.Module, where: str, kinds: tuple[str, ...] = ("forward hook", "forward pre-hook"),
                 global_hooks: bool = False) -> Optional[str]:
    """``"a <kind> <where> (from <package>)"`` for the first hook of ``kinds`` on ``module`` (and, with
    ``global_hooks``, registered for every module) that is not a wrapper package's, else None."""
    from torch.nn.modules import module as torch_module

    for kind, attr in _HOOK_KINDS:
        if kind not in kinds:
            continue
        tables = [getattr(module, attr, None) or {}]
        if global_hooks:
            tables.append(getattr(torch_module, "_global" + attr, None) or {})
        for hooks in tables:
            for hook in hooks.values():
                package = defining_module(hook)
                if not _in_wrapper_package(package):
                    return f"a {kind} {where} (from {package})"
    return None


def remove_hooks(module: nn.Module, ours) -> None:
    """Remove the forward hooks and pre-hooks of ``module`` for which ``ours(hook)`` is true (the hooks
    mmfast registered without keeping their handles)."""
    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        for key in [k for k, h in hooks.items() if ours(h)]:
            del hooks[key]
            for table in (module._forward_pre_hooks_with_kwargs, module._forward_hooks_with_kwargs,
                          module._forward_hooks_always_called):
                table.pop(key, None)


def has_hooks(module: nn.Module) -> bool:
    """Whether any hook of :data:`_HOOK_KINDS` sits on ``module`` or is registered for every module (the
    cheap question before :func:`foreign_hook`'s, which looks at where each one comes from)."""
    from torch.nn.modules import module as torch_module

    return any(getattr(module, attr, None) or getattr(torch_module, "_global" + attr, None) for _, attr in _HOOK_KINDS)


def _in_wrapper_package(module_name: str) -> bool:
    """``module_name`` is one of :data:`WRAPPER_PACKAGES` or inside one (not a package that merely starts
    with the same letters: ``deepspeed_probe``, ``mmfast_ext``)."""
    return any(module_name == p or module_name.startswith(p + ".") for p in WRAPPER_PACKAGES)


def _describe(fn) -> str:
    inner = _inner(fn)
    name = getattr(inner, "__qualname__", None) or type(inner).__name__
    return f"{defining_module(fn)}.{name}"


def _hub_layer(cls: type) -> bool:
    """Whether transformers lets the ``kernels`` library replace the forward of ``cls``'s instances."""
    return getattr(cls, "kernel_layer_name", None) is not None


def _kernelized(module: nn.Module, slot: str = "forward") -> bool:
    """Whether ``module``'s instance forward was put there by the ``kernels`` library's ``kernelize``, which
    transformers runs over layers it marks ``use_kernel_forward_from_hub`` (every RMSNorm) when a model is
    loaded with ``use_kernels`` (``from_pretrained``'s default in transformers 5.25, which installs kernels
    with itself) and again at each ``model.train()`` / ``eval()``: a hub kernel's forward, or the
    class's own, bound to the module (kernels 0.19 leaves the class's in place instead). mmfast's fused forward
    takes its place, as it would the class's. A hub kernel is told from another library's forward put on the
    instance (Liger's instance patching looks the same) by the ``_kernel_repo`` kernels 0.18+ records beside
    it (a kernel library's own forward beside a stale one is not a hub kernel's); kernels 0.17's hub kernels
    lack it, and are reported as someone else's. ``slot``: "forward", or "_old_forward" where an Accelerate
    hook wraps it (transformers keeps the hooks of a dispatched model around what kernelize puts there)."""
    cls, d = type(module), module.__dict__
    f = d.get(slot)
    return (_hub_layer(cls) and isinstance(f, types.MethodType)
            and f.__self__ is module and ("_kernel_repo" in d or f.__func__ is cls.forward)
            and defining_module(f).split(".")[0] not in KERNEL_LIBRARIES)


class _LeavePatched:
    """The ``kernel_condition`` of a hub-kernel layer class once mmfast patched an instance of it: ``kernelize``
    skips an instance whose condition is false, so it leaves the instances mmfast patched (and unpatched
    since, again) to mmfast, and asks the class's own condition about the others."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, module: nn.Module) -> bool:
        return not is_patched(module) and bool(self.inner(module))


def _keep_from_kernelize(module: nn.Module) -> None:
    """Keep transformers' hub kernels off ``module`` while mmfast's forward is installed: a model loaded with
    ``use_kernels`` is kernelized again at each switch of ``model.train()`` / ``eval()`` (HF Trainer makes
    one), which would put the class's forward or a hub kernel back in the instance's forward slot, and the
    model would run them from then on with nothing to show it."""
    cls = type(module)
    inner = getattr(cls, "kernel_condition", None)
    # kernels before 0.17 has no condition (kernelize_problem refuses what it would undo)
    if _hub_layer(cls) and inner is not None and not isinstance(inner, _LeavePatched):
        cls.kernel_condition = staticmethod(_LeavePatched(inner))


def kernelize_problem(model: nn.Module) -> Optional[str]:
    """Why mmfast cannot keep its forwards in ``model`` (a ValueError's message), or None: a model loaded with
    ``use_kernels`` is kernelized again at each ``model.train()`` / ``eval()``, and kernels before 0.17 has no
    ``kernel_condition`` through which :func:`_keep_from_kernelize` keeps it off the modules mmfast patches."""
    if not any(getattr(m, "use_kernels", False) is True for m in model.modules()):
        return None
    for path, m in model.named_modules():
        cls = type(m)
        if _hub_layer(cls) and not hasattr(cls, "kernel_condition") and family_of(m) is not None:
            return (f"{type(model).__name__} was loaded with transformers' hub kernels on (use_kernels), which "
                    f"kernelizes it again at each model.train() / eval() and would put {path}'s own forward "
                    f"({cls.__name__}) back over mmfast's; the installed kernels library (before 0.17) gives no "
                    f"way to keep it off a module. Load the model with from_pretrained(..., use_kernels=False), "
                    f"or upgrade kernels (pip install 'kernels>=0.17')")
    return None


def _foreign_patch(module: nn.Module) -> Optional[str]:
    """Why ``module``'s forward is someone else's, or None when it is the class's own (or a hub kernel's:
    :func:`_kernelized`)."""
    cls = type(module)
    lib = cls.__module__.split(".")[0]
    if lib in KERNEL_LIBRARIES:
        return f"already replaced by {lib} ({cls.__module__}.{cls.__qualname__}); mmfast does not stack on it"
    owner = next(c for c in cls.__mro__ if "forward" in c.__dict__)
    fwd = owner.__dict__["forward"]
    if getattr(fwd, "__module__", owner.__module__) != owner.__module__:
        return f"class forward was replaced globally by {_describe(fwd)}; mmfast does not stack on it"
    d = module.__dict__
    if "forward" in d:
        if "_hf_hook" in d and "_old_forward" in d:
            old = d["_old_forward"]
            if getattr(old, "__func__", None) is cls.forward or getattr(old, "func", None) is cls.forward:
                return None  # an Accelerate hook around the class's own forward
            if _kernelized(module, "_old_forward"):
                return None  # around a hub kernel's
            return f"forward behind an Accelerate hook was replaced by {_describe(old)}; mmfast does not stack on it"
        if _kernelized(module):
            return None
        hub = (" (if transformers' hub kernels put it there, load the model with from_pretrained(..., "
               "use_kernels=False))") if _hub_layer(cls) else ""
        return (f"forward already replaced on this instance by {_describe(d['forward'])}; mmfast does not stack on "
                f"it{hub}")
    return None


def _install(module: nn.Module, fam, forward=patched_forward, top: bool = False) -> None:
    """Put ``forward(module, ...)`` in the module's forward slot, recording ``fam`` (anything with a
    ``kind``: a :class:`NormFamily`, or the fused loss's parts) and what to put back. ``top``: the model's
    top module, whose forward is a callable object (see :class:`ForwardBinding`)."""
    d = module.__dict__
    slot = "_old_forward" if "_hf_hook" in d and "_old_forward" in d else "forward"
    saved = d.get(slot, _ABSENT) if slot == "_old_forward" else _ABSENT
    if _kernelized(module, slot):  # a hub kernel's: unpatched, the module runs its class's forward (until
        d.pop("_kernel_repo", None)     # transformers kernelizes it again); kernels' inspection would name it
        if slot == "_old_forward":
            saved = types.MethodType(type(module).forward, module)
    _keep_from_kernelize(module)
    rec = _Patch(fam, slot, saved, d.get("extra_repr", _ABSENT))
    d[_ATTR] = rec
    identity = top or _needs_identity(module)
    patched = rec.forward = _PatchedForward(forward, module) if identity else ForwardBinding(forward, module).forward
    setattr(module, slot, patched)
    if not identity:  # for a deep copy's forward, whose function is this one (see _Signature)
        inspect.signature(patched)
    hooked = d.get("forward") if slot == "_old_forward" else None
    if hooked is not None and "__wrapped__" in getattr(hooked, "__dict__", {}):
        # inspect.signature(module.forward) follows the hook's __wrapped__: to the patched forward, whose
        # signature is the original's plus mmfast's keyword arguments (EXTRA_KWARGS_ATTR)
        rec.saved_wrapped = hooked.__wrapped__
        hooked.__wrapped__ = patched
    module.extra_repr = ModuleCall(_patched_extra_repr, module)
    d[_REPLICATE] = ModuleCall(_refuse_replication, module)
    d[_SCRIPTABLE] = _KernelizeGuard(_refuse_scripting, module)


def _refuse_replication(module: nn.Module):
    """``torch.nn.DataParallel`` copies modules within one process and keeps their instance attributes: a
    replica's patched forward would still run the original module on the first GPU's weights."""
    raise RuntimeError(
        f"mmfast: torch.nn.DataParallel cannot replicate a patched module ({type(module).__name__}): its "
        "replicas would run the original's forward and weights. Use DistributedDataParallel instead (one "
        "process per GPU: torchrun, accelerate launch; HF Trainer uses it when launched so), or "
        "mmfast.unpatch(model) first.")


class _KernelizeGuard(ModuleCall):
    """A :class:`ModuleCall` a patched module holds that puts :func:`_keep_from_kernelize` on the module's class
    wherever the module is rebuilt: a patched model unpickled in another process finds its classes as
    transformers made them, and its next ``train()`` / ``eval()`` would put the class's forward back."""

    __slots__ = ()

    def __init__(self, func, module: Optional[nn.Module] = None):
        super().__init__(func, module)
        if module is not None:
            _keep_from_kernelize(module)


def _refuse_scripting(module: nn.Module):
    """``torch.jit.script`` compiles a module's forward from its source; a patched forward runs mmfast's ops
    through Python, which TorchScript cannot read."""
    raise RuntimeError(
        f"mmfast: torch.jit.script cannot compile a patched module ({type(module).__name__}): its forward runs "
        "mmfast's ops through Python. torch.jit.trace, torch.export and torch.compile record them as mmfast:: "
        "ops; to script the model, mmfast.unpatch(model) first.")


def _unpatched_call(original, module: nn.Module, *args, **kwargs):
    """A disarmed patched forward: the original forward (``module`` stays the first argument, as the
    signature lookup wants it); ``original`` is the instance's own forward, or _ABSENT for the class's (looked
    up at the call: holding it bound would hold the module)."""
    if original is _ABSENT:
        return type(module).forward(module, *args, **kwargs)
    return original(*args, **kwargs)


def _uninstall(module: nn.Module) -> None:
    """Put back what :func:`_install` changed. What wrapped the module's forward since (an Accelerate hook
    added or removed, ``Accelerator.prepare``'s autocast wrapper) stays, around the original forward: the
    patched forward is taken out where it is found, and wherever it is still held (inside a wrapper) it
    runs the original forward from now on."""
    d = module.__dict__
    d.pop(_REPLICATE, None)
    d.pop(_SCRIPTABLE, None)
    rec: _Patch = d.pop(_ATTR)
    if rec.forward is None:  # a record pickled before it kept its forward: the one in its slot
        rec.forward = d.get(rec.slot)
    binding = binding_of(rec.forward)
    if binding is not None:  # disarmed in place, wherever it is held
        binding.func = functools.partial(_unpatched_call, rec.saved_slot)
    own = rec.saved_slot is _ABSENT or getattr(rec.saved_slot, "__func__", None) is type(module).forward
    if d.get(rec.slot) is rec.forward:  # where it was put
        if rec.saved_slot is _ABSENT:
            d.pop(rec.slot, None)
        else:
            d[rec.slot] = rec.saved_slot
    elif d.get("forward") is rec.forward:  # the Accelerate hook it was put behind was removed since
        if own:
            d.pop("forward")
        else:
            d["forward"] = rec.saved_slot
    elif d.get("_old_forward") is rec.forward:  # behind an Accelerate hook added since
        d["_old_forward"] = rec.saved_slot if rec.saved_slot is not _ABSENT else \
            types.MethodType(type(module).forward, module)
    hooked = d.get("forward") if "_old_forward" in d else None
    if hooked is not None and getattr(hooked, "__wrapped__", None) is rec.forward:
        hooked.__wrapped__ = rec.saved_wrapped if rec.saved_wrapped is not _ABSENT else d["_old_forward"]
    now = d.get("extra_repr")
    if isinstance(now, ModuleCall) and now.func is _patched_extra_repr:  # (not another library's, put since)
        if rec.saved_extra_repr is _ABSENT:
            d.pop("extra_repr", None)
        else:
            d["extra_repr"] = rec.saved_extra_repr


@dataclasses.dataclass
class PatchReport:
    """What ``mmfast.patch`` did: ``patched`` module paths, ``skipped`` (path, reason) pairs."""

    patched: list[str] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    kinds: dict[str, str] = dataclasses.field(default_factory=dict)
    #: the backend asked for at patch time (``MMFAST_BACKEND`` / ``use_backend``). ``auto`` chooses per call
    #: from the device, the shape and the backend table: ``mmfast.backends_used()`` counts what ran
    backend: str = "auto"
    tuning: Optional[str] = None
    trainable_params: int = 0
    all_params: int = 0
    #: the fused LM-head loss: "on", "off" (not asked for), or why it could not be installed
    fused_loss: str = "off"
    #: MLP module paths whose activation is fused (:mod:`mmfast.patching.mlp`; the family, "swiglu" or
    #: "quick_gelu", in ``kinds``); None: not asked for
    mlps: Optional[list[str]] = None
    #: module paths of what ``tuning="mma"`` inserted (the adapters and the modality embedding)
    adapters: list[str] = dataclasses.field(default_factory=list)

    def trainable_line(self) -> str:
        """The trainable-parameter line, in PEFT's ``print_trainable_parameters`` format."""
        pct = 100 * self.trainable_params / self.all_params if self.all_params else 0.0
        return (f"trainable params: {self.trainable_params:,d} || all params: {self.all_params:,d} "
                f"|| trainable%: {pct:.4f}")

    def summary(self) -> str:
        tuning = f", tuning {self.tuning}" if self.tuning else ""
        if self.mlps is None:
            mlp = "off"
        else:
            per_kind = Counter(self.kinds.get(p, "?") for p in self.mlps)
            mlp = f"{len(self.mlps)} MLPs" + "".join(f", {n} {k}" for k, n in sorted(per_kind.items()))
        adapters = f"; MMA modules inserted: {len(self.adapters)}" if self.adapters else ""
        return (f"mmfast.patch: {len(self.patched)} norm modules patched, {len(self.skipped)} skipped "
                f"(backend {self.backend}{tuning}); fused MLP activations: {mlp}; fused LM-head loss: "
                f"{self.fused_loss}{adapters}")

    def __str__(self) -> str:
        groups = Counter((re.sub(r"\.\d+\.", ".*.", p), self.kinds[p]) for p in self.patched)
        groups.update((re.sub(r"\.\d+\.", ".*.", p), self.kinds.get(p, "?")) for p in self.mlps or ())
        groups.update((re.sub(r"\.\d+\.", ".*.", p), "mma (inserted)") for p in self.adapters)
        rows = [(pattern, kind, str(n)) for (pattern, kind), n in groups.items()]
        rows += [(path, "skipped", reason) for path, reason in self.skipped]
        w0 = max([len("module")] + [len(r[0]) for r in rows])
        w1 = max([len("kind")] + [len(r[1]) for r in rows])
        lines = [self.summary(), f"  {'module':<{w0}}  {'kind':<{w1}}  count / reason"]
        lines += [f"  {a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows]
        if self.backend == "auto":
            lines.append("backend auto: chosen per call (device, shape, this GPU's backend table); "
                         "`with mmfast.backends_used() as used:` counts what ran")
        lines.append(self.trainable_line())
        return "\n".join(lines)


def patch_norms(model: nn.Module, report: Optional[PatchReport] = None) -> PatchReport:
    """Swap the forward of every supported norm instance in ``model`` (idempotent)."""
    report = report or PatchReport()
    for path, module in model.named_modules(remove_duplicate=True):
        drop_if_displaced(module, FAMILIES)
        if is_patched(module):
            rec: _Patch = module.__dict__[_ATTR]
            if rec.family not in FAMILIES:
                continue  # not a norm (the fused loss's model and head)
            _fit_forward_form(module)
            report.patched.append(path)
            report.kinds[path] = rec.family.kind
            continue
        foreign = _foreign_patch(module) if (is_norm_candidate(module) or family_of(module)) else None
        if foreign is not None:
            report.skipped.append((path, foreign))
            continue
        fam = family_of(module)
        if fam is None:
            if is_norm_candidate(module):
                report.skipped.append((path, unsupported_reason(module)))
            continue
        reason = fam.check(module)
        if reason is not None:
            report.skipped.append((path, reason))
            continue
        _install(module, fam)
        report.patched.append(path)
        report.kinds[path] = fam.kind
    return report


def unpatch_where(model: nn.Module, wanted, on_restore=None) -> int:
    """Restore the original forward of every patched module whose record's family satisfies ``wanted``
    (then call ``on_restore(module, family)``, for state the patch kept besides the forward); returns how
    many were restored."""
    n = 0
    for module in model.modules():
        if is_patched(module) and wanted(module.__dict__[_ATTR].family):
            family = module.__dict__[_ATTR].family
            _uninstall(module)
            if on_restore is not None:
                on_restore(module, family)
            n += 1
    return n


def unpatch_norms(model: nn.Module) -> int:
    """Restore the original forwards of every patched norm; returns how many were restored."""
    return unpatch_where(model, lambda fam: fam in FAMILIES)
