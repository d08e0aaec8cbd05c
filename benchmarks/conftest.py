"""pytest-benchmark cases over mmfast.bench's code: ``pytest benchmarks/ --benchmark-only``.

On a GPU the cases are the benchmark's full GPU sizes; without one, its tiny sizes (CPU timings,
not GPU performance). Each test stores the record mmfast.bench would write (CUDA-event median, GB/s,
fraction of copy bandwidth, peak memory, device, versions, commit) in ``benchmark.extra_info``.
"""

import os
import sys

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type != "cuda" and "TRITON_INTERPRET" not in os.environ and "triton" not in sys.modules:
    # as ``python -m mmfast.bench`` on CPU: mmfast's Triton kernels, through the interpreter (Triton reads
    # the variable when it is imported), not its pure-PyTorch reference
    os.environ["TRITON_INTERPRET"] = "1"

from mmfast.bench.env import CPU_BANNER, environment  # noqa: E402 - after the variable
from mmfast.bench.timing import copy_gbps  # noqa: E402


@pytest.fixture(scope="session")
def device():
    return DEVICE


@pytest.fixture(scope="session")
def env():
    # on CPU every record says what its timings are not (as the bench's CSV and results.json do)
    return {**environment(DEVICE), **({} if DEVICE.type == "cuda" else {"note": CPU_BANNER})}


@pytest.fixture(scope="session")
def copy():
    return copy_gbps(DEVICE, (1 << 30) if DEVICE.type == "cuda" else (1 << 24))


@pytest.hookimpl(trylast=True)  # (after pytest-benchmark's table)
def pytest_terminal_summary(terminalreporter):
    """pytest-benchmark's own table prints CPU times like any others: say what they are not, where it is read."""
    if DEVICE.type != "cuda":
        terminalreporter.write_sep("=", "CPU timings")
        terminalreporter.write_line(CPU_BANNER)
