"""Kernel and model-level benchmarks as pytest-benchmark cases (see conftest.py)."""

import pytest
import torch

from conftest import DEVICE
from mmfast.bench.__main__ import _model_record, _providers, kernel_cases, model_cases
from mmfast.bench.cases import DIRECTIONS
from mmfast.bench.runner import time_case, timed_call

QUICK = DEVICE.type != "cuda"
KERNEL_PAIRS = [(c, p) for c in kernel_cases(DEVICE, QUICK) for p in _providers(c, DEVICE)]
MODEL_PAIRS = [(c, p) for c in model_cases(DEVICE, QUICK, llm_layers=8) for p in _providers(c, DEVICE)]


def _id(pair):
    case, provider = pair
    return f"{case.name}-M{case.M}-N{case.N}{'-graphs' if getattr(case, 'graphs', False) else ''}-{provider}"


def _synced(call):
    def run():
        call()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)

    return run


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("pair", KERNEL_PAIRS, ids=_id)
def test_kernel(benchmark, pair, direction, device, env, copy):
    """``extra_info`` holds the suite's record (CUDA-event median, GPU busy time, GB/s, fraction of copy;
    CUDA-graph replays for the small shapes). pytest-benchmark's own statistics are host wall time of one
    synchronized eager call (no graph replay): for comparing runs of this file, not for quoting."""
    case, provider = pair
    (rec,) = time_case(case, provider, device, copy, env, directions=(direction,))
    benchmark.extra_info.update(rec)  # the record as mmfast.bench writes it, its empty fields included
    assert rec["error"] is None, rec["error"]
    call, _ = timed_call(case, provider, device, direction)
    benchmark.pedantic(_synced(call), rounds=20 if DEVICE.type == "cuda" else 3, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("pair", MODEL_PAIRS, ids=_id)
def test_model_train_step(benchmark, pair, device, env):
    """``extra_info`` holds the record ``mmfast.bench`` writes for this run."""
    case, provider = pair
    rec = benchmark.pedantic(lambda: _model_record(case, provider, device, env, steps=3 if QUICK else 10),
                             rounds=1, iterations=1)
    benchmark.extra_info.update(rec)
    assert rec["error"] is None, rec["error"]
