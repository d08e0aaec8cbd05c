"""The switch that takes mmfast's kernels out of a model: ``MMFAST_DISABLE=1`` or ``with
mmfast.disabled():``. Patched modules then run their original forwards (``mmfast.patching``), and the
modules here that own parameters (the MMA adapter) their eager PyTorch composition.

It lives at the modules layer, below patching, so that both read one switch.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

_DISABLE_DEPTH = 0


def is_disabled() -> bool:
    """True inside ``mmfast.disabled()`` or when ``MMFAST_DISABLE`` is set to a true value."""
    return _DISABLE_DEPTH > 0 or os.environ.get("MMFAST_DISABLE", "0").strip().lower() not in ("", "0", "false", "off")


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """mmfast's kernels are out of the model inside this block (module docstring)."""
    global _DISABLE_DEPTH
    _DISABLE_DEPTH += 1
    try:
        yield
    finally:
        _DISABLE_DEPTH -= 1
