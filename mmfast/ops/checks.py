"""Input checks every op runs before anything launches: each names the op and the offending argument,
and raises TypeError (wrong kind of thing, wrong dtype) or ValueError (wrong shape, device, value)."""

from __future__ import annotations

import torch
from torch import Tensor

#: Activation dtypes the ops accept.
ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(fn: str, name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_activation(fn: str, name: str, t: object) -> Tensor:
    """A tensor in one of :data:`ACT_DTYPES`."""
    check_tensor(fn, name, t)
    if t.dtype not in ACT_DTYPES:
        raise TypeError(f"{fn}: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    return t


def check_device(fn: str, name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{fn}: {name} is on {t.device} but {ref_name} is on {ref.device}")


def check_like(fn: str, name: str, t: object, ref_name: str, ref: Tensor) -> None:
    """``t`` is a tensor with ``ref``'s dtype, shape and device (a residual beside x, up beside gate)."""
    check_tensor(fn, name, t)
    if t.dtype != ref.dtype:
        raise TypeError(f"{fn}: {name} must have {ref_name}'s dtype ({ref.dtype}), got {t.dtype}")
    if t.shape != ref.shape:
        raise ValueError(f"{fn}: {name} must have {ref_name}'s shape {tuple(ref.shape)}, got {tuple(t.shape)}")
    check_device(fn, name, t, ref_name, ref)
