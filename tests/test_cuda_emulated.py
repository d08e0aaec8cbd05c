"""The CUDA C++ norm kernels (csrc/) run on the CPU through the emulator (cuda_emulator.py, cuda_emu/).

Every kernel path the GPU can take is run here against the float64 reference by the accuracy rule:
the special widths, the generic register kernels (16-byte vectors and scalar, every threads-per-row
instance), the wide kernels, the staged backward at every stage count, residuals, fp32 master weights,
strided and misaligned rows, M = 0, and the need_dx / need_dw / need_db combinations. The emulated
device has 3 SMs, so the persistent backward's blocks walk several row groups, as at full size on a GPU.
Each call is also checked for accesses past the end of any buffer (a guarded page), writes before an
output or into row padding (bytes that must stay untouched), reads before an input or of row padding
(NaN that reaches the outputs), and the emulator's faults (cuda_emulator.py); warps run one after
another, so a shared-memory overwrite race shows as a wrong result, and the staged tests run with
copies landing both late and early. What this cannot show: speed, races between blocks, and the
GPU's own instruction results (rsqrtf here is 1/sqrtf): the GPU matrix (test_cuda_backend.py,
test_cuda_staged.py) stays the word on those.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cuda_emulator as E
from norm_cases import DTYPES, check_case, make_case, special_geometry, staged_fits, staged_rows

_reason = E.unavailable_reason()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")

SPECIAL = [768, 1024, 1280, 4096, 5120, 8192]


@pytest.fixture(autouse=True)
def emulated_device():
    E.select_device(0)
    E.set_copy_mode(eager=False)
    yield
    E.select_device(0)
    E.set_copy_mode(eager=False)


def _detach(t):
    return None if t is None else t.detach()


def emulated(stages: int = 0, pad: int = 0, paths: list | None = None, offset: int = 0, res_pad: int | None = None,
             w_offset: int = 0):
    """A ``run`` for check_case: forward and backward through the emulated kernels (rows ``N + pad`` apart,
    the residual's and its gradient's ``N + res_pad`` when given, x ``offset`` elements and weight and bias
    ``w_offset`` elements off 16-byte alignment); the (forward, backward) kernel names go to ``paths``."""
    one_off = dict(res_pad=res_pad, w_offset=w_offset)

    def run(case):
        N = case.x.shape[-1]
        shape = case.x.shape
        rows = lambda t: None if t is None else t.detach().reshape(-1, N)  # noqa: E731
        rms = case.kind == "rms"
        w, b = _detach(case.weight), _detach(case.bias)
        y, h, mean, rstd = E.norm_fwd(rows(case.x), w, b, rows(case.residual), case.eps, rms, pad=pad, offset=offset,
                                  **one_off)
        need_dw = case.weight is not None and case.weight.requires_grad
        need_db = case.bias is not None and case.bias.requires_grad
        xin = h if h is not None else rows(case.x)
        dx, dw, db, bwd_path = E.norm_bwd(rows(case.gy), xin, w, mean, rstd, rows(case.gh), rms, True, need_dw, need_db,
                                          stages=stages, pad=pad, offset=0 if h is not None else offset,
                                          dw_dtype=None if w is None else w.dtype,
                                          db_dtype=None if b is None else b.dtype, **one_off)
        if paths is not None:
            paths.append((E.fwd_path(rows(case.x), w, b, rows(case.residual), rms, pad=pad, offset=offset, **one_off),
                          bwd_path))
        by_name = {"x": dx.view(shape), "weight": dw, "bias": db, "residual": dx.view(shape)}
        grads = [by_name[n] for n in ("x", "weight", "bias", "residual")
                 if getattr(case, n) is not None and getattr(case, n).requires_grad]
        return y.view(shape), (h.view(shape) if h is not None else None), grads

    return run


def _check(kind, M, N, dtypes, residual, seed, stages=0, pad=0, offset=0, **kw):
    torch.manual_seed(seed)
    paths = []
    check_case(make_case(kind, (M,), N, dtypes, residual=residual, **kw), seed,
               run=emulated(stages, pad, paths, offset))
    return paths[0]


# ---- the special widths: every dtype pair, both norms, with and without the residual -----------------------

@pytest.mark.parametrize("N", SPECIAL)
@pytest.mark.parametrize("dtypes", list(DTYPES))
@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_special_widths(kind, dtypes, N):
    for residual in (False, True):
        fwd, bwd = _check(kind, 37, N, dtypes, residual, seed=N + residual)
        assert fwd == bwd == f"special-{N}"


# ---- the generic register kernels and the wide kernels ----------------------------------------------------

GENERIC = [  # (dtypes, N, pad, forward kernel, backward kernel)
    ("bf16", 256, 0, "register-v8-t32", "register-v8-t32"),
    ("bf16", 2048, 8, "register-v8-t64", "register-v8-t64"),
    ("bf16", 3000, 0, "register-v8-t128", "register-v8-t128"),
    ("bf16-fp32w", 6000, 0, "register-v8-t256", "register-v8-t256"),
    ("bf16", 12288, 0, "register-v8-t512", "wide-v8"),
    ("fp16", 20000, 8, "wide-v8", "wide-v8"),
    ("fp32", 300, 4, "register-v4-t32", "register-v4-t32"),
    ("fp32", 9000, 0, "wide-v4", "wide-v4"),
    ("fp32", 1, 0, "register-v1-t32", "register-v1-t32"),
    ("fp16", 77, 0, "register-v1-t32", "register-v1-t32"),
    ("fp32", 301, 0, "register-v1-t128", "register-v1-t128"),
    ("bf16", 1001, 0, "register-v1-t512", "register-v1-t256"),
    ("bf16", 3001, 0, "wide-v1", "wide-v1"),
    ("bf16", 4096, 1, "wide-v1", "wide-v1"),  # a special width whose rows are not 16-byte aligned
    ("bf16", 768, 3, "register-v1-t512", "register-v1-t256"),
]


@pytest.mark.parametrize("dtypes,N,pad,fwd,bwd", GENERIC, ids=[f"{d}-{n}-pad{p}" for d, n, p, *_ in GENERIC])
@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_generic_paths(kind, dtypes, N, pad, fwd, bwd):
    for residual in (False, True):
        M = 23 if N >= 9000 else 37
        assert _check(kind, M, N, dtypes, residual, seed=N + pad + residual, pad=pad) == (fwd, bwd)


@pytest.mark.parametrize("N,fwd,bwd", [(4096, "wide-v1", "wide-v1"), (768, "register-v1-t512", "register-v1-t256")])
def test_misaligned_rows(N, fwd, bwd):
    """x starting 2 bytes past 16-byte alignment (a view like ``big[:, 1:]``) takes the scalar kernels."""
    for kind in ("rms", "ln"):
        assert _check(kind, 37, N, "bf16", False, seed=N, offset=1) == (fwd, bwd)


ONE_INPUT_OFF = [  # (N, dtypes, forward kernel, backward kernel): the scalar kernels, where x alone would vectorise
    (768, "bf16", "register-v1-t512", "register-v1-t256"),
    (300, "fp32", "register-v1-t128", "register-v1-t128"),
]


@pytest.mark.parametrize("N,dtypes,fwd,bwd", ONE_INPUT_OFF, ids=[f"{d}-{n}" for n, d, *_ in ONE_INPUT_OFF])
@pytest.mark.parametrize("which", ["residual-rows", "weight"])
def test_one_input_off_the_vectors_takes_the_scalar_kernels(which, N, dtypes, fwd, bwd):
    """x and dy on 16-byte vectors, but the residual's (and its gradient's) rows an odd number of elements
    apart, or the weight and bias one element past 16-byte alignment (a slice of a packed parameter): a
    16-byte access to them would be misaligned (a fault on a GPU and in the emulator), so every input's
    alignment decides the kernel, not x's alone."""
    kw = {"res_pad": 1} if which == "residual-rows" else {"w_offset": 1}
    for kind in ("rms", "ln"):
        torch.manual_seed(N)
        paths = []
        check_case(make_case(kind, (37,), N, dtypes, residual=True), N, run=emulated(paths=paths, **kw))
        assert paths[0] == (fwd, bwd)


@pytest.mark.parametrize("N,path", [(1000, "register-v8-t32"), (3001, "wide-v1"), (20000, "wide-v8")])
def test_rms_norm_rounds_like_hf_on_every_kernel(N, path):
    """RMSNorm rounds twice, as HF LlamaRMSNorm (the normalised row to bf16, then its product with the
    weight): test_norm.py's test_rounding_matches_pytorch_modules holds the register kernel to it at N = 1000;
    here also the wide kernels (one rounding fewer is more accurate, so the accuracy rule cannot see it).
    Almost every element identical, none further apart than one unit per rounding plus fp32 noise."""
    import math

    import mmfast

    torch.manual_seed(N)
    M = 64 if N <= 3001 else 12
    x = torch.randn(M, N, dtype=torch.bfloat16)
    w = (1 + 0.1 * torch.randn(N)).to(torch.bfloat16)
    ours = E.norm_fwd(x, w, None, None, 1e-6, True)[0]
    assert E.fwd_path(x, w, None, None, True) == path
    theirs = mmfast.rms_norm_reference(x, w, 1e-6)
    normalised = mmfast.rms_norm_reference(x, None, 1e-6).float()
    units = torch.finfo(torch.bfloat16).eps * (theirs.float().abs() + w.float().abs() * normalised.abs())
    same = (ours == theirs).float().mean().item()
    assert same > 0.99, f"only {same:.3f} of elements round identically"
    fp32_noise = 2 * (math.log2(N) + 4) * torch.finfo(torch.float32).eps * theirs.float().abs().max()
    assert ((ours.float() - theirs.float()).abs() <= units * 1.0001 + fp32_noise).all()


# ---- the staged backward ------------------------------------------------------------------------------

def _staged_rows(N: int, dtype: torch.dtype) -> int:
    return staged_rows(N, dtype, sms=E.device_props(0)[0])


def _staged_fits(N: int, dtype: torch.dtype, stages: int, residual: bool) -> bool:
    return staged_fits(N, dtype, stages, 3 if residual else 2, smem_optin=E.device_props(0)[1])


STAGED = [(N, d, s) for N in SPECIAL for d, s in (("bf16", 2), ("fp32", 3), ("fp16", 4), ("bf16-fp32w", 3))]


def _staged_residual(N: int, stages: int) -> bool:
    """Half the STAGED cases have the residual gradient (the staged kernel's third buffer)."""
    return (N // 256 + stages) % 2 == 1


@pytest.mark.parametrize("N,dtypes,stages", STAGED, ids=[f"{n}-{d}-s{s}" for n, d, s in STAGED])
@pytest.mark.parametrize("kind", ["rms", "ln"])
@pytest.mark.parametrize("copies", ["late", "eager"])
def test_staged_backward(copies, kind, N, dtypes, stages):
    """Copies landing as late as the waits allow catch a stage read before its copy; landing at issue, a
    copy into a stage still being read."""
    E.set_copy_mode(eager=copies == "eager")
    dtype = DTYPES[dtypes][0]
    residual = _staged_residual(N, stages)
    _, bwd = _check(kind, _staged_rows(N, dtype), N, dtypes, residual, seed=N + stages, stages=stages)
    fits = _staged_fits(N, dtype, stages, residual)
    assert bwd == (f"special-{N}-staged{stages}" if fits else f"special-{N}")


def test_staged_cases_mostly_stage():
    """The matrix above exercises the staged kernel, not only its fallback."""
    staged = sum(_staged_fits(N, DTYPES[d][0], s, _staged_residual(N, s)) for N, d, s in STAGED)
    assert staged >= len(STAGED) - 2


@pytest.mark.parametrize("stages", [2, 3, 4])
def test_staged_dx_matches_register_kernel_bitwise(stages):
    """Same per-row arithmetic: dx bit-identical to the register kernel's (test_staged_backward holds the
    staged dweight to the float64 reference)."""
    torch.manual_seed(stages)
    N, M = 4096, _staged_rows(4096, torch.bfloat16)
    case = make_case("ln", (M,), N, "bf16", residual=True)
    rows = lambda t: t.detach().reshape(M, N)  # noqa: E731
    y, h, mean, rstd = E.norm_fwd(rows(case.x), case.weight.detach(), case.bias.detach(), rows(case.residual), 1e-5,
                                  False)
    args = (rows(case.gy), h, case.weight.detach(), mean, rstd, rows(case.gh), False, True, True, True)
    dx0, *_, p0 = E.norm_bwd(*args, stages=0)
    dxs, *_, ps = E.norm_bwd(*args, stages=stages)
    assert (p0, ps) == ("special-4096", f"special-4096-staged{stages}")
    assert torch.equal(dx0.view(torch.int16), dxs.view(torch.int16))


def test_staged_falls_back_where_shared_memory_is_short():
    """A device with 64 KiB to opt into: fp32 8192 at 4 stages (4 x 3 x 4 x 512 x 16 bytes) does not fit, so
    the register kernel runs, and says so."""
    E.select_device(1)
    M = _staged_rows(8192, torch.float32)
    _, bwd = _check("rms", M, 8192, "fp32", True, seed=3, stages=4)
    assert bwd == "special-8192"
    _, bwd = _check("rms", 63, 768, "bf16", True, seed=4, stages=2)  # 2 x 3 x 3 x 128 x 16 bytes fits
    assert bwd == "special-768-staged2"


def test_staged_falls_back_when_its_stages_fill_the_opt_in_exactly():
    """4 stages of bf16 4096 rows without a residual gradient take 4 x 2 x 4 x 128 x 16 = 65536 bytes, all the
    64 KiB device 1 lets a block opt into, with no room left for the block's static reduction buffer (the
    launcher opts in to 1 KiB less): the register kernel runs. 3 stages fit and stage."""
    E.select_device(1)
    optin = E.device_props(1)[1]
    assert not staged_fits(4096, torch.bfloat16, 4, 2, optin) and staged_fits(4096, torch.bfloat16, 3, 2, optin)
    for stages, want in ((4, "special-4096"), (3, "special-4096-staged3")):
        _, bwd = _check("rms", 63, 4096, "bf16", False, seed=stages, stages=stages)
        assert bwd == want


def test_shared_memory_opt_in_is_per_device():
    """The staged launcher opts in to dynamic shared memory once per device (a device's own limit): a
    small-memory device's opt-in must not cap a large one's launches of the same kernel."""
    for dev in (0, 1):
        E.select_device(dev)
        _, bwd = _check("rms", 63, 4096, "bf16", False, seed=5, stages=2)  # 2 x 2 x 4 x 128 x 16 B fits 64 KiB
        assert bwd == "special-4096-staged2"
    # above the 48 KiB a launch gets without opting in, on device 1 after device 0 opted in: device 1 must
    # opt in itself (a launcher that looked up device 0's opt-in for every device failed this launch)
    items, threads, _ = special_geometry(768, torch.bfloat16)
    assert 3 * 3 * items * threads * 16 > 48 * 1024 and staged_fits(768, torch.bfloat16, 3, 3, E.device_props(1)[1])
    for dev in (0, 1):
        E.select_device(dev)
        _, bwd = _check("rms", 63, 768, "bf16", True, seed=7, stages=3)  # 3 x 3 x 3 x 128 x 16 B: 54 KiB
        assert bwd == "special-768-staged3"
    E.select_device(0)
    _, bwd = _check("rms", 63, 4096, "bf16", True, seed=6, stages=4)  # 4 x 3 x 4 x 128 x 16 B does not
    assert bwd == "special-4096-staged4"


# ---- rows, flags and shapes -----------------------------------------------------------------------------

@pytest.mark.parametrize("N,dtypes", [(768, "bf16"), (300, "fp32"), (77, "fp16"), (256, "bf16")])
def test_fewer_rows_than_row_slots(N, dtypes):
    """1-3 rows for kernels with 4 row slots per block: the empty slots' partial rows must be zeros (the
    workspace starts as NaN). On 132 SMs, as on a GPU."""
    E.select_device(2)
    for M in (1, 2, 3):
        for kind in ("rms", "ln"):
            _check(kind, M, N, dtypes, True, seed=N + M)


@pytest.mark.parametrize("N", [768, 300, 20000])
def test_no_rows(N):
    x = torch.empty(0, N, dtype=torch.bfloat16)
    w = torch.ones(N, dtype=torch.bfloat16)
    for rms in (True, False):
        y, h, mean, rstd = E.norm_fwd(x, w, None if rms else w, x, 1e-6, rms)
        assert y.shape == (0, N) and h.shape == (0, N) and rstd.shape == (0,)
        dx, dw, db, _ = E.norm_bwd(x, x, w, mean, rstd, x, rms, True, True, not rms)
        assert dx.shape == (0, N)
        assert torch.equal(dw, torch.zeros(N, dtype=torch.bfloat16))
        assert db is None if rms else torch.equal(db, torch.zeros(N, dtype=torch.bfloat16))


@pytest.mark.parametrize("N,stages", [(4096, 0), (4096, 3), (1001, 0), (20000, 0)])
@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, True, True), (False, False, True)])
def test_gradient_subsets(N, stages, need):
    """Only the asked-for gradients, each equal to the full backward's (same kernels, same order; the
    staged kernel's grid is sized by its buffers, which need_dx changes, so its sums may be grouped
    differently and are held to the float64 reference by test_staged_backward instead)."""
    torch.manual_seed(N)
    M = 37
    x = torch.randn(M, N).bfloat16()
    w = (1 + 0.1 * torch.randn(N)).bfloat16()
    b = (0.1 * torch.randn(N)).bfloat16()
    dy = torch.randn(M, N).bfloat16()
    _, _, mean, rstd = E.norm_fwd(x, w, b, None, 1e-5, False)
    full = E.norm_bwd(dy, x, w, mean, rstd, None, False, True, True, True, stages=stages)
    part = E.norm_bwd(dy, x, w, mean, rstd, None, False, *need, stages=stages)
    assert part[3] == (f"special-{N}-staged{stages}" if stages else full[3])
    for name, want, a, f in zip(("dx", "dweight", "dbias"), need, part[:3], full[:3]):
        assert (a is not None) == want, f"{name}: asked {want}, got {a is not None}"
        if want:
            assert torch.isfinite(a).all()
            if stages == 0 or name == "dx":
                assert torch.equal(a, f)
            else:
                assert torch.allclose(a.float(), f.float(), rtol=2 ** -7, atol=0)


@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_no_weight(kind):
    for N, stages in ((4096, 0), (4096, 3), (77, 0), (20000, 0)):
        torch.manual_seed(N)
        paths = []
        check_case(make_case(kind, (37,), N, "bf16", residual=True, weight=False, bias=False), N,
                   run=emulated(stages, paths=paths))
        assert paths[0][1].endswith(f"-staged{stages}") == (stages > 0)


def test_fp32_gradient_of_16bit_weight():
    """dweight summed into an fp32 output (the op layer's choice for fp32 master weights) from the same
    partials: the bf16 result is the fp32 one rounded."""
    torch.manual_seed(0)
    M, N = 37, 4096
    x, dy = torch.randn(M, N).bfloat16(), torch.randn(M, N).bfloat16()
    w = (1 + 0.1 * torch.randn(N)).bfloat16()
    _, _, _, rstd = E.norm_fwd(x, w, None, None, 1e-6, True)
    _, dw16, _, _ = E.norm_bwd(dy, x, w, None, rstd, None, True, False, True, False)
    _, dw32, _, _ = E.norm_bwd(dy, x, w, None, rstd, None, True, False, True, False, dw_dtype=torch.float32)
    assert dw32.dtype == torch.float32
    assert torch.equal(dw32.bfloat16(), dw16)


def test_bad_parameters_are_refused():
    x = torch.randn(4, 64)
    w = torch.ones(64)
    with pytest.raises(E.EmulatorFault, match="refused"):
        E.norm_bwd(x, x, w, None, torch.ones(4), None, True, True, True, False, stages=1)
    lib = E.lib()
    assert lib.emu_norm_fwd(x.data_ptr(), None, None, None, x.data_ptr(), None, None, None, 4, 64, 64, 0, 0, 0,
                            1e-6, 1) != 0  # no rstd
    assert lib.emu_norm_fwd(x.data_ptr(), None, None, None, x.data_ptr(), None, None, x.data_ptr(), 4, 0, 64, 0, 0, 0,
                            1e-6, 1) != 0  # N == 0
    assert E.lib().emu_take_fault() == b""


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kind=st.sampled_from(["rms", "ln"]),
    M=st.one_of(st.integers(0, 4), st.integers(5, 90)),
    N=st.one_of(st.integers(1, 300), st.integers(301, 6000), st.integers(6001, 26000), st.sampled_from(SPECIAL)),
    dtypes=st.sampled_from(list(DTYPES)),
    residual=st.booleans(),
    weight=st.booleans(),
    pad=st.sampled_from([0, 1, 8, 13]),
    stages=st.sampled_from([0, 2, 3, 4]),
    device=st.sampled_from([0, 1, 2]),
    eager_copies=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz(kind, M, N, dtypes, residual, weight, pad, stages, device, eager_copies, seed):
    E.select_device(device)
    E.set_copy_mode(eager=eager_copies)
    M = min(M, max(1, 250_000 // N)) if M else 0  # emulation time grows with M x N
    torch.manual_seed(seed)
    case = make_case(kind, (M,), N, dtypes, residual=residual, weight=weight, bias=weight)
    check_case(case, seed, run=emulated(stages, pad))


# ---- the emulator's own checks ---------------------------------------------------------------------------

def test_emulator_runs_barriers_shuffles_and_copies():
    out = torch.full((128,), float("nan"))
    assert E.selftest(0, out) == ""
    t = torch.arange(64).float()
    warp_sums = torch.tensor([sum(range(0, 32)), sum(range(32, 64))]).float().repeat_interleave(32)
    expected = ((t + 1) % 64 + warp_sums).repeat(2)
    assert torch.equal(out, expected)

    src = torch.arange(128).float()
    out = torch.zeros(64)
    assert E.selftest(4, out, src) == ""
    assert torch.isnan(out[0::2]).all(), "a stage read before its wait must see the poisoned shared memory"
    assert torch.equal(out[1::2], src[0::4])


def test_emulator_exposes_shared_memory_reuse_races():
    """A second reduction that overwrites the shared array before every warp has read the first: on a GPU
    a race that usually goes unseen; the emulator's warp-by-warp schedule makes the wrong sum certain."""
    out = torch.zeros(128)
    assert E.selftest(6, out) == ""
    right = torch.cat([torch.full((64,), 64.0), torch.full((64,), 6400.0)])
    assert not torch.equal(out, right)
    assert (out[:64] != 64.0).any(), "the slower warp read the faster warp's second partial sum"


def test_emulator_faults_on_access_past_a_buffer():
    """Rows past the end of x: the page after the buffer is guarded, so the read faults at once."""
    x = E.Guarded((2, 64), torch.float32)
    x.view.normal_()
    y, rstd = E.Guarded((3, 64), torch.float32), E.Guarded(3, torch.float32)
    err = E.lib().emu_norm_fwd(x.ptr(), None, None, None, y.ptr(), None, None, rstd.ptr(), 3, 64, 64, 0, 0, 0, 1e-6, 1)
    with pytest.raises(E.EmulatorFault, match="past the end of a buffer"):
        E._check(err, "norm_fwd")
    E.select_device(0)  # the emulator still runs launches after the fault
    y2 = E.norm_fwd(x.view.clone(), None, None, None, 1e-6, True)[0]
    assert torch.isfinite(y2).all()


def test_real_cuda_runtime_in_the_process_does_not_capture_the_emulator(tmp_path):
    """A CUDA build of torch loads the real CUDA runtime before the emulator; the kernels' runtime calls
    must still reach the emulator's definitions (the library links with -Bsymbolic)."""
    import glob
    import subprocess
    import sys
    from pathlib import Path

    from mmfast.kernels.cuda_compile_check import toolkit_include

    runtimes = sorted(glob.glob(str(toolkit_include().parent / "lib*" / "libcudart.so*")))
    if not runtimes:
        pytest.skip(f"no CUDA runtime library next to {toolkit_include()} to load")
    script = tmp_path / "probe.py"
    script.write_text(
        "import ctypes, sys, torch\n"
        f"ctypes.CDLL({runtimes[0]!r}, mode=ctypes.RTLD_GLOBAL)\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import cuda_emulator as E\n"
        "y = E.norm_fwd(torch.randn(5, 64), None, None, None, 1e-6, True)[0]\n"
        "print('finite', bool(torch.isfinite(y).all()))\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "finite True" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("which,message", [
    (1, "not uniform"),
    (2, "deadlock"),
    (3, "full masks over full warps"),
    (5, "in flight"),
    (7, "misaligned 16-byte vector load from"),
    (8, "misaligned 16-byte vector store to"),
])
def test_emulator_reports_faults(which, message):
    out = torch.zeros(64)
    src = torch.zeros(128)
    fault = E.selftest(which, out, src)
    assert message in fault, fault
    assert E.lib().emu_take_fault() == b"", "a fault is reported once"


def test_guards_catch_stray_writes():
    g = E.Guarded((3, 5), torch.bfloat16)
    assert g.intact() and g.ptr() % 16 == 0
    g.buf[g.pad - 1] = 0
    assert not g.intact()
    g = E.Guarded((3, 5), torch.float32, row_stride=7)  # 19 elements: 4 bytes before the guarded page
    assert g.view.stride() == (7, 1) and torch.isnan(g.view).all()
    g.buf[g.pad + 2 * 7 + 5] = 0  # one past the last row's end
    assert not g.intact()
    assert E.Guarded((4,), torch.bfloat16, offset=1).ptr() % 16 == 2


def test_guarded_memory_lives_as_long_as_its_tensors():
    """A view kept after its Guarded is gone still owns its mapping: a new buffer does not alias it."""
    import gc

    v = E.Guarded(1000, torch.float32).view
    gc.collect()
    w = E.Guarded(1000, torch.float32)
    w.view.fill_(7.0)
    assert v.data_ptr() != w.ptr() and torch.isnan(v).all()


@pytest.mark.parametrize("P,N", [(2112, 768), (1056, 1024), (65, 100), (64, 768), (0, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_partial_sums_split_over_rows(P, N, dtype):
    """The dweight / dbias workspace ([P, N] fp32, P = blocks x row slots: 2112 at N = 768 on an H100) was
    summed by N / 32 blocks, 24 at N = 768, each slice walking 264 rows at the latency of its loads. Where the
    columns fill fewer than two blocks per SM, the rows are split into chunks too (a first pass writes each
    chunk's sum into its first row, a second adds those): as accurate as PyTorch's sum, the same bits run to
    run, nothing written outside the workspace (on the emulated H100's 132 SMs, the split runs at the first
    two shapes)."""
    from accuracy import assert_accurate

    torch.manual_seed(P + N)
    part = torch.randn(P, N) * torch.rand(1, N) * 4
    ref = part.double().sum(0)
    ours = E.sum_partials(part, dtype)
    assert torch.equal(ours, E.sum_partials(part, dtype))
    scale = part.abs().sum(0).max().item() if P else 1.0
    assert_accurate("sum", ours, part.sum(0).to(dtype), ref, scale, P * N, terms=max(P, 1))
