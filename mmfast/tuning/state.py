"""Save and load only the trainable tensors of a tuned model (safetensors)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import weakref
from collections.abc import Mapping
from typing import Optional

import torch
from torch import nn

from .._zero import full_shape, gathered, partitioned

FORMAT = "mmfast-trainable"


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / FSDP1 / DeepSpeed (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            inner = model.module
        if inner is None and type(model).__name__ in ("FullyShardedDataParallel", "DeepSpeedEngine"):
            inner = model.module
        if inner is None:
            return model
        model = inner


#: Path components that wrappers insert into parameter names and ``state_dict`` leaves out: activation
#: checkpointing's ``checkpoint_wrapper``, FSDP1's wrapped modules, ``torch.compile``'s module.
_WRAPPER_COMPONENTS = re.compile(r"(?:^|(?<=\.))(?:_checkpoint_wrapped_module|_fsdp_wrapped_module|_orig_mod)\.")


def clean_name(name: str) -> str:
    """A parameter's name as the unwrapped model (and ``state_dict``) names it."""
    return _WRAPPER_COMPONENTS.sub("", name)


def _fsdp1_root(model: nn.Module):
    """The outermost FSDP1 (``FullyShardedDataParallel``) module in ``model``, or None."""
    return next((m for m in model.modules() if type(m).__name__ == "FullyShardedDataParallel"), None)


def distributed_holder(model: nn.Module) -> Optional[str]:
    """The distributed wrapper holding ``model``'s parameters, or None: DDP, FSDP1 or a DeepSpeed engine
    around it (what :func:`unwrap` steps through, but ``torch.compile``), FSDP2 (a ``fully_shard``
    module in it; a DTensor parameter alone may be tensor parallelism, which holds no copy), DeepSpeed's
    parameters (ZeRO-3 partitions, optimizer fp32 masters)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without distributed
        FSDPModule = None
    for m in model.modules():
        if isinstance(m, nn.parallel.DistributedDataParallel):
            return "DistributedDataParallel"
        if type(m).__name__ in ("FullyShardedDataParallel", "DeepSpeedEngine"):
            return type(m).__name__
        if FSDPModule is not None and isinstance(m, FSDPModule):
            return "FSDP2 (fully_shard)"
    if any(partitioned(p) or _deepspeed_master(p) for p in model.parameters()):
        return "DeepSpeed"
    return None


def _named_trainables(model: nn.Module):
    return ((clean_name(n), p) for n, p in unwrap(model).named_parameters() if p.requires_grad)


def _offload_hooks(hook):
    """The hooks in an Accelerate hook (one, or a ``SequentialHook`` of several) that offload weights."""
    for h in getattr(hook, "hooks", None) or (hook,):
        if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None:
            yield h


def _offloaded(inner: nn.Module, names) -> dict:
    """Clean name -> (weights map, key, storage) of each meta parameter of ``inner`` named in ``names`` whose
    value an Accelerate hook keeps off the module between forwards (``cpu_offload``, a ``device_map`` with
    "cpu" or "disk" entries): the hook loads ``weights_map[key]`` onto the execution device for each
    forward. ``storage`` is :func:`_storage`'s answer. Nothing is read (a disk-offloaded model's other
    weights would each be read from their files)."""
    names, out = set(names), {}
    for mod_name, module in inner.named_modules():
        for hook in _offload_hooks(module.__dict__.get("_hf_hook")):
            for local, p in module.named_parameters(recurse=bool(getattr(hook, "place_submodules", False))):
                name = clean_name(f"{mod_name}.{local}" if mod_name else local)
                if p.is_meta and name in names and name not in out:
                    storage = _storage(hook.weights_map, local)
                    if storage is not None:
                        out[name] = (hook.weights_map, local, storage)
    return out


def _storage(weights_map, key: str) -> Optional[str]:
    """Where an Accelerate weights map keeps ``key``, told from its keys: "memory" (one tensor, handed out
    at each access: writing into it is what the next forward loads), "disk" (read from its file at each
    access), or None (not there)."""
    while hasattr(weights_map, "dataset") and hasattr(weights_map, "prefix"):  # a PrefixedDataset
        key, weights_map = weights_map.prefix + key, weights_map.dataset
    state, index = getattr(weights_map, "state_dict", None), getattr(weights_map, "index", None)
    if isinstance(state, dict) and isinstance(index, Mapping):  # an OffloadedWeightsLoader
        return "memory" if key in state else "disk" if key in index else None
    if isinstance(weights_map, dict):  # a state dict
        return "memory" if key in weights_map else None
    try:  # another mapping: asked (which may read it)
        return ("memory" if weights_map[key] is weights_map[key] else "disk") if key in weights_map else None
    except Exception:  # noqa: BLE001 - not a mapping this understands: left to the meta check
        return None


def _offloaded_value(where: tuple) -> torch.Tensor:
    weights_map, key, _ = where
    return weights_map[key]


def _deepspeed_master(p: torch.Tensor) -> bool:
    """Whether a DeepSpeed optimizer keeps an fp32 master of ``p`` (ZeRO-1/2/3, its bf16 optimizer): the
    trained value is the master's; the module's 16-bit copy is its rounding (a norm update below bf16's
    resolution lives in the master alone)."""
    return hasattr(p, "_hp_mapping") or (partitioned(p) and hasattr(p, "_z3_optimizer"))


def _gathered_tensor(p: torch.Tensor) -> torch.Tensor:
    if _deepspeed_master(p):  # gathered from every rank's fragment (a collective)
        from deepspeed.utils import safe_get_full_fp32_param

        master = safe_get_full_fp32_param(p)
        if master is not None:
            return master.detach().cpu().contiguous()
    if partitioned(p):  # every rank gathers it
        with gathered([p]):
            return p.detach().clone().cpu().contiguous()
    t = p.detach()
    if hasattr(t, "full_tensor"):  # FSDP2 / DTensor shard
        t = t.full_tensor()
    return t.cpu().contiguous()


def _fsdp1_units(root: nn.Module, inner: nn.Module):
    """``(unit, own parameters)`` for each FSDP1 unit under ``root``: the parameters a unit's own flat
    parameter holds (not its nested units'), with their names under ``inner``."""
    paths = {id(m): n for n, m in inner.named_modules()}

    def own(module: nn.Module, prefix: str):
        for name, p in module.named_parameters(recurse=False):
            yield f"{prefix}{name}", p
        for name, child in module.named_children():
            if type(child).__name__ != "FullyShardedDataParallel":
                yield from own(child, f"{prefix}{name}.")

    for unit in root.modules():
        if type(unit).__name__ == "FullyShardedDataParallel":
            path = paths.get(id(unit), "")
            yield unit, lambda unit=unit, path=path: own(unit, f"{path}." if path else "")


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> full tensor of every parameter that requires grad, named as in the unwrapped model's
    ``state_dict`` (FSDP1's flat-parameter shards, FSDP2's DTensor shards and DeepSpeed ZeRO-3 partitions
    are gathered: in a distributed run every rank must call this). Where a DeepSpeed optimizer keeps an
    fp32 master of a parameter (a bf16 / fp16 run), the master is saved, not the module's rounded copy.

    FSDP1 units are gathered one at a time, and only those that hold a trainable parameter, so that saving
    never needs more memory than the largest unit (a whole unsharded model could not fit)."""
    root = _fsdp1_root(model)
    if root is None:
        trainables = dict(_named_trainables(model))
        offloaded = _offloaded(unwrap(model), trainables)
        empty = [n for n, p in trainables.items() if p.is_meta and n not in offloaded]
        if empty:
            listed = ", ".join(empty[:3]) + (f" and {len(empty) - 3} more" if len(empty) > 3 else "")
            raise ValueError(f"save_trainable: {len(empty)} trainable parameters hold no values, on the meta "
                             f"device ({listed}): the model was patched on the meta device and its weights "
                             "loaded since without these (a checkpoint without mmfast's modules). Patch after "
                             "loading the weights")
        return {name: _gathered_tensor(_offloaded_value(offloaded[name]) if name in offloaded else p)
                for name, p in trainables.items()}
    # parameters saved so far, by id, with a weak reference that tells a live object from one that took a
    # freed one's id (without use_orig_params every summon makes new parameter objects and frees them after)
    out, seen = {}, {}

    def saved(p: torch.Tensor) -> bool:
        ref = seen.get(id(p))
        return ref is not None and ref() is p

    for unit, own in _fsdp1_units(root, unwrap(model)):
        # (the root always: its summon is what initialises FSDP from the root; a nested unit summoned first
        # would take the root's part, and the model's next forward would fail)
        if unit is not root and not any(p.requires_grad and not saved(p) for _, p in own()):
            continue  # the same on every rank: all skip it together
        with type(unit).summon_full_params(unit, recurse=False, writeback=False):
            for name, p in own():
                if p.requires_grad and not saved(p):  # a tied parameter once, under its first name
                    seen[id(p)] = weakref.ref(p)
                    out[clean_name(name)] = p.detach().cpu().contiguous().clone()
    return dict(sorted(out.items()))


#: metadata key of the MMA options the saved adapters were trained with
_MMA_KEY = "mma_options"


def _mma_options(model: nn.Module) -> Optional[dict]:
    from .mma import _OPTIONS

    for m in unwrap(model).modules():
        opts = m.__dict__.get(_OPTIONS)
        if opts is not None:
            return dataclasses.asdict(opts)
    return None


def save_trainable(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Write the trainable parameters of ``model`` to ``path`` (safetensors); returns their names.

    In a distributed run (``torch.distributed`` initialised) call it on every rank: sharded parameters
    are gathered collectively, rank 0 writes the file, and every rank returns once it is written."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    from .. import __version__

    tensors = trainable_state(model)
    if not tensors:
        raise ValueError("save_trainable: the model has no trainable parameters (apply a tuning recipe first)")
    distributed = dist.is_available() and dist.is_initialized()
    error = None
    if not distributed or dist.get_rank() == 0:
        try:
            meta = {"format": FORMAT, "mmfast": __version__, "model_class": type(unwrap(model)).__name__}
            options = _mma_options(model)
            if options is not None:  # what the adapters compute with besides their weights (temperature, scale)
                meta[_MMA_KEY] = json.dumps(options, sort_keys=True, default=_json_number)
            if os.path.isdir(path):
                raise ValueError(f"save_trainable: {path} is a directory; pass the path of the file to write "
                                 f"(e.g. {os.path.join(path, 'mmfast.safetensors')})")
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            save_file(tensors, str(path), metadata=meta)
        except Exception as e:  # noqa: BLE001 - the other ranks are told, then it is raised
            error = e
    if distributed and not _all_ranks_ok(error is None) and error is None:  # (also the wait for rank 0's write)
        raise RuntimeError(f"save_trainable: rank 0 could not write {path} (its error says why)")
    if error is not None:
        raise error
    return sorted(tensors)


def _json_number(value):
    """A number type json does not know (a NumPy scalar in an option, say) as the Python number it holds."""
    item = getattr(value, "item", None)
    if callable(item):
        return item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _all_ranks_ok(ok: bool) -> bool:
    """Whether every rank says ``ok`` (a collective: every rank must ask). A rank that failed alone would
    otherwise leave the others waiting in the next collective for good."""
    import torch.distributed as dist

    backend = str(dist.get_backend())
    device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend and torch.cuda.is_available() \
        else torch.device("cpu")
    flag = torch.tensor([1 if ok else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def load_trainable(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> list[str]:
    """Copy the tensors saved by :func:`save_trainable` into ``model``'s parameters.

    Under DeepSpeed the values also go into the optimizer's fp32 masters (its next step would otherwise
    put the old values back), and ZeRO-3 partitions are written through a gather: there, call it on
    every rank.

    Every saved tensor must name a materialised (not meta) parameter of the same shape and a floating
    dtype if the parameter's is, and MMA adapters must have the options they were saved with (all but
    dropout: a temperature or scale changes what the same weights compute); with ``strict`` the file must
    hold exactly the trainable parameters of ``model`` (none missing, none frozen in the model: a
    checkpoint of another recipe). Anything else raises a ValueError that lists the mismatches, before any
    parameter is changed. ``strict=False`` also loads a file that lacks some trainables or holds frozen
    parameters (a trained state into a model for inference). Values are cast to each parameter's dtype.
    """
    import torch.distributed as dist

    inner = unwrap(model)
    params = {clean_name(n): p for n, p in inner.named_parameters()}
    # ZeRO-3 partitions are written through gathers, collectives every rank must reach: a rank whose file
    # is missing or does not match says so to the others before any of them waits in one
    collective = dist.is_available() and dist.is_initialized() and any(partitioned(p) for p in params.values())
    error = None
    try:
        meta, saved = _checked_file(model, inner, params, path, strict)
    except Exception as e:  # noqa: BLE001 - raised below, once the other ranks know
        error = e
    if collective and not _all_ranks_ok(error is None) and error is None:
        raise RuntimeError(f"load_trainable: another rank could not load {path} (its error says why)")
    if error is not None:
        raise error
    offloaded = _offloaded(inner, saved)
    with torch.no_grad():
        for name in sorted(saved):  # one order on every rank: the ZeRO-3 gathers are collectives
            p, t = params[name], saved[name]
            if name in offloaded:  # what the offloading hook loads for the next forward
                value = _offloaded_value(offloaded[name])
                value.copy_(t.to(dtype=value.dtype))
                continue
            with gathered([p], modifier_rank=0):  # rank 0's values partitioned again on exit (ZeRO-3)
                p.copy_(t.to(dtype=p.dtype))
            if _deepspeed_master(p):
                from deepspeed.utils import safe_set_full_fp32_param

                safe_set_full_fp32_param(p, t.to(dtype=torch.float32))
    refresh = getattr(getattr(model, "optimizer", None), "refresh_fp32_params", None)
    if callable(refresh) and not any(_deepspeed_master(p) for p in params.values()):
        refresh()  # DeepSpeed's fp16 optimizer without ZeRO: its fp32 masters are taken from the module again
    return sorted(saved)


def _checked_file(model: nn.Module, inner: nn.Module, params: dict, path, strict: bool) -> tuple[dict, dict]:
    """``(metadata, tensors)`` of a save_trainable file that fits ``model``, or the ValueError listing what does
    not."""
    from safetensors import SafetensorError, safe_open

    if os.path.isdir(path):
        inside = os.path.join(path, "mmfast.safetensors")
        hint = f"; it holds {inside}, which may be the one" if os.path.isfile(inside) else ""
        raise ValueError(f"load_trainable: {path} is a directory; pass the file save_trainable wrote{hint}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_trainable: no file {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"load_trainable: {path} was not written by mmfast.save_trainable")
            saved = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"load_trainable: {path} is not a safetensors file ({e}); save_trainable writes "
                         "safetensors (a torch.save file cannot be loaded here)") from e
    if _fsdp1_root(model) is not None:
        raise ValueError("load_trainable: the model is wrapped in FSDP (FullyShardedDataParallel), whose parameters are "
                         "each rank's flat shards; load before wrapping it")
    problems = []
    offloaded = _offloaded(inner, saved)
    now = _mma_options(model)
    if _MMA_KEY in meta and now is not None:  # the same weights give other outputs under other options
        were = json.loads(meta[_MMA_KEY])
        from .mma import options_differ

        problems += [f"MMAOptions.{k}: saved with {were.get(k)!r}, the model's adapters have {now.get(k)!r}"
                     for k in sorted(options_differ(were, now, ignore=("dropout",)))]  # dropout: training's
    for name, t in saved.items():
        p = params.get(name)
        if p is None:
            problems.append(f"{name}: not a parameter of {type(inner).__name__}")
        elif name in offloaded and offloaded[name][2] == "disk":
            problems.append(f"{name}: offloaded to disk by Accelerate (each forward reads it from the file); "
                            "load before dispatching the model, or offload it to the CPU instead")
        elif name in offloaded:
            value = _offloaded_value(offloaded[name])
            if tuple(value.shape) != tuple(t.shape):
                problems.append(f"{name}: saved shape {tuple(t.shape)} != model's {tuple(value.shape)}")
            elif value.is_floating_point() and not t.is_floating_point():
                problems.append(f"{name}: saved as {t.dtype}, the model's parameter is {value.dtype}")
        elif p.is_meta:
            problems.append(f"{name}: the model's parameter is on the meta device (no memory to load into); load "
                            f"after model.to_empty(...)")
        elif p.is_floating_point() and not t.is_floating_point():
            problems.append(f"{name}: saved as {t.dtype}, the model's parameter is {p.dtype}")
        elif full_shape(p) != tuple(t.shape):
            problems.append(f"{name}: saved shape {tuple(t.shape)} != model's {full_shape(p)}")
        elif hasattr(p, "full_tensor"):
            problems.append(f"{name}: sharded (DTensor) parameter; load before fully_shard")
    if strict:
        problems += [f"{n}: trainable in the model but not in the file" for n, p in params.items()
                     if p.requires_grad and n not in saved]
        problems += [f"{n}: in the file but frozen in the model (a checkpoint of another recipe? "
                     "strict=False loads it anyway)" for n in saved if n in params and not params[n].requires_grad]
    if problems:
        saved_from = meta.get("model_class", "?")
        raise ValueError(
            f"load_trainable: {path} (saved from {saved_from}) does not match {type(inner).__name__}:\n  "
            + "\n  ".join(problems)
        )
    return meta, saved
