"""Every tensor argument of every kernel op (``torch.ops.mmfast.*``), handed over in another memory layout,
gives bit for bit what its contiguous copy gives, on every kernel backend (Triton; the CUDA C++ kernels,
emulated without a GPU).

The kernels read the affine vectors, the adapter's weights and the saved statistics through raw pointers
as dense arrays; a launcher that passed a strided one through would read the wrong elements and return a
plausible, wrong result. The layouts: every other element of a larger buffer (a strided last dimension;
for a vector, a strided vector), and for matrices column-major storage. The values are the same, so the
outputs must be too. (The pure-PyTorch reference is not held to this: PyTorch's own matmuls round
differently for strided operands.)
"""

from __future__ import annotations

import pytest
import torch

import backend_params
import mmfast  # noqa: F401  (registers the ops)

ops = torch.ops.mmfast
M, N = 6, 64
B, S, D, R, E, G = 2, 3, 32, 8, 2, 2


@pytest.fixture(autouse=True, params=backend_params.BACKENDS)
def backend(request, monkeypatch):
    return backend_params.select(request.param, monkeypatch)


def every_other(t: torch.Tensor) -> torch.Tensor:
    buf = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    buf[..., ::2] = t
    return buf[..., ::2]


def column_major(t: torch.Tensor) -> torch.Tensor | None:
    return t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() >= 2 else None


LAYOUTS = {"every-other-element": every_other, "column-major": column_major}


def _calls(device: str) -> dict:
    """op name -> (op, arguments), each call a valid one (statistics and z from the forwards)."""
    # 16-bit activations with fp32 parameters (the tuning recipes' case); fp16 on CPU, where the Triton
    # interpreter's bf16 dot products are unusable (the adapter's)
    act = torch.bfloat16 if device == "cuda" else torch.float16

    def a(*shape):
        return torch.randn(*shape, device=device).to(act)

    def f(*shape):
        return torch.randn(*shape, device=device)

    x, res, dy, dres = a(M, N), a(M, N), a(M, N), a(M, N)
    w, b = f(N), f(N)
    _, h_rms, rstd_rms = ops.rms_norm_fwd(x, w, res, 1e-6)
    _, h_ln, mean, rstd_ln = ops.layer_norm_fwd(x, w, b, res, 1e-5)
    xa, dya = a(B, S, D), a(B, S, D)
    adapter = (f(R, D) * 0.2, f(R) * 0.2, f(E, D, R // G) * 0.2, f(E, D) * 0.2, f(B, E).softmax(-1), 0.5, G, 0.0, None)
    _, z = ops.mma_adapter_fwd(xa, *adapter)
    g, u, dh = a(M, N), a(M, N), a(M, N)
    return {
        "rms_norm_fwd": (ops.rms_norm_fwd, (x, w, res, 1e-6)),
        "rms_norm_bwd": (ops.rms_norm_bwd, (dy, h_rms, w, rstd_rms, dres, True, True)),
        "layer_norm_fwd": (ops.layer_norm_fwd, (x, w, b, res, 1e-5)),
        "layer_norm_bwd": (ops.layer_norm_bwd, (dy, h_ln, w, b, mean, rstd_ln, dres, True, True, True)),
        "mma_adapter_fwd": (ops.mma_adapter_fwd, (xa, *adapter)),
        "mma_adapter_bwd": (ops.mma_adapter_bwd, (dya, xa, z, *adapter, True, True, True)),
        "swiglu_fwd": (ops.swiglu_fwd, (g, u)),
        "swiglu_bwd": (ops.swiglu_bwd, (dh, g, u)),
        "quick_gelu_fwd": (ops.quick_gelu_fwd, (g,)),
        "quick_gelu_bwd": (ops.quick_gelu_bwd, (dh, g)),
    }


def _outputs(op, args) -> tuple[torch.Tensor, ...]:
    out = op(*args)
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("name", sorted(_calls("meta")))
def test_every_tensor_argument_in_any_layout(name, device, seed):
    op, args = _calls(device)[name]
    expected = _outputs(op, args)
    assert all(torch.isfinite(t).all() for t in expected), f"seed {seed}"
    tried = 0
    for i, arg in enumerate(args):
        if not isinstance(arg, torch.Tensor):
            continue
        for layout, make in LAYOUTS.items():
            other = make(arg)
            if other is None:
                continue
            assert torch.equal(other, arg) and not other.is_contiguous()
            got = _outputs(op, args[:i] + (other,) + args[i + 1:])
            for k, (e, o) in enumerate(zip(expected, got)):
                assert e.dtype == o.dtype and e.shape == o.shape and torch.equal(e, o), \
                    f"{name}: argument {i} {layout}: output {k} differs (seed {seed})"
            tried += 1
    assert tried >= len([t for t in args if isinstance(t, torch.Tensor)])


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_public_norms_with_parameter_views(kind, device, seed):
    """The public functions (the eager fast path and its autograd) with weight and bias that are strided
    views of larger parameters: outputs and every gradient equal those of contiguous copies."""
    act = torch.bfloat16 if device == "cuda" else torch.float16
    x0 = torch.randn(3, M, N, device=device).to(act)
    buf = torch.randn(2, 2 * N, device=device)

    def run(strided: bool):
        base = buf.clone().requires_grad_(True)
        w, b = (base[0, ::2], base[1, ::2]) if strided else (base[0, ::2].detach().clone().requires_grad_(True),
                                                             base[1, ::2].detach().clone().requires_grad_(True))
        x = x0.clone().requires_grad_(True)
        y = mmfast.rms_norm(x, w, 1e-6) if kind == "rms" else mmfast.layer_norm(x, w, b, 1e-5)
        y.float().square().sum().backward()
        dw = base.grad[0, ::2] if strided else w.grad
        db = (base.grad[1, ::2] if strided else b.grad) if kind == "layer" else None
        return y, x.grad, dw, db

    for e, o, what in zip(run(False), run(True), ("y", "dx", "dweight", "dbias")):
        assert (e is None and o is None) or torch.equal(e, o), f"{kind}: {what} differs (seed {seed})"
