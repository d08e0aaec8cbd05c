"""Shared by the GPU tuners (benchmarks/tune_adapter.py, benchmarks/tune_norm.py)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def outputs_close(ours: Sequence[Optional[torch.Tensor]], current: Sequence[Optional[torch.Tensor]]) -> bool:
    """Whether a candidate launch's outputs match the current launch's: a launch choice changes only the
    order of fp32 sums, so anything past 2% of the largest magnitude is a wrong kernel, not rounding."""
    for u, v in zip(ours, current):
        if u is None:
            continue
        u, v = u.float(), v.float()
        if not torch.allclose(u, v, rtol=2e-2, atol=2e-2 * v.abs().max().item() + 1e-6):
            return False
    return True
