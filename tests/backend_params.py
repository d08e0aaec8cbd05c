"""The backends a module's tests run once each (an autouse fixture parametrised over ``BACKENDS``).

* ``auto``: Triton (natively on a GPU, through the interpreter on CPU); no backend table is consulted
  without one;
* ``cuda`` (GPU): the CUDA C++ kernels, built on first use; a GPU machine where they do not build fails
  rather than skipping;
* ``emulated-cuda`` (no GPU): the ``cuda`` backend's whole path (ops layer, ``cuda_ext`` launchers, and
  ``csrc/binding.cpp`` itself, built for CPU tensors) over the emulated kernels
  (cuda_emulator.register_cpu_ops).
"""

from __future__ import annotations

import torch

from mmfast.ops.backend import ENV_VAR


BACKENDS = ["auto", "cuda"] if torch.cuda.is_available() else ["auto", "emulated-cuda"]


def select(name: str, monkeypatch) -> str:
    """Make ``name`` the backend of the running test (undone with ``monkeypatch``); returns it."""
    if name == "cuda":
        from mmfast.kernels import cuda_ext

        assert cuda_ext.load(), f"the CUDA C++ backend did not load: {cuda_ext.unavailable_reason()}"
        monkeypatch.setenv(ENV_VAR, "cuda")
    elif name == "emulated-cuda":
        import pytest

        import cuda_emulator
        from mmfast.ops import backend

        if cuda_emulator.unavailable_reason():
            pytest.skip(f"emulated CUDA C++ kernels: {cuda_emulator.unavailable_reason()}")
        cuda_emulator.register_cpu_ops()
        monkeypatch.setenv(ENV_VAR, "cuda")
        monkeypatch.setattr(backend, "cuda_can_run", lambda device: None)
    return name
