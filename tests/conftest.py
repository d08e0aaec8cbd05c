"""Test setup: with no CUDA device, Triton kernels run through the interpreter.

``TRITON_INTERPRET`` has to be decided before Triton is imported, so it is set here, before any test
module imports mmfast. On a GPU machine nothing is set and the same tests run natively.
"""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and "OMP_NUM_THREADS" not in os.environ:
    # a worker of a parallel run (the README's command: one per core): each worker's torch took a thread
    # per core, and the workers' OpenMP pools spun against each other (test_norm.py and test_mlp_patch.py
    # took 111 s on two cores, 95 s with a core's share each)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def seed():
    """A fresh random seed per test (printed in failure messages so a failure can be replayed)."""
    s = int(os.environ.get("MMFAST_TEST_SEED", 0)) or torch.seed() % (2**31)
    torch.manual_seed(s)
    return s


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps its state in process-wide singletons, and every trainer (HF Trainer, TRL) sets
    them: after TRL's SFTConfig (bf16 by default) a later ``Accelerator(cpu=True)`` in the same process
    ran the model under bf16 autocast. Each test starts from fresh state (only where a test has imported
    accelerate)."""
    import sys

    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    yield
