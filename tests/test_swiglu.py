"""The fused SwiGLU gate against the float64 reference (accuracy rule: accuracy.py).

PyTorch's own low-precision implementation is what ``LlamaMLP`` computes: ``silu(gate) * up`` in the
activation dtype (two roundings), differentiated by autograd. Natural scales: the largest magnitude of
each output or gradient's terms (``|silu(g)| |u|`` for the output; the two terms of dg, and
``|dh| |silu(g)|`` for du). Elementwise, so bf16 runs through the interpreter too.
"""

import pytest
import torch

import mmfast
from accuracy import assert_accurate
from dispatch import dispatched_ops
from mmfast.ops.backend import EAGER_ENV, ENV_VAR
from mmfast.ops.swiglu import swiglu, swiglu_unfused

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _grads(fn, g, u, dh):
    g, u = g.detach().clone().requires_grad_(), u.detach().clone().requires_grad_()
    h = fn(g, u)
    return (h, *torch.autograd.grad(h, (g, u), dh.to(h.dtype)))


def _draw(g, u, fn):
    """(ours, PyTorch's, float64 reference, natural scale) of h, dgate and dup for one draw."""
    dh = torch.randn_like(g)
    ours = _grads(fn, g, u, dh)
    lowp = _grads(swiglu_unfused, g, u, dh)
    # the definition written here, not the product's reference (the CPU backend runs that one)
    ref = _grads(lambda g, u: torch.nn.functional.silu(g) * u, g.double(), u.double(), dh.double())
    g64, u64, dh64 = g.double(), u.double(), dh.double()
    s = torch.sigmoid(g64)
    mags = ((g64 * s).abs() * u64.abs(), (dh64 * u64 * s).abs() * (1 + (g64 * (1 - s)).abs()),
            dh64.abs() * (g64 * s).abs())
    for a, like in zip(ours, (g, g, u)):
        assert a.dtype == like.dtype and a.shape == like.shape
    return ours, lowp, ref, [m.max().item() if m.numel() else 0.0 for m in mags]


#: Elements pooled per check: with a handful of elements PyTorch's max error is a noisy sample (it can
#: be exact by luck), so small shapes are drawn again until the pool is this large.
POOL = 256


def check_swiglu(make, seed, fn=swiglu):
    """Output, dgate and dup of ``fn`` against the float64 reference, by the accuracy rule, pooled
    over independent draws ``make(i) -> (gate, up)`` until POOL elements."""
    pooled = [[] for _ in range(3)]
    n = 0
    while True:
        g, u = make(len(pooled[0]))
        for slot, item in zip(pooled, zip(*_draw(g, u, fn))):
            slot.append(item)
        n += g.numel()
        if n >= POOL or g.numel() == 0:
            break
    for name, items in zip(("h", "dgate", "dup"), pooled):
        cat = lambda k: torch.cat([it[k].flatten() for it in items])  # noqa: E731
        assert_accurate(name, cat(0), cat(1), cat(2), max(it[3] for it in items), seed)


SHAPES = [(3, 5, 200), (7, 2500), (4, 17), (1, 1), (2, 0, 64), (0, 8)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_matches_reference(shape, dtype, device, seed):
    check_swiglu(lambda i: ((2 * torch.randn(shape, device=device)).to(dtype),
                            torch.randn(shape, device=device).to(dtype)), seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_gate_values(dtype, device, seed):
    """Gates far into both tails (exp overflows in fp32 for the negative ones): finite and accurate."""
    g = torch.linspace(-100, 100, 403, device=device).to(dtype).view(13, 31)
    check_swiglu(lambda i: (g, torch.randn_like(g)), seed)


def test_row_strided_views_without_copy(device, seed):
    """Gate and up sliced from one fused [M, 2I] projection (row stride 2I) run as they are; a transposed
    (column-strided) input runs through a contiguous copy. Both accurate."""
    gu = torch.randn(2, 9, 2 * 300, device=device).to(torch.bfloat16)
    check_swiglu(lambda i: (gu[..., :300], gu[..., 300:]), seed)
    gt = torch.randn(40, 7, device=device).to(torch.float16).t()
    check_swiglu(lambda i: (gt, torch.randn(7, 40, device=device).to(torch.float16)), seed)


def _spy_grids(monkeypatch, kernels, names) -> list:
    """Replace the named kernels of ``kernels`` with spies that record each launch's grid, then launch."""
    grids = []

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            grids.append(grid)
            return self.kernel[grid]

    for name in names:
        monkeypatch.setattr(kernels, name, Spy(getattr(kernels, name)))
    return grids


def test_rows_wider_than_one_grid(monkeypatch, device, seed):
    """A row of more column blocks than a grid's y dimension takes (CUDA: 65,535; a flattened 1-D tensor is
    one row) runs in several launches, none over the limit, and is as accurate (limit lowered to 2 blocks
    here; one launch asked for 3)."""
    from mmfast.kernels import swiglu as kernels

    monkeypatch.setattr(kernels, "MAX_GRID_Y", 2)
    grids = _spy_grids(monkeypatch, kernels, ("_swiglu_fwd_kernel", "_swiglu_bwd_kernel"))
    gu = torch.randn(3, 2 * 5000, device=device).to(torch.bfloat16)
    check_swiglu(lambda i: (gu[:, :5000], gu[:, 5000:]), seed)  # row-strided views: spans keep the strides
    flat = torch.randn(5000, device=device)
    check_swiglu(lambda i: (flat, torch.randn_like(flat)), seed)
    assert grids and max(g[1] for g in grids) <= 2 and sum(g[1] for g in grids[:2]) == 3


def test_narrow_rows_share_a_program(monkeypatch, device, seed):
    """Rows narrower than a block of ``MAX_BLOCK`` are stacked into one program (37 rows of 64: 2 programs
    of 32 rows, the last one masked, where one program per row took 37); rows past 1024 elements keep one
    program each (every LLaMA and CLIP MLP width). Accurate either way."""
    from mmfast.kernels import swiglu as kernels

    assert [kernels.launch(n)[0] for n in (64, 1000, 1024, 1025, 11008)] == [32, 2, 2, 1, 1]
    grids = _spy_grids(monkeypatch, kernels, ("_swiglu_fwd_kernel",))
    check_swiglu(lambda i: (torch.randn(37, 64, device=device), torch.randn(37, 64, device=device)), seed)
    assert grids[0] == (2, 1)


@pytest.mark.parametrize("op", ["swiglu", "quick_gelu"])
def test_row_offsets_past_2_31_elements(op, device):
    """Rows of a strided view whose offsets pass 2**31 elements (row stride 2**30 + 128, third row) are
    addressed with 64-bit offsets: the same bits as the rows copied out (with 32-bit offsets the third row
    was read from before the tensor). Only the rows' pages are touched: the rest of the 4 GiB is never
    written, so it costs no memory (CPU: untouched pages of an allocation; GPU: one allocation)."""
    N, stride = 64, 2**30 + 128
    base = torch.empty(2 * stride + 2 * N, device=device, dtype=torch.bfloat16)
    rows = base.as_strided((3, 2 * N), (stride, 1))
    rows.copy_(torch.randn(3, 2 * N, device=device))
    views = (rows[:, :N], rows[:, N:]) if op == "swiglu" else (rows[:, :N],)
    fn = mmfast.swiglu if op == "swiglu" else mmfast.quick_gelu
    dy = torch.randn(3, N, device=device).to(torch.bfloat16)
    results = []
    for inputs in (views, tuple(v.clone() for v in views)):
        inputs = tuple(v.detach().requires_grad_() for v in inputs)
        y = fn(*inputs)
        results.append((y, *torch.autograd.grad(y, inputs, dy)))
    assert views[0].stride(0) == stride and results[1][0].abs().max() > 0
    for got, want in zip(*results):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_backend(monkeypatch, device, seed, dtype):
    """What CPU tensors run without the interpreter."""
    monkeypatch.setenv(ENV_VAR, "reference")
    g = (2 * torch.randn(5, 130, device=device)).to(dtype)
    check_swiglu(lambda i: (g, torch.randn_like(g)), seed)


def test_keeps_only_gate_and_up(device):
    """Saved for backward: the two inputs themselves (no copies), where the unfused gate keeps a third
    tensor (silu(gate)) of the same size."""
    def saved(fn):
        g = torch.randn(4, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
        u = torch.randn(4, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
        seen = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
            fn(g, u)
        return seen, (g, u)

    kept, (g, u) = saved(swiglu)
    assert len(kept) == 2 and {t.data_ptr() for t in kept} == {g.data_ptr(), u.data_ptr()}
    unfused, _ = saved(swiglu_unfused)
    assert sum(t.numel() for t in unfused) == 3 * g.numel()


@pytest.mark.parametrize("path", ["eager", "ops"])
@pytest.mark.parametrize("frozen", ["gate", "up"])
def test_an_inference_tensor_input_trains_the_other(frozen, path, device, monkeypatch):
    """One input made under ``torch.inference_mode``, the other trains: HF's ``act(gate) * up`` trains the up
    projection on a gate made so (it saves ``act(gate)``, a tensor it computed), but the fused op saved the
    gate, and autograd refuses to save an inference tensor. A copy is saved in that case: the gradient is
    that of the same values in an ordinary tensor, bit for bit."""
    monkeypatch.setenv(EAGER_ENV, "ops" if path == "ops" else "")
    with torch.inference_mode():
        fixed = torch.randn(4, 16, device=device)
    grads = []
    for inference in (True, False):
        other = torch.linspace(-2, 2, 64, device=device).view(4, 16).requires_grad_()
        held = fixed if inference else fixed.clone()
        h = swiglu(held, other) if frozen == "gate" else swiglu(other, held)
        h.backward(torch.linspace(-1, 1, 64, device=device).view(4, 16))
        grads.append((h.detach(), other.grad))
    for got, want in zip(*grads):
        assert torch.equal(got, want)


def test_inputs_unchanged_by_backward(device):
    """A second backward through a retained graph gives the same gradients (the kernel never writes g, u)."""
    g = torch.randn(6, 100, device=device, requires_grad=True)
    u = torch.randn(6, 100, device=device, requires_grad=True)
    h = swiglu(g, u)
    dh = torch.randn_like(h)
    first = torch.autograd.grad(h, (g, u), dh, retain_graph=True)
    second = torch.autograd.grad(h, (g, u), dh)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_deterministic(device):
    g = torch.randn(33, 700, device=device).to(torch.bfloat16)
    u = torch.randn_like(g)
    dh = torch.randn_like(g)
    a, b = _grads(swiglu, g, u, dh), _grads(swiglu, g, u, dh)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


BAD = {
    "int": (TypeError, "gate", lambda g, u: (g.long(), u)),
    "dtype-mismatch": (TypeError, "up", lambda g, u: (g, u.double())),
    "shape": (ValueError, "shape", lambda g, u: (g, u[:, :3])),
    "device": (ValueError, "device|on", lambda g, u: (g, u.to("meta"))),
    "not-tensor": (TypeError, "up", lambda g, u: (g, 1.0)),
    "scalar": (ValueError, "dimension", lambda g, u: (g[0, 0], u[0, 0])),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case, device):
    exc, word, make = BAD[case]
    g, u = torch.randn(2, 8, device=device), torch.randn(2, 8, device=device)
    with pytest.raises(exc, match=word):
        swiglu(*make(g, u))


def test_opcheck(device):
    g = torch.randn(3, 4, 40, device=device, requires_grad=True)
    u = torch.randn(3, 4, 40, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.mmfast.swiglu_fwd, (g, u))
    torch.library.opcheck(torch.ops.mmfast.swiglu_bwd, (torch.randn_like(g), g.detach(), u.detach()))


def test_compile_fullgraph(device):
    torch._dynamo.reset()
    g = torch.randn(5, 48, device=device, requires_grad=True)
    u = torch.randn(5, 48, device=device, requires_grad=True)
    h = torch.compile(mmfast.swiglu, backend="aot_eager", fullgraph=True)(g, u)
    torch.testing.assert_close(h, swiglu(g, u))
    got = torch.autograd.grad(h.sum(), (g, u))
    want = torch.autograd.grad(swiglu(g, u).sum(), (g, u))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_eager_fast_path_equals_custom_op(monkeypatch, device):
    g = torch.randn(4, 300, device=device).to(torch.bfloat16).requires_grad_()
    u = torch.randn(4, 300, device=device).to(torch.bfloat16).requires_grad_()
    dh = torch.randn_like(g)
    results = {}
    for path in ("fast", "ops"):
        monkeypatch.setenv(EAGER_ENV, "ops" if path == "ops" else "")
        h = swiglu(g, u)
        assert (h.grad_fn.name() == "_SwiGLUFnBackward") == (path == "fast"), h.grad_fn.name()
        results[path] = [h, *torch.autograd.grad(h, (g, u), dh)]
    for a, b in zip(results["fast"], results["ops"]):
        assert torch.equal(a, b)
    monkeypatch.setenv(EAGER_ENV, "")
    seen = dispatched_ops(lambda: swiglu(g, u))
    assert any("mmfast.swiglu_fwd" in s for s in seen), seen


def test_opcheck_reference_backend_strided(monkeypatch, device):
    """The reference backend returns the contiguous layout the fake impls promise, also for a transposed
    input (an elementwise op would otherwise copy the input's strides)."""
    monkeypatch.setenv(ENV_VAR, "reference")
    g = torch.randn(40, 7, device=device).t().requires_grad_()
    u = torch.randn(7, 40, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.mmfast.swiglu_fwd, (g, u))
    torch.library.opcheck(torch.ops.mmfast.swiglu_bwd, (torch.randn(7, 40, device=device), g.detach(), u.detach()))


def test_forward_mode_ad_is_refused_not_dropped(device):
    """No jvp is implemented: under forward-mode AD the op must raise, never return a tensor without a
    tangent (the no-grad shortcut must not hide that)."""
    import torch.autograd.forward_ad as fwAD

    g, u = torch.randn(3, 8, device=device), torch.randn(3, 8, device=device)
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="mmfast.swiglu does not support forward-mode AD"):
        swiglu(fwAD.make_dual(g, torch.ones_like(g)), u)
