"""Parameters that DeepSpeed ZeRO-3 partitioned in place (a model built under ``deepspeed.zero.Init``, as
``from_pretrained`` does under a ZeRO-3 config): their ``.data`` is empty on every rank, and their full
shape is ``ds_shape``."""

from __future__ import annotations

import contextlib
from typing import Iterable

from torch import nn


def partitioned(p: nn.Parameter) -> bool:
    return hasattr(p, "ds_id")


def full_shape(p: nn.Parameter) -> tuple[int, ...]:
    return tuple(p.ds_shape) if partitioned(p) else tuple(p.shape)


def full_numel(p: nn.Parameter) -> int:
    return int(p.ds_numel) if partitioned(p) else p.numel()


def gathered(params: Iterable[nn.Parameter], modifier_rank=None):
    """A context in which the partitioned ones among ``params`` hold their full values (every rank must
    enter it); with ``modifier_rank`` that rank's changes are partitioned again on exit. A no-op for
    ordinary parameters."""
    parts = [p for p in params if partitioned(p)]
    if not parts:
        return contextlib.nullcontext()
    try:
        import deepspeed
    except ImportError as e:
        raise RuntimeError("mmfast: ZeRO-3 partitioned parameters, but deepspeed cannot be imported to gather "
                           "them") from e

    return deepspeed.zero.GatheredParameters(parts, modifier_rank=modifier_rank)
