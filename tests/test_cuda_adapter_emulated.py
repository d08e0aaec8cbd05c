"""The CUDA C++ adapter kernels (csrc/adapter.cu) on the CPU through the emulator (cuda_emulator.py).

The same accuracy rule as test_adapter.py (float64 reference, PyTorch's LaVIN-style low-precision error),
in fp32, fp16 and bf16 (the emulator has no tl.dot problem), over the vector and scalar paths of the row
kernels and the column kernel, strided and misaligned rows, one to eight groups, one or two experts,
hidden widths up to the kernels' limit, dropout (the same mask as the Triton kernels, bit for bit), the
need_dx / need_dw subsets, M = 0, and persistent column programs walking many rows. Every call is also
checked for accesses outside its buffers and for inputs it changed (cuda_emulator.py). Speed and the
GPU's own rounding are the GPU tests' part (test_adapter.py runs this backend natively there).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import cuda_emulator as E
from mmfast.kernels import cuda_ext
from test_adapter import check_adapter, make_inputs

_reason = E.unavailable_reason()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def emulated_device():
    E.select_device(0)
    yield
    E.select_device(0)


def emulated(pad: int = 0, offset: int = 0, paths: list | None = None, need=(True, True)):
    """A ``fused`` for test_adapter's check: forward and backward through the emulated kernels (rows ``D +
    pad`` apart, x ``offset`` elements off 16-byte alignment); kernel path names go to ``paths``."""

    def fused(leaves, dy, scale, groups, dropout, dseed):
        x, A, a, U, c, mix = (t.detach() for t in leaves)
        B, S, D = x.shape
        rows = lambda t: t.reshape(B * S, D)  # noqa: E731
        y, z, fpath = E.adapter_fwd(rows(x), S, A, a, U, c, mix, scale, groups, dropout, dseed, pad=pad, offset=offset)
        dx, dA, da, dU, dc, dmix, bpath = E.adapter_bwd(rows(dy), rows(x), z, S, A, U, c, mix, scale, groups, dropout,
                                                        dseed, need_dx=need[0], need_dw=need[1], pad=pad, offset=offset)
        if paths is not None:
            paths.append((fpath, bpath))
        grads = [dx.view(B, S, D) if dx is not None else torch.zeros_like(x)]
        for g, t in zip((dA, da, dU, dc), (A, a, U, c)):
            grads.append(g.to(t.dtype) if g is not None else torch.zeros_like(t))
        return y.view(B, S, D), grads + [dmix.to(mix.dtype)]

    return fused


def check(shape, dtype, seed, draws=2, dropout=0.0, weight_dtype=torch.float32, **kw):
    B, S, D, R, G, Ex = shape

    def draw(i):
        leaves = make_inputs(B, S, D, R, G, Ex, dtype, "cpu", weight_dtype=weight_dtype)
        # draws check_adapter adds to pool small outputs take the same path as the first ones: not recorded
        out = dict(leaves=leaves, scale=0.8, groups=G, fused=emulated(**(kw if i < draws else {**kw, "paths": None})))
        if dropout > 0:
            dseed = torch.tensor([seed + i], dtype=torch.int64)
            keep = E.adapter_keep_mask(dseed, B * S, R, dropout)
            out.update(keep=keep.view(B, S, R) / (1 - dropout), dropout=dropout, dseed=dseed)
        return out

    check_adapter(draw, seed, draws=draws)


SHAPES = [  # (B, S, D, R, G, E), paths for 16-bit / fp32 activations
    (2, 5, 200, 8, 2, 2),  # group width 100: scalar rows for 16-bit, 4-vectors for fp32
    (1, 33, 96, 4, 1, 2),  # one group, several row tiles, a partial last tile
    (2, 9, 120, 6, 3, 2),  # three groups
    (2, 4, 64, 8, 8, 1),  # one hidden channel per group, one expert
    (3, 7, 1024, 8, 2, 2),  # 16-byte vectors everywhere, several vectors per thread
    (1, 3, 4096, 8, 2, 2),  # a LLaMA-7B width: 64 threads per row tile
    (2, 3, 25, 5, 5, 2),  # odd width, odd groups: scalar everything
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(shape, dtype, seed):
    check(shape, dtype, seed)


def _expected(D, G, dtype, pad=0, offset=0, M=2):
    """(forward, backward) paths: a vector width where every row the kernel reads that way (x: offset and
    padded; dy: padded) starts on a multiple of it and no vector straddles a group. A single row has no
    row stride to speak of (the kernels are passed D)."""
    vec = 16 // torch.empty((), dtype=dtype).element_size()
    pad = pad if M > 1 else 0
    fits = lambda v, off: D % v == 0 and (D // G) % v == 0 and (D + pad) % v == 0 and off % v == 0  # noqa: E731
    name = lambda v, off: f"v{v}" if fits(v, off) else "v1"  # noqa: E731
    return name(vec, offset), f"{name(vec, 0)}+{name(2, offset)}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", [(0, 0), (3, 0), (8, 1), (16, 2)], ids=lambda t: f"pad{t[0]}-offset{t[1]}")
def test_strided_and_misaligned_rows(dtype, layout, seed):
    """Row strides and a start off 16-byte alignment take the paths whose accesses they allow, and stay
    accurate (nothing read from the NaN padding between rows)."""
    pad, offset = layout
    shape = (2, 6, 512, 8, 2, 2)
    paths = []
    check(shape, dtype, seed, draws=1, pad=pad, offset=offset, paths=paths)
    assert paths == [_expected(512, 2, dtype, pad, offset)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_uses_the_triton_mask(dtype, seed):
    """Forward and backward draw one mask, the Triton kernels' (check draws the reference's mask from the
    emulated kernel; test_keep_mask_matches_triton ties that to Triton's)."""
    check((3, 11, 256, 8, 2, 2), dtype, seed, dropout=0.3)


@pytest.mark.parametrize("seed_value", [0, 7, 2**31 + 5, 2**40 + 123, -1, -(2**50) - 3])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_mask_matches_triton(seed_value, p):
    """The CUDA C++ kernels draw the Triton kernels' dropout mask for every seed (both halves of the key)."""
    K = _triton()
    seed = torch.tensor([seed_value], dtype=torch.int64)
    M, R = 4096, 8
    mask = E.adapter_keep_mask(seed, M, R, p)
    assert torch.equal(mask, K.keep_mask(seed, M, R, p))
    rate = mask.float().mean().item()
    assert abs(rate - (1 - p)) < 5 * ((1 - p) * p / mask.numel()) ** 0.5


@pytest.mark.parametrize("need", [(True, False), (False, True)], ids=["dx-only", "dw-only"])
def test_gradient_subsets(need, seed):
    """need_dx / need_dw alone write what was asked; d mix and d z come either way (with dropout, so the
    column kernel reads the dropped activations the rows kernel wrote only when dW is wanted)."""
    B, S, D, R, G, Ex = 2, 7, 256, 8, 2, 2
    x, A, a, U, c, mix = (t.detach() for t in make_inputs(B, S, D, R, G, Ex, torch.float16, "cpu"))
    dseed = torch.tensor([seed], dtype=torch.int64)
    rows = x.reshape(B * S, D)
    dy = torch.randn_like(rows)
    _y, z, _ = E.adapter_fwd(rows, S, A, a, U, c, mix, 0.8, G, 0.2, dseed)
    full = E.adapter_bwd(dy, rows, z, S, A, U, c, mix, 0.8, G, 0.2, dseed)
    part = E.adapter_bwd(dy, rows, z, S, A, U, c, mix, 0.8, G, 0.2, dseed, need_dx=need[0], need_dw=need[1])
    assert (part[0] is not None) == need[0]
    assert all((g is not None) == need[1] for g in part[1:5])
    for a_, b_ in zip(full[:6], part[:6]):
        if b_ is not None:
            assert torch.equal(a_, b_)


def test_weights_in_activation_dtype(seed):
    """16-bit weights are widened to fp32 exactly (the binding does the same)."""
    check((2, 6, 200, 8, 2, 2), torch.bfloat16, seed, weight_dtype=torch.bfloat16)


@pytest.mark.parametrize("device_index", [0, 2], ids=["3-sms", "132-sms"])
def test_column_programs_walk_many_rows(device_index, seed):
    """Few SMs: each column program sums many rows; many SMs: a program per few rows. Both accurate,
    and bit-identical run to run (fixed-order partial sums, no atomics)."""
    E.select_device(device_index)
    check((4, 40, 256, 8, 2, 2), torch.bfloat16, seed, draws=1)
    B, S, D, R, G, Ex = 4, 40, 256, 8, 2, 2
    x, A, a, U, c, mix = (t.detach() for t in make_inputs(B, S, D, R, G, Ex, torch.bfloat16, "cpu"))
    rows = x.reshape(B * S, D)
    dy = torch.randn_like(rows)
    _y, z, _ = E.adapter_fwd(rows, S, A, a, U, c, mix, 1.0, G, 0.0, None)
    first = E.adapter_bwd(dy, rows, z, S, A, U, c, mix, 1.0, G, 0.0, None)
    again = E.adapter_bwd(dy, rows, z, S, A, U, c, mix, 1.0, G, 0.0, None)
    assert all(torch.equal(u, v) for u, v in zip(first[:6], again[:6]))


def test_no_rows():
    B, S, D, R, G, Ex = 0, 3, 64, 8, 2, 2
    x, A, a, U, c, mix = (t.detach() for t in make_inputs(B, S, D, R, G, Ex, torch.float16, "cpu"))
    rows = x.reshape(0, D)
    y, z, _ = E.adapter_fwd(rows, S, A, a, U, c, mix, 1.0, G, 0.0, None)
    assert y.shape == (0, D) and z.shape == (0, R)
    dx, dA, da, dU, dc, dmix, _ = E.adapter_bwd(rows, rows, z, S, A, U, c, mix, 1.0, G, 0.0, None)
    assert dx.shape == (0, D) and dmix.shape == (0, Ex)
    assert all(bool((g == 0).all()) and g.shape == t.shape for g, t in zip((dA, da, dU, dc), (A, a, U, c)))


@pytest.mark.parametrize("shape", [(1, 4, 64, 16, 2, 2), (1, 4, 64, 8, 2, 3), (1, 4, 63, 8, 2, 2)], ids=str)
def test_unsupported_shapes_are_refused(shape):
    """Shapes beyond the kernels' limits (or groups not dividing D) are refused before any launch."""
    B, S, D, R, G, Ex = shape
    x = torch.randn(B * S, D)
    args = (torch.randn(R, D), torch.randn(R), torch.randn(Ex, D, R // G), torch.randn(Ex, D),
            torch.softmax(torch.randn(B, Ex), -1))
    with pytest.raises(E.EmulatorFault, match="invalid argument"):
        E.adapter_fwd(x, S, *args, 1.0, G, 0.0, None)


def test_limits_match_the_ops_layer():
    """The ops layer decides which shapes go to these kernels from constants that must match adapter.h."""
    assert E.adapter_limits() == (cuda_ext.ADAPTER_MAX_HIDDEN, cuda_ext.ADAPTER_MAX_EXPERTS)


@st.composite
def _fuzz_case(draw):
    R = draw(st.integers(1, cuda_ext.ADAPTER_MAX_HIDDEN))
    G = draw(st.sampled_from([g for g in range(1, R + 1) if R % g == 0]))
    D = G * draw(st.integers(1, 96))
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 9)), D, R, G, draw(st.integers(1, cuda_ext.ADAPTER_MAX_EXPERTS)))
    return dict(shape=shape, dtype=draw(st.sampled_from(DTYPES)), dropout=draw(st.sampled_from([0.0, 0.3])),
                pad=draw(st.sampled_from([0, 1, 8])), offset=draw(st.sampled_from([0, 1, 4])),
                device_index=draw(st.sampled_from([0, 2])))


@given(case=_fuzz_case(), seed=st.integers(1, 2**31 - 1))
@example(case=dict(shape=(1, 1, 2, 1, 1, 1), dtype=torch.float32, dropout=0.0, pad=1, offset=0, device_index=0),
         seed=1)  # one row: its padding is no stride
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz(case, seed):
    """Random shapes within the kernels' limits, layouts, dtypes and dropout: accurate, in bounds, on the
    paths the layout allows."""
    E.select_device(case.pop("device_index"))
    torch.manual_seed(seed)
    shape, dtype, paths = case.pop("shape"), case.pop("dtype"), []
    check(shape, dtype, seed, draws=1, paths=paths, **case)
    assert paths == [_expected(shape[2], shape[4], dtype, case["pad"], case["offset"], M=shape[0] * shape[1])]


def _triton():
    pytest.importorskip("triton")
    from mmfast.kernels import _device

    if not _device.interpreting():
        pytest.skip("Triton runs on the CPU only through the interpreter (TRITON_INTERPRET=1)")
    from mmfast.kernels import adapter as K

    return K


@pytest.mark.parametrize("p", [0.15, 0.6, 0.9])
def test_dropout_scale_is_the_triton_kernels(p):
    """Kept activations are scaled by 1 / (1 - p) rounded to fp32 once from the double, as the Triton
    launchers pass it, so the two backends' outputs agree bit for bit where the products are exact
    (here z = 1, U = 1: y is the scale itself)."""
    K = _triton()
    M, D = 64, 8
    x = torch.zeros(M, D)
    A, a = torch.zeros(1, D), torch.ones(1)
    U, c, mix = torch.ones(1, D, 1), torch.zeros(1, D), torch.ones(M, 1)
    seed = torch.tensor([11], dtype=torch.int64)
    y, _z, _ = E.adapter_fwd(x, 1, A, a, U, c, mix, 1.0, 1, p, seed)
    y_triton, _ = K.adapter_fwd(x, 1, A, a, U, c, mix, 1.0, 1, p, seed)
    kept = y[:, 0] != 0
    assert 0 < kept.sum() < M
    assert (y[kept] == torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)).all()
    assert torch.equal(y, y_triton)


def mixed(forward: str):
    """A ``fused`` whose forward runs one backend and backward the other (``forward``: "triton" or
    "cuda"): the z one saves is the z the other reads, and both draw one dropout mask."""
    K = _triton()

    def fused(leaves, dy, scale, groups, dropout, dseed):
        x, A, a, U, c, mix = (t.detach() for t in leaves)
        B, S, D = x.shape
        rows = lambda t: t.reshape(B * S, D)  # noqa: E731
        if forward == "triton":
            y, z = K.adapter_fwd(rows(x), S, A, a, U, c, mix.float().contiguous(), scale, groups, dropout, dseed)
            grads = E.adapter_bwd(rows(dy), rows(x), z, S, A, U, c, mix, scale, groups, dropout, dseed)[:6]
        else:
            y, z, _ = E.adapter_fwd(rows(x), S, A, a, U, c, mix, scale, groups, dropout, dseed)
            grads = K.adapter_bwd(rows(dy), rows(x), z, S, A, U, c, mix.float().contiguous(), scale, groups, dropout,
                                  dseed, True, True, True)
        dx, dA, da, dU, dc, dmix = grads
        return y.view(B, S, D), [dx.view(B, S, D), dA.to(A.dtype), da.to(a.dtype), dU.to(U.dtype), dc.to(c.dtype),
                                 dmix.to(mix.dtype)]

    return fused


@pytest.mark.parametrize("forward", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_either_backward_follows_either_forward(forward, dtype, seed):
    """auto chooses per direction, so a Triton forward may meet a CUDA C++ backward and the reverse
    (the interpreter's bf16 products are unusable: fp32 and fp16 here)."""
    B, S, D, R, G, Ex = 2, 9, 256, 8, 2, 2

    def draw(i):
        dseed = torch.tensor([seed + i], dtype=torch.int64)
        keep = E.adapter_keep_mask(dseed, B * S, R, 0.3).view(B, S, R) / 0.7
        return dict(leaves=make_inputs(B, S, D, R, G, Ex, dtype, "cpu"), scale=0.8, groups=G, keep=keep,
                    dropout=0.3, dseed=dseed, fused=mixed(forward))

    check_adapter(draw, seed)
