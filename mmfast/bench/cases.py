"""Benchmark cases and their byte models: the fewest bytes each op must move through memory.

Per-row statistics and the weights (N-long vectors, or the adapter's few-MB parameters) are below
0.1% of the traffic at the benchmarked sizes and are not counted.
"""

from __future__ import annotations

import dataclasses

import torch

DIRECTIONS = ("fwd", "bwd", "fwd+bwd")
#: The kernel suite's ops, in the order the report lists them (a case's name adds "+residual" to a norm's)
KERNEL_OPS = ("rms_norm", "layer_norm", "mma_adapter", "swiglu", "quick_gelu")


def _elem(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


@dataclasses.dataclass(frozen=True)
class NormCase:
    op: str  # "rms_norm" | "layer_norm"
    M: int
    N: int
    dtype: torch.dtype
    residual: bool = False
    graphs: bool = False  # small shape: time CUDA-graph replays (launch overhead out of the way)

    @property
    def name(self) -> str:
        return self.op + ("+residual" if self.residual else "")

    def bytes_moved(self, direction: str) -> int:
        """fwd: read x (+ residual), write y (+ residual_out); bwd: read x and dy (+ the gradient of
        residual_out), write dx."""
        unit = self.M * self.N * _elem(self.dtype)
        fwd = unit * (4 if self.residual else 2)
        bwd = unit * (4 if self.residual else 3)
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction]


@dataclasses.dataclass(frozen=True)
class AdapterCase:
    """The MMA adapter on x [B, S, D] (M = B * S tokens), hidden R, G groups, E experts."""

    B: int
    S: int
    D: int
    dtype: torch.dtype
    R: int = 8
    G: int = 2
    E: int = 2
    graphs: bool = False
    op: str = "mma_adapter"

    @property
    def name(self) -> str:
        return self.op

    @property
    def M(self) -> int:
        return self.B * self.S

    @property
    def N(self) -> int:
        return self.D

    def bytes_moved(self, direction: str) -> int:
        """fwd: read x, write y; bwd: read x and dy, write dx."""
        unit = self.M * self.D * _elem(self.dtype)
        return {"fwd": 2 * unit, "bwd": 3 * unit, "fwd+bwd": 5 * unit}[direction]


class _MlpActivationCase:
    """An elementwise MLP activation on [M, I] tensors (M tokens, I = intermediate_size); subclasses give
    ``op`` and ``UNITS``, the [M, I] tensors each direction reads and writes."""

    UNITS: dict[str, int] = {}

    @property
    def name(self) -> str:
        return self.op

    @property
    def N(self) -> int:
        return self.I

    def bytes_moved(self, direction: str) -> int:
        return self.UNITS[direction] * self.M * self.I * _elem(self.dtype)


@dataclasses.dataclass(frozen=True)
class SwiGLUCase(_MlpActivationCase):
    """The SwiGLU gate of a LLaMA MLP on gate and up [M, I]: fwd reads gate and up, writes h; bwd reads
    dh, gate and up, writes dgate and dup."""

    M: int
    I: int  # noqa: E741 - the MLP's intermediate width, as in the papers
    dtype: torch.dtype
    op: str = "swiglu"
    UNITS = {"fwd": 3, "bwd": 5, "fwd+bwd": 8}


@dataclasses.dataclass(frozen=True)
class QuickGELUCase(_MlpActivationCase):
    """CLIP's MLP activation ``x * sigmoid(1.702 x)`` on x [M, I]: fwd reads x, writes y; bwd reads dy and
    x, writes dx."""

    M: int
    I: int  # noqa: E741 - the MLP's intermediate width
    dtype: torch.dtype
    op: str = "quick_gelu"
    UNITS = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}
