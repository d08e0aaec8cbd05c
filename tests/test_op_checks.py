"""The kernel ops themselves (``torch.ops.mmfast.*``) check their arguments, not only the public functions
in front of them: a direct call (or a traced one, through the ops' fake implementations) with one broken
argument raises a TypeError / ValueError naming it before anything launches, where the kernels would
otherwise read past a buffer."""

import pytest
import torch

import mmfast  # noqa: F401  (registers the ops)

ops = torch.ops.mmfast
M, N = 4, 64
B, S, D, R, E, G = 2, 3, 32, 8, 2, 2


def f32(*shape):
    return torch.randn(*shape)


def norm_fwd_args(**kw):
    a = dict(x=f32(M, N), weight=f32(N), residual=None, eps=1e-6)
    a.update(kw)
    return tuple(a.values())


def rms_bwd_args(**kw):
    a = dict(dy=f32(M, N), x=f32(M, N), weight=f32(N), rstd=f32(M), dresidual_out=None, need_dx=True, need_dw=True)
    a.update(kw)
    return tuple(a.values())


def ln_fwd_args(**kw):
    a = dict(x=f32(M, N), weight=f32(N), bias=f32(N), residual=None, eps=1e-5)
    a.update(kw)
    return tuple(a.values())


def ln_bwd_args(**kw):
    a = dict(dy=f32(M, N), x=f32(M, N), weight=f32(N), bias=f32(N), mean=f32(M), rstd=f32(M), dresidual_out=None,
             need_dx=True, need_dw=True, need_db=True)
    a.update(kw)
    return tuple(a.values())


def adapter_args(**kw):
    a = dict(x=f32(B, S, D), down_w=f32(R, D), down_b=f32(R), up_w=f32(E, D, R // G), up_b=f32(E, D),
             mix=f32(B, E).softmax(-1), scale=1.0, groups=G, p=0.0, seed=None)
    a.update(kw)
    return a


def adapter_bwd_args(dy=None, z=None, **kw):
    a = adapter_args(**kw)
    dy = torch.randn_like(a["x"]) if dy is None else dy
    z = torch.zeros(B * S, R) if z is None else z
    return (dy, a["x"], z, *list(a.values())[1:], True, True, True)


CASES = {
    "rms_norm_fwd: short weight": (ops.rms_norm_fwd, lambda: norm_fwd_args(weight=f32(N // 2)), ValueError, "weight"),
    "rms_norm_fwd: integer weight": (ops.rms_norm_fwd, lambda: norm_fwd_args(weight=torch.ones(N, dtype=torch.int32)),
                                     TypeError, "weight"),
    "rms_norm_fwd: residual rows": (ops.rms_norm_fwd, lambda: norm_fwd_args(residual=f32(M // 2, N)), ValueError,
                                    "residual"),
    "rms_norm_fwd: negative eps": (ops.rms_norm_fwd, lambda: norm_fwd_args(eps=-1.0), ValueError, "eps"),
    "rms_norm_bwd: dy rows": (ops.rms_norm_bwd, lambda: rms_bwd_args(dy=f32(M - 1, N)), ValueError, "dy"),
    "rms_norm_bwd: fp16 rstd": (ops.rms_norm_bwd, lambda: rms_bwd_args(rstd=f32(M).half()), ValueError, "rstd"),
    "rms_norm_bwd: short rstd": (ops.rms_norm_bwd, lambda: rms_bwd_args(rstd=f32(M - 1)), ValueError, "rstd"),
    "rms_norm_bwd: residual gradient dtype": (ops.rms_norm_bwd, lambda: rms_bwd_args(dresidual_out=f32(M, N).half()),
                                              TypeError, "dresidual_out"),
    "rms_norm_bwd: dweight without a weight": (ops.rms_norm_bwd, lambda: rms_bwd_args(weight=None), ValueError,
                                               "weight"),
    "layer_norm_fwd: long bias": (ops.layer_norm_fwd, lambda: ln_fwd_args(bias=f32(N + 1)), ValueError, "bias"),
    "layer_norm_bwd: short mean": (ops.layer_norm_bwd, lambda: ln_bwd_args(mean=f32(M - 1)), ValueError, "mean"),
    "layer_norm_bwd: dbias without a bias": (ops.layer_norm_bwd, lambda: ln_bwd_args(bias=None), ValueError, "bias"),
    "mma_adapter_fwd: mix batch": (ops.mma_adapter_fwd, lambda: tuple(adapter_args(mix=f32(B + 1, E)).values()),
                                   ValueError, "mix"),
    "mma_adapter_fwd: up_w width": (ops.mma_adapter_fwd, lambda: tuple(adapter_args(up_w=f32(E, D, R)).values()),
                                    ValueError, "up_w"),
    "mma_adapter_fwd: dropout without a seed": (ops.mma_adapter_fwd, lambda: tuple(adapter_args(p=0.1).values()),
                                                ValueError, "seed"),
    "mma_adapter_bwd: z rows": (ops.mma_adapter_bwd, lambda: adapter_bwd_args(z=torch.zeros(B * S - 1, R)),
                                ValueError, "z"),
    "mma_adapter_bwd: dy dtype": (ops.mma_adapter_bwd, lambda: adapter_bwd_args(dy=f32(B, S, D).half()), TypeError,
                                  "dy"),
    "swiglu_fwd: up shape": (ops.swiglu_fwd, lambda: (f32(M, N), f32(M, N - 1)), ValueError, "up"),
    "swiglu_bwd: dh shape": (ops.swiglu_bwd, lambda: (f32(M, N - 1), f32(M, N), f32(M, N)), ValueError, "dh"),
    "quick_gelu_fwd: integer x": (ops.quick_gelu_fwd, lambda: (torch.ones(M, N, dtype=torch.int32),), TypeError, "x"),
    "quick_gelu_bwd: dy shape": (ops.quick_gelu_bwd, lambda: (f32(M, N + 1), f32(M, N)), ValueError, "dy"),
}


def _on(device, args):
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


@pytest.mark.parametrize("where", ["op", "fake"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_ops_reject_a_broken_argument_by_name(case, where):
    """``op``: the real op on CPU (where it would run the kernel); ``fake``: meta tensors, which reach the
    op's fake implementation, as tracing under torch.compile does."""
    op, make, exc, name = CASES[case]
    args = _on("meta" if where == "fake" else "cpu", make())
    with pytest.raises(exc, match=rf"\b{name}\b"):
        op(*args)


GOOD = {
    "rms_norm_fwd": (ops.rms_norm_fwd, norm_fwd_args),
    "rms_norm_bwd": (ops.rms_norm_bwd, rms_bwd_args),
    "layer_norm_fwd": (ops.layer_norm_fwd, ln_fwd_args),
    "layer_norm_bwd": (ops.layer_norm_bwd, lambda: ln_bwd_args(rstd=f32(M).abs())),
    "mma_adapter_fwd": (ops.mma_adapter_fwd, lambda: tuple(adapter_args().values())),
    "mma_adapter_bwd": (ops.mma_adapter_bwd, adapter_bwd_args),
    "swiglu_fwd": (ops.swiglu_fwd, lambda: (f32(M, N), f32(M, N))),
    "swiglu_bwd": (ops.swiglu_bwd, lambda: (f32(M, N), f32(M, N), f32(M, N))),
    "quick_gelu_fwd": (ops.quick_gelu_fwd, lambda: (f32(M, N),)),
    "quick_gelu_bwd": (ops.quick_gelu_bwd, lambda: (f32(M, N), f32(M, N))),
}


@pytest.mark.parametrize("where", ["op", "fake"])
@pytest.mark.parametrize("name", sorted(GOOD))
def test_the_unbroken_arguments_pass_the_checks(name, where):
    """Each case above breaks one argument of a call that runs: the checks are not simply rejecting."""
    op, make = GOOD[name]
    out = op(*_on("meta" if where == "fake" else "cpu", make()))
    outs = out if isinstance(out, tuple) else (out,)
    assert all(isinstance(t, torch.Tensor) for t in outs)
    if where == "op":
        assert all(torch.isfinite(t).all() for t in outs if t.numel())
