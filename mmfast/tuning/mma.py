"""Mixture-of-Modality Adaptation (METHODS.md, section 2) inserted into HuggingFace models.

* Every LLaMA-style decoder layer gets ``mma_adapter`` (an :class:`~mmfast.nn.adapter.MMAdapter`)
  applied to the output of ``input_layernorm``, before attention: ``h = x + Attn(adapter(norm(x)))``.
* Every CLIP/SigLIP encoder layer gets one applied to the output of ``layer_norm1``, except, in a
  LLaVA-style model, the layers after the one it reads features from (``config.vision_feature_layer``;
  -2 in LLaVA-1.5, so the last layer runs but its output is dropped): an adapter there could never get
  a gradient, and DDP stops on a parameter that never gets one.
* Routing is per sample. In the vision tower each sample routes from its own CLS token (position 0 of
  that layer's normed input), or, in a tower without one (SigLIP), from the mean of its tokens that are
  not padding. In the LLM a learned ``mma_modality_embedding`` (``Embedding(2, D)``:
  "has image" or not) plays LaVIN's modality token: before the main pass it runs through every
  decoder layer as a one-token sequence (adapters included), and layer l's router reads that token's
  normed state at layer l. The main sequence keeps plain causal attention, with no extra token.
* Which samples have images: ``mma_has_image`` (a [B] bool tensor) passed to the model's forward, or
  else the image or video tokens in ``input_ids`` (``config.image_token_id`` / ``video_token_id``); neither
  means text only. Decode steps of generation keep the prefill's flags.

Every added parameter has ``mma`` in its name; adapters are fp32. Routes are computed once per forward
and read by the layers. When activation checkpointing recomputes a layer during backward, the layer
reads the routes of the forward that made its input, also after later forwards (two forwards, then one
backward of their summed losses): each layer keeps which routes went with which input.

The hooks hold nothing of their own: each reads its layer's pieces (adapter, route, token mask) from a
:class:`_LayerSlot` on the norm it sits on, and the model's routing state from the module it is called
with. torch.compile does not guard a module's hooks, and layers compiled one by one share one compiled code
(mmfast's patched norms are methods it guards by their code): what a hook holds would be baked into that
code, one layer's for every layer; what it reads from its module is read from each layer's own.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import sys
import threading
import weakref
from typing import Optional

import torch
from torch import Tensor, nn

from .._zero import full_shape, gathered, partitioned
from ..nn.adapter import InitWhenMaterialized, MMAdapter, _XavierLinear, unloaded_mma
from ..patching.core import (EXTRA_KWARGS_ATTR, SHARED_CODE_HOOK, binding_of, forward_argument, forward_cut,
                             forward_runner, forward_running_on, patch_name, remove_hooks)
from ..ops.backend import warn_once
from .recipes import _hf_model, find_parts, peft_trainables, untrainable_problem, warn_cast_trainables

ADAPTER_NAME = "mma_adapter"
_OPTIONS = "_mmfast_mma_options"  # on the HF model: the MMAOptions its adapters were made with
EMBEDDING_NAME = "mma_modality_embedding"
NECK_NAME = "mma_neck"
HAS_IMAGE_KWARG = "mma_has_image"
_STATE = "_mmfast_mma_state"
_BRIDGE_HOOKED = "_mmfast_mma_bridge"  # on a language model's input embeddings: the routing states whose bridge it places


@dataclasses.dataclass
class MMAOptions:
    """Adapter hyper-parameters (LaVIN's defaults; temperature 5 for 13B)."""

    hidden_dim: int = 8
    groups: int = 2
    experts: int = 2
    scale: float = 1.0
    temperature: float = 10.0
    dropout: float = 0.1
    #: Replace the multimodal projector with LaVIN's visual neck: ``Linear(in -> neck_dim)``, SiLU,
    #: ``Linear(neck_dim -> D)``, freshly initialised, fp32, trainable (METHODS.md's parameter counts).
    #: Off by default: a pretrained LLaVA's projector is the alignment it was trained with, and it is
    #: trained in place instead. ``unpatch`` puts the original projector back.
    neck: bool = False
    neck_dim: int = 128


_MISSING = object()


class _ByInput:
    """Values recorded against live input tensors and found again by the input's storage: activation
    checkpointing recomputes a layer on the very input object (non-reentrant) or a detached alias of its
    storage (reentrant). An entry goes with its input; nothing is recorded while compiling (no storage to
    tell inputs by there) or for a tensor without storage."""

    __slots__ = ("entries",)

    def __init__(self):
        self.entries = {}  # storage key -> (weak reference to the input, value)

    def __reduce__(self):
        return _ByInput, ()  # weak references do not pickle, and what they map is one forward's

    def put(self, x: Tensor, value) -> None:
        if torch.compiler.is_compiling():
            return
        self.prune()
        try:
            self.entries[_storage_key(x)] = (weakref.ref(x), value)
        except (RuntimeError, NotImplementedError):
            pass

    def get(self, x: Tensor, default=None):
        if torch.compiler.is_compiling():
            return default
        try:
            entry = self.entries.get(_storage_key(x))
        except (RuntimeError, NotImplementedError):
            return default
        return entry[1] if entry is not None and entry[0]() is not None else default

    def prune(self) -> None:
        """Forget the inputs that are gone (their forward's graph was freed)."""
        for key in [k for k, (ref, _) in self.entries.items() if ref() is None]:
            del self.entries[key]


@dataclasses.dataclass
class _State:
    """Per-forward routing of one model: flags per sample (the routes are on the layers' slots)."""

    has_image: Optional[Tensor] = None
    # set by the model's forward, taken by its language model's: a language model called alone (no model
    # forward around it) routes as text, not by the flags of whatever forward ran last (those stay in
    # ``has_image`` for a cache that forward filled)
    live: bool = False
    # what runs the forward that set ``live`` (:func:`~mmfast.patching.core.forward_runner`): a forward a
    # KeyboardInterrupt cut before its language model ran (no hook runs after it) leaves ``live`` set, and a
    # language model called alone then sees that no such forward runs it
    runner: Optional[tuple] = None
    # the flags of an eager forward given no cache, for the cache it may make (:func:`_clear_bridge_hook`)
    untagged: Optional[Tensor] = None
    recording: bool = False  # True while the modality token runs through the layers
    # the thread running that pass (eager): a layer another thread recomputes meanwhile (activation
    # checkpointing in a backward) is no part of it
    recording_thread: Optional[int] = None
    # the routes' gradient bridge (the input embeddings module, the leaves, the last output, the routes) a
    # forward with token ids and other inputs hands to its own lookup (:func:`_embedding_bridge_hook`);
    # None once placed, and after the forward
    bridge: Optional[tuple] = None
    # the forwards whose graph is alive (:class:`_Leaves`), and the backward the latest forward ran in (-1:
    # none), for a layer recomputed on an input no forward recorded (:func:`_route_for_input`)
    forwards: weakref.WeakSet = dataclasses.field(default_factory=weakref.WeakSet)
    routed_in: int = -1
    # the thread in the model's forward, what runs the outermost one there, and how many of its forwards
    # (the model's, its language model's) have started and not ended (:func:`_enter`)
    busy: Optional[list] = None

    def __setstate__(self, state: dict) -> None:
        # a state pickled by an earlier version held the routes itself, by layer index, and no bridge (one
        # pickled between a forward's start and its lookup of the embeddings brings none either)
        _modality_pass_uncompiled()  # (in eager code: see there)
        _wrap_generation()  # (a cache saved with its flags may be loaded beside it)
        spent = ("routes", "seen", "bridge", "live", "runner", "untagged", "forwards", "routed_in", "busy",
                 "recording_thread")
        self.__dict__.update(bridge=None, live=False, runner=None, untagged=None, forwards=weakref.WeakSet(),
                             routed_in=-1, busy=None, recording_thread=None,
                             **{k: v for k, v in state.items() if k not in spent})

    def __getstate__(self) -> dict:
        # (the runners hold a code object and a weak reference, and ``forwards`` weak references, none of which
        # pickles; a pickle is taken between forwards, where they are spent)
        return {k: v for k, v in self.__dict__.items() if k not in ("runner", "forwards", "busy")}


class _Leaves:
    """One forward's route leaves, in its layers' order (what :class:`_RouteGradBridge` hands the routes'
    gradients from), the leaf each layer's slot was given, and the bridge's node (a weak reference, once
    applied). The bridge holds it, so it lives as long as that forward's graph; its state's ``forwards`` holds
    it weakly."""

    __slots__ = ("leaves", "by_slot", "node", "__weakref__")

    def __init__(self, slots: list, leaves: list, forwards: weakref.WeakSet):
        self.leaves, self.by_slot, self.node = leaves, dict(zip(slots, leaves)), None
        # (compiled layers take their forward's route, and a traced add guarded on the set's size: a compile
        # per size)
        if not torch.compiler.is_compiling():
            forwards.add(self)

    def backpropagated(self) -> bool:
        """Whether the running backward runs through this forward's bridge (so through its layers)."""
        node = self.node() if self.node is not None else None
        return node is not None and torch._C._will_engine_execute_node(node)


class _LayerSlot:
    """One layer's MMA pieces, on the norm whose output its adapter takes (attribute ``_SLOT``): the
    adapter, the model's routing state, and for a decoder layer the latest forward's route and the route
    each live input of the layer was given (``seen``); for a vision layer routed by its tokens' mean, which
    tokens its calls leave in (``mask``). Copies and pickles keep the adapter and start without routes.

    A vision layer whose output the model does not read has a slot without an adapter, and the same hooks
    (which leave it alone): compiled code traced through a layer without hooks would otherwise be taken
    for the layers with them (torch.compile does not guard hooks)."""

    def __init__(self, adapter: Optional[MMAdapter], state: Optional[_State] = None,
                 mask: Optional["_TokenMask"] = None):
        self.adapter, self.state, self.mask = adapter, state, mask
        self.route: Optional[Tensor] = None
        self.seen = _ByInput()

    def __reduce__(self):
        return _LayerSlot, (self.adapter, self.state, self.mask)

    def __deepcopy__(self, memo):
        return _LayerSlot(copy.deepcopy(self.adapter, memo), copy.deepcopy(self.state, memo),
                          copy.deepcopy(self.mask, memo))


_SLOT = "_mmfast_mma_slot"


def _storage_key(x: Tensor) -> tuple:
    return (x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape), tuple(x.stride()))


def _copied_input_error(layer: str, forwards: str, what: str) -> RuntimeError:
    """A recompute on a copied input in a backward through several forwards: which one made it is unknown."""
    return RuntimeError(
        f"mmfast MMA: activation checkpointing is recomputing {layer} in a backward through {forwards}, and the "
        "layer's input is a copy (a saved-tensor hook such as torch.autograd.graph.save_on_cpu, or activation "
        "offloading, as transformers' activation_checkpointing_enable(offload=True), copied it), so which "
        f"forward's {what} it takes is unknown. Run each forward's backward on its own loss, or leave that hook out.")


def _route_for_input(slot: _LayerSlot, x: Tensor) -> Optional[Tensor]:
    """The route of the forward that made ``x``, the input of ``slot``'s layer.

    A layer's run outside backward is a forward: it takes that forward's route (``slot.route``) and records
    it against ``x``. A run inside backward on an input already recorded is activation checkpointing
    recomputing the layer, possibly after later forwards replaced ``latest``: it takes the recorded route.
    (Non-reentrant checkpointing recomputes on the very input object, reentrant on a detached alias of its
    storage; a forward given an input object it was given before is a new forward all the same.)

    A recompute on an input no forward recorded (a saved-tensor hook, such as ``save_on_cpu`` on a GPU or
    activation offloading, handed checkpointing a copy of it) takes the route of the one forward the running
    backward runs through; through several (their losses summed), which one made the input is unknown, and it
    raises."""
    latest = slot.route
    if torch.compiler.is_compiling():
        # compiled code records nothing (no storage to tell inputs by): a compiled layer takes its
        # forward's route, and asking autograd for the running backward would only break the graph
        return latest
    task = torch._C._current_graph_task_id()
    if task != -1:
        recorded = slot.seen.get(x)
        if recorded is not None:
            return recorded
        state = slot.state
        if state is not None and state.routed_in != task:  # (not a forward run inside this backward)
            through = [f.by_slot[slot] for f in list(state.forwards) if slot in f.by_slot and f.backpropagated()]
            if len(through) > 1:
                raise _copied_input_error("a decoder layer", f"{len(through)} forwards of this model", "routes")
            if through:
                return through[0]
    if latest is not None:
        slot.seen.put(x, latest)
    return latest


def _state(hf: nn.Module) -> _State:
    st = hf.__dict__.get(_STATE)
    if st is None:
        st = hf.__dict__[_STATE] = _State()
    return st


# ---------------------------------------------------------------------------------------------
# hooks (module-level functions, registered as they are: picklable, found again by unpatch; each reads
# what it needs from the module it is called with, see the module docstring)
# ---------------------------------------------------------------------------------------------


def _slot(module: nn.Module) -> _LayerSlot:
    return getattr(module, _SLOT)


def _vision_cls_hook(module, args, output):
    """layer_norm1 output -> adapter, each sample routed by its own CLS token (position 0)."""
    adapter = _slot(module).adapter
    return None if adapter is None else adapter(output, output[:, 0])


class _TokenMask:
    """The non-padding tokens (``[B, S]`` bool, None: all) of a vision layer's calls, handed from the layer's
    pre-hook to its ``layer_norm1`` hook: by the layer's input, so that activation checkpointing's recompute
    (HF's checkpoints the layer's forward, not its hooks: the pre-hook does not run again) finds its own
    forward's, also after later forwards; ``latest`` where inputs cannot be told apart (compiling).

    A recompute on an input no call recorded (a saved-tensor hook such as ``save_on_cpu`` copied it) takes
    the mask of the call an autograd node of which the running backward executes (``nodes``: the adapter's
    node of each call, and for reentrant checkpointing, which builds none inside, the layer's checkpoint
    node, recorded by the layer's forward hook outside the checkpoint); through several calls of different
    masks (their losses summed), which one made the input is unknown, and it raises; where no recorded call
    is found (a model pickled with an earlier version's hooks), the latest call in training mode's
    (``trained``)."""

    __slots__ = ("by_input", "latest", "trained", "nodes")

    def __init__(self):
        self.by_input, self.latest, self.trained, self.nodes = _ByInput(), None, None, []

    def __reduce__(self):
        return _TokenMask, ()  # the calls' masks are not state: copies and pickles start empty

    def put(self, x: Tensor, valid: Optional[Tensor], training: bool = True) -> None:
        self.latest = valid
        if training:
            self.trained = valid
        self.by_input.put(x, valid)

    def put_node(self, node, valid: Optional[Tensor]) -> None:
        """The mask of the call one of whose autograd nodes is ``node`` (outside backward; a node that takes no
        weak reference, a C++ one, is left out)."""
        if node is None or torch._C._current_graph_task_id() != -1:  # (the callers skip compiled code)
            return
        try:
            ref = weakref.ref(node)
        except TypeError:
            return
        self.nodes = [(r, v) for r, v in self.nodes if r() is not None]
        self.nodes.append((ref, valid))

    def get(self, x: Tensor) -> Optional[Tensor]:
        if torch.compiler.is_compiling():
            return self.latest
        found = self.by_input.get(x, _MISSING)
        if found is not _MISSING:
            return found
        if torch._C._current_graph_task_id() == -1:
            return self.latest
        through = [v for ref, v in self.nodes if ref() is not None and torch._C._will_engine_execute_node(ref())]
        if not through:
            return self.trained
        if any(not _same_mask(v, through[0]) for v in through[1:]):
            raise _copied_input_error("a vision layer", f"{len(through)} forwards of it with different padding",
                                      "padding")
        return through[0]


def _same_mask(a: Optional[Tensor], b: Optional[Tensor]) -> bool:
    if a is None or b is None:
        return a is b
    return a is b or (a.shape == b.shape and bool(torch.equal(a, b)))


def _valid_tokens(mask, batch: int, seq: int):
    """Which of ``seq`` key tokens a layer's attention mask lets any query see, ``[batch, seq]`` bool, or None
    for all. HF hands encoder layers None (no padding), a 2D ``[B, S]`` keep mask (flash attention), or a 4D
    ``[B, 1, Q, S]`` one, bool (True: attend) or additive float (0: attend, the dtype's minimum: not), or
    flex attention's BlockMask (read through its ``mask_mod``)."""
    if mask is None:
        return None
    if not torch.is_tensor(mask) and callable(getattr(mask, "mask_mod", None)):  # flex attention's BlockMask
        try:
            from torch.nn.attention.flex_attention import create_mask

            mask = create_mask(mask.mask_mod, mask.shape[0], 1, seq, seq, device=mask.kv_num_blocks.device)
        except Exception:  # noqa: BLE001 - a mask_mod that cannot be evaluated densely: said below
            pass
    if not torch.is_tensor(mask):
        warn_once(f"mmfast MMA: a vision layer got an attention mask of type {type(mask).__name__}; its samples "
                  f"route from the mean of all their tokens, padding included", key="mma-vision-mask")
        return None
    if mask.dim() == 2 and tuple(mask.shape) == (batch, seq):
        return mask != 0
    if mask.dim() == 4 and mask.shape[-1] == seq and mask.shape[0] in (1, batch):
        keep = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        return keep[:, 0].any(dim=-2).expand(batch, seq)
    raise RuntimeError(f"mmfast MMA: a vision layer's attention mask has shape {tuple(mask.shape)}; expected "
                       f"[{batch}, {seq}] or [{batch}, 1, Q, {seq}]")


def _vision_padding_hook(module, args, kwargs):
    """Encoder layer pre-hook: keep which tokens the call's attention mask leaves in, for the mean route of
    its ``layer_norm1`` (which reads the same input)."""
    slot = _slot(module.layer_norm1)
    if slot.adapter is not None:
        _keep_valid_tokens(slot.mask, args, kwargs, module.training)


def _vision_padding_node_hook(module, args, output):
    """Encoder layer forward hook (outside HF's checkpoint): the autograd node of the call's output, for the
    call's mask (:class:`_TokenMask`)."""
    slot = _slot(module.layer_norm1)
    out = output[0] if isinstance(output, (tuple, list)) else output
    if slot.adapter is not None and torch.is_tensor(out) and not torch.compiler.is_compiling():
        slot.mask.put_node(out.grad_fn, slot.mask.latest)


def _keep_valid_tokens(holder: _TokenMask, args, kwargs, training: bool = True) -> None:
    x = args[0] if args else kwargs.get("hidden_states")
    if torch.is_tensor(x) and x.dim() == 3:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        holder.put(x, _valid_tokens(mask, x.shape[0], x.shape[1]), training)


def _vision_tokens_hook(module, args, output):
    """layer_norm1 output -> adapter, each sample routed by the mean of its own tokens (padding left out):
    for towers without a CLS token (SigLIP), where position 0 is one corner patch of the image."""
    slot = _slot(module)
    return None if slot.adapter is None else _mean_routed(slot.mask, slot.adapter, args, output)


def _mean_routed(holder: _TokenMask, adapter: MMAdapter, args, output):
    valid = holder.get(args[0]) if args else holder.latest
    if valid is not None and tuple(valid.shape) != tuple(output.shape[:2]):
        valid = None  # (another call's: not this input's shape)
    acc = torch.promote_types(output.dtype, torch.float32)
    if valid is None:
        route = output.mean(dim=1, dtype=acc)
    else:  # the sum over the kept tokens, taken in fp32 as the mean above, then the mean
        kept = (output * valid.unsqueeze(-1).to(output.dtype)).sum(dim=1, dtype=acc)
        route = kept / valid.sum(dim=1, keepdim=True).clamp_min(1).to(acc)
    out = adapter(output, route)
    if not torch.compiler.is_compiling():
        holder.put_node(out.grad_fn, valid)
    return out


def _llm_norm_adapter_hook(module, args, output):
    """input_layernorm output -> adapter, routed by the modality token's normed state at this layer."""
    slot = _slot(module)
    state = slot.state
    if state.recording and (torch.compiler.is_compiling() or state.recording_thread in (None, threading.get_ident())):
        # the modality token itself: it routes from its own state and leaves it
        route = output[:, 0]
        slot.route = route
    else:
        if state.bridge is not None:  # the forward's token ids were not looked up by its input embeddings
            state.bridge = None
            raise RuntimeError("mmfast MMA: the language model did not look its input_ids up with its input "
                               "embeddings module (get_input_embeddings()), where the routes' gradients join "
                               "the main pass; the routers would get no gradient")
        route = _route_for_input(slot, args[0]) if args else slot.route
        if route is None or route.shape[0] != output.shape[0]:
            raise RuntimeError("mmfast MMA: no modality route for this forward; call the model (or its language "
                               "model) as a whole, not a decoder layer alone. (A norm copied after tuning='mma', "
                               "as PEFT's modules_to_save copies it, carries a copy of the adapter that is no part "
                               "of the model: call get_peft_model first, then mmfast.patch.)")
    return slot.adapter(output, route)


#: Keyword arguments besides ``pixel_values*`` that bring images into a forward (encoded ahead of it:
#: chunked prefill hands later chunks the encoder's outputs).
_IMAGE_INPUTS = ("mm_encoder_outputs", "image_embeds", "image_features")


def _visual_tokens(ids: Tensor, token_ids: tuple[int, ...]) -> Tensor:
    """``ids``-shaped bool: which tokens are any of ``token_ids`` (:func:`_visual_token_ids`)."""
    found = ids == token_ids[0]
    for tid in token_ids[1:]:
        found = found | (ids == tid)
    return found


def _has_visual_tokens(ids: Tensor, token_ids: tuple[int, ...]) -> Tensor:
    """[B] bool: which rows of ``ids`` hold any of ``token_ids`` (:func:`_visual_token_ids`)."""
    return _visual_tokens(ids, token_ids).any(-1)


def _visual_token_ids(config) -> Optional[tuple[int, ...]]:
    """The model's image and video token ids (a sample with a video has visual input as one with an image:
    LLaVA-OneVision / -NeXT-Video, Qwen-VL), or None."""
    ids = tuple(t for t in (_config_id(config, "image"), _config_id(config, "video")) if t is not None)
    return ids or None


def _flags_pre_hook(module, args, kwargs):
    """Decide which samples have images, from ``mma_has_image`` or the image (and video) tokens in
    ``input_ids``. The token ids are read from the config on every call, as the model reads them: a token
    added after patching (``resize_token_embeddings``, then ``config.image_token_id``) counts."""
    state: _State = module.__dict__[_STATE]
    eager = not torch.compiler.is_compiling()
    runner = _enter(state, module, sys._getframe(1)) if eager else None
    _warn_if_shallow_copy(module)
    visual_ids = _visual_token_ids(module.config)
    flags = kwargs.pop(HAS_IMAGE_KWARG, None)
    ids = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
    embeds = kwargs.get("inputs_embeds")
    ref = ids if ids is not None else embeds
    if ref is None:
        raise ValueError("mmfast MMA: the model needs input_ids or inputs_embeds")
    B, device = ref.shape[0], ref.device
    # the KV cache: ``cache`` from transformers 5.24 (``past_key_values`` before, still accepted)
    past = next((kwargs[k] for k in ("cache", "past_key_values") if kwargs.get(k) is not None), None)
    if flags is not None:
        given, flags = flags, torch.as_tensor(flags, device=device).bool().reshape(-1)
        if flags.shape[0] != B:
            hint = "" if torch.is_tensor(given) or not flags.shape[0] or B % flags.shape[0] else \
                " (generate repeats tensor arguments for its beams and returned sequences, not lists: pass a tensor)"
            raise ValueError(f"mmfast MMA: {HAS_IMAGE_KWARG} has {flags.shape[0]} entries for a batch of {B}{hint}")
    elif past is None:
        # (transformers keeps packed samples apart without a cache; a call without visual input routes as text)
        if ids is not None and visual_ids is not None and _visual_inputs_given(args, kwargs):
            _refuse_mixed_packing(ids, visual_ids, functools.partial(forward_argument, type(module), args, kwargs))
        flags = _flags_of_inputs(ids, visual_ids, kwargs, B, device, args)
    else:
        length = getattr(past, "get_seq_length", lambda: 0)()
        # a static cache's length is a tensor: compiled code takes both routings and picks one in the graph (a
        # branch on the tensor broke the graph of every compiled decode step)
        in_graph = torch.is_tensor(length) and torch.compiler.is_compiling()
        decoding = in_graph or bool(length > 0)
        kept = _kept_flags_or_none(state, past, decoding, ids, visual_ids, kwargs, B)
        if kept is None:
            flags = _flags_of_inputs(ids, visual_ids, kwargs, B, device, args)
        elif in_graph:
            # (images without input_ids: a prefill raises in eager code; a decode step takes the kept flags)
            fresh = kept if ids is None and kwargs.get("pixel_values") is not None else \
                _flags_of_inputs(ids, visual_ids, kwargs, B, device, args)
            state.has_image, state.live = torch.where(length.to(device) > 0, kept, fresh), True
            state.runner = state.untagged = None  # (compiled: forward_runner finds none)
            # not stored on the cache: it keeps the flags its eager prefill stored (generate's prefill is not
            # compiled). A compiled step's output that the next step reads back is what CUDA graphs
            # (reduce-overhead, generate's default on a GPU) overwrite with that step
            return args, kwargs
        else:
            flags = kept  # generation: keep the prefill's flags
    state.has_image, state.live, state.runner = flags, True, runner
    state.untagged = flags if eager and past is None else None
    if past is not None:  # on the cache itself: a copy of it (a reused prompt cache) carries them too
        _put_flags(past, flags)
    return args, kwargs


_BUSY_LOCK = threading.Lock()


def _enter(state: _State, module: nn.Module, frame) -> Optional[tuple]:
    """A forward of the model, or of its language model, starts on this thread: count it, or raise if another
    thread is inside one. The routes are the model's (each forward's on its layers' slots), and forwards on two
    threads at once would each read the other's (wrong outputs, not an error; the unpatched model has no such
    state). A thread that left its forward without the closing hooks (a KeyboardInterrupt) or ended no
    longer counts. Returns what runs this forward (:func:`~mmfast.patching.core.forward_runner`)."""
    runner = forward_runner(module, frame, (nn.Module._call_impl.__code__,))
    me = threading.get_ident()
    with _BUSY_LOCK:
        busy = state.busy
        if busy is not None and busy[0] != me:
            if forward_running_on(busy[0], busy[1]):
                raise RuntimeError(
                    "mmfast MMA: this model is running a forward on another thread. Its routing is the model's "
                    "state, and forwards on two threads at once would mix their routes: run one MMA model from "
                    "one thread at a time (a lock around its calls, generate's too), or give each thread its own "
                    "copy (copy.deepcopy(model))")
            busy = None
        state.busy = [me, runner, 1] if busy is None else [me, busy[1], busy[2] + 1]
    return runner


def _leave(state: _State) -> bool:
    """A forward :func:`_enter` counted ends (its closing hook). False where another thread's forward holds
    the state: this thread's was refused, and the state is that one's."""
    busy = state.busy
    if busy is None:
        return True
    if busy[0] != threading.get_ident():
        return False
    busy[2] -= 1
    if busy[2] <= 0:
        state.busy = None
    return True


def _put_flags(cache, flags: Tensor) -> None:
    """Store ``flags`` on ``cache`` (:data:`CACHE_FLAGS_ATTR`)."""
    try:
        setattr(cache, CACHE_FLAGS_ATTR, flags)
    except AttributeError:  # a cache object that takes no attributes: decode steps take the latest flags
        pass


#: Words in the names of the forward arguments that bring visual input (pixel_values, image_pixel_values,
#: pixel_values_videos, image_embeds, image_patches, ...). A name taken for one when it is not only keeps
#: the image tokens counting, as before.
_VISUAL_WORDS = ("pixel", "image", "video", "vision", "visual", "patch")


def _visual_inputs_given(args: tuple, kwargs: dict) -> bool:
    """Whether a forward call may bring visual inputs: an argument whose name has one of
    :data:`_VISUAL_WORDS` (or one of :data:`_IMAGE_INPUTS`) that is given (not None, not empty), or any
    tensor passed by position after the token ids (not told apart by name there)."""
    if any(torch.is_tensor(a) for a in args[1:]):
        return True
    return any(_given(v) and (k in _IMAGE_INPUTS or any(w in k for w in _VISUAL_WORDS)) for k, v in kwargs.items())


def _given(value) -> bool:
    """An input argument that brings something: not None, not an empty container (generate passes {})."""
    return value is not None and not (isinstance(value, (dict, list, tuple)) and not value)


def _kept_flags_or_none(state: _State, past, decoding: bool, ids: Optional[Tensor], visual_ids, kwargs: dict,
                        batch: int) -> Optional[Tensor]:
    """The flags a forward continuing ``past`` takes from it (:func:`_flags_kept`), or None where its own
    inputs decide (:func:`_flags_of_inputs`): an empty cache, or one this model did not fill under a whole
    sequence (PEFT's prefix tuning hands every forward a cache holding its virtual tokens), whose own image
    tokens say which samples have images."""
    foreign = getattr(past, CACHE_FLAGS_ATTR, None) is None and ids is not None and visual_ids is not None \
        and (ids.shape[-1] > 1 or kwargs.get("labels") is not None)
    return _flags_kept(state, past, batch, ids, visual_ids, kwargs) if decoding and not foreign else None


def _flags_of_inputs(ids: Optional[Tensor], visual_ids, kwargs: dict, batch: int, device, args: tuple = ()) -> Tensor:
    """The flags of a forward that continues no cache: its image tokens say, or no sample has an image.

    A call that brings no visual input merges no image: its image-token ids are plain tokens to the model
    (a text sample that generated the image token's id without a cache, each step a whole forward), so
    they route as text, as the cached decode steps route them."""
    if ids is not None and visual_ids is not None:
        if not _visual_inputs_given(args, kwargs):
            return torch.zeros(batch, dtype=torch.bool, device=device)
        return _has_visual_tokens(ids, visual_ids)
    if kwargs.get("pixel_values") is not None:
        raise ValueError(f"mmfast MMA: images given without input_ids (PEFT's prompt learning, say, hands the model "
                         f"inputs_embeds only); pass {HAS_IMAGE_KWARG} (a [batch] bool tensor)")
    return torch.zeros(batch, dtype=torch.bool, device=device)


def _packed_samples(ids: Tensor, argument) -> Optional[Tensor]:
    """[B, S] the sample each token belongs to where several samples are packed into a row (padding-free
    batches: transformers' DataCollatorWithFlattening), found as transformers finds them: ``cu_seq_lens_q`` or
    ``seq_idx`` where given, else ``position_ids`` that restart within a row with no ``attention_mask``. None
    where rows are not packed so. ``argument(name)``: the forward's argument (by keyword or position)."""
    B, S = ids.shape[0], ids.shape[-1]
    cu = argument("cu_seq_lens_q")
    if torch.is_tensor(cu) and cu.dim() == 1 and cu.numel() > 1:  # boundaries over the batch's B * S tokens
        at = torch.arange(B * S, device=cu.device, dtype=cu.dtype)
        return torch.searchsorted(cu[1:].contiguous(), at, right=True).view(B, S)
    seq = argument("seq_idx")
    if torch.is_tensor(seq) and tuple(seq.shape) == (B, S):
        return seq
    pos = argument("position_ids")
    if not torch.is_tensor(pos) or pos.dim() != 2 or pos.shape[-1] != S or argument("attention_mask") is not None:
        return None
    pos = pos.expand(B, S)
    return (torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1) != 1).cumsum(-1)


def _refuse_mixed_packing(ids: Tensor, visual_ids: tuple[int, ...], argument) -> None:
    """Raise where a packed row holds samples with images and samples without: MMA routes each row by one
    flag (one modality token per row, one route per row in the adapters), so the row's text samples would
    be routed as image samples (the unpatched model keeps packed samples apart). Rows of one modality route
    as their samples would alone. Eager only (a data-dependent check)."""
    if torch.compiler.is_compiling() or ids.dim() != 2:
        return
    sample = _packed_samples(ids, argument)
    if sample is None:
        return
    sample = sample.to(ids.device).long()
    visual = _visual_tokens(ids, visual_ids)
    # a sample whose labels are all ignored trains nothing and (kept apart) reaches no other sample: not
    # counted (a padding-free collator's padding to a multiple: each pad token a "sample" of its own)
    labels = argument("labels")
    counted = labels != -100 if torch.is_tensor(labels) and labels.shape == ids.shape else torch.ones_like(visual)
    n = int(sample.max()) + 1
    counts = torch.zeros(ids.shape[0], n, dtype=torch.long, device=ids.device)
    has = counts.scatter_add(1, sample, visual.long()) > 0
    present = counts.scatter_add(1, sample, counted.to(ids.device).long()) > 0
    mixed = ((has & present).any(-1) & (present & ~has).any(-1)).nonzero().flatten().tolist()
    if mixed:
        raise ValueError(f"mmfast MMA: row{'s' if len(mixed) > 1 else ''} {', '.join(map(str, mixed[:8]))} of this "
                         f"batch pack{'' if len(mixed) > 1 else 's'} samples with images beside samples without "
                         "(padding-free packing: position_ids restarting within a row, cu_seq_lens_q or seq_idx); "
                         "MMA routes a row by one modality flag, so its text samples would be routed as image "
                         f"samples. Pack samples of one modality per row, pad instead of packing, or pass "
                         f"{HAS_IMAGE_KWARG} (one flag per row) to choose a row's routing")


def _flags_kept(state: _State, past, batch: int, ids: Optional[Tensor], visual_ids, kwargs: dict) -> Optional[Tensor]:
    """The flags of a forward that continues ``past``: those kept for it, with the samples whose images arrive
    in this chunk; None where none are kept for this batch."""
    flags = _decode_flags(state, past, batch)
    if flags is None:
        return None
    # (by the image inputs' own names: an argument that only describes images, as image_sizes, brings none,
    # and a sampled image token id without its image merges none)
    images = any(_given(v) for k, v in kwargs.items() if "pixel_values" in k or k in _IMAGE_INPUTS)
    if images and ids is not None and visual_ids is not None:
        # a chunk after a cached prefix may bring a sample's image: route it (and what follows) as one
        # (only a chunk with images: a decode step that samples the image token id merges no image)
        new = _has_visual_tokens(ids, visual_ids) & ~flags
        if not torch.compiler.is_compiling() and bool(new.any()):
            warn_once("mmfast MMA: image tokens arrived after a cached text prefix; the new tokens route "
                      "as image samples, but the cached prefix keeps the text routing it was computed "
                      "with (a single pass over the whole sequence would route all of it as image)")
        flags = flags | new
    return flags


def _warn_if_shallow_copy(module: nn.Module) -> None:
    """Say so where ``module`` is a shallow copy of the patched model (Accelerate's ``compile_regions`` makes
    one and puts compiled copies of the repeated layers in it): its forward, the signature pass-through the
    copy shares, runs the original model, whose layers are not the compiled ones."""
    if torch.compiler.is_compiling():  # (compiled whole: no copy; nothing here for compiled code to guard)
        return
    binding = binding_of(module.__dict__.get("forward"))
    original = binding._ref() if binding is not None and binding._ref is not None else None
    if original is not None and original is not module:
        warn_once("mmfast MMA: this model is a shallow copy of a patched MMA model (Accelerate's compile_regions "
                  "makes one), and its forward runs the original model with the original layers: nothing the copy "
                  "compiled runs. Compile the layers in place instead (layer.compile() for each decoder and vision "
                  "layer), or the whole model (torch.compile)", key="mma-shallow-copy")


#: Attribute of a KV cache object that holds the flags of the samples it caches: each generation's decode
#: steps keep those of the prefill that filled their cache, also when generations of one model interleave
#: or a copied prompt cache is continued.
CACHE_FLAGS_ATTR = "_mmfast_mma_has_image"


def _decode_flags(state: _State, past, batch: int) -> Optional[Tensor]:
    """The flags a decode step on ``past`` keeps: those of the forwards that filled that cache, or (a cache
    filled elsewhere, or one that takes no attributes) the latest forward's, with a warning."""
    flags = getattr(past, CACHE_FLAGS_ATTR, None)
    if flags is not None and flags.shape[0] != batch:
        # (rows copied or selected by something that did not carry the routing along: the new rows' samples
        # are unknown, and the chunk's tokens cannot say: a decode step's token is no image token)
        raise ValueError(f"mmfast MMA: this KV cache holds the routing of {flags.shape[0]} samples but is continued "
                         f"with a batch of {batch}: its rows were copied or selected by a method that does not "
                         f"carry the routing along (the cache's own batch_repeat_interleave, batch_select_indices "
                         f"and reorder_cache do); pass {HAS_IMAGE_KWARG} (a [batch] bool tensor) with the call")
    if flags is None:
        flags = state.has_image
        if flags is not None and not torch.compiler.is_compiling():
            warn_once(f"mmfast MMA: a KV cache this model did not fill (or one that takes no attributes) is "
                      f"continued with the routing of the latest forward; pass {HAS_IMAGE_KWARG} to say which "
                      f"samples have images")
    return flags if flags is not None and flags.shape[0] == batch else None


def _on(index, flags: Tensor) -> Tensor:
    return torch.as_tensor(index, device=flags.device)


#: The KV cache's methods that copy, select or reorder its rows, and what each does to the cached
#: samples' flags (its arguments after self), as the cache's layers do it to their keys (indices or a
#: bool mask for ``batch_select_indices``)
_CACHE_ROW_OPS = {
    "batch_repeat_interleave": lambda flags, repeats: flags.repeat_interleave(repeats, dim=0),
    "batch_select_indices": lambda flags, indices: flags[_on(indices, flags)],
    "reorder_cache": lambda flags, beam_idx: flags.index_select(0, _on(beam_idx, flags).long()),
}


def _cache_row_op(name: str, original):
    @functools.wraps(original)
    def method(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        flags = self.__dict__.get(CACHE_FLAGS_ATTR)
        if flags is not None:
            self.__dict__[CACHE_FLAGS_ATTR] = _CACHE_ROW_OPS[name](flags, *args, *kwargs.values())
        return out

    method.__mmfast_carries_flags__ = True
    return method


_CARRYING = [False]


def _carry_flags_through_cache_row_ops() -> None:
    """Make ``transformers.cache_utils.Cache``'s row operations carry the cached samples' flags along: a
    prompt cache expanded for beams (``batch_repeat_interleave``), a contrastive search's candidate rows
    (``batch_repeat_interleave``, then ``batch_select_indices``), beam reordering. Before, the flags stayed
    as they were, and the next step found flags of another batch size and routed every row as text.

    Called when MMA is applied and when a patched model is unpickled or deep-copied (a flagged cache comes
    from such a model): the methods are wrapped once, on the class (a transformers utility class, no model's): a cache without flags runs
    them unchanged. (Not bound on each cache: a shallow copy of the cache would share the bound
    methods, and they would reorder the original.) A subclass that overrides one without calling it leaves
    flags of another batch size, which the next step refuses (:func:`_decode_flags`)."""
    if _CARRYING[0]:
        return
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # (an MMA model is a transformers model)
        return
    for name in _CACHE_ROW_OPS:
        original = Cache.__dict__.get(name)
        if original is not None and not getattr(original, "__mmfast_carries_flags__", False):
            setattr(Cache, name, _cache_row_op(name, original))
    _CARRYING[0] = True  # (after: another thread that finds it set finds the methods wrapped)


def _chunked_prefill_flags(original):
    signature = inspect.signature(original)  # (bound by name: the private method's signature may change)

    @functools.wraps(original)
    def _prefill(self, *args, **kwargs):
        try:
            bound = signature.bind(self, *args, **kwargs).arguments
        except TypeError:
            bound = {}
        ids, config, model_kwargs = (bound.get(k) for k in ("input_ids", "generation_config", "model_kwargs"))
        # (not an assistant's prefill, is_first_iteration=False: its forwards are given no image inputs, so
        # they route as text, chunked or not)
        if self.__dict__.get(_STATE) is None or not isinstance(model_kwargs, dict) \
                or not bound.get("is_first_iteration", True) \
                or getattr(config, "prefill_chunk_size", None) is None or model_kwargs.get(HAS_IMAGE_KWARG) is not None \
                or not torch.is_tensor(ids) or ids.dim() != 2 or ids.shape[-1] == 0:
            return original(self, *args, **kwargs)
        cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
        visual_ids = _visual_token_ids(self.config)
        if cache is None or visual_ids is None or not _visual_inputs_given((), model_kwargs):
            return original(self, *args, **kwargs)
        # generate feeds the prompt in chunks, and a first chunk of text before a sample's image routed that
        # sample as text: the flags are those one forward over the prompt's new tokens takes
        # (:func:`_flags_pre_hook`'s rules; a cache passed in counts as there). Set in generate's own dict for
        # the prefill only: the decode steps keep the flags the prefill stored on the cache
        length = int(getattr(cache, "get_seq_length", lambda: 0)())
        new = ids
        if length > 0:
            mask = model_kwargs.get("attention_mask")
            if (mask.shape[1] if mask is not None else getattr(config, "_mask_length", -1)) == ids.shape[1]:
                new = ids[:, length:]  # (as the prefill slices them)
            if new.shape[-1] == 0:
                return original(self, *args, **kwargs)
        B = new.shape[0]
        flags = _kept_flags_or_none(self.__dict__[_STATE], cache, length > 0, new, visual_ids, model_kwargs, B)
        if flags is None:
            flags = _flags_of_inputs(new, visual_ids, model_kwargs, B, new.device)
        model_kwargs[HAS_IMAGE_KWARG] = flags
        try:
            return original(self, *args, **kwargs)
        finally:
            model_kwargs.pop(HAS_IMAGE_KWARG, None)

    _prefill.__mmfast_routes_whole_prompt__ = True
    return _prefill


def _route_chunked_prefill_whole() -> None:
    """Make ``GenerationMixin._prefill`` route a chunked prefill (``generate(prefill_chunk_size=N)``) by the
    whole prompt's image tokens: the chunks before a sample's image routed it as text, and the cache kept
    that routing. The prefill is the one place that sees the whole prompt (each chunk's forward sees only
    its own tokens). Wrapped once, on the class, like the cache's row operations; it acts only for a model
    MMA patched, given visual inputs and no ``mma_has_image``."""
    try:
        from transformers.generation.utils import GenerationMixin
    except ImportError:
        return
    original = GenerationMixin.__dict__.get("_prefill")
    if original is not None and not getattr(original, "__mmfast_routes_whole_prompt__", False):
        GenerationMixin._prefill = _chunked_prefill_flags(original)


def _wrap_generation() -> None:
    """transformers' generation classes, wrapped once for MMA's flags (:func:`_carry_flags_through_cache_row_ops`,
    :func:`_route_chunked_prefill_whole`): when MMA is applied, and when a patched model is unpickled or
    deep-copied."""
    _carry_flags_through_cache_row_ops()
    _route_chunked_prefill_whole()


def _plain_call(module: nn.Module, *args, **kwargs):
    return module(*args, **kwargs)


def _without_checkpointing(layer: nn.Module, h: Tensor, **kwargs) -> Tensor:
    """Call a decoder layer on the modality token with activation checkpointing off for this call.

    Reentrant checkpointing runs its forward without grad, and the routes recorded in this pass must
    carry theirs (the token is one per sample: nothing to save). The layer is called as it is, so the
    hooks of every wrapper around it run (FSDP's unshard, also where FSDP shards a checkpoint wrapper,
    as Accelerate does); a checkpoint wrapper (``checkpoint_wrapper``) calls its module plainly for this
    call, and HF layers have their ``gradient_checkpointing`` flag lowered."""
    wrappers, inner = [], layer
    while True:  # by registered children: FSDP1's __getattr__ hands out its child's attributes
        children = inner._modules
        if "_checkpoint_wrapped_module" in children:
            if "checkpoint_fn" in inner.__dict__:
                wrappers.append((inner, inner.__dict__["checkpoint_fn"], inner.__dict__.get("checkpoint_impl")))
            inner = children["_checkpoint_wrapped_module"]
        elif "_fsdp_wrapped_module" in children:
            inner = children["_fsdp_wrapped_module"]
        else:
            break
    flagged = bool(getattr(inner, "gradient_checkpointing", False))
    if wrappers:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl
    for wrapper, _, _ in wrappers:
        wrapper.checkpoint_fn = _plain_call
        wrapper.checkpoint_impl = CheckpointImpl.NO_REENTRANT  # (reentrant packs keyword arguments)
    if flagged:
        inner.gradient_checkpointing = False
    try:
        out = layer(h, **kwargs)
    finally:
        if flagged:
            inner.gradient_checkpointing = True
        for wrapper, fn, impl in wrappers:
            wrapper.checkpoint_fn = fn
            if impl is None:
                wrapper.__dict__.pop("checkpoint_impl", None)
            else:
                wrapper.checkpoint_impl = impl
    return out[0] if isinstance(out, tuple) else out


class _RouteGradBridge(torch.autograd.Function):
    """Identity on the language model's input embeddings that carries the routes' gradients.

    The main pass reads each route through a detached leaf, so every kind of activation checkpointing
    (reentrant ones recompute a layer inside backward and would otherwise run a nested backward into
    the modality pass's shared graph, once per layer) just accumulates ``.grad`` on the leaf. This
    node sits upstream of every layer, so its backward runs after all of them: it hands the leaves'
    gradients to the routes, and the modality pass is traversed once.

    It also gives the modality pass's last output (``last``, which nothing else reads) a zero gradient.
    Otherwise the last layer's route, read inside the layer, would be the only gradient into that
    layer's modality pass: its norm's backward would run without the layer's output ever getting a
    gradient, so a sharding wrapper's pre-backward hook on that output (FSDP2's all-gather of the
    layer's parameters, which it freed after the main pass's backward of the layer) would not run
    first, and the norm's backward would read freed parameter memory.
    """

    @staticmethod
    def forward(ctx, embeds, leaves: _Leaves, last, *routes):
        ctx.leaves, ctx.last = leaves, (last.shape, last.dtype, last.device)
        leaves.node = weakref.ref(ctx)  # (ctx is the bridge's node)
        return embeds.view_as(embeds)

    @staticmethod
    def backward(ctx, grad):
        shape, dtype, device = ctx.last
        wanting = [leaf for leaf in ctx.leaves.leaves if leaf.requires_grad]
        if wanting and all(leaf.grad is None for leaf in wanting) and not any(
                torch._C._will_engine_execute_node(_grad_accumulator(leaf)) for leaf in wanting):
            # torch.autograd.grad(loss, inputs) and backward(inputs=...) compute only what leads to their
            # inputs: the leaves' .grad stays empty and the routes' part would be lost. (Under reentrant
            # checkpointing the leaves are not in this graph either, but nested backward calls fill .grad.)
            raise RuntimeError(
                "tuning='mma': the modality routes' gradients flow through loss.backward() only; "
                "torch.autograd.grad and backward(inputs=...) would leave them out of every adapter and "
                "router gradient. Call loss.backward() and read the parameters' .grad.")
        route_grads = []
        for leaf in ctx.leaves.leaves:
            route_grads.append(leaf.grad)
            leaf.grad = None  # taken: a second backward through a retained graph brings its own
        return (grad, None, torch.zeros(shape, dtype=dtype, device=device), *route_grads)


def _grad_accumulator(leaf: Tensor):
    """The autograd node that accumulates ``leaf.grad`` (found as torch.autograd.graph's multi-grad hook
    finds it; backward runs without grad mode, where a view would record no node)."""
    with torch.enable_grad():
        return leaf.view_as(leaf).grad_fn.next_functions[0][0]


def _position_embeddings(module: nn.Module, h: Tensor, position_ids: Tensor) -> list:
    """Each decoder layer's rotary embeddings for the modality token: one for all, or, where the rotary
    embedding depends on the layer's attention type (Gemma 3's sliding and full layers), one per type."""
    rotary = module.rotary_emb
    if "layer_type" in inspect.signature(rotary.forward).parameters:
        types = list(getattr(module.config, "layer_types", None) or [])
        if len(types) < len(module.layers):
            raise ValueError(f"mmfast MMA: {type(module).__name__}'s rotary embedding takes a layer type, and its "
                             f"config has no layer_types for its {len(module.layers)} layers")
        by_type = {t: rotary(h, position_ids, t) for t in dict.fromkeys(types)}
        return [by_type[t] for t in types[:len(module.layers)]]
    return [rotary(h, position_ids=position_ids)] * len(module.layers)


def _modality_pass(state: _State, module: nn.Module, h: Tensor, position_ids: Tensor, pos_embs) -> Tensor:
    """The modality token through every decoder layer, each layer's norm hook recording its route; returns
    the last layer's output (the route bridge holds it: FSDP's backward hooks for the pass sit on it)."""
    state.recording = True
    if not torch.compiler.is_compiling():
        state.recording_thread = threading.get_ident()
    try:
        for layer, pos_emb in zip(module.layers, pos_embs):
            # no cache argument: its default is None under both of its names (``past_key_values`` before
            # transformers 5.24, ``cache`` after), and naming the old one warns from 5.24 on
            h = _without_checkpointing(layer, h, attention_mask=None, position_ids=position_ids,
                                       use_cache=False, position_embeddings=pos_emb)
    finally:
        state.recording = False
        if not torch.compiler.is_compiling():
            state.recording_thread = None
    return h


_UNCOMPILED: list = []


def _modality_pass_uncompiled():
    """:func:`_modality_pass` kept out of compiled graphs. Made when MMA is inserted (or a model with it
    unpickled), not at import: ``torch.compiler.disable`` imports Dynamo, which took two seconds of every
    ``import mmfast``; compiled code then only reads it."""
    if not _UNCOMPILED:
        _UNCOMPILED.append(torch.compiler.disable(_modality_pass))
    return _UNCOMPILED[0]


def _modality_pre_hook(module, args, kwargs):
    """Run the modality token through every decoder layer (one-token sequence) and record routes."""
    state: _State = module.__dict__[_STATE]
    compiling = torch.compiler.is_compiling()
    if not compiling:
        _enter(state, module, sys._getframe(1))
    ref = kwargs.get("inputs_embeds")
    if ref is None:
        ref = kwargs.get("input_ids", args[0] if args else None)
    B = ref.shape[0]
    live = state.live and not forward_cut(state.runner)
    flags, state.live, state.runner = (state.has_image if live else None), False, None
    if flags is None or flags.shape[0] != B:
        flags = torch.zeros(B, dtype=torch.bool, device=ref.device)
    emb: nn.Embedding = getattr(module, EMBEDDING_NAME)
    if module.training and torch.is_grad_enabled() and not compiling and emb.weight.requires_grad \
            and emb.weight.dtype != torch.float32:  # (a cast casts the adapters with it)
        said = module.__dict__.get(_SAID_CAST)
        if not isinstance(said, dict):  # (True: a model an earlier version patched and pickled)
            said = module.__dict__[_SAID_CAST] = {"owner": patch_name(module)}
        warn_cast_trainables("the MMA adapters and modality embedding mmfast.patch made in float32", emb.weight.dtype,
                             said)
    if emb.weight.is_meta and not ref.is_meta and getattr(emb, "_hf_hook", None) is None:
        raise unloaded_mma("mmfast MMA: the modality embedding's weights", ref.device)
    dtype = module.get_input_embeddings().weight.dtype
    h = emb(flags.long()).to(dtype)[:, None, :]
    position_ids = torch.zeros(B, 1, dtype=torch.long, device=h.device)
    pos_embs = _position_embeddings(module, h, position_ids)
    # the slots of the layers the model has now (layers may have been removed or added since patching; one
    # added has no adapter), in order
    slots = [slot for slot in (getattr(getattr(layer, "input_layernorm", None), _SLOT, None)
                               for layer in module.layers) if slot is not None]
    for slot in slots:  # the previous forward's: no layer may read a route this forward did not make
        slot.route = None
        if not compiling:  # (compiled code records no inputs; guards on what eager calls did would recompile)
            slot.seen.prune()
    flex = getattr(getattr(module, "config", None), "_attn_implementation", None) == "flex_attention"
    # compiled with flex attention, the pass's graph break (HF's flex mask) lost the reset of the recording
    # flag, and the main pass's adapters routed from their own tokens: that pass runs uncompiled there
    run = _modality_pass_uncompiled() if flex and torch.compiler.is_compiling() else _modality_pass
    h = run(state, module, h, position_ids, pos_embs)
    routes = [slot.route for slot in slots]
    given = kwargs.get("inputs_embeds")
    if given is not None and slots and slots[0].seen.get(given, _MISSING) is not _MISSING:
        # the same embeddings as a forward whose backward has not run (one tensor passed twice): a copy, so
        # that a layer recomputed for either one's backward tells them apart (by storage, see
        # _route_for_input). Only layer 0 can meet this: every later layer's input is new. Without grad too:
        # reentrant checkpointing runs its forward without grad, so forwards without grad record their
        # inputs as well, and an evaluation pass between a forward and its backward must not overwrite it.
        kwargs["inputs_embeds"] = given.clone()
    state.bridge = None
    if not compiling:
        state.routed_in = torch._C._current_graph_task_id()
    if torch.is_grad_enabled() and any(r.requires_grad for r in routes):
        leaves = _Leaves(slots, [r.detach().requires_grad_(r.requires_grad) for r in routes], state.forwards)
        embeds = kwargs.get("inputs_embeds")
        lookup = None if embeds is not None else module.get_input_embeddings()
        if embeds is not None:
            kwargs["inputs_embeds"] = _RouteGradBridge.apply(embeds, leaves, h, *routes)
        elif _more_than_text(kwargs) and isinstance(lookup, nn.Module):
            # token ids with inputs of other kinds (Phi-4-multimodal's images): the model merges those into
            # its embeddings itself, which embeddings passed in its place would skip. The bridge goes on its
            # own lookup of the ids (the input embeddings module it has now)
            _hook_lookup(lookup, state)
            state.bridge = (lookup, leaves, h, routes)
        else:  # token ids alone: look them up here, so that the bridge sits on the embeddings
            ids = kwargs.pop("input_ids", None)
            if ids is None:
                ids, args = args[0], (None, *args[1:])
            kwargs["inputs_embeds"] = _RouteGradBridge.apply(lookup(ids), leaves, h, *routes)
        for slot, leaf in zip(slots, leaves.leaves):
            slot.route = leaf
    return args, kwargs


#: a language model's inputs that carry text, or say how to attend to it (anything else a call passes,
#: such as Phi-4-multimodal's ``image_pixel_values``, the model may merge into its embeddings itself)
_TEXT_INPUTS = frozenset({"input_ids", "inputs_embeds", "attention_mask", "position_ids", "past_key_values",
                          "cache", "cache_position", "use_cache", "output_attentions", "output_hidden_states",
                          "return_dict", "labels", "logits_to_keep", "token_type_ids", "num_items_in_batch",
                          "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"})


def _more_than_text(kwargs: dict) -> bool:
    """Whether a language model's call passes tensors besides its text inputs."""
    return any(v is not None and k not in _TEXT_INPUTS and (torch.is_tensor(v) or isinstance(v, (list, tuple)))
               for k, v in kwargs.items())


def _hook_lookup(lookup: nn.Module, state: _State) -> None:
    """Put :func:`_embedding_bridge_hook` on the input embeddings module ``lookup`` for ``state`` (once: the
    module patching found, or one swapped in or wrapped since, as PEFT's trainable tokens wrap it)."""
    states = lookup.__dict__.get(_BRIDGE_HOOKED, ())
    if any(s is state for s in states):
        return
    if torch.compiler.is_compiling():
        raise RuntimeError("mmfast MMA: this model's input embeddings module was replaced since patching and a "
                           "compiled forward cannot hook it; run one training forward uncompiled first")
    if not states:
        lookup.register_forward_hook(_embedding_bridge_hook)
    lookup.__dict__[_BRIDGE_HOOKED] = (*states, state)


def _embedding_bridge_hook(module, args, output):
    """The language model's input embeddings: the first lookup through this module after a forward with
    inputs besides the text set its bridge (:func:`_modality_pre_hook`) is that forward's own; the bridge
    goes on its output. (Several models may share the module: each has its own routing state.)"""
    for state in module.__dict__.get(_BRIDGE_HOOKED, ()):
        pending = state.bridge
        if pending is not None and pending[0] is module and torch.is_tensor(output):
            state.bridge = None
            _, leaves, last, routes = pending
            return _RouteGradBridge.apply(output, leaves, last, *routes)
    return None


def _clear_bridge_hook(module, args, output):
    """After the language model's forward and the model's, also one that raised: a bridge its lookup did not
    take (the forward failed before it) is dropped, so that no later lookup of the module takes it, and
    flags the language model did not take (the model's forward failed before it ran) are no longer live.
    After the model's own forward (the one :func:`_flags_pre_hook` runs on), a KV cache it made itself
    (``use_cache`` with no cache passed: a hand-written decode loop's prefill) gets this forward's flags, as
    a cache passed in does before the forward, so that continuing it keeps each sample's routing."""
    state = module.__dict__.get(_STATE)
    if state is not None and (torch.compiler.is_compiling() or _leave(state)):
        # (not a forward refused because another thread's runs: the state is that one's)
        if _OPTIONS in module.__dict__:  # (the model's own forward, after its language model's)
            if state.untagged is not None and output is not None and not torch.compiler.is_compiling():
                _tag_made_cache(output, state.untagged)
            state.untagged = None
        state.bridge = None
        state.live, state.runner = False, None


def _tag_made_cache(output, flags: Tensor) -> None:
    """Put ``flags`` on the KV cache in ``output`` (a model output, or its tuple) that carries none yet."""
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # (an MMA model is a transformers model)
        return
    values = output.values() if isinstance(output, dict) else output if isinstance(output, tuple) else ()
    for value in values:
        if isinstance(value, Cache):
            if getattr(value, CACHE_FLAGS_ATTR, None) is None:
                _put_flags(value, flags)
            return


# The hooks of earlier versions bound each layer's pieces (and the layer's index) into the hook; a model
# pickled with them runs through these.


def _vision_norm_hook(adapter: MMAdapter, module, args, output):
    return adapter(output, output[:, 0])


def _vision_mask_hook(holder: _TokenMask, module, args, kwargs):
    _keep_valid_tokens(holder, args, kwargs, module.training)


def _vision_mean_hook(holder: _TokenMask, adapter: MMAdapter, module, args, output):
    return _mean_routed(holder, adapter, args, output)


def _llm_norm_hook(state: _State, layer: int, adapter: MMAdapter, module, args, output):
    return _llm_norm_adapter_hook(module, args, output)  # (its slot made by _llm_pre_hook)


def _top_pre_hook(state: _State, module, args, kwargs):
    module.__dict__.setdefault(_STATE, state)
    return _flags_pre_hook(module, args, kwargs)


def _llm_pre_hook(state: _State, module, args, kwargs):
    module.__dict__.setdefault(_STATE, state)
    for layer in module.layers:  # a slot for each layer whose norm has the earlier hook
        norm = layer.input_layernorm
        if _SLOT not in norm.__dict__:
            hook = next((h for h in norm._forward_hooks.values()
                         if isinstance(h, functools.partial) and h.func is _llm_norm_hook), None)
            if hook is not None:
                norm.__dict__[_SLOT] = _LayerSlot(hook.args[2], state)
    return _modality_pre_hook(module, args, kwargs)


_HOOKS = (_vision_cls_hook, _vision_padding_hook, _vision_padding_node_hook, _vision_tokens_hook,
          _llm_norm_adapter_hook, _flags_pre_hook, _modality_pre_hook, _embedding_bridge_hook, _clear_bridge_hook)
_LEGACY_HOOKS = (_vision_norm_hook, _vision_mask_hook, _vision_mean_hook, _llm_norm_hook, _top_pre_hook, _llm_pre_hook)
for _hook in _HOOKS:  # what they need per module they read from the module
    setattr(_hook, SHARED_CODE_HOOK, True)


def _ours(hook) -> bool:
    return hook in _HOOKS or (isinstance(hook, functools.partial) and hook.func in _LEGACY_HOOKS)


# ---------------------------------------------------------------------------------------------
# insertion and removal
# ---------------------------------------------------------------------------------------------


def _text_tower_layers(hf: nn.Module) -> set[int]:
    """ids of the modules inside a dual encoder's text tower (CLIP's, SigLIP's: embeddings with a
    ``token_embedding``). Their encoder layers are CLIP/SigLIP layers too, but no vision tower: CLIP's is causal,
    and a route from the mean of every token would let each token's state depend on later tokens."""
    found = set()
    for m in hf.modules():
        emb = getattr(m, "embeddings", None)
        if isinstance(emb, nn.Module) and isinstance(getattr(emb, "token_embedding", None), nn.Module):
            found.update(id(sub) for sub in m.modules())
    return found


def _vision_layers(hf: nn.Module) -> list[nn.Module]:
    """Encoder layers with a ``layer_norm1`` (CLIP, SigLIP), wherever the vision tower sits (not in a dual
    encoder's text tower: :func:`_text_tower_layers`)."""
    text = _text_tower_layers(hf)
    return [m for name, m in hf.named_modules() if hasattr(m, "layer_norm1") and hasattr(m, "self_attn")
            and isinstance(getattr(m, "layer_norm1"), nn.Module) and id(m) not in text]


def _vision_states_read(cfg) -> tuple[list[int], str] | None:
    """The indices into the vision tower's hidden states ([0] the embeddings, [i] layer i-1's output) the
    model reads its image features from, and the config fields that say so; None where the config does not
    say (every layer is then taken as read).

    - ``vision_feature_layer``, an index or a list of them (LLaVA and most HF VLMs);
    - Granite 4 Vision: ``spatial_vision_layer`` and the vision side of each ``deepstack_layer_map`` pair (its
      ``vision_feature_layer`` is not read);
    - Molmo 2: ``adapter_config.vision_feature_layer``, counted in layers (layer i is hidden state i + 1);
    - Phi-4-multimodal: ``vision_config.feature_layer``."""
    def ints(v):
        return [int(i) for i in (v if isinstance(v, (list, tuple)) else [v])]

    if cfg is None:
        return None
    if getattr(cfg, "spatial_vision_layer", None) is not None:
        pairs = getattr(cfg, "deepstack_layer_map", None) or []
        return ints(cfg.spatial_vision_layer) + [int(v) for v, _ in pairs], (
            f"spatial_vision_layer={cfg.spatial_vision_layer} and deepstack_layer_map={pairs}")
    if getattr(cfg, "vision_feature_layer", None) is not None:
        return ints(cfg.vision_feature_layer), f"vision_feature_layer={cfg.vision_feature_layer}"
    adapter = getattr(getattr(cfg, "adapter_config", None), "vision_feature_layer", None)
    if adapter is not None:
        return [i + 1 if i >= 0 else i for i in ints(adapter)], f"adapter_config.vision_feature_layer={adapter}"
    feature = getattr(getattr(cfg, "vision_config", None), "feature_layer", None)
    if isinstance(feature, int):
        return [feature], f"vision_config.feature_layer={feature}"
    return None


def _read_vision_layers(hf: nn.Module, vision: list[nn.Module]) -> list[nn.Module]:
    """The vision layers whose output reaches the model. A LLaVA-style model reads each tower's hidden
    states at ``config.vision_feature_layer`` (an index or a list of them into the tower's hidden
    states: [0] is the embeddings, [i] layer i-1's output); the layers after the last one read run, but
    nothing uses what they compute. Per tower (Video-LLaVA has an image and a video tower): the layers
    of one encoder's layer list."""
    cfg = getattr(hf, "config", None)
    read_at = _vision_states_read(cfg)
    n = getattr(getattr(cfg, "vision_config", None), "num_hidden_layers", None)
    if read_at is None or n is None:
        return vision
    last_state = max(s if s >= 0 else n + 1 + s for s in read_at[0])
    ids = {id(v) for v in vision}
    read, listed = set(), set()  # (a layer in no layer list is read)
    for m in hf.modules():
        if isinstance(m, nn.ModuleList):
            members = [layer for layer in m if id(layer) in ids]
            listed.update(id(layer) for layer in members)
            read.update(id(layer) for layer in (members[:max(last_state, 0)] if len(members) == n else members))
    return [m for m in vision if id(m) in read or id(m) not in listed]


def _layers_with_cls(hf: nn.Module) -> set[int]:
    """ids of the encoder layers in a tower whose embeddings prepend a CLS token (``class_embedding``: CLIP,
    BLIP); the others (SigLIP, Idefics) start with an image patch."""
    found = set()
    for m in hf.modules():
        emb = getattr(m, "embeddings", None)
        if isinstance(emb, nn.Module) and isinstance(m, nn.Module) and hasattr(emb, "class_embedding"):
            found.update(id(sub) for sub in m.modules())
    return found


#: the visual neck's layers (the name earlier versions pickled)
_NeckLinear = _XavierLinear


class ModalityEmbedding(InitWhenMaterialized, nn.Embedding):
    """The modality embedding (row 0: text, row 1: image), with ``nn.Embedding``'s init."""


class VisualNeck(nn.Module):
    """LaVIN's visual neck in the projector's place: ``Linear(in_dim -> hidden)``, SiLU,
    ``Linear(hidden -> out_dim)``, xavier-uniform weights and zero biases as LaVIN initialises it. It
    computes in its own (fp32) dtype and returns the features in the dtype they came in, as the
    projector it replaces did. The replaced projector is kept outside the module tree (no parameters,
    no state dict) for ``unpatch``; moves and casts of the model (``to``, ``cuda``, ``half``, ...) apply
    to it too."""

    def __init__(self, replaced: nn.Module, in_dim: int, out_dim: int, hidden: int, device=None):
        super().__init__()
        self.__dict__["replaced"] = replaced
        lin = functools.partial(_XavierLinear, device=device, dtype=torch.float32)
        self.add_module(NECK_NAME, nn.Sequential(lin(in_dim, hidden), nn.SiLU(), lin(hidden, out_dim)))

    def _apply(self, fn, recurse=True):
        self.replaced._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def forward(self, features: Tensor, *args, **kwargs) -> Tensor:
        neck = getattr(self, NECK_NAME)
        return neck(features.to(neck[0].weight.dtype)).to(features.dtype)


def _neck_for(hf: nn.Module, projector: nn.Module, out_dim: int, opts: MMAOptions) -> VisualNeck:
    """A visual neck that reads what ``projector`` reads: the vision features, ``vision_config.hidden_size``
    per selected layer (or the projector's first Linear's input width). Only a per-token projector can
    be replaced: one that maps [1, 4, width] features to [1, 4, D] (not a patch merger or pixel
    shuffle, which change the number of tokens, nor one that needs more arguments)."""
    if opts.neck_dim < 1:
        raise ValueError(f"MMAOptions(neck_dim={opts.neck_dim}) must be positive")
    cfg = getattr(hf, "config", None)
    vision_width = getattr(getattr(cfg, "vision_config", None), "hidden_size", None)
    select = getattr(cfg, "vision_feature_layer", None)
    first = next((m for m in projector.modules() if isinstance(m, nn.Linear)), None)
    if vision_width is not None:
        in_dim = vision_width * (len(select) if isinstance(select, (list, tuple)) else 1)
    elif first is not None:
        in_dim = first.in_features
    else:
        raise ValueError(f"MMAOptions(neck=True): cannot tell the width of the vision features {type(projector).__name__} "
                         f"reads (no vision_config.hidden_size, no Linear layer)")
    p = next(projector.parameters(), None)
    device = _home_device(projector) if p is not None else None
    probe = torch.zeros(1, 4, in_dim, device=device, dtype=p.dtype if p is not None else torch.float32)
    try:
        with gathered(projector.parameters()), torch.no_grad():
            out = projector(probe)
        ok = torch.is_tensor(out) and tuple(out.shape) == (1, 4, out_dim)
        why = "" if ok else f"it maps [1, 4, {in_dim}] features to {tuple(out.shape) if torch.is_tensor(out) else type(out).__name__}"
    except Exception as e:  # noqa: BLE001 - any failure means it is not a plain per-token projector
        ok, why = False, f"it does not take [1, 4, {in_dim}] features alone ({type(e).__name__}: {e})"
    if not ok:
        raise ValueError(f"MMAOptions(neck=True) replaces a per-token projector (vision features [B, T, {in_dim}] -> "
                         f"[B, T, {out_dim}]); {type(projector).__name__} is not one: {why}")
    return VisualNeck(projector, in_dim, out_dim, opts.neck_dim, device=device)


def _execution_device(module: nn.Module):
    """The device an Accelerate hook on ``module`` (``cpu_offload``, ``dispatch_model``, ``from_pretrained``
    with a ``device_map``) runs it on, or None."""
    hooks = [module.__dict__.get("_hf_hook")]
    while hooks:
        hook = hooks.pop()
        if hook is None:
            continue
        if getattr(hook, "execution_device", None) is not None:
            dev = hook.execution_device
            if isinstance(dev, int):  # an index of the machine's accelerator (CUDA, XPU, ...)
                acc = getattr(torch, "accelerator", None)
                kind = acc.current_accelerator() if acc is not None and acc.is_available() else None
                return torch.device(kind.type if kind is not None else "cuda", dev)
            return torch.device(dev)
        hooks.extend(getattr(hook, "hooks", ()))  # a SequentialHook
    return None


def _home_device(module: nn.Module) -> torch.device:
    """Where new parameters for ``module`` go: its parameters' device; for weights Accelerate offloads (on
    the meta device between forwards, loaded by its hooks), the device its hooks run it on, where the
    (small) adapters then stay. A model built on the meta device without hooks gets meta parameters,
    for its ``to_empty`` and initialisation."""
    p = next(module.parameters())
    if p.is_meta:
        for m in module.modules():
            dev = _execution_device(m)
            if dev is not None:
                return dev
    return p.device


def _adapter_like(module: nn.Module, dim: int, opts: MMAOptions) -> MMAdapter:
    """An adapter for ``module``, on its device and in its mode: a model in eval mode (as
    ``from_pretrained`` returns it) gets adapters without dropout until it is put in training mode."""
    adapter = MMAdapter(dim, hidden_dim=opts.hidden_dim, groups=opts.groups, experts=opts.experts, scale=opts.scale,
                        temperature=opts.temperature, dropout=opts.dropout, device=_home_device(module),
                        dtype=torch.float32)
    return adapter.train(module.training)


def added_modules(model: nn.Module) -> list[str]:
    """Paths of the adapters and the modality embedding ``insert_mma`` added to ``model``."""
    return [n for n, _ in model.named_modules() if n.split(".")[-1] in (ADAPTER_NAME, EMBEDDING_NAME, NECK_NAME)]


#: Names a vision tower goes by (Pixtral / LLaVA, Qwen-VL, InternVL, ...), for the report.
_TOWER_NAMES = ("vision_tower", "visual", "vision_model", "vision_encoder")


def options_differ(were: dict, now: dict, ignore: tuple = ()) -> list[str]:
    """The MMAOptions fields of ``were`` (as dicts: a file of an earlier version may lack newer ones) that
    ``now`` has otherwise: ``neck_dim`` only where a neck is made (it sizes nothing without one), and none of
    ``ignore``."""
    neckless = not were.get("neck") and not now.get("neck")
    return [k for k in were if k not in ignore and were[k] != now.get(k) and not (k == "neck_dim" and neckless)]


def _reapply_problem(hf: nn.Module, opts: MMAOptions) -> Optional[str]:
    """Why ``tuning='mma'`` with ``opts`` cannot go again on ``hf``, which has it already (None: patching
    again is patching once)."""
    has_neck = any(isinstance(m, VisualNeck) for m in hf.modules())
    if has_neck != opts.neck:
        return (f"tuning='mma' is already applied {'with' if has_neck else 'without'} the visual neck; "
                f"mmfast.unpatch(model) first to patch with MMAOptions(neck={opts.neck})")
    applied = hf.__dict__.get(_OPTIONS)
    differ = [] if applied is None else options_differ(dataclasses.asdict(applied), dataclasses.asdict(opts))
    if differ:
        diff = ", ".join(f"{k}={getattr(applied, k)!r} (asked {getattr(opts, k)!r})" for k in differ)
        return (f"tuning='mma' is already applied with other options: {diff}; the adapters in the model keep "
                f"theirs. mmfast.unpatch(model) first to patch with the new ones")
    return None


def _parts_or_problem(model: nn.Module, opts: MMAOptions):
    """``(parts, neck, None)`` with the language model's parts (None: a vision tower alone) and the visual neck
    to insert (None: no neck, or MMA applied already), or ``(None, None, why tuning='mma' with opts cannot
    apply)``: asked before anything changes."""
    hf = _hf_model(model)
    try:
        parts, missing = find_parts(model), None
    except ValueError as exc:
        parts, missing = None, exc  # no LLaMA-style language model: vision adapters only (a CLIP/SigLIP tower)
    if added_modules(hf):  # applied already: the parts what trains is set again on
        if _OPTIONS not in hf.__dict__ and _STATE not in hf.__dict__:
            # not this model's (whose options, or an earlier version's routing state, it would hold): a module
            # it shares with a model patched with tuning='mma' holds them
            return None, None, (f"tuning='mma': {', '.join(added_modules(hf)[:2])}{', ...' if len(added_modules(hf)) > 2 else ''} "
                                f"already hold MMA adapters, but {type(hf).__name__} was not patched with "
                                "tuning='mma': a module it shares with another model patched so (a frozen vision tower "
                                "or language model shared by a policy and a reference model, say) carries them, and "
                                "MMA's adapters train "
                                "per model. Give this model its own copy of that module (copy.deepcopy), or "
                                "mmfast.unpatch the other model first")
        return parts, None, _reapply_problem(hf, opts)
    if missing is not None and _has_language_model(hf):
        # a language model the adapters cannot go into: the tower's alone are not MMA
        return None, None, (f"tuning='mma' found no LLaMA-style decoder layers (input_layernorm and "
                            f"post_attention_layernorm) in {type(hf).__name__}'s language model, so its adapters "
                            f"would go into the vision tower alone. ({missing})")
    cross = [i for i, layer in enumerate(parts.decoder.layers) if hasattr(layer, "cross_attn")] if parts else []
    if cross:
        return None, None, (f"tuning='mma' runs its modality token through every decoder layer, and "
                            f"{type(hf).__name__}'s layers {cross} are cross-attention layers, which need the "
                            f"image states (Mllama); MMA does not support such decoders. The LayerNorm recipes do")
    needs = sorted(set(inspect.signature(type(parts.decoder.layers[0]).forward).parameters)
                   & {"per_layer_input", "shared_kv_states"}) if parts and len(parts.decoder.layers) else []
    if needs:
        return None, None, (f"tuning='mma' runs its modality token through each decoder layer alone, and "
                            f"{type(parts.decoder.layers[0]).__name__} takes {' and '.join(needs)}, which its model "
                            f"computes for the whole forward (from the token ids, and the keys and values one "
                            f"layer shares with later ones: Gemma 3n, Gemma 4); MMA does not support such "
                            f"decoders. The LayerNorm recipes do")
    if parts is None and not _vision_layers(hf):
        return None, None, (f"tuning='mma' found neither a LLaMA-style language model nor CLIP/SigLIP encoder layers "
                      f"in {type(hf).__name__}")
    neck = None
    if opts.neck:
        if parts is None or parts.projector is None:
            return None, None, f"MMAOptions(neck=True) replaces the multimodal projector, and {type(hf).__name__} has none"
        try:  # a projector the neck cannot stand in for (one that merges tokens) is refused here, not midway
            neck = _neck_for(hf, parts.projector, _llm_width(parts), opts)
        except ValueError as exc:
            return None, None, str(exc)
    if parts is not None:  # (a neck takes the projector's place: the projector itself stays frozen)
        trained = parts.projector_modules() if neck is None else list(parts.projector_siblings)
        problem = untrainable_problem(hf, "mma", trained, parts.projector_params)
        if problem is not None:
            return None, None, problem
    return parts, neck, None


def _llm_width(parts) -> int:
    return full_shape(parts.decoder.layers[0].input_layernorm.weight)[0]


def _config_id(config, kind: str) -> Optional[int]:
    """``config.<kind>_token_id`` (or the older ``<kind>_token_index``)."""
    # (Phi-4-multimodal keeps its image token id in vision_config only)
    for owner in (config, getattr(config, "vision_config", None) if kind == "image" else None):
        for name in (f"{kind}_token_id", f"{kind}_token_index"):
            value = getattr(owner, name, None)
            if isinstance(value, int):
                return value
    return None


def _has_language_model(hf: nn.Module) -> bool:
    """Whether ``hf`` generates text: an LM head it hands out, or a language model or text decoder inside
    (BLIP's BERT-style ``text_decoder`` hands out no output embeddings). A dual encoder's text tower
    (CLIP's ``text_model``) is not one."""
    return _has_lm_head(hf) or any(name.rpartition(".")[2] in ("language_model", "text_decoder")
                                   for name, _ in hf.named_modules())


def _has_lm_head(hf: nn.Module) -> bool:
    get = getattr(hf, "get_output_embeddings", None)
    try:
        return callable(get) and isinstance(get(), nn.Module)
    except (AttributeError, NotImplementedError):
        return False


def insert_mma(model: nn.Module, opts: Optional[MMAOptions] = None) -> list[tuple[str, str]]:
    """Add MMA adapters, the modality embedding and their hooks to ``model`` (idempotent); with
    ``opts.neck`` replace the multimodal projector with a visual neck; make the MMA parameters and the
    projector (or neck) trainable and freeze the rest. Returns the vision layers left without an
    adapter, as (path, reason) pairs. Everything that can refuse (a ValueError) is checked before the
    model is changed."""
    opts = opts or MMAOptions()
    hf = _hf_model(model)
    _wrap_generation()  # (before any forward: a prompt cache saved with flags may be loaded)
    vision = _vision_layers(hf)
    read = _read_vision_layers(hf, vision)
    paths = {id(m): n for n, m in model.named_modules()}
    read_at = _vision_states_read(getattr(hf, "config", None))
    unread = [(paths.get(id(m), "?"), f"no MMA adapter: the model reads the vision tower's hidden states at "
               f"{read_at[1] if read_at else '?'}, and this layer's output is not used")
              for m in vision if id(m) not in {id(r) for r in read}]
    if not vision and getattr(hf.config, "vision_config", None) is not None:
        tower = next((paths.get(id(m), n) for n, m in hf.named_modules() if n.split(".")[-1] in _TOWER_NAMES),
                     "vision tower")
        unread.append((tower, "no MMA adapters: its layers are not CLIP/SigLIP encoder layers (no layer_norm1); "
                              "the language model's adapters and routing are inserted as usual"))
    parts, neck, problem = _parts_or_problem(model, opts)
    if problem is not None:
        raise ValueError(problem)
    if added_modules(hf):  # applied already, with these options: what trains is set again, as a recipe's is
        _train_mma(model, hf, parts)
        return unread
    hf.__dict__[_OPTIONS] = dataclasses.replace(opts)  # a copy: the caller may change theirs
    _modality_pass_uncompiled()  # (in eager code: see there)

    if parts is not None:
        state = _state(hf)
        dim = _llm_width(parts)
        for layer in parts.decoder.layers:
            adapter = _adapter_like(layer, dim, opts)
            layer.add_module(ADAPTER_NAME, adapter)
            layer.input_layernorm.__dict__[_SLOT] = _LayerSlot(adapter, state)
            layer.input_layernorm.register_forward_hook(_llm_norm_adapter_hook)
        parts.decoder.add_module(EMBEDDING_NAME, ModalityEmbedding(2, dim, device=_home_device(parts.decoder),
                                                                   dtype=torch.float32)
                                 .train(parts.decoder.training))
        parts.decoder.__dict__[_STATE] = state
        parts.decoder.register_forward_pre_hook(_modality_pre_hook, with_kwargs=True)
        parts.decoder.register_forward_hook(_clear_bridge_hook, always_call=True)
        embeddings = parts.decoder.get_input_embeddings()
        if isinstance(embeddings, nn.Module):  # (hooked here, so that a compiled first forward finds it hooked)
            _hook_lookup(embeddings, state)
        hf.register_forward_pre_hook(_flags_pre_hook, with_kwargs=True)
        hf.register_forward_hook(_clear_bridge_hook, always_call=True)
        # shown in the signature of a patched forward (the fused loss's), so that HF Trainer keeps the column
        hf.__dict__[EXTRA_KWARGS_ATTR] = (HAS_IMAGE_KWARG,)
        if neck is not None:  # built when the options were checked
            neck.train(parts.projector.training)
            owner, _, name = next(n for n, m in hf.named_modules() if m is parts.projector).rpartition(".")
            setattr(hf.get_submodule(owner), name, neck)
            parts.projector.requires_grad_(False)  # out of the model now, frozen with the rest
            parts.projector = neck

    with_cls = _layers_with_cls(hf)
    read_ids = {id(m) for m in read}
    for layer in vision:  # a layer whose output is not read gets no adapter, and the same hooks (_LayerSlot)
        adapter = None
        if id(layer) in read_ids:
            adapter = _adapter_like(layer, layer.layer_norm1.normalized_shape[0], opts)
            layer.add_module(ADAPTER_NAME, adapter)
        if id(layer) in with_cls:
            layer.layer_norm1.__dict__[_SLOT] = _LayerSlot(adapter)
            layer.layer_norm1.register_forward_hook(_vision_cls_hook)
        else:
            layer.layer_norm1.__dict__[_SLOT] = _LayerSlot(adapter, mask=_TokenMask())
            layer.register_forward_pre_hook(_vision_padding_hook, with_kwargs=True)
            layer.register_forward_hook(_vision_padding_node_hook)
            layer.layer_norm1.register_forward_hook(_vision_tokens_hook)

    _train_mma(model, hf, parts)
    return unread


#: On the module MMA's modality pass runs from: the cast warning's record (once per model, until a patch again)
_SAID_CAST = "_mmfast_said_mma_cast"


def _train_mma(model: nn.Module, hf: nn.Module, parts) -> None:
    """Freeze ``model`` but for MMA's modules, the projector (or neck) and PEFT's adapters. MMA's modules train
    in fp32, as they were made: a cast to 16 bits since patching (which the modality pass warns about) is undone, but
    for a ZeRO-3 partition, whose optimizer keeps fp32 masters of its own."""
    kept = peft_trainables(model)  # PEFT's adapters keep training beside MMA's
    for p in model.parameters():
        p.requires_grad_(False)
    if parts is not None:  # the cast warning, re-armed: this patch widens them back to fp32
        parts.decoder.__dict__[_SAID_CAST] = {"owner": patch_name(model)}
    for n in added_modules(hf):
        module = hf.get_submodule(n)
        for p in module.parameters():
            if p.dtype.itemsize < 4 and not partitioned(p):  # (float64, cast for a reference run, stays)
                p.data = p.data.to(torch.float32)
        module.requires_grad_(True)
    if parts is not None:
        parts.train_projector()
    for p in kept:
        p.requires_grad_(True)


def remove_mma(model: nn.Module) -> int:
    """Remove every MMA adapter, the modality embedding and their hooks, and put back a projector a
    visual neck replaced; returns how many modules went."""
    removed = 0
    for m in list(model.modules()):
        for name, child in list(m._modules.items()):
            if isinstance(child, VisualNeck):
                m._modules[name] = child.replaced
                removed += 1
        remove_hooks(m, _ours)
        for name in (ADAPTER_NAME, EMBEDDING_NAME):
            if name in m._modules:
                del m._modules[name]
                removed += 1
        m.__dict__.pop(_STATE, None)
        m.__dict__.pop(_BRIDGE_HOOKED, None)
        m.__dict__.pop(_SLOT, None)
        m.__dict__.pop(_OPTIONS, None)
        m.__dict__.pop(EXTRA_KWARGS_ATTR, None)
    return removed
