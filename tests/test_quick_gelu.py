"""Fused QuickGELU (CLIP's MLP activation) against the float64 reference (accuracy rule: accuracy.py).

PyTorch's own low-precision implementation is what transformers' ``QuickGELUActivation`` computes:
``x * sigmoid(1.702 * x)`` in the activation dtype (three roundings), differentiated by autograd. Natural
scales: the largest ``|x s|`` for the output and ``|dy| (s + 1.702 |x| s (1 - s))`` for dx, s the sigmoid.
Elementwise, so bf16 runs through the interpreter too.
"""

import pytest
import torch

import mmfast
from accuracy import assert_accurate
from dispatch import dispatched_ops
from mmfast.ops.backend import EAGER_ENV, ENV_VAR
from mmfast.ops.quick_gelu import quick_gelu, quick_gelu_unfused
from transformers.activations import QuickGELUActivation

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
#: Elements pooled per check (small shapes are drawn again until this many: see test_swiglu.POOL).
POOL = 256


def _grads(fn, x, dy):
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    return y, torch.autograd.grad(y, x, dy.to(y.dtype))[0]


def check_quick_gelu(make, seed, fn=quick_gelu):
    """Output and dx of ``fn`` against the float64 reference, pooled over draws ``make(i) -> x``."""
    pooled, n = [], 0
    while True:
        x = make(len(pooled))
        dy = torch.randn_like(x)
        ours, lowp = _grads(fn, x, dy), _grads(QuickGELUActivation(), x, dy)
        # the definition with CLIP's constant written here, not the product's reference and ALPHA (the CPU
        # backend runs that reference)
        ref = _grads(lambda x: x * torch.sigmoid(1.702 * x), x.double(), dy.double())
        for a in ours:
            assert a.dtype == x.dtype and a.shape == x.shape
        x64, dy64 = x.double(), dy.double()
        s = torch.sigmoid(1.702 * x64)
        mags = [(x64 * s).abs(), dy64.abs() * (s + 1.702 * x64.abs() * s * (1 - s))]
        pooled.append((ours, lowp, ref, [m.max().item() if m.numel() else 0.0 for m in mags]))
        n += x.numel()
        if n >= POOL or x.numel() == 0:
            break
    for k, name in enumerate(("y", "dx")):
        cat = lambda part: torch.cat([p[part][k].flatten() for p in pooled])  # noqa: E731
        assert_accurate(name, cat(0), cat(1), cat(2), max(p[3][k] for p in pooled), seed)


SHAPES = [(3, 5, 200), (7, 2500), (4, 17), (1, 1), (2, 0, 64), (0, 8)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_matches_reference(shape, dtype, device, seed):
    check_quick_gelu(lambda i: (2 * torch.randn(shape, device=device)).to(dtype), seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_values(dtype, device, seed):
    """Inputs far into both tails (exp overflows in fp32 for the negative ones): finite and accurate."""
    x = torch.linspace(-100, 100, 403, device=device).to(dtype).view(13, 31)
    check_quick_gelu(lambda i: x, seed)


@pytest.mark.parametrize("backend", ["default", "reference"])
def test_backward_at_the_edge_of_the_range(backend, device, monkeypatch):
    """|x| near fp32's and bf16's largest values: 1.702 x overflows, but the gradient is 1 (x > 0) or 0 (x < 0)
    as PyTorch's own autograd of x * sigmoid(1.702 x) gives; it was inf * 0 = NaN."""
    if backend == "reference":
        monkeypatch.setenv(ENV_VAR, "reference")
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.tensor([[3e38, -3e38, 2.5e38, -2.5e38, 1e30, -1e30]], device=device).to(dtype).requires_grad_()
        (dx,) = torch.autograd.grad(mmfast.quick_gelu(x).sum(), x)
        expected = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0, 0.0]], device=device).to(dtype)
        assert torch.equal(dx, expected), (dtype, dx)


def test_row_strided_and_transposed_inputs(device, seed):
    """A row-strided slice runs as it is; a transposed (column-strided) input through a contiguous copy."""
    wide = torch.randn(2, 9, 2 * 300, device=device).to(torch.bfloat16)
    check_quick_gelu(lambda i: wide[..., :300], seed)
    check_quick_gelu(lambda i: torch.randn(40, 7, device=device).to(torch.float16).t(), seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_backend(monkeypatch, device, seed, dtype):
    """What CPU tensors run without the interpreter; fp32 resolves the constant (1.7 for 1.702 is below bf16's unit)."""
    monkeypatch.setenv(ENV_VAR, "reference")
    check_quick_gelu(lambda i: (2 * torch.randn(5, 130, device=device)).to(dtype), seed)


def test_keeps_only_the_input(device):
    """Saved for backward: x itself (no copy), where the unfused activation also keeps the sigmoid."""
    def saved(fn):
        x = torch.randn(4, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
        seen = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
            fn(x)
        return seen, x

    kept, x = saved(quick_gelu)
    assert len(kept) == 1 and kept[0].data_ptr() == x.data_ptr()
    unfused, _ = saved(quick_gelu_unfused)
    assert len({t.data_ptr() for t in unfused}) == 2


def test_backward_is_repeatable_and_deterministic(device):
    x = torch.randn(33, 700, device=device).to(torch.bfloat16).requires_grad_()
    y = quick_gelu(x)
    dy = torch.randn_like(y)
    first = torch.autograd.grad(y, x, dy, retain_graph=True)[0]
    assert torch.equal(first, torch.autograd.grad(y, x, dy)[0])  # x never written by the backward
    assert torch.equal(quick_gelu(x), y)


BAD = {
    "int": (TypeError, "x", lambda x: x.long()),
    "double": (TypeError, "x", lambda x: x.double()),
    "not-tensor": (TypeError, "x", lambda x: 1.0),
    "scalar": (ValueError, "dimension", lambda x: x[0, 0]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case, device):
    exc, word, make = BAD[case]
    with pytest.raises(exc, match=word):
        quick_gelu(make(torch.randn(2, 8, device=device)))


def test_opcheck(device):
    x = torch.randn(3, 4, 40, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.mmfast.quick_gelu_fwd, (x,))
    torch.library.opcheck(torch.ops.mmfast.quick_gelu_bwd, (torch.randn_like(x), x.detach()))


def test_opcheck_reference_backend_strided(monkeypatch, device):
    monkeypatch.setenv(ENV_VAR, "reference")
    x = torch.randn(40, 7, device=device).t().requires_grad_()
    torch.library.opcheck(torch.ops.mmfast.quick_gelu_fwd, (x,))
    torch.library.opcheck(torch.ops.mmfast.quick_gelu_bwd, (torch.randn(7, 40, device=device), x.detach()))


def test_compile_fullgraph(device):
    torch._dynamo.reset()
    x = torch.randn(5, 48, device=device, requires_grad=True)
    y = torch.compile(mmfast.quick_gelu, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(y, quick_gelu(x))
    torch.testing.assert_close(torch.autograd.grad(y.sum(), x)[0], torch.autograd.grad(quick_gelu(x).sum(), x)[0])


def test_eager_fast_path_equals_custom_op(monkeypatch, device):
    x = torch.randn(4, 300, device=device).to(torch.bfloat16).requires_grad_()
    dy = torch.randn_like(x)
    results = {}
    for path in ("fast", "ops"):
        monkeypatch.setenv(EAGER_ENV, "ops" if path == "ops" else "")
        y = quick_gelu(x)
        assert (y.grad_fn.name() == "_QuickGELUFnBackward") == (path == "fast"), y.grad_fn.name()
        results[path] = [y, torch.autograd.grad(y, x, dy)[0]]
    for a, b in zip(results["fast"], results["ops"]):
        assert torch.equal(a, b)
    monkeypatch.setenv(EAGER_ENV, "")
    assert any("mmfast.quick_gelu_fwd" in s for s in dispatched_ops(lambda: quick_gelu(x)))


def test_forward_mode_ad_is_refused_not_dropped(device):
    import torch.autograd.forward_ad as fwAD

    x = torch.randn(3, 8, device=device)
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="mmfast.quick_gelu does not support forward-mode AD"):
        quick_gelu(fwAD.make_dual(x, torch.ones_like(x)))
