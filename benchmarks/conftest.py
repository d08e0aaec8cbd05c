"""pytest-benchmark cases over mmfast.bench's code: ``pytest benchmarks/ --benchmark-only``.

On a GPU the cases are the benchmark's full GPU sizes; without one, its tiny sizes (CPU timings,
not GPU performance). Each test stores the record mmfast.bench would write (CUDA-event median, GB/s,
fraction of copy bandwidth, peak memory, device, versions, commit) in ``benchmark.extra_info``.
"""

import pytest
import torch

from mmfast.bench.env import environment
from mmfast.bench.timing import copy_gbps

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def device():
    return DEVICE


@pytest.fixture(scope="session")
def env():
    return environment(DEVICE)


@pytest.fixture(scope="session")
def copy():
    return copy_gbps(DEVICE, (1 << 30) if DEVICE.type == "cuda" else (1 << 24))
