"""``csrc/binding.cpp``'s ops called directly (``torch.ops.mmfast_cuda.*``): the checks that guard the kernels'
assumptions, and, without a GPU, the binding's glue (allocations, workspaces, partial sums, dtype mapping)
against the emulator's own drivers of the same kernels.

On a GPU these run the real extension on CUDA tensors; without one, the binding built for CPU tensors over
the emulated kernels (cuda_emulator.register_cpu_ops). The ops layer validates arguments before it calls
these ops, so only direct calls reach the checks; each case here breaks one assumption of one op.
"""

import ctypes

import pytest
import torch

from mmfast.kernels import cuda_ext

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"


@pytest.fixture(scope="module")
def ops():
    if GPU:
        assert cuda_ext.load(), f"the CUDA C++ backend did not load: {cuda_ext.unavailable_reason()}"
    else:
        import cuda_emulator

        if cuda_emulator.unavailable_reason():
            pytest.skip(f"emulated CUDA C++ kernels: {cuda_emulator.unavailable_reason()}")
        cuda_emulator.register_cpu_ops()
    return torch.ops.mmfast_cuda


def t(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, device=DEV).to(dtype)


M, N = 6, 64
B, S, D, R, E = 2, 3, 32, 8, 2


def _norm_bwd(ops, **kw):
    a = dict(dy=t(M, N), x=t(M, N), weight=t(N), mean=t(M, dtype=torch.float32), rstd=t(M, dtype=torch.float32).abs(),
             dresidual_out=None, rms=False, need_dx=True, need_dw=True, need_db=True, dw_dtype=None, db_dtype=None,
             stages=0)
    a.update(kw)
    return ops.norm_bwd(*a.values())


def _adapter(R=R, E=E, groups=2, D=D, S=S, B=B, mix_e=None, p=0.0, seed=None, dtype=torch.bfloat16):
    return dict(x=t(B * S, D, dtype=dtype), down_w=t(R, D, dtype=torch.float32), down_b=t(R, dtype=torch.float32),
                up_w=t(E, D, R // groups, dtype=torch.float32), up_b=t(E, D, dtype=torch.float32),
                mix=t(B, mix_e or E, dtype=torch.float32).softmax(-1), scale=1.0, groups=groups, p=p, seed=seed, S=S)


def _replace(args, **kw):
    return tuple({**args, **kw}.values())


def _adapter_fwd(ops, **kw):
    return ops.adapter_fwd(*_adapter(**kw).values())


def _adapter_bwd(ops, z=None, dy=None, **kw):
    a = _adapter(**kw)
    M_, R_ = a["x"].shape[0], a["down_w"].shape[0]
    z = torch.zeros(M_, R_, device=DEV) if z is None else z
    dy = torch.zeros_like(a["x"]) if dy is None else dy
    return ops.adapter_bwd(dy, a["x"], z, a["down_w"], a["up_w"], a["up_b"], a["mix"], a["scale"], a["groups"],
                           a["p"], a["seed"], a["S"], True, True)


SEED = lambda dtype=torch.int64: torch.tensor([7], device=DEV, dtype=dtype)  # noqa: E731

BAD = {
    # norm_fwd
    "norm_fwd: 1-D x": (lambda o: o.norm_fwd(t(N), None, None, None, 1e-6, True), "x must be a 2-D"),
    "norm_fwd: empty rows": (lambda o: o.norm_fwd(t(M, 0), None, None, None, 1e-6, True), "empty rows"),
    "norm_fwd: column stride": (lambda o: o.norm_fwd(t(N, M).t(), None, None, None, 1e-6, True), "unit column stride"),
    "norm_fwd: RMSNorm with a bias": (lambda o: o.norm_fwd(t(M, N), t(N), t(N), None, 1e-6, True), "takes no bias"),
    "norm_fwd: integer x": (lambda o: o.norm_fwd(t(M, N, dtype=torch.int32), None, None, None, 1e-6, True),
                            "must be float32, float16 or bfloat16"),
    "norm_fwd: weight length": (lambda o: o.norm_fwd(t(M, N), t(N + 1), None, None, 1e-6, True),
                                "weight must be a contiguous vector of length N"),
    "norm_fwd: strided weight": (lambda o: o.norm_fwd(t(M, N), t(2 * N)[::2], None, None, 1e-6, True),
                                 "weight must be a contiguous vector of length N"),
    "norm_fwd: weight dtype": (lambda o: o.norm_fwd(t(M, N), t(N, dtype=torch.float16), None, None, 1e-6, True),
                               "in x's dtype or float32"),
    "norm_fwd: residual shape": (lambda o: o.norm_fwd(t(M, N), None, None, t(M + 1, N), 1e-6, True),
                                 r"residual must be \[M, N\] like x"),
    "norm_fwd: residual dtype": (lambda o: o.norm_fwd(t(M, N), None, None, t(M, N, dtype=torch.float32), 1e-6, True),
                                 "residual must have x's dtype"),
    # norm_bwd
    "norm_bwd: dy shape": (lambda o: _norm_bwd(o, dy=t(M, N + 1)), r"dy must be \[M, N\] like x"),
    "norm_bwd: dweight without a weight": (lambda o: _norm_bwd(o, weight=None), "need_dw requires a weight"),
    "norm_bwd: RMSNorm dbias": (lambda o: _norm_bwd(o, rms=True, mean=None), "RMSNorm has no bias"),
    "norm_bwd: LayerNorm without mean": (lambda o: _norm_bwd(o, mean=None), "LayerNorm needs mean"),
    "norm_bwd: rstd dtype": (lambda o: _norm_bwd(o, rstd=t(M)), r"rstd must be float32 \[M\]"),
    "norm_bwd: rstd length": (lambda o: _norm_bwd(o, rstd=t(M + 1, dtype=torch.float32)), r"rstd must be float32 \[M\]"),
    "norm_bwd: 1 stage": (lambda o: _norm_bwd(o, stages=1), "stages must be 0 or 2..4, got 1"),
    "norm_bwd: 5 stages": (lambda o: _norm_bwd(o, stages=cuda_ext.MAX_BWD_STAGES + 1), "stages must be 0 or 2..4"),
    "norm_fwd: residual column stride": (lambda o: o.norm_fwd(t(M, N), None, None, t(N, M).t(), 1e-6, True),
                                         "residual needs a unit column stride"),
    "norm_fwd: bias length": (lambda o: o.norm_fwd(t(M, N), t(N), t(N - 1), None, 1e-6, False),
                              "bias must be a contiguous vector of length N"),
    "norm_bwd: x column stride": (lambda o: _norm_bwd(o, x=t(N, M).t(), dy=t(N, M).t()), "x needs a unit column stride"),
    "norm_bwd: residual gradient shape": (lambda o: _norm_bwd(o, dresidual_out=t(M, N - 1)),
                                          r"dresidual_out must be \[M, N\] like x"),
    "norm_bwd: weight length": (lambda o: _norm_bwd(o, weight=t(N + 1)), "weight must be a contiguous vector"),
    "norm_bwd: mean length": (lambda o: _norm_bwd(o, mean=t(M - 1, dtype=torch.float32)), "LayerNorm needs mean"),
    "norm_bwd: bf16 mean": (lambda o: _norm_bwd(o, mean=t(M)), r"LayerNorm needs mean: float32 \[M\]"),
    "norm_bwd: strided mean": (lambda o: _norm_bwd(o, mean=t(2 * M, dtype=torch.float32)[::2]),
                               r"LayerNorm needs mean: float32 \[M\], contiguous"),
    "norm_bwd: strided rstd": (lambda o: _norm_bwd(o, rstd=t(2 * M, dtype=torch.float32)[::2]),
                               r"rstd must be float32 \[M\]"),
    "norm_bwd: integer dweight": (lambda o: _norm_bwd(o, dw_dtype=torch.int32), "dweight must be float32"),
    "norm_path: 1-D x": (lambda o: o.norm_path(t(N), None, None, None, True, False, 0), "x must be 2-D"),
    "norm_path: 1 stage": (lambda o: o.norm_path(t(M, N), t(N), None, None, True, True, 1), "stages must be 0 or 2..4"),
    # the adapter
    "adapter_fwd: 1-D x": (lambda o: o.adapter_fwd(t(D), *list(_adapter().values())[1:]), "x must be a 2-D"),
    "adapter_fwd: down_w width": (lambda o: o.adapter_fwd(t(B * S, D + 1), *list(_adapter().values())[1:]),
                                  r"down_w must be \[R, D\]"),
    "adapter_fwd: groups": (lambda o: _adapter_fwd(o, groups=3), r"up_w must be \[E, D, R / groups\]"),
    "adapter_fwd: mix experts": (lambda o: _adapter_fwd(o, mix_e=E + 1), r"mix must be \[B, E\]"),
    "adapter_fwd: tokens": (lambda o: o.adapter_fwd(*list(_adapter().values())[:-1], S + 1), "samples of S tokens"),
    "adapter_fwd: too wide": (lambda o: _adapter_fwd(o, R=16), "unsupported shape"),
    "adapter_fwd: too many experts": (lambda o: _adapter_fwd(o, E=3), "unsupported shape"),
    "adapter_fwd: dropout without a seed": (lambda o: _adapter_fwd(o, p=0.1), "dropout needs seed"),
    "adapter_fwd: int32 seed": (lambda o: _adapter_fwd(o, p=0.1, seed=SEED(torch.int32)), "dropout needs seed"),
    "adapter_fwd: dropout of 1": (lambda o: _adapter_fwd(o, p=1.0, seed=SEED()), "unsupported shape"),
    "adapter_fwd: x column stride": (lambda o: o.adapter_fwd(t(D, B * S).t(), *list(_adapter().values())[1:]),
                                     "x needs a unit column stride"),
    "adapter_fwd: down_b length": (lambda o: o.adapter_fwd(*_replace(_adapter(), down_b=t(R + 1, dtype=torch.float32))),
                                   r"down_b must be \[R\]"),
    "adapter_fwd: up_b shape": (lambda o: o.adapter_fwd(*_replace(_adapter(), up_b=t(E, D + 1, dtype=torch.float32))),
                                r"up_b must be \[E, D\]"),
    "adapter_fwd: two seeds": (lambda o: _adapter_fwd(o, p=0.1, seed=torch.tensor([7, 8], device=DEV)),
                               "dropout needs seed"),
    "adapter_bwd: strided z": (lambda o: _adapter_bwd(o, z=torch.zeros(B * S, 2 * R, device=DEV)[:, ::2]),
                               "z must be the forward's float32"),
    "adapter_keep_mask: two seeds": (lambda o: o.adapter_keep_mask(torch.tensor([7, 8], device=DEV), 4, 8, 0.1),
                                     "seed must be a one-element int64"),
    "adapter_bwd: z dtype": (lambda o: _adapter_bwd(o, z=torch.zeros(B * S, R, device=DEV, dtype=torch.bfloat16)),
                             "z must be the forward's float32"),
    "adapter_bwd: z shape": (lambda o: _adapter_bwd(o, z=torch.zeros(B * S, R + 1, device=DEV)),
                             "z must be the forward's float32"),
    "adapter_bwd: dy shape": (lambda o: _adapter_bwd(o, dy=t(B * S, D + 1)), r"dy must be \[M, N\] like x"),
    "adapter_keep_mask: int32 seed": (lambda o: o.adapter_keep_mask(SEED(torch.int32), 4, 8, 0.1),
                                      "seed must be a one-element int64"),
    "adapter_path: no rows": (lambda o: o.adapter_path(t(0, D), t(R, D), t(E, D, R), 1, False), "x must be 2-D with rows"),
}
if GPU:  # one device on CPU: these break the device assumption
    BAD |= {
        "norm_fwd: CPU x": (lambda o: o.norm_fwd(torch.randn(M, N).bfloat16(), t(N), None, None, 1e-6, True),
                            "x must be a 2-D CUDA tensor"),
        "norm_fwd: CPU weight": (lambda o: o.norm_fwd(t(M, N), torch.ones(N), None, None, 1e-6, True),
                                 "weight must be on x's device"),
        "norm_bwd: CPU dy": (lambda o: _norm_bwd(o, dy=torch.randn(M, N).bfloat16()), "dy must be a CUDA tensor"),
        "norm_bwd: CPU mean": (lambda o: _norm_bwd(o, mean=torch.randn(M)), r"mean: .* on x's device"),
        "norm_bwd: CPU rstd": (lambda o: _norm_bwd(o, rstd=torch.rand(M) + 1), "rstd must be .* on x's device"),
        "adapter_fwd: CPU mix": (lambda o: o.adapter_fwd(*list(_adapter().values())[:5], torch.ones(B, E) / E,
                                                         *list(_adapter().values())[6:]), "on x's device"),
    }


@pytest.mark.parametrize("case", sorted(BAD))
def test_binding_rejects_what_its_kernels_cannot_take(ops, case):
    call, message = BAD[case]
    with pytest.raises(RuntimeError, match=message):
        call(ops)


@pytest.mark.parametrize("case", ["norm_fwd: RMSNorm with a bias", "adapter_fwd: too wide"])
def test_a_valid_neighbour_of_a_rejected_case_runs(ops, case):
    """The rejections above are specific: the same call with the broken argument mended runs."""
    if case.startswith("norm"):
        y, _, _, rstd = ops.norm_fwd(t(M, N), t(N), None, None, 1e-6, True)
        assert y.shape == (M, N) and torch.isfinite(rstd).all()
    else:
        y, z = _adapter_fwd(ops, R=8)
        assert y.shape == (B * S, D) and z.shape == (B * S, R) and torch.isfinite(z).all()


# ---- without a GPU: the binding's glue against the emulator's drivers of the same kernels ------------------

needs_emulator = pytest.mark.skipif(GPU, reason="compares the CPU build of the binding with the emulator's drivers")


def _same(a, b, what):
    if a is None or b is None:
        assert (a is None or a.numel() == 0) and (b is None or b.numel() == 0), what
        return
    assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), what


@pytest.fixture
def emulated_device():
    """Select an emulated device (0: 3 SMs with an H100's shared memory, 1: 2 SMs with 64 KiB); back to 0 after."""
    import cuda_emulator

    yield cuda_emulator.select_device
    cuda_emulator.select_device(0)


NORM_CASES = {  # rms, residual, activation dtype, weight dtype, width
    "rms bf16": (True, False, torch.bfloat16, torch.bfloat16, 4096),
    "rms+residual fp16, fp32 weight": (True, True, torch.float16, torch.float32, 1024),
    "ln bf16, fp32 weight": (False, False, torch.bfloat16, torch.float32, 4096),
    "ln+residual fp32, generic width": (False, True, torch.float32, torch.float32, 1000),
}


@needs_emulator
@pytest.mark.parametrize("dev", [0, 1])
@pytest.mark.parametrize("stages", [0, 2, 3])
@pytest.mark.parametrize("need", ["dx dw db", "dx", "dw db", "dw"])
@pytest.mark.parametrize("case", sorted(NORM_CASES))
def test_norm_binding_equals_the_drivers(ops, emulated_device, case, need, stages, dev):
    """Outputs, gradients and statistics bit for bit, for strided x / dy rows, on two emulated devices
    (so the partial-sum workspace has two sizes) and with the staged backward asked for."""
    import cuda_emulator

    rms, residual, act, wdt, Nx = NORM_CASES[case]
    emulated_device(dev)
    g = torch.Generator().manual_seed(Nx + stages)
    Mx = 37

    def rows(pad):
        return torch.randn(Mx, Nx + pad, generator=g).to(act)[:, :Nx]  # rows Nx + pad apart

    x, dy = rows(8), rows(16)
    res = rows(0) if residual else None
    w = (1 + 0.1 * torch.randn(Nx, generator=g)).to(wdt)
    b = None if rms else (0.1 * torch.randn(Nx, generator=g)).to(wdt)
    got = ops.norm_fwd(x, w, b, res, 1e-5, rms)
    want = cuda_emulator.norm_fwd(x, w, b, res, 1e-5, rms)
    for name, a, e in zip(("y", "residual_out", "mean", "rstd"), got, want):
        _same(a, e, f"forward {name}")
    need_dx, need_dw, need_db = "dx" in need, "dw" in need, "db" in need and not rms
    dres = rows(0) if residual and need_dx else None
    mean, rstd = got[2] if not rms else None, got[3]
    got_b = ops.norm_bwd(dy, x, w, mean, rstd, dres, rms, need_dx, need_dw, need_db, torch.float32, None, stages)
    want_b = cuda_emulator.norm_bwd(dy, x, w, mean, rstd, dres, rms, need_dx, need_dw, need_db, stages=stages,
                                    dw_dtype=torch.float32, db_dtype=act)
    for name, a, e in zip(("dx", "dweight", "dbias"), got_b, want_b[:3]):
        _same(a, e, f"backward {name}")
    assert cuda_emulator.take_ran_paths()[-1] == f"norm_bwd:{want_b[3]}"


@needs_emulator
def test_no_rows(ops):
    """M = 0: empty outputs and zero weight gradients; the backward launches nothing but the partial sums."""
    import cuda_emulator

    x = t(0, N)
    cuda_emulator.take_ran_paths()
    y, h, mean, rstd = ops.norm_fwd(x, t(N), t(N), None, 1e-5, False)
    assert y.shape == (0, N) and mean.shape == (0,) and rstd.shape == (0,)
    dx, dw, db = ops.norm_bwd(t(0, N), x, t(N), mean, rstd, None, False, True, True, True, None, None, 0)
    assert dx.shape == (0, N) and torch.equal(dw, torch.zeros_like(dw)) and torch.equal(db, torch.zeros_like(db))
    assert cuda_emulator.take_ran_paths() == ["norm_fwd:" + ops.norm_path(x, t(N), t(N), None, False, False, 0)]


@needs_emulator
def test_binding_outputs_come_from_guarded_buffers(ops):
    """Inside the ops, allocations are the emulator's fenced buffers (NaN-filled, ending at a guarded
    page): an output element the kernels never write stays NaN, an access past a workspace faults."""
    import cuda_emulator

    y, _, _, rstd = ops.norm_fwd(t(M, N), t(N), None, None, 1e-6, True)
    assert all(cuda_emulator.lib().emu_fenced_offset(o.data_ptr()) > 0 for o in (y, rstd))
    assert cuda_emulator.lib().emu_fenced_offset(t(M, N).data_ptr()) == 0  # outside the ops: torch's own


@needs_emulator
@pytest.mark.parametrize("case", ["contiguous", "padded rows", "offset by one element", "odd bytes", "column",
                                  "broadcast rows"])
def test_binding_inputs_are_copied_into_guarded_buffers(case):
    """Every tensor input an op gets is first copied into a fenced buffer (binding_emu.cpp), and every
    launch checks that all its pointers lie in one: same values, sizes and strides, the same address
    modulo 16 (the kernels' vector paths depend on it), NaN in the gaps between strided rows, and the
    guard page under 16 bytes past the last element, so a kernel reading past an input faults."""
    import cuda_emulator

    cuda_emulator.register_cpu_ops()
    L = cuda_emulator.lib()
    L.emu_in_fence.argtypes, L.emu_in_fence.restype = [ctypes.c_void_p], ctypes.c_int
    base = torch.randn(7, 40)
    x = {"contiguous": base, "padded rows": base[:, :33], "offset by one element": base.view(-1)[1:1 + 9 * 22].view(9, 22),
         "odd bytes": base.to(torch.bfloat16)[:, :13], "column": base[:, 5], "broadcast rows": base[0].expand(7, 40)}[case]
    c = torch.ops.mmfast_cuda_emu.fenced_input(x)
    assert torch.equal(c, x) and c.stride() == x.stride() and c.dtype == x.dtype
    assert c.data_ptr() % 16 == x.data_ptr() % 16
    assert L.emu_in_fence(c.data_ptr()) and not L.emu_in_fence(x.data_ptr())
    span = ((torch.tensor(c.shape) - 1) * torch.tensor(c.stride())).sum().item() + 1  # elements first to last
    end = c.data_ptr() + span * c.element_size()
    assert L.emu_in_fence(end - 1) and not L.emu_in_fence(end + 15)  # the guard, under 16 bytes past the end
    whole = c.as_strided((span,), (1,))  # the elements and the gaps between them
    covered = torch.zeros(span, dtype=torch.bool)
    covered.as_strided(c.shape, c.stride()).fill_(True)
    gaps = whole[~covered]
    assert gaps.numel() == 0 if case in ("contiguous", "offset by one element", "broadcast rows") else gaps.numel() > 0
    assert gaps.float().isnan().all()


@needs_emulator
def test_binding_takes_broadcast_rows(ops):
    """Rows that share memory (stride 0: autograd's gradient of a sum over rows, an expanded input) are
    valid inputs: the same outputs as from their contiguous copy."""
    v, w = t(N), t(N)
    for args in ((v.expand(M, N), w, None, None), (t(M, N), w, None, v.expand(M, N))):
        got = ops.norm_fwd(*args, 1e-6, True)
        want = ops.norm_fwd(*[a.contiguous() if a is not None else None for a in args], 1e-6, True)
        for a, e in zip(got, want):
            assert (a is None and e is None) or torch.equal(a, e)


@needs_emulator
def test_a_one_element_weight_with_any_stride(ops):
    """N = 1: a weight or bias view of one element may have any stride (PyTorch calls it contiguous, so
    ``.contiguous()`` keeps it); the binding refused it, where the Triton backend took it."""
    x, dy = t(M, 1), t(M, 1)
    w, b = t(3)[::3], t(5)[2::4]
    assert w.stride() == (3,) and b.stride() == (4,)
    for rms in (True, False):
        got = cuda_ext.norm_fwd(x, w, None if rms else b, None, 1e-5, rms)
        want = cuda_ext.norm_fwd(x, w.clone(), None if rms else b.clone(), None, 1e-5, rms)
        for a, e in zip(got, want):
            assert (a is None and e is None) or torch.equal(a, e)
        mean, rstd = got[2], got[3]
        grads = cuda_ext.norm_bwd(dy, x, w, mean, rstd, None, rms, True, True, not rms)
        want = cuda_ext.norm_bwd(dy, x, w.clone(), mean, rstd, None, rms, True, True, not rms)
        for a, e in zip(grads, want):
            assert (a is None and e is None) or torch.equal(a, e)


@needs_emulator
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("act", [torch.bfloat16, torch.float32])
def test_adapter_binding_equals_the_drivers(ops, p, act):
    import cuda_emulator

    torch.manual_seed(5)
    a = _adapter(groups=2, D=256, S=5, B=3, p=p, seed=SEED() if p else None, dtype=act)
    a["up_w"] = a["up_w"].bfloat16()  # widened to fp32 by the binding, as by the drivers
    got = ops.adapter_fwd(*a.values())
    want = cuda_emulator.adapter_fwd(a["x"], a["S"], a["down_w"], a["down_b"], a["up_w"], a["up_b"], a["mix"],
                                     a["scale"], a["groups"], a["p"], a["seed"])
    _same(got[0], want[0], "y")
    _same(got[1], want[1], "z")
    dy = torch.randn_like(a["x"])
    args = (a["down_w"], a["up_w"], a["up_b"], a["mix"], a["scale"], a["groups"], a["p"], a["seed"])
    got_b = ops.adapter_bwd(dy, a["x"], got[1], *args, a["S"], True, True)
    want_b = cuda_emulator.adapter_bwd(dy, a["x"], got[1], a["S"], *args, True, True)[:6]
    for name, g_, e in zip(("dx", "d_down_w", "d_down_b", "d_up_w", "d_up_b", "d_mix"), got_b, want_b):
        _same(g_, e, name)


@needs_emulator
def test_the_binding_records_the_paths_it_launched(ops):
    import cuda_emulator

    cuda_emulator.take_ran_paths()
    x, w = t(M, 1024), t(1024)
    a = _adapter()
    ops.norm_fwd(x, w, None, None, 1e-6, True)
    ops.adapter_fwd(*a.values())
    assert cuda_emulator.take_ran_paths() == [
        "norm_fwd:" + ops.norm_path(x, w, None, None, True, False, 0),
        "adapter_fwd:" + ops.adapter_path(a["x"], a["down_w"], a["up_w"], a["groups"], False)]
    assert cuda_emulator.take_ran_paths() == []
