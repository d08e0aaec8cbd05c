"""A second derivative through a fused op raises, on the eager fast path and on the custom ops alike.

The kernels' backward is not itself differentiable. A double backward (a gradient penalty: ``grad(...,
create_graph=True)`` then ``backward``) must say so instead of silently dropping the terms that would
flow through the op's backward, which the eager path's ``autograd.Function`` did before it was marked
once-differentiable (the custom ops always raised: their backward op has no autograd formula).
"""

from __future__ import annotations

import pytest
import torch

import mmfast

N = 16


def _adapter(x):
    B, S, D = x.shape
    g = torch.Generator().manual_seed(0)
    w = [(torch.randn(*s, generator=g) * 0.3).to(x.device) for s in ((4, D), (4,), (2, D, 2), (2, D))]
    return mmfast.mma_adapter(x, *w, torch.full((B, 2), 0.5, device=x.device), scale=1.0, groups=2)


OPS = {
    "rms_norm": lambda t: mmfast.rms_norm(t, None, 1e-6),
    "layer_norm": lambda t: mmfast.layer_norm(t, None, None, 1e-5),
    "swiglu": lambda t: mmfast.swiglu(t[..., : N // 2], t[..., N // 2:]),
    "quick_gelu": mmfast.quick_gelu,
    "mma_adapter": _adapter,
}


@pytest.mark.parametrize("path", ["eager", "ops"])
@pytest.mark.parametrize("name", sorted(OPS))
def test_second_derivative_raises(name, path, device, monkeypatch):
    if path == "ops":
        monkeypatch.setenv("MMFAST_EAGER", "ops")
    lin = torch.nn.Linear(N, N, device=device)
    x = torch.randn(2, 3, N, device=device, requires_grad=True)
    out = OPS[name](lin(x))
    (g,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)  # first derivative: fine
    assert torch.isfinite(g).all()
    with pytest.raises(RuntimeError, match="second derivative through a fused op"):
        g.square().sum().backward()  # through the op's backward


@pytest.mark.parametrize("path", ["eager", "ops"])
@pytest.mark.parametrize("name", sorted(OPS) + ["linear_cross_entropy"])
def test_second_derivative_with_a_constant_output_gradient_raises(name, path, device, monkeypatch):
    """A loss linear in the op's output (no parameter after it): the incoming gradient is a constant, the
    inputs saved for the op's backward still require grad. PyTorch's once_differentiable marks nothing
    then, and the penalty's terms through the op's backward were dropped silently (rms_norm's input
    gradient off by 1e2 against the same math in PyTorch; the loss on both paths)."""
    if path == "ops":
        monkeypatch.setenv("MMFAST_EAGER", "ops")
    fn = _loss if name == "linear_cross_entropy" else OPS[name]
    lin = torch.nn.Linear(N, N, device=device)
    x = torch.randn(2, 3, N, device=device)
    h = lin(x)
    out = fn(h)
    main = (out * torch.randn(out.shape, device=device)).sum()
    (g,) = torch.autograd.grad(main, h, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivative through a fused op"):
        (main + g.square().sum()).backward()


@pytest.mark.parametrize("how", ["grad", "backward_inputs", "hessian", "checkpoint"])
@pytest.mark.parametrize("path", ["eager", "ops"])
@pytest.mark.parametrize("name", sorted(OPS) + ["linear_cross_entropy"])
def test_second_derivative_for_chosen_inputs_raises(name, path, how, device, monkeypatch):
    """A second derivative that asks for chosen inputs (``autograd.grad(penalty, params)``,
    ``backward(inputs=...)``, ``autograd.functional.hessian``) runs only the nodes between the gradient and
    them. The error sat on fresh leaves that reach nothing, so it was skipped: the penalty's gradient came
    out without the terms through the op's backward (rms_norm: 54 where the same math in PyTorch gives 58)
    and the Hessian all zeros. Under non-reentrant checkpointing the saved inputs are unpacked once."""
    if path == "ops":
        monkeypatch.setenv("MMFAST_EAGER", "ops")
    fn = _loss if name == "linear_cross_entropy" else OPS[name]
    lin = torch.nn.Linear(N, N, device=device)
    x = torch.randn(2, 3, N, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="second derivative through a fused op"):
        if how == "hessian":
            torch.autograd.functional.hessian(lambda t: (fn(t) * 0.5).sum(), torch.randn(1, 2, N, device=device))
            return
        if how == "checkpoint":
            from torch.utils.checkpoint import checkpoint

            out = checkpoint(lambda t: fn(lin(t)), x, use_reentrant=False)
        else:
            out = fn(lin(x))
        (g,) = torch.autograd.grad((out * torch.randn(out.shape, device=device)).sum(), x, create_graph=True)
        if how == "backward_inputs":
            g.square().sum().backward(inputs=[lin.weight])
        else:
            torch.autograd.grad(g.square().sum(), lin.weight)


@pytest.mark.parametrize("path", ["eager", "ops"])
def test_second_derivative_raises_under_a_dispatch_mode(path, device, monkeypatch):
    """A pass-through TorchDispatchMode (a memory tracker, CommDebugMode) around the first derivative is no
    trace: the marking stays (it was skipped under any dispatch mode, and the gradient came out without
    a graph)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class PassThrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    if path == "ops":
        monkeypatch.setenv("MMFAST_EAGER", "ops")
    lin = torch.nn.Linear(N, N, device=device)
    x = torch.randn(2, 3, N, device=device, requires_grad=True)
    out = mmfast.rms_norm(lin(x), None, 1e-6)
    with PassThrough():
        (g,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivative through a fused op"):
        g.square().sum().backward()


@pytest.mark.parametrize("path", ["eager", "ops"])
@pytest.mark.parametrize("name", sorted(OPS))
def test_create_graph_without_a_derivative_of_the_ops_backward(name, path, device, monkeypatch):
    """``create_graph=True`` alone does not raise, only differentiating the op's backward does: a penalty
    on the gradient of a layer after the op (that gradient is the op's output) backpropagates through the
    op's backward once, as a first derivative."""
    if path == "ops":
        monkeypatch.setenv("MMFAST_EAGER", "ops")
    lin1, lin2 = torch.nn.Linear(N, N, device=device), torch.nn.Linear(N // 2 if name == "swiglu" else N, 1,
                                                                          device=device)
    x = torch.randn(2, 3, N, device=device)
    (gw,) = torch.autograd.grad(lin2(OPS[name](lin1(x))).sum(), lin2.weight, create_graph=True)
    gw.square().sum().backward()
    assert lin1.weight.grad is not None and torch.isfinite(lin1.weight.grad).all() and lin1.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# functorch and forward-mode AD: refused with a clear error, never a silently wrong derivative
# ---------------------------------------------------------------------------------------------

def _loss(t):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, N, generator=g).to(t.device)
    target = torch.randint(0, 8, (t.shape[:-1].numel(),), generator=g).to(t.device)
    return mmfast.linear_cross_entropy(t.reshape(-1, N), w, target)


ALL_OPS = {**OPS, "linear_cross_entropy": _loss}


# (functorch's jvp and jacfwd take the custom op whatever the path; forward_ad takes the eager fast path too)
@pytest.mark.parametrize("how,path", [("func.jvp", "ops"), ("jacfwd", "ops"), ("forward_ad", "ops"),
                                      ("forward_ad", "eager")])
@pytest.mark.parametrize("name", sorted(ALL_OPS))
def test_forward_mode_is_refused_naming_the_op(name, how, path, device, monkeypatch):
    """Under a functorch transform (and any torch_function mode, or MMFAST_EAGER=ops) a call takes the
    custom op, which PyTorch runs without its autograd when no input requires grad: jvp and jacfwd got an
    all-zero tangent and forward_ad a None one, silently. They raise now. On the eager fast path forward_ad
    raised PyTorch's message about an autograd.Function without a jvp; it names the op now too."""
    if path == "ops":
        monkeypatch.setenv("MMFAST_EAGER", "ops")
    fn = ALL_OPS[name]
    x, t = torch.randn(2, 3, N, device=device), torch.randn(2, 3, N, device=device)
    with pytest.raises(NotImplementedError, match=f"mmfast.{name} does not support forward-mode AD"):
        if how == "func.jvp":
            torch.func.jvp(fn, (x,), (t,))
        elif how == "jacfwd":
            torch.func.jacfwd(fn, randomness="same")(x[:1, :2])
        else:
            from torch.autograd import forward_ad

            with forward_ad.dual_level():
                fn(forward_ad.make_dual(x, t))


@pytest.mark.parametrize("name", sorted(ALL_OPS))
def test_func_grad_is_refused_with_the_reason(name, device):
    """torch.func.grad / jacrev cannot run PyTorch's custom ops; the error names the op and the way out
    (it was PyTorch's internal message about autograd.Function's setup_context)."""
    x = torch.randn(2, 3, N, device=device)
    with pytest.raises(NotImplementedError, match=f"mmfast.{name} does not support torch.func.grad"):
        torch.func.grad(lambda v: ALL_OPS[name](v).sum())(x)


def test_vmap_runs_the_kernel_per_slice(device):
    """vmap is supported: it runs the op once per slice, bitwise the direct calls."""
    x, w = torch.randn(3, 4, N, device=device), torch.randn(3, N, device=device)
    out = torch.vmap(lambda a, b: mmfast.rms_norm(a, b, 1e-6))(x, w)
    torch.testing.assert_close(out, torch.stack([mmfast.rms_norm(x[i], w[i], 1e-6) for i in range(3)]), rtol=0, atol=0)


@pytest.mark.parametrize("create_graph", [False, True])
@pytest.mark.parametrize("path", ["eager", "ops"])
@pytest.mark.parametrize("name", sorted(ALL_OPS))
def test_batched_gradients(name, path, create_graph, device, monkeypatch):
    """``autograd.grad(..., is_grads_batched=True)`` (``jacobian(vectorize=True)``) equals the rows taken
    one by one. The eager path's backward handed vmap's batched tensors to the kernels ("Cannot access
    storage of BatchedTensorImpl"); with create_graph the marking could not detach them on either path."""
    if path == "ops":
        monkeypatch.setenv("MMFAST_EAGER", "ops")
    lin = torch.nn.Linear(N, N, device=device)
    x = torch.randn(1, 3, N, device=device, requires_grad=True)
    y = ALL_OPS[name](lin(x))
    n = y.numel()
    v = torch.eye(n, device=device).view(n, *y.shape)
    (jac,) = torch.autograd.grad(y, x, v, is_grads_batched=True, create_graph=create_graph, retain_graph=True)
    rows = torch.stack([torch.autograd.grad(y, x, v[i], retain_graph=True)[0] for i in range(n)])
    torch.testing.assert_close(jac, rows)  # the same kernels per slice, summed in another order
