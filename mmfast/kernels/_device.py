"""Device facts the launch heuristics need, safe under the Triton interpreter.

The interpreter runs kernels on CPU tensors and cannot answer device queries, so every lookup here
has an interpreter answer that is a fixed, small constant: it keeps interpreted runs fast and makes
the persistent-grid code paths (several programs, several rows each) run in tests exactly as they do
on a GPU.
"""

from __future__ import annotations

import functools
import os

import torch

# Virtual multiprocessor count used under the Triton interpreter.
INTERPRETER_SM_COUNT = 2


def interpreting() -> bool:
    """True when Triton kernels run through the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off")


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming-multiprocessor count of ``device`` (a fixed constant under the interpreter)."""
    if interpreting() or device.type != "cuda":
        return INTERPRETER_SM_COUNT
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_sm_count(index)
