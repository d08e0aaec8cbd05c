"""The fused MMA adapter against the float64 reference of its formula (accuracy rule: accuracy.py).

PyTorch's own low-precision implementation is a LaVIN-style eager module (everything in x's dtype,
one expert at a time). Natural scales come from the same formula evaluated on the absolute values of
every input and of dy: the adapter is multilinear with a positive scale, so that evaluation is the sum
of the magnitudes of every term of each output and gradient.

CPU runs the kernels through the interpreter in fp32 and fp16 (its bf16 tl.dot is broken); a GPU
runs bf16 too. Every test runs once per backend: ``auto`` (Triton) and ``cuda`` (the CUDA C++ kernels,
for the adapters within their limits; larger ones run Triton there, with a warning): natively on a GPU,
on CPU through ``csrc/binding.cpp`` built for CPU over the emulated kernels (``emulated-cuda``; the
kernels' own tests are in test_cuda_adapter_emulated.py).
"""

import contextlib

import pytest
import torch

import backend_params
import mmfast
from accuracy import assert_accurate
from dispatch import dispatched_ops
from mmfast.ops.adapter import dropout_keep_mask, mma_adapter, mma_adapter_lavin_style, mma_adapter_reference
from mmfast.ops.backend import ENV_VAR

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
NAMES = ["x", "down_w", "down_b", "up_w", "up_b", "mix"]


@pytest.fixture(autouse=True, params=backend_params.BACKENDS)
def adapter_backend(request, monkeypatch):
    """Every test of this module once per backend (backend_params.py)."""
    return backend_params.select(request.param, monkeypatch)


def make_inputs(B, S, D, R, G, E, dtype, device, weight_dtype=torch.float32, trained=True):
    """Adapter inputs; ``trained`` gives non-zero up weights (a fresh adapter has zeros there)."""
    x = torch.randn(B, S, D, device=device).to(dtype)
    down_w = torch.nn.init.xavier_uniform_(torch.empty(R, D, device=device))
    down_b = 0.1 * torch.randn(R, device=device)
    up_w = (0.2 if trained else 0.0) * torch.randn(E, D, R // G, device=device)
    up_b = (0.1 if trained else 0.0) * torch.randn(E, D, device=device)
    mix = torch.softmax(torch.randn(B, E, device=device), dim=-1)
    params = [t.to(weight_dtype) for t in (down_w, down_b, up_w, up_b)]
    return [t.requires_grad_() for t in (x, *params, mix)]


def _run(fn, leaves, dy, **kw):
    ins = [t.detach().clone().requires_grad_() for t in leaves]
    y = fn(*ins, **kw)
    return y, torch.autograd.grad(y, ins, dy.to(y.dtype))


DRAWS = 3


def _results(leaves, scale, groups, keep=None, dropout=0.0, dseed=None, fused=None):
    """Per quantity: (fused, LaVIN-style low precision, float64 reference, natural scale). ``fused(leaves,
    dy, scale, groups, dropout, dseed) -> (y, grads)`` replaces the op (the emulated CUDA C++ kernels)."""
    dy = torch.randn_like(leaves[0])
    keep_lp = None if keep is None else keep.to(leaves[0].dtype)
    if fused is None:
        y, g = _run(mma_adapter, leaves, dy, scale=scale, groups=groups, dropout=dropout, seed=dseed)
    else:
        y, g = fused(leaves, dy.to(leaves[0].dtype), scale, groups, dropout, dseed)
    y_lp, g_lp = _run(mma_adapter_lavin_style, leaves, dy, scale=scale, groups=groups, keep=keep_lp)
    l64 = [t.detach().double() for t in leaves]
    keep64 = None if keep is None else keep.double()
    y_ref, g_ref = _run(mma_adapter_reference, l64, dy.double(), scale=scale, groups=groups, keep=keep64)
    y_abs, g_abs = _run(mma_adapter_reference, [t.abs() for t in l64], dy.double().abs(), scale=abs(scale),
                        groups=groups, keep=keep64)
    assert y.dtype == leaves[0].dtype and y.shape == leaves[0].shape
    for name, a in zip(NAMES, g):
        assert a.dtype == leaves[NAMES.index(name)].dtype, name
    out = {"y": (y, y_lp, y_ref, y_abs.abs().max().item())}
    for name, a, b, r, s in zip(NAMES, g, g_lp, g_ref, g_abs):
        out["d" + name] = (a, b, r, s.abs().max().item())
    return out


#: The fewest values of a quantity the accuracy rule compares maxima over (check_adapter draws more
#: inputs until every quantity has them).
MIN_POOLED = 8


def check_adapter(make_draw, seed, draws=DRAWS):
    """The accuracy rule over ``draws`` or more independent random draws pooled per quantity (fused max
    error <= 2 x PyTorch's max error + atol, on the same inputs). Pooling matters for small outputs: d mix
    has batch x experts values and is a sum of many terms that cancel, so one draw's max error is a noisy
    sample of either implementation's error; with a single value (batch 1, one expert), fp32 failed on
    1 draw in 300 at twice the bound's rounding unit, with no error in the kernels. So draws continue
    until every quantity has at least MIN_POOLED values."""
    pooled = {}
    i = 0
    while i < draws or min(sum(it[0].numel() for it in items) for items in pooled.values()) < MIN_POOLED:
        for name, (a, b, r, s) in _results(**make_draw(i)).items():
            pooled.setdefault(name, []).append((a, b, r, s))
        i += 1
    for name, items in pooled.items():
        cat = lambda k: torch.cat([it[k].flatten() for it in items])  # noqa: E731
        assert_accurate(name, cat(0), cat(1), cat(2), max(it[3] for it in items), seed)


SHAPES = [  # (B, S, D, R, G, E)
    (2, 5, 200, 8, 2, 2),  # D not a power of two
    (3, 7, 1100, 12, 4, 2),  # several column chunks, four groups
    (1, 33, 96, 4, 1, 2),  # one group, more tokens than a tile
    (4, 3, 136, 16, 2, 2),  # hidden 16
    (2, 9, 120, 6, 3, 3),  # three groups, three experts
    (1, 5, 40, 126, 2, 4),  # wide hidden x many experts: fit() narrows the column chunks (16-32)
    (1, 3, 40, 126, 2, 8),  # 1024 extended slots: row tiles of 16 too
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_matches_reference(shape, dtype, device, seed):
    B, S, D, R, G, E = shape
    check_adapter(lambda i: dict(leaves=make_inputs(B, S, D, R, G, E, dtype, device), scale=0.8, groups=G), seed)


@pytest.mark.parametrize("B, S", [(2, 0), (0, 3)], ids=["no-tokens", "no-samples"])
def test_no_tokens(B, S, device):
    """M = 0: an empty output, zero weight and router gradients, nothing launched that could fail."""
    leaves = make_inputs(B, S, 64, 8, 2, 2, torch.float16, device)
    y = mma_adapter(*leaves, dropout=0.1, seed=torch.tensor([3], dtype=torch.int64, device=device))
    assert y.shape == (B, S, 64) and y.dtype == torch.float16
    y.float().sum().backward()
    for t in leaves:
        assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weights_in_activation_dtype(dtype, device, seed):
    check_adapter(lambda i: dict(leaves=make_inputs(2, 6, 200, 8, 2, 2, dtype, device, weight_dtype=dtype),
                                 scale=1.0, groups=2), seed)


def test_fp32_weights_keep_fp32_precision_in_router_and_bias_gradients(device, seed):
    """16-bit activations with fp32 (master) weights: the up-projection's products take its x-dtype part
    and its remainder, and the router weight's rounding remainder has its own slot (kernels/adapter.py), so
    that d mix, d z (d down_b is its column sum) and d up_b keep fp32 precision. The LaVIN-style rule of
    check_adapter cannot see that (PyTorch's 16-bit eager module rounds the same things), so here PyTorch's
    implementation is its fp32 computation of the formula from the same inputs, the precision these
    gradients are documented to have. The down-projection is made exact in x's dtype, so that z, whose
    products run in x's dtype by design, is exact too."""
    dtype = torch.float16 if device == "cpu" else torch.bfloat16  # (the interpreter's bf16 products)
    B, S, D, R, G, E = 3, 4, 40, 8, 2, 2  # small sums: the rounding of a 16-bit step stands out
    pooled = {}
    for i in range(DRAWS):
        leaves = make_inputs(B, S, D, R, G, E, dtype, device)
        with torch.no_grad():
            for t in leaves[1:3]:
                t.copy_(t.to(dtype).float())
        dy = torch.randn_like(leaves[0])
        _, ours = _run(mma_adapter, leaves, dy, scale=0.8, groups=G)
        _, fp32 = _run(mma_adapter_reference, leaves, dy, scale=0.8, groups=G)
        l64 = [t.detach().double() for t in leaves]
        _, ref = _run(mma_adapter_reference, l64, dy.double(), scale=0.8, groups=G)
        _, mag = _run(mma_adapter_reference, [t.abs() for t in l64], dy.double().abs(), scale=0.8, groups=G)
        for name in ("down_b", "up_b", "mix"):
            k = NAMES.index(name)
            assert ours[k].dtype == torch.float32
            pooled.setdefault(name, []).append((ours[k], fp32[k], ref[k], mag[k].abs().max().item()))
    for name, items in pooled.items():
        cat = lambda k: torch.cat([it[k].flatten() for it in items])  # noqa: E731
        assert_accurate("d" + name, cat(0), cat(1), cat(2), max(it[3] for it in items), seed, terms=B * S)


TILES = [(16, 64), (32, 128), (64, 64)]  # (rows per tile, column chunk): shapes the GPU tuner may choose


@pytest.mark.parametrize("adapter_backend", ["auto"], indirect=True)  # TUNED holds Triton's tiles only
@pytest.mark.parametrize("kernel", ["fwd", "rows", "cols"])
@pytest.mark.parametrize("tile", TILES, ids=str)
def test_tile_shapes(kernel, tile, device, seed, monkeypatch):
    """Every tile shape benchmarks/tune_adapter.py can pick gives accurate results, with M and D not
    multiples of the tile (dropout on: the mask must follow rows, not tiles). The Triton kernels' tiles:
    the CUDA C++ kernels' are fixed (kTileRows), and each of their runs here was the same as the last."""
    from mmfast.kernels import adapter as K

    dtype = torch.float16 if device == "cpu" else torch.bfloat16
    for cls in ("16bit", "fp32"):
        monkeypatch.setitem(K.TUNED, (cls, kernel), K.AdapterLaunch(*tile, 4, 2, 2))
    check_adapter(lambda i: _dropout_draw(3, 23, 1100, 8, 2, 2, 0.2, dtype, device, seed + i), seed, draws=1)


def _dropout_draw(B, S, D, R, G, E, p, dtype, device, seed):
    dseed = torch.tensor([seed], dtype=torch.int64, device=device)
    keep = dropout_keep_mask(dseed, B * S, R, p).view(B, S, R) / (1 - p)
    assert 0 < (keep == 0).sum() < keep.numel()
    return dict(leaves=make_inputs(B, S, D, R, G, E, dtype, device), scale=1.0, groups=G, keep=keep, dropout=p,
                dseed=dseed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_matches_reference_with_its_mask(dtype, device, seed):
    """The backward regenerates exactly the forward's mask: fused output and every gradient match the
    reference computed with that mask."""
    check_adapter(lambda i: _dropout_draw(3, 11, 200, 8, 2, 2, 0.3, dtype, device, seed + i), seed)


@pytest.mark.parametrize("path", ["eager", "ops"])
@pytest.mark.parametrize("forward_on", ["reference", "kernels"])
def test_dropout_backward_on_another_mask_stream_raises(forward_on, path, device, monkeypatch):
    """With dropout the backward redraws the forward's mask from the seed. The kernels (Triton, CUDA C++)
    draw one stream of masks and the reference another, so a backward that would run on the other side
    (the backend is chosen when a call runs) raises instead of returning another mask's gradients, which
    it did; under the forward's backend it runs."""
    if path == "ops":
        monkeypatch.setenv("MMFAST_EAGER", "ops")
    leaves = make_inputs(2, 3, 32, 8, 2, 2, torch.float32, device)
    seed = torch.tensor([5], dtype=torch.int64, device=device)

    def under(backend):
        return mmfast.use_backend(backend) if backend else contextlib.nullcontext()

    fwd_on, other = ("reference", None) if forward_on == "reference" else (None, "reference")  # None: the fixture's
    with under(fwd_on):
        y = mma_adapter(*leaves, dropout=0.2, seed=seed)
    with under(other), pytest.raises(RuntimeError, match="draws a different dropout mask"):
        y.float().square().sum().backward()
    with under(fwd_on):
        y = mma_adapter(*leaves, dropout=0.2, seed=seed)
        y.float().square().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)


def test_dropout_same_seed_same_mask_and_keep_rate(device):
    B, S, D, R, p = 4, 64, 96, 8, 0.25
    leaves = make_inputs(B, S, D, R, 2, 2, torch.float32, device)
    args = [t.detach() for t in leaves]
    s1 = torch.tensor([1234], dtype=torch.int64, device=device)
    s2 = torch.tensor([999], dtype=torch.int64, device=device)
    y1 = mma_adapter(*args, dropout=p, seed=s1)
    assert torch.equal(y1, mma_adapter(*args, dropout=p, seed=s1.clone()))
    assert not torch.equal(y1, mma_adapter(*args, dropout=p, seed=s2))
    mask = dropout_keep_mask(torch.tensor([7], dtype=torch.int64, device=device), 20000, R, p)
    n = mask.numel()
    rate = mask.float().mean().item()
    sigma = ((1 - p) * p / n) ** 0.5
    assert abs(rate - (1 - p)) < 5 * sigma, rate
    assert torch.equal(mask, dropout_keep_mask(torch.tensor([7], dtype=torch.int64, device=device), 20000, R, p))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_new_adapter_is_identity(dtype, device):
    adapter = mmfast.MMAdapter(200, hidden_dim=8, groups=2, dropout=0.1).to(device)
    x = torch.randn(3, 5, 200, device=device).to(dtype).requires_grad_()
    route = torch.randn(3, 200, device=device).to(dtype)
    for mode in (adapter.train, adapter.eval):
        mode()
        y = adapter(x, route)
        assert torch.equal(y, x)
        dy = torch.randn_like(y)
        (dx,) = torch.autograd.grad(y, x, dy)
        assert torch.equal(dx, dy)


def test_module_gradients_reach_router_and_route(device, seed, monkeypatch):
    """Through the module the router's parameters and the route get gradients (via d mix). All the
    module's gradients together follow the rule norm-wise (model_accuracy.py says why jointly): PyTorch's
    own is the same module on the reference backend, the oracle the formula in float64."""
    D = 136
    adapter = mmfast.MMAdapter(D, hidden_dim=8, groups=2, dropout=0.0).to(device)
    with torch.no_grad():
        adapter.up_weight.normal_(0, 0.2)
        adapter.up_bias.normal_(0, 0.1)
    ref = mmfast.MMAdapter(D, hidden_dim=8, groups=2, dropout=0.0).to(device).double()
    ref.load_state_dict(adapter.state_dict())
    x = torch.randn(4, 7, D, device=device)
    route = torch.randn(4, D, device=device)
    dy = torch.randn(4, 7, D, device=device)

    def grads(module, x, route):
        x, route = x.clone().requires_grad_(), route.clone().requires_grad_()
        return torch.autograd.grad(module(x, route), [x, route, *module.parameters()], dy.to(x.dtype))

    ours = grads(adapter, x, route)
    monkeypatch.setenv(ENV_VAR, "reference")
    lowp = grads(adapter, x, route)
    x64, r64 = x.double().requires_grad_(), route.double().requires_grad_()
    y64 = mma_adapter_reference(x64, ref.down.weight, ref.down.bias, ref.up_weight, ref.up_bias, ref.mix(r64), 1.0, 2)
    grads64 = torch.autograd.grad(y64, [x64, r64, *ref.parameters()], dy.double())
    names = ["x", "route"] + [n for n, _ in adapter.named_parameters()]
    assert {"router.weight", "router.bias"} <= set(names)
    for name, g in zip(names, ours):
        assert g.abs().sum() > 0, f"no gradient reached {name}"
    flat = lambda gs: torch.cat([g.double().flatten() for g in gs])  # noqa: E731
    err, err_lowp = (flat(ours) - flat(grads64)).norm().item(), (flat(lowp) - flat(grads64)).norm().item()
    bound = 2 * err_lowp + torch.finfo(torch.float32).eps * flat(grads64).norm().item()
    assert err <= bound, f"||error|| {err:.3e} > 2 x {err_lowp:.3e} + eps ||ref|| (seed {seed})"


@pytest.mark.parametrize("impl", ["fused", "eager"])
def test_module_follows_its_formula_with_its_options(impl, device, seed):
    """The module's own options (scale, temperature, groups) and its router against the formula written out
    here, not through the module's ``mix``: w = softmax(router(route) / temperature) per sample (over the
    experts), y = x + scale * sum_e w_e (...). Output and every gradient (the router's, the route's) jointly,
    norm-wise as test_module_gradients_reach_router_and_route: PyTorch's own is the formula in fp32."""
    D, R, G, E, scale, t = 96, 8, 4, 2, 0.6, 2.5
    adapter = mmfast.MMAdapter(D, hidden_dim=R, groups=G, experts=E, scale=scale, temperature=t, dropout=0.0).to(device)
    adapter.impl = impl
    with torch.no_grad():
        adapter.up_weight.normal_(0, 0.2)
        adapter.up_bias.normal_(0, 0.1)
        adapter.router.weight.mul_(4)  # routers away from uniform: the temperature shows
    x, dy = torch.randn(3, 5, D, device=device), torch.randn(3, 5, D, device=device)
    route = torch.randn(3, D, device=device)

    def formula(x, route, params):
        A, a, U, c, Wr, br = params
        mix = torch.softmax((route @ Wr.T + br) / t, dim=-1)
        return mma_adapter_reference(x, A, a, U, c, mix, scale, G)

    named = dict(adapter.named_parameters())
    params = [named[n] for n in ("down.weight", "down.bias", "up_weight", "up_bias", "router.weight", "router.bias")]
    assert len(named) == len(params)

    def run(fn, dtype):
        xi, ri = x.to(dtype).requires_grad_(), route.to(dtype).requires_grad_()
        ps = [p.detach().to(dtype).requires_grad_() for p in params]
        y = fn(xi, ri, ps)
        return [y, *torch.autograd.grad(y, [xi, ri, *ps], dy.to(dtype))]

    ref = run(formula, torch.float64)
    lowp = run(formula, torch.float32)
    xi, ri = x.clone().requires_grad_(), route.clone().requires_grad_()
    y = adapter(xi, ri)
    ours = [y, *torch.autograd.grad(y, [xi, ri, *params], dy)]
    flat = lambda gs: torch.cat([g.double().flatten() for g in gs])  # noqa: E731
    err, err_lowp = (flat(ours) - flat(ref)).norm().item(), (flat(lowp) - flat(ref)).norm().item()
    bound = 2 * err_lowp + torch.finfo(torch.float32).eps * flat(ref).norm().item()
    assert err <= bound, f"||error|| {err:.3e} > 2 x {err_lowp:.3e} + eps ||ref|| (seed {seed})"


@pytest.mark.parametrize("impl", ["fused", "eager"])
def test_module_dropout_keeps_one_minus_p_scaled(impl, device):
    """Training-mode dropout, through the module (the eager composition draws its own mask): with z = 1 and
    each output channel reading one hidden channel, y - x is the scaled keep mask: a share 1 - p of it
    1 / (1 - p), the rest 0."""
    R, p = 8, 0.3
    adapter = mmfast.MMAdapter(R, hidden_dim=R, groups=R, experts=1, dropout=p).to(device)
    adapter.impl = impl
    with torch.no_grad():
        adapter.down.weight.zero_()
        adapter.down.bias.fill_(1.0)
        adapter.up_weight.fill_(1.0)
    x = torch.zeros(4, 250, R, device=device)
    zd = (adapter.train()(x, torch.randn(4, R, device=device)) - x).flatten()
    kept = zd != 0
    assert torch.allclose(zd[kept], torch.full_like(zd[kept], 1 / (1 - p)))
    rate, n = kept.float().mean().item(), zd.numel()
    assert abs(rate - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5, rate


def test_eval_and_zero_dropout_draw_no_random_numbers(device, monkeypatch):
    adapter = mmfast.MMAdapter(64, dropout=0.1).to(device)
    x, route = torch.randn(2, 3, 64, device=device), torch.randn(2, 64, device=device)
    calls = []
    real = torch.randint
    monkeypatch.setattr(torch, "randint", lambda *a, **k: calls.append(1) or real(*a, **k))
    adapter.eval()
    adapter(x, route)
    adapter.train()
    adapter.dropout = 0.0
    adapter(x, route)
    assert not calls
    adapter.dropout = 0.1
    adapter(x, route)
    assert calls


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_meta_forward_gives_shapes(mode):
    """A forward on the meta device (shapes only: a model built there, traced before its weights load) ran in
    eval mode but raised in training mode: the dropout mask read its seed's value."""
    adapter = mmfast.MMAdapter(16, hidden_dim=4, dropout=0.1, device="meta").train(mode == "train")
    x = torch.empty(2, 5, 16, device="meta", requires_grad=True)
    y = adapter(x, torch.empty(2, 16, device="meta"))
    assert y.is_meta and y.shape == x.shape and y.dtype == x.dtype
    y.sum().backward()
    assert x.grad.is_meta and x.grad.shape == x.shape and adapter.down.weight.grad.is_meta


@pytest.mark.parametrize("recurse", [True, False])
def test_to_empty_gives_the_init(recurse, monkeypatch):
    """``to_empty`` of an adapter made on the meta device (a model built there, then patched: no checkpoint of
    the base model holds it) gives its init, the identity, not whatever the memory held (NaN here); also
    module by module (``to_empty(recurse=False)``, FSDP1's materialisation), in either order."""
    D, R = 64, 8
    for order in (1, -1):
        adapter = mmfast.MMAdapter(D, hidden_dim=R, device="meta")
        empty_like = torch.empty_like
        monkeypatch.setattr(torch, "empty_like", lambda t, **kw: empty_like(t, **kw).fill_(float("nan")))
        for m in ([adapter] if recurse else list(adapter.modules())[::order]):
            m.to_empty(device="cpu", recurse=recurse)
        monkeypatch.undo()
        assert all(p.isfinite().all() for p in adapter.parameters())
        assert not adapter.up_weight.any() and not adapter.up_bias.any()
        assert torch.equal(adapter.down.bias, torch.zeros(R))
        xavier = (6 / (D + R)) ** 0.5
        assert adapter.down.weight.abs().max() <= xavier and adapter.down.weight.std() > xavier / 4
        assert adapter.router.weight.abs().max() <= 1 / D ** 0.5
        x, route = torch.randn(2, 3, D), torch.randn(2, D)
        torch.testing.assert_close(adapter(x, route), x)


@pytest.mark.parametrize("order", ["adapter", "every module"])
def test_init_after_meta(order):
    """Built on the meta device, then ``to_empty``: ``reset_parameters`` left the router holding whatever the
    memory did (a bias of -4e21 saturates the softmax), and a flow that resets every module (the adapter
    before its children) gave ``down`` nn.Linear's init. Both give the documented init: ``down``
    xavier-uniform with a zero bias, the up-projections zero, the router nn.Linear's."""
    D, R = 64, 8
    adapter = mmfast.MMAdapter(D, hidden_dim=R, device="meta")
    adapter.to_empty(device="cpu")
    with torch.no_grad():
        for p in adapter.parameters():
            p.fill_(-4e21)  # what the memory held
    for m in ([adapter] if order == "adapter" else list(adapter.modules())):
        m.reset_parameters()
    assert torch.equal(adapter.down.bias, torch.zeros(R))
    xavier = (6 / (D + R)) ** 0.5
    assert adapter.down.weight.abs().max() <= xavier and adapter.down.weight.std() > xavier / 4
    assert not adapter.up_weight.any() and not adapter.up_bias.any()
    bound = 1 / D ** 0.5  # nn.Linear's default, weight and bias (two values: no spread to check)
    assert adapter.router.weight.abs().max() <= bound and adapter.router.weight.std() > bound / 4
    assert adapter.router.bias.abs().max() <= bound


def test_parameter_counts():
    assert sum(p.numel() for p in mmfast.MMAdapter(4096).parameters()) == 81_930
    assert sum(p.numel() for p in mmfast.MMAdapter(1024).parameters()) == 20_490
    a = mmfast.MMAdapter(4096)
    assert a.down.weight.shape == (8, 4096) and a.up_weight.shape == (2, 4096, 4)
    assert a.up_bias.shape == (2, 4096) and a.router.weight.shape == (2, 4096)


def test_reference_backend(monkeypatch, device, seed):
    monkeypatch.setenv(ENV_VAR, "reference")
    check_adapter(lambda i: dict(leaves=make_inputs(2, 5, 200, 8, 2, 2, torch.float32, device), scale=0.8,
                                 groups=2), seed)
    check_adapter(lambda i: _dropout_draw(2, 5, 200, 8, 2, 2, 0.2, torch.float32, device, seed + i), seed)


def test_fit_narrows_column_chunks_for_registers_only_where_tiles_are_wide():
    """fit() leaves the usual adapter's tiles (hidden 8, two experts) as launch_config gives them, and narrows
    the column chunk of wide hidden x many experts until each kernel's [EK, block_d] tile is within
    REG_TILE_BYTES a warp (the sm_90 compile check, tests/test_compile_check.py, finds no spills then; at the
    former widths the forward spilled 928 B a thread at 512 extended slots), never below 16 columns, and past
    WIDE_EK slots to row tiles of 16."""
    from mmfast.kernels import adapter as K

    bf16, f32 = torch.bfloat16, torch.float32
    planes = {"fwd": 2, "rows": 2, "cols": 1}  # (16-bit x with fp32 weights: two planes of W)
    for dt in (bf16, f32):
        for kernel in K.KERNELS:
            cfg = K.launch_config(dt, kernel)
            assert K.fit(cfg, 2 * K.slots(8), planes[kernel], dt.itemsize, kernel) == cfg
    widths = {}
    for dt in (bf16, f32):
        for kernel in K.KERNELS:
            for EK in (128, 256, 512, 1024):
                cfg = K.fit(K.launch_config(dt, kernel), EK, planes[kernel] if dt == bf16 else 1, dt.itemsize, kernel)
                assert cfg.block_d == 16 or EK * cfg.block_d * dt.itemsize <= K.REG_TILE_BYTES[kernel] * cfg.num_warps
                assert cfg.block_m == (16 if EK > K.WIDE_EK else K.launch_config(dt, kernel).block_m)
                widths[dt, kernel, EK] = cfg.block_d
    assert [widths[bf16, "fwd", EK] for EK in (128, 256, 512, 1024)] == [64, 64, 32, 16]
    assert [widths[bf16, "cols", EK] for EK in (128, 256, 512, 1024)] == [64, 32, 16, 16]
    assert [widths[f32, "fwd", EK] for EK in (128, 256, 512, 1024)] == [64, 32, 16, 16]
    assert [widths[f32, "cols", EK] for EK in (128, 256, 512, 1024)] == [32, 16, 16, 16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_too_wide_for_the_triton_kernels_is_refused_before_any_launch(dtype, device, monkeypatch):
    """Experts x hidden width whose packed up-projection tile cannot fit shared memory even at the
    narrowest tile (8 experts of hidden 256: 263 KB, fp32 or 16-bit activations with fp32 weights): a
    ValueError naming them, forward and backward, before any kernel runs (Triton would fail the launch as
    out of resources, past the Triton launcher's own checks). One size down (hidden 254) still fits."""
    from mmfast.kernels import adapter as K

    monkeypatch.setenv(ENV_VAR, "triton")
    launched = []

    class Recorder:
        def __getitem__(self, grid):
            launched.append(grid)
            raise AssertionError("a kernel was launched")

    for name in ("_pack_w_kernel", "_mma_fwd_kernel", "_mma_bwd_rows_kernel", "_mma_bwd_cols_kernel"):
        monkeypatch.setattr(K, name, Recorder())
    x, A, a, U, c, mix = (t.detach() for t in make_inputs(1, 3, 64, 256, 2, 8, dtype, device))
    with pytest.raises(ValueError, match="8 experts of hidden width 256 are too wide for the Triton kernels"):
        torch.ops.mmfast.mma_adapter_fwd(x, A, a, U, c, mix, 1.0, 2, 0.0, None)
    z = torch.zeros(3, 256, device=device)
    with pytest.raises(ValueError, match="8 experts of hidden width 256 are too wide"):
        torch.ops.mmfast.mma_adapter_bwd(torch.ones_like(x), x, z, A, a, U, c, mix, 1.0, 2, 0.0, None,
                                         True, True, True)
    assert not launched
    x2 = x.view(3, 64)
    for R in (254, 256):
        U = torch.zeros(8, 64, R // 2, device=device)
        fits = [K.smem_bytes(K._unpacked(x2, U, c, 2).launch(x2, kernel, planes), 8 * K.slots(R),
                             planes or (1 if dtype == torch.float32 else 2), x2.element_size()) <= K.SMEM_BUDGET
                for kernel, planes in (("fwd", None), ("rows", None), ("cols", 1))]
        # (the column kernel reads no W: one plane, so 16-bit activations' tiles fit at 256 too)
        assert fits == [R == 254, R == 254, R == 254 or dtype != torch.float32], (R, fits)


def test_bf16_on_the_interpreter_runs_the_reference(adapter_backend, monkeypatch, device, seed):
    """The Triton interpreter's bf16 ``tl.dot`` gives wrong products: a bf16 adapter under ``TRITON_INTERPRET=1``
    returned outputs ~1e10 off, and a bf16 MMA model trained on such gradients without a word. The auto backend
    runs those calls on the reference (counted as such, and accurate); ``MMFAST_BACKEND=triton`` refuses them,
    saying why. (fp16 and fp32 calls still run the kernels there.)"""
    from mmfast.kernels import _device

    if adapter_backend != "auto" or not _device.interpreting():
        pytest.skip("the auto backend's routing of CPU calls under the Triton interpreter")
    with mmfast.backends_used() as used:
        check_adapter(lambda i: dict(leaves=make_inputs(2, 5, 200, 8, 2, 2, torch.bfloat16, device), scale=0.8,
                                     groups=2), seed)
        mma_adapter(*make_inputs(2, 5, 200, 8, 2, 2, torch.float16, device), scale=0.8, groups=2)
    ran = {(u.dtype, u.direction, u.backend) for u in used if u.op == "mma_adapter"}
    assert ran == {(torch.bfloat16, "fwd", "reference"), (torch.bfloat16, "bwd", "reference"),
                   (torch.float16, "fwd", "triton")}
    monkeypatch.setenv(ENV_VAR, "triton")
    with pytest.raises(RuntimeError, match="bf16 tl.dot"):
        mma_adapter(*make_inputs(2, 5, 200, 8, 2, 2, torch.bfloat16, device), scale=0.8, groups=2)


# ---------------------------------------------------------------------------------------------
# errors, opcheck, compile
# ---------------------------------------------------------------------------------------------


def _good(device):
    return [t.detach() for t in make_inputs(2, 3, 64, 8, 2, 2, torch.float32, device)]


BAD = {
    "x-2d": (ValueError, "x must be", lambda a: [a[0][0]] + a[1:]),
    "x-int": (TypeError, "x must be", lambda a: [a[0].long()] + a[1:]),
    "down-width": (ValueError, "down_w", lambda a: [a[0], a[1][:, :32]] + a[2:]),
    "down-bias": (ValueError, "down_b", lambda a: [a[0], a[1], a[2][:4]] + a[3:]),
    "up-shape": (ValueError, "up_w", lambda a: a[:3] + [a[3][:, :, :2]] + a[4:]),
    "up-bias": (ValueError, "up_b", lambda a: a[:4] + [a[4][:1]] + a[5:]),
    "mix-shape": (ValueError, "mix", lambda a: a[:5] + [a[5][:1]]),
    "fp16-weights-fp32-x": (TypeError, "down_w", lambda a: [a[0], a[1].half()] + a[2:]),
    "other-device": (ValueError, "up_b", lambda a: a[:4] + [a[4].to("meta")] + a[5:]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case, device):
    exc, word, make = BAD[case]
    with pytest.raises(exc, match=word):
        mma_adapter(*make(_good(device)))


def test_bad_arguments(device):
    args = _good(device)
    with pytest.raises(ValueError, match="groups"):
        mma_adapter(*args, groups=3)
    with pytest.raises(ValueError, match="dropout"):
        mma_adapter(*args, dropout=1.0)
    with pytest.raises(ValueError, match="seed"):
        mma_adapter(*args, dropout=0.1)
    # a tensor scale's gradient would be lost (the op takes a number); a number scale is fine
    with pytest.raises(TypeError, match="scale must be a Python float"):
        mma_adapter(*args, scale=torch.tensor(0.5, device=device, requires_grad=True))
    with pytest.raises(ValueError, match="scale must be finite"):
        mma_adapter(*args, scale=float("nan"))
    with pytest.raises(TypeError, match="dropout must be a Python float"):
        mma_adapter(*args, dropout=torch.tensor(0.1))
    assert torch.isfinite(mma_adapter(*args, scale=2)).all()
    with pytest.raises(ValueError, match="groups"):
        mmfast.MMAdapter(100, hidden_dim=8, groups=3)
    adapter = mmfast.MMAdapter(64).to(device)
    with pytest.raises(ValueError, match="route"):
        adapter(torch.randn(2, 3, 64, device=device), torch.randn(3, 64, device=device))


def test_module_in_float64_and_disabled(device):
    """The fused kernel refuses float64 with a message that says what runs it; ``impl="eager"`` and
    ``mmfast.disabled()`` both run the eager composition (identical results, float64 included)."""
    adapter = mmfast.MMAdapter(64, dropout=0.0).to(device).double()
    with torch.no_grad():
        adapter.up_weight.normal_()
    x, route = torch.randn(2, 3, 64, device=device, dtype=torch.float64), torch.randn(2, 64, device=device)
    with pytest.raises(TypeError, match=r"float64; impl='eager' or `with mmfast.disabled\(\):`"):
        adapter(x, route)
    with mmfast.disabled():
        y = adapter(x, route)
    adapter.impl = "eager"
    assert y.dtype == torch.float64 and torch.equal(y, adapter(x, route))
    adapter.impl = "bogus"
    with pytest.raises(ValueError, match="impl must be one of"), mmfast.disabled():
        adapter(x, route)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_backward_is_repeatable_and_deterministic(device, dropout):
    """The weight gradients reduce row-tile partials in a fixed order (no atomics): two backward passes on
    the same inputs and dropout seed give the same bits, several row tiles per program included."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float16  # the interpreter's bf16 products are unusable
    leaves = make_inputs(3, 130, 256, 8, 2, 2, dtype, device)
    seed = torch.tensor([11], dtype=torch.int64, device=device)
    y = mma_adapter(*leaves, scale=0.7, groups=2, dropout=dropout, seed=seed if dropout else None)
    dy = torch.randn_like(y)
    first = torch.autograd.grad(y, leaves, dy, retain_graph=True)
    second = torch.autograd.grad(y, leaves, dy)
    again = torch.autograd.grad(mma_adapter(*leaves, scale=0.7, groups=2, dropout=dropout,
                                            seed=seed if dropout else None), leaves, dy)
    for a, b, c in zip(first, second, again):
        assert a.abs().sum() > 0 and torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("path", ["eager", "ops"])
def test_gradient_of_each_input_alone(path, device, monkeypatch):
    """With only some inputs requiring gradients (a frozen down-projection, a fixed router, x a leaf of
    nothing trainable), each one asked for alone gets exactly what the full backward gives it."""
    if path == "ops":
        monkeypatch.setenv("MMFAST_EAGER", "ops")
    leaves = [t.detach() for t in make_inputs(2, 5, 64, 8, 2, 2, torch.float32, device)]
    dy = torch.randn_like(leaves[0])
    full = _run(mma_adapter, leaves, dy, scale=0.7, groups=2)[1]
    for i, name in enumerate(NAMES):
        ins = [t.clone().requires_grad_(k == i) for k, t in enumerate(leaves)]
        (g,) = torch.autograd.grad(mma_adapter(*ins, scale=0.7, groups=2), ins[i], dy)
        assert torch.equal(g, full[i]), name


def test_dropout_offset_limit_is_checked(device):
    """Dropout offsets are row * hidden + j in 32 bits: batch * seq * hidden must stay below 2**31, refused
    before anything runs (meta tensors: shapes only)."""
    D, R = 16, 8
    args = [torch.empty(R, D, device="meta"), torch.empty(R, device="meta"), torch.empty(2, D, R // 2, device="meta"),
            torch.empty(2, D, device="meta"), torch.empty(1, 2, device="meta")]
    x = torch.empty(1, 2**31 // R, D, device="meta")
    with pytest.raises(ValueError, match="must stay below 2\\*\\*31"):
        mma_adapter(x, *args)
    assert mma_adapter(x[:, 1:], *args).shape == (1, 2**31 // R - 1, D)


def test_opcheck(device):
    x, A, a, U, c, mix = make_inputs(2, 3, 64, 8, 2, 2, torch.float32, device)
    seed = torch.tensor([5], dtype=torch.int64, device=device)
    torch.library.opcheck(torch.ops.mmfast.mma_adapter_fwd, (x, A, a, U, c, mix, 0.5, 2, 0.0, None))
    torch.library.opcheck(torch.ops.mmfast.mma_adapter_fwd, (x, A, a, U, c, mix, 0.5, 2, 0.1, seed))
    with torch.no_grad():
        y, z = torch.ops.mmfast.mma_adapter_fwd(x, A, a, U, c, mix, 0.5, 2, 0.1, seed)
    args = [t.detach() for t in (torch.randn_like(y), x, z, A, a, U, c, mix)]
    torch.library.opcheck(torch.ops.mmfast.mma_adapter_bwd, (*args, 0.5, 2, 0.1, seed, True, True, True))


def test_compile_fullgraph(device):
    torch._dynamo.reset()
    adapter = mmfast.MMAdapter(64, dropout=0.0).to(device)
    with torch.no_grad():
        adapter.up_weight.normal_()
    x, route = torch.randn(2, 3, 64, device=device, requires_grad=True), torch.randn(2, 64, device=device)
    compiled = torch.compile(adapter, backend="aot_eager", fullgraph=True)
    y = compiled(x, route)
    torch.testing.assert_close(y, adapter(x, route))
    (g,) = torch.autograd.grad(y.sum(), x)
    (g_eager,) = torch.autograd.grad(adapter(x, route).sum(), x)
    torch.testing.assert_close(g, g_eager)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_eager_fast_path_equals_custom_op(dropout, monkeypatch, device):
    """The eager fast path (autograd.Function) and the custom ops run the same kernels: output and every
    gradient bitwise equal; tensor modes see the custom op."""
    from mmfast.ops.backend import EAGER_ENV

    leaves = make_inputs(2, 9, 200, 8, 2, 2, torch.float32, device)
    dseed = torch.tensor([77], dtype=torch.int64, device=device)
    dy = torch.randn_like(leaves[0])
    results = {}
    for path in ("fast", "ops"):
        monkeypatch.setenv(EAGER_ENV, "ops" if path == "ops" else "")
        y = mma_adapter(*leaves, scale=0.7, groups=2, dropout=dropout, seed=dseed)
        assert (y.grad_fn.name() == "_MMAdapterFnBackward") == (path == "fast"), y.grad_fn.name()
        results[path] = [y, *torch.autograd.grad(y, leaves, dy)]
    for a, b in zip(results["fast"], results["ops"]):
        assert torch.equal(a, b)

    monkeypatch.setenv(EAGER_ENV, "")
    seen = dispatched_ops(lambda: mma_adapter(*leaves, groups=2))
    assert any("mmfast.mma_adapter_fwd" in s for s in seen), seen


def test_cuda_backend_runs_its_own_kernels(adapter_backend, device, monkeypatch, seed):
    """Under MMFAST_BACKEND=cuda an adapter within the kernels' limits never reaches the Triton launchers,
    its kernels draw the Triton kernels' dropout mask, and a larger adapter runs Triton, with one warning
    naming the limit."""
    if adapter_backend == "auto":
        pytest.skip("a test of the cuda backend (its parametrisation runs it)")
    from mmfast.kernels import adapter as triton_kernels
    from mmfast.kernels import cuda_ext
    from mmfast.ops import backend

    dtype = torch.bfloat16 if device == "cuda" else torch.float16  # the interpreter's bf16 products are unusable
    leaves = make_inputs(2, 7, 512, 8, 2, 2, dtype, device)
    dseed = torch.tensor([seed], dtype=torch.int64, device=device)
    M = 2**16 if device == "cuda" else 2**10
    assert torch.equal(cuda_ext.adapter_keep_mask(dseed, M, 8, 0.25), triton_kernels.keep_mask(dseed, M, 8, 0.25))
    x2, down_w, up_w = leaves[0].detach().reshape(14, 512), leaves[1].detach(), leaves[3].detach()
    assert cuda_ext.adapter_path(x2, down_w, up_w, 2) == "v8"  # 16-byte rows
    assert cuda_ext.adapter_path(x2, down_w, up_w, 2, backward=True) == "v8+v2"
    odd = (x2[:, 2:], down_w[:, 2:], up_w[:, 2:], 2)  # group width 255, rows off 16-byte alignment
    assert (cuda_ext.adapter_path(*odd), cuda_ext.adapter_path(*odd, backward=True)) == ("v1", "v1+v1")

    def refuse(*args, **kwargs):
        raise AssertionError("the Triton adapter kernels ran under MMFAST_BACKEND=cuda")

    with monkeypatch.context() as m:
        for name in ("adapter_fwd", "adapter_bwd"):
            m.setattr(triton_kernels, name, refuse)
        y = mma_adapter(*leaves, dropout=0.25, seed=dseed)
        y.float().sum().backward()
    assert all(t.grad is not None for t in leaves)
    backend._warned.clear()
    big = make_inputs(2, 7, 512, 16, 2, 2, dtype, device)
    with pytest.warns(RuntimeWarning, match="MMFAST_BACKEND=cuda, but the CUDA C\\+\\+ kernels cannot run: the CUDA C\\+\\+ adapter kernels take 1 to 8 hidden"):
        mma_adapter(*big)


def test_broadcast_rows(device, seed):
    """x and the output gradient with rows that share memory (stride 0: an expanded input, autograd's
    gradient of a sum over tokens) give what contiguous copies give, bit for bit."""
    B, S, D, R, G, E = 2, 5, 64, 8, 2, 2
    x, *params = make_inputs(B, S, D, R, G, E, torch.float32, device)
    row = x.detach()[:, :1]  # one token per sample, repeated over S
    dy_row = torch.randn(B, 1, D, device=device)

    def run(expand):
        xi = (row.expand(B, S, D) if expand else row.expand(B, S, D).contiguous()).requires_grad_(True)
        ps = [p.detach().clone().requires_grad_() for p in params]
        y = mmfast.mma_adapter(xi, *ps, scale=1.0, groups=G)
        dy = dy_row.expand(B, S, D) if expand else dy_row.expand(B, S, D).contiguous()
        grads = torch.autograd.grad(y, [xi, *ps], dy)
        return [y.detach(), *grads]

    for got, want in zip(run(True), run(False)):
        assert torch.equal(got, want)
