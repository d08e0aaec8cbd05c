"""Which implementation runs an op: ``triton``, ``reference`` (pure PyTorch), chosen per call.

``MMFAST_BACKEND`` forces one (``auto`` is the default):

* ``auto``: CUDA tensors run the Triton kernels; CPU tensors run the reference, or the Triton kernels
  through the interpreter when ``TRITON_INTERPRET=1``;
* ``triton``: always the Triton kernels; an error (not a fallback) where they cannot run;
* ``reference``: always the pure-PyTorch reference.

Nothing falls back silently: a forced backend that cannot run raises with the reason.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ..kernels._device import interpreting

ENV_VAR = "MMFAST_BACKEND"
BACKENDS = ("auto", "triton", "reference")


def requested_backend() -> str:
    """The backend ``MMFAST_BACKEND`` asks for (``auto`` when unset)."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r} is not one of {', '.join(BACKENDS)}")
    return value


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_can_run(device: torch.device) -> str | None:
    """None when the Triton kernels can run on ``device``, else the reason they cannot."""
    if not _triton_available():
        return "Triton is not installed (pip install triton)"
    if device.type == "cuda":
        return None
    if interpreting():
        return None if device.type == "cpu" else f"the Triton interpreter runs CPU tensors, not {device.type}"
    return (
        f"Triton kernels need CUDA tensors (got a {device.type} tensor); "
        "set TRITON_INTERPRET=1 to run them on CPU through the interpreter"
    )


def resolve_backend(device: torch.device) -> str:
    """The backend that runs an op on ``device`` now."""
    wanted = requested_backend()
    if wanted == "reference":
        return "reference"
    if wanted == "triton":
        reason = _triton_can_run(device)
        if reason is not None:
            raise RuntimeError(f"{ENV_VAR}=triton cannot run: {reason}")
        return "triton"
    # auto
    if device.type == "cuda":
        reason = _triton_can_run(device)
        if reason is not None:
            raise RuntimeError(f"no GPU backend for CUDA tensors: {reason} (or set {ENV_VAR}=reference)")
        return "triton"
    if device.type == "cpu" and interpreting() and _triton_available():
        return "triton"
    return "reference"
