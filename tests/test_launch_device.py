"""The Triton launchers run on their tensors' device, not the current one.

Triton launches on the current device and its stream. A model split over GPUs (``device_map="auto"``)
runs layers on ``cuda:1`` while ``cuda:0`` is current: without a switch the kernel ran on the wrong
device's stream, unordered with the work that produced its inputs (the CUDA C++ ops guard the device).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import mmfast
from mmfast.kernels import _device, adapter, norm, quick_gelu, swiglu

#: every launcher the ops call on the Triton backend
LAUNCHERS = [norm.norm_fwd, norm.norm_bwd, adapter.keep_mask, adapter.adapter_fwd, adapter.adapter_bwd,
             swiglu.swiglu_fwd, swiglu.swiglu_bwd, quick_gelu.quick_gelu_fwd, quick_gelu.quick_gelu_bwd]


@pytest.mark.parametrize("launcher", LAUNCHERS, ids=lambda f: f.__name__)
def test_every_launcher_switches_to_its_tensors_device(launcher):
    assert getattr(launcher, "on_tensor_device", False), f"{launcher.__name__} launches on the current device"


class _OnCuda1(torch.Tensor):
    """A CPU tensor that says it lives on cuda:1 (this machine may have no GPU at all)."""

    @property
    def is_cuda(self):
        return True

    @property
    def device(self):
        return torch.device("cuda", 1)


def test_the_switch_enters_the_tensors_device_and_only_when_it_differs(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def fake_device(index):
        entered.append(index)
        yield

    current = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[-1])
    monkeypatch.setattr(torch.cuda, "device", fake_device)
    launch = _device.on_tensor_device(lambda tag, x, y=None: (tag, list(entered)))
    x = torch.zeros(2).as_subclass(_OnCuda1)

    current.append(0)
    assert launch("a", x) == ("a", [1])  # switched while the launcher ran
    entered.clear()
    current.append(1)
    assert launch("b", x, y=3) == ("b", [])  # already current: no switch
    assert launch("c", torch.zeros(2)) == ("c", [])  # a CPU tensor (the interpreter): no switch


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_norm_on_the_second_gpu_while_the_first_is_current():
    torch.cuda.set_device(0)
    x = torch.randn(64, 512, device="cuda:1", requires_grad=True)
    w = torch.randn(512, device="cuda:1", requires_grad=True)
    with mmfast.use_backend("triton"):
        y = mmfast.rms_norm(x, w, 1e-6)
        y.square().sum().backward()
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + 1e-6) * w64
    ref.square().sum().backward()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-4)


def test_every_launch_asks_for_fused_multiply_adds(monkeypatch, device):
    """Each Triton kernel is launched with enable_fp_fusion=True: the contraction every measurement and the
    bitwise tests assume, not Triton's default (Triton 3.9 warns at each launch that leaves it to the default,
    and 3.10 turns it off). Every kernel of the launchers' modules is launched here at least once."""
    from spy import triton_kernels

    launches: dict[str, list] = {}

    class Recording:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launch = self.kernel[grid]

            def run(*args, **kwargs):
                launches.setdefault(self.name, []).append(kwargs.get("enable_fp_fusion"))
                return launch(*args, **kwargs)

            return run

    kernels = set()
    for module, name, obj in triton_kernels():
        monkeypatch.setattr(module, name, Recording(name, obj))
        kernels.add(name)
    monkeypatch.setattr(norm, "MAX_FUSED_N_FWD", 64)  # (rows of 100 take the two-pass kernels)
    monkeypatch.setattr(norm, "MAX_FUSED_N_BWD", 64)
    g = torch.Generator().manual_seed(0)

    def randn(*shape):  # on the device: compiled launchers take no CPU tensor (only the interpreter does)
        return torch.randn(*shape, generator=g).to(device)

    for N in (48, 100):
        x, dy = (randn(3, N) for _ in range(2))
        w, b = randn(N), randn(N)
        for rms in (True, False):
            y, _, mean, rstd = norm.norm_fwd(x, w, None if rms else b, None, 1e-6, rms)
            norm.norm_bwd(dy, x, w, mean, rstd, None, rms, True, True, not rms)
    B, S, D, R, G, E = 2, 3, 32, 8, 2, 2
    x2, dy2 = (randn(B * S, D) for _ in range(2))
    down_w, down_b = randn(R, D) / 8, randn(R)
    up_w, up_b = randn(E, D, R // G), randn(E, D)
    mix = torch.softmax(randn(B, E), -1)
    seed = torch.tensor([7], device=device)
    adapter.keep_mask(seed, B * S, R, 0.25)
    y, z = adapter.adapter_fwd(x2, S, down_w, down_b, up_w, up_b, mix, 1.0, G, 0.25, seed)
    adapter.adapter_bwd(dy2, x2, z, S, down_w, up_w, up_b, mix, 1.0, G, 0.25, seed, True, True, True)
    gate, up = (randn(4, 40) for _ in range(2))
    swiglu.swiglu_bwd(swiglu.swiglu_fwd(gate, up), gate, up)
    quick_gelu.quick_gelu_bwd(quick_gelu.quick_gelu_fwd(gate), gate)
    assert set(launches) == kernels, kernels - set(launches)
    assert {name: set(calls) for name, calls in launches.items()} == {name: {True} for name in kernels}
