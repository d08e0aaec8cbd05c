"""Fused RMSNorm / LayerNorm against the float64 reference (accuracy rule: accuracy.py).

On a machine without CUDA these run the Triton kernels through the interpreter (conftest.py); on a
GPU the same tests run natively, once per backend: ``auto`` (Triton, no backend table is consulted
without one) and ``cuda`` (the CUDA C++ kernels, built on first use; a GPU machine where they do not
build fails here rather than skipping). Without a GPU, ``emulated-cuda`` runs the ``cuda`` backend's
whole path, ``csrc/binding.cpp`` built for CPU included, over the emulated kernels
(cuda_emulator.register_cpu_ops).
"""

import dataclasses
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import backend_params
import mmfast
from mmfast.kernels import _device
from accuracy import assert_accurate
from norm_cases import DTYPES, check_case, make_case, run_ours

KINDS = ["rms", "ln"]
NS = [1, 7, 129, 768, 1000, 4096, 5120]


@pytest.fixture(autouse=True, params=backend_params.BACKENDS)
def norm_backend(request, monkeypatch):
    """Every test of this module once per backend (backend_params.py)."""
    return backend_params.select(request.param, monkeypatch)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("N", NS)
@pytest.mark.parametrize("dtypes", list(DTYPES))
@pytest.mark.parametrize("kind", KINDS)
def test_matrix(kind, dtypes, N, residual, device, seed):
    check_case(make_case(kind, (2, 5), N, dtypes, residual=residual, device=device), seed)


@pytest.mark.parametrize("N", [8192, 8193, 16385, 65536])
@pytest.mark.parametrize("dtypes", ["fp32", "bf16-fp32w"])
@pytest.mark.parametrize("kind", KINDS)
def test_wide_rows(kind, dtypes, N, device, seed):
    """Rows wider than the register-resident path loop over column blocks (forward and backward)."""
    check_case(make_case(kind, (3,), N, dtypes, residual=True, device=device), seed)


@pytest.mark.parametrize("lead", [(), (1,), (7,), (2, 3, 4), (0,), (3, 0, 2)], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_leading_dims(kind, lead, device, seed):
    check_case(make_case(kind, lead, 129, "bf16", residual=True, device=device), seed)


@pytest.mark.parametrize("kind", KINDS)
def test_no_rows_zeroes_the_parameter_gradients(kind, device, seed, monkeypatch):
    """M = 0: dweight and dbias are PyTorch's zeros, written by the backward, not what their memory held
    (here every tensor torch.empty makes starts as NaN, so a skipped fill cannot pass by luck)."""
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    case = make_case(kind, (0,), 129, "bf16-fp32w", residual=True, device=device)
    check_case(case, seed)
    assert case.weight.requires_grad and (kind == "rms" or case.bias.requires_grad)


@pytest.mark.parametrize("M,N", [(2000, 7), (300, 768), (77, 4096), (20, 9000)])
@pytest.mark.parametrize("kind", KINDS)
def test_persistent_rows(kind, M, N, device, seed):
    """Enough rows that each persistent backward program walks several row tiles."""
    check_case(make_case(kind, (M,), N, "bf16-fp32w", residual=False, device=device), seed)


#: Register-path launches benchmarks/tune_norm.py can pick: (rows per tile, warps, programs per SM,
#: prefetch, weight kept in registers). Warps do not change results, so few are tried here.
TUNES = [(1, 4, 1, True, True), (1, 4, 2, True, False), (2, 4, 1, False, False), (4, 8, 3, True, True)]


@pytest.mark.parametrize("norm_backend", ["auto"], indirect=True)  # TUNED holds the Triton kernels' launches only
@pytest.mark.parametrize("tune", TUNES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_tuned_launches(kind, tune, device, seed, monkeypatch):
    """Every launch choice the GPU tuner can enter in ``TUNED`` is accurate, forward and backward, with M
    not a multiple of the tile or the grid, so the prefetch of a missing tile is masked off (and a
    program whose first tile is missing, with per SM > 1, writes zero partials). The Triton backend's: the
    CUDA C++ backward's own launch choice (its stages) is test_cuda_staged.py's."""
    from mmfast.kernels import norm as K

    N, M = 768, 37
    for cls in ("16bit", "fp32"):
        monkeypatch.setitem(K.TUNED, ("bwd", kind, N, cls), K.NormTune(*tune))
        monkeypatch.setitem(K.TUNED, ("fwd", kind, N, cls), K.NormTune(tune[0], tune[1]))
    cfg = K.bwd_launch(M, N, torch.device(device), kind == "rms", torch.bfloat16)
    assert (cfg.block_m, cfg.num_warps, cfg.prefetch, cfg.keep_w) == (tune[0], tune[1], tune[3], tune[4])
    for dtypes in ("bf16-fp32w", "fp32"):
        check_case(make_case(kind, (M,), N, dtypes, residual=True, device=device), seed)


LAYOUTS = {
    "transposed": lambda t: t.transpose(0, 1).contiguous().transpose(0, 1),  # rows not viewable as [M, N]
    "row-slice": lambda t: torch.cat([t, t[..., :3]], dim=-1)[..., : t.shape[-1]],  # row stride > N
    "every-other-row": lambda t: torch.stack([t, t], dim=1).flatten(0, 1)[::2],  # strided rows
    "column-major": lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2),  # last dim not unit-stride
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind", KINDS)
def test_non_contiguous(kind, layout, device, seed):
    case = make_case(kind, (4, 6), 200, "bf16", residual=True, device=device, x_layout=LAYOUTS[layout])
    assert not case.x.is_contiguous() and not case.gy.is_contiguous()
    check_case(case, seed)


@pytest.mark.parametrize(
    "kind,weight,bias", [("rms", False, False), ("ln", False, False), ("ln", True, False)],
    ids=["rms-no-weight", "ln-no-affine", "ln-weight-no-bias"],
)
@pytest.mark.parametrize("dtypes", ["fp32", "bf16"])
def test_affine_variants(kind, weight, bias, dtypes, device, seed):
    check_case(make_case(kind, (3, 5), 768, dtypes, residual=True, weight=weight, bias=bias, device=device), seed)


@pytest.mark.parametrize("kind", KINDS)
def test_frozen_affine_parameters(kind, device, seed):
    """Weights that do not require grad get none (and dx is still right)."""
    case = make_case(kind, (4, 5), 768, "bf16", residual=False, device=device, grad_weight=False)
    check_case(case, seed)
    _, _, grads = run_ours(case)
    assert len(grads) == 1  # dx only


@pytest.mark.parametrize("kind", KINDS)
def test_only_parameter_gradients(kind, device, seed):
    """x does not require grad (LN tuning's first layer): only dweight/dbias are produced."""
    case = make_case(kind, (4, 5), 768, "bf16-fp32w", device=device)
    case.x.requires_grad_(False)
    check_case(case, seed)


@pytest.mark.parametrize("kind", KINDS)
def test_backward_deterministic(kind, device, seed):
    case = make_case(kind, (64,), 1000, "bf16-fp32w", residual=True, device=device)
    first = run_ours(case)[2]
    second = run_ours(case)[2]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_residual_gradients_are_separate(device):
    """x and residual receive the same gradient values without sharing storage after accumulation."""
    x = torch.randn(3, 64, device=device, requires_grad=True)
    r = torch.randn(3, 64, device=device, requires_grad=True)
    w = torch.ones(64, device=device, requires_grad=True)
    for _ in range(2):
        y, h = mmfast.rms_norm(x, w, 1e-6, residual=r)
        (y.sum() + h.sum()).backward()
    assert torch.equal(x.grad, r.grad)
    x.grad.add_(1.0)
    assert not torch.equal(x.grad, r.grad)


def test_rms_reference_matches_hf_bitwise(device):
    """The RMSNorm reference is exactly HF's LlamaRMSNorm (the rounding the kernels promise)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        m = LlamaRMSNorm(257, eps=1e-6).to(device=device, dtype=dtype)
        with torch.no_grad():
            m.weight.normal_(1.0, 0.1)
        x = torch.randn(9, 257, device=device, dtype=dtype)
        assert torch.equal(m(x), mmfast.rms_norm_reference(x, m.weight, 1e-6))


@pytest.mark.parametrize("M,N", [(64, 1000), (4, 16400)], ids=["registers", "two-pass"])
@pytest.mark.parametrize("kind", KINDS)
def test_rounding_matches_pytorch_modules(kind, M, N, device, seed):
    """Outputs round like HF LlamaRMSNorm / nn.LayerNorm: almost every element identical in bf16, and none
    further apart than the roundings allow. Two fp32 computations of a value before rounding may differ by
    (log2 N + 4) fp32 units at the output's scale each (sums in another order), which matters only near
    zero, where bf16 units get finer than that. Elsewhere they differ only when the value lies that close
    to a rounding midpoint, and then by one bf16 unit per rounding of it:
    - nn.LayerNorm rounds once (the fp32 result to bf16): one unit of the output;
    - LlamaRMSNorm rounds twice (the normalised row to bf16, then its product with the bf16 weight): one
      unit of the normalised value, times |w|, plus one unit of the output. Seen (seed 856428704): the
      normalised value -0.5957031288 lies 4e-9 from the midpoint of -0.59375 and -0.59765625; the two
      fp32 sums rounded it to either side, and the outputs came out two bf16 units apart.
    Both the register-resident path and the two-pass path of wide rows (N > 16384) round this way."""
    x = torch.randn(M, N, device=device, dtype=torch.bfloat16)
    w = (1 + 0.1 * torch.randn(N, device=device)).to(torch.bfloat16)
    b = (0.1 * torch.randn(N, device=device)).to(torch.bfloat16)
    bf16_eps = torch.finfo(torch.bfloat16).eps  # one unit at |v| is at most eps * |v|
    if kind == "rms":
        ours, theirs = mmfast.rms_norm(x, w, 1e-6), mmfast.rms_norm_reference(x, w, 1e-6)
        normalised = mmfast.rms_norm_reference(x, None, 1e-6).float()  # HF's first rounding: no weight yet
        units = bf16_eps * (theirs.float().abs() + w.float().abs() * normalised.abs())
    else:
        ours, theirs = mmfast.layer_norm(x, w, b, 1e-5), torch.nn.functional.layer_norm(x, (N,), w, b, 1e-5)
        units = bf16_eps * theirs.float().abs()
    same = (ours == theirs).float().mean().item()
    assert same > 0.99, f"only {same:.3f} of elements round identically (seed {seed})"
    fp32_noise = 2 * (math.log2(N) + 4) * torch.finfo(torch.float32).eps * theirs.float().abs().max()
    apart = (ours.float() - theirs.float()).abs()
    assert (apart <= units * 1.0001 + fp32_noise).all(), (
        f"{int((apart > units * 1.0001 + fp32_noise).sum())} elements further apart than the roundings allow "
        f"(largest {apart.max().item():.3e}, seed {seed})")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kind=st.sampled_from(KINDS),
    lead=st.lists(st.integers(0, 6), max_size=3),
    N=st.one_of(st.integers(1, 300), st.integers(301, 9000)),
    dtypes=st.sampled_from(list(DTYPES)),
    residual=st.booleans(),
    weight=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_shapes(kind, lead, N, dtypes, residual, weight, seed):
    from conftest import DEVICE

    torch.manual_seed(seed)
    check_case(make_case(kind, tuple(lead), N, dtypes, residual=residual, weight=weight, bias=weight, device=DEVICE), seed)


def test_persistent_grid_is_bounded():
    """The backward's program count never exceeds a few per SM, whatever M, and shrinks with M."""
    from mmfast.kernels.norm import bwd_launch

    dev = torch.device("cpu")
    sms = _device.sm_count(dev)
    for N in (7, 768, 4096, 20000):
        big = [bwd_launch(M, N, dev).programs for M in (10**5, 10**6, 10**7)]
        assert big[0] == big[1] == big[2] <= 8 * sms
        assert bwd_launch(1, N, dev).programs == 1
        small = bwd_launch(3, N, dev)
        assert small.programs <= 3


H100 = dict(regs_per_sm=65536, threads_per_sm=2048, shared_per_sm=233472)  # (torch's device properties there)


@pytest.mark.parametrize("regs, warps, shared, limits, blocks", [
    (80, 8, 1024, H100, 3),  # 2560 registers a warp: 6 warps per partition, 24 an SM
    (128, 8, 1024, H100, 2),
    (96, 16, 1024, H100, 1),  # 3072 a warp: 5 per partition, 20 an SM: one block of 16
    (255, 8, 0, H100, 1),  # 8192 a warp: 2 per partition
    (99, 8, 0, H100, 2),  # 3168 rounds up to 3328 a warp: 4 per partition
    (40, 4, 0, H100, 12),  # 1280 a warp: 12 per partition, 48 an SM
    (32, 4, 0, H100, 16),  # registers and threads allow 16 (2048 / 128), the block limit too
    (32, 4, 100_000, H100, 2),  # shared memory: 233472 // (101024 rounded up to 101120)
    (32, 4, 0, dict(regs_per_sm=65536, threads_per_sm=1536, shared_per_sm=102400), 12),  # sm_86's threads
    (64, 6, 0, H100, 5),  # 2048 a warp: 8 per partition, 32 an SM: five blocks of 6
])
def test_resident_blocks_follow_cuda_occupancy(regs, warps, shared, limits, blocks):
    assert _device.resident_blocks(regs, warps, shared, **limits) == blocks


def test_resident_per_sm_compiles_once_per_specialization(monkeypatch):
    """resident_per_sm asks Triton's warmup for the compiled kernel once per specialization Triton compiles (a
    tensor's dtype and 16-byte alignment, an int's divisibility by 16 and being 1, the keyword arguments; not
    a float's value) and device, loads it, and answers from its registers, warps and shared memory; under the
    interpreter and off CUDA it answers None without compiling anything."""
    import types

    calls = []

    class Compiled:
        n_regs, metadata = 80, types.SimpleNamespace(num_warps=8, shared=1024)

        def _init_handles(self):
            calls.append("load")

    class Kernel:
        def warmup(self, *args, grid, **kwargs):
            calls.append((args, grid, kwargs))
            return Compiled()

    kernel, cuda, x = Kernel(), torch.device("cuda", 0), torch.zeros(64)
    monkeypatch.setattr(_device, "_sm_limits", lambda index: tuple(H100.values()))
    monkeypatch.setattr(_device, "_RESIDENT", {})
    monkeypatch.setattr(_device, "interpreting", lambda: True)
    assert _device.resident_per_sm(kernel, cuda, (x, 7), {}) is None and not calls
    monkeypatch.setattr(_device, "interpreting", lambda: False)
    assert _device.resident_per_sm(kernel, torch.device("cpu"), (x, 7), {}) is None and not calls
    args, kwargs = (x, torch.float32, None, 1024, 1e-6), {"BLOCK_M": 1, "num_warps": 8}
    assert _device.resident_per_sm(kernel, cuda, args, kwargs) == 3
    assert calls == [(args, (1,), kwargs), "load"]
    same = [(torch.zeros(8), torch.float32, None, 2048, 1e-5)]  # another aligned tensor, int, eps: as compiled
    Compiled.n_regs = 128
    for other in same:
        assert _device.resident_per_sm(kernel, cuda, other, kwargs) == 3 and len(calls) == 2
    others = [(x[1:], torch.float32, None, 1024, 1e-6), (x.double(), torch.float32, None, 1024, 1e-6),
              (x, torch.float16, None, 1024, 1e-6), (x, torch.float32, None, 1000, 1e-6),
              (x, torch.float32, None, 1, 1e-6)]
    for other in others:  # (an address off 16 bytes, another dtype or stand-in, an int that does not divide, 1)
        assert _device.resident_per_sm(kernel, cuda, other, kwargs) == 2
    assert len(calls) == 2 + 2 * len(others)
    assert _device.resident_per_sm(kernel, cuda, args, {**kwargs, "BLOCK_M": 2}) == 2
    assert _device.resident_per_sm(kernel, torch.device("cuda", 1), args, kwargs) == 2
    assert len(calls) == 2 + 2 * len(others) + 4


@pytest.mark.parametrize("norm_backend", ["auto"], indirect=True)  # the Triton kernels' grid (pinned below)
@pytest.mark.parametrize("N", [768, 20000])
@pytest.mark.parametrize("kind", KINDS)
def test_backward_grid_holds_only_resident_programs(kind, N, device, seed, monkeypatch):
    """The backward asks how many programs of the kernel it launches fit an SM at once (resident_per_sm: the
    compiled kernel's registers) and launches no more per SM, so none waits for a second, partly empty wave:
    its question compiles the contiguous layout's specialization (the same kernel, flags and argument types,
    rows N apart: what this test's contiguous launch compiles), and the smaller grid is as accurate. On a GPU
    the compiled kernel's own count decides (with the interpreter, which compiles nothing, a stand-in says one
    program per SM). Another layout gets the same grid: test_op_layouts.py holds every output, dweight's
    partial sums included, to the contiguous call's bits."""
    from mmfast.kernels import norm as K
    from mmfast.ops.backend import ENV_VAR

    monkeypatch.setenv(ENV_VAR, "triton")
    asked, launched = [], []
    real = K.resident_per_sm
    stand_in = _device.interpreting() or device == "cpu"

    def resident(kernel, dev, args, kwargs):
        n = 1 if stand_in else real(kernel, dev, args, kwargs)
        asked.append((kernel, args, kwargs, n))
        return n

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getattr__(self, name):  # (warmup, on a GPU)
            return getattr(self.kernel, name)

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append((self, grid, args, kwargs))
                return self.kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(K, "resident_per_sm", resident)
    for name in ("_norm_bwd_kernel", "_norm_bwd_wide_kernel"):
        monkeypatch.setattr(K, name, Spy(getattr(K, name)))
    sms = _device.sm_count(torch.device(device))
    M = 6 * sms * (4 if N < 4096 else 1)  # (more row tiles than programs)
    check_case(make_case(kind, (M,), N, "bf16-fp32w", residual=True, device=device), seed)
    assert asked and len(asked) == len(launched), (len(asked), len(launched))
    for (kernel, args, kwargs, per_sm), (spy, grid, real_args, real_kwargs) in zip(asked, launched):
        assert kernel is spy and kwargs == real_kwargs
        assert len(args) == len(real_args)
        for a, b in zip(args, real_args):
            assert a == (b.dtype if isinstance(b, torch.Tensor) else b), (a, b)
        assert per_sm >= 1 and grid == (min(M, per_sm * sms, 4 * sms),), (grid, per_sm)
    # rows N + 3 apart (not 16-byte aligned, compiled apart by Triton): the same question, grid and bits
    rms, dev = kind == "rms", torch.device(device)
    w, b = torch.randn(N, device=dev), (None if rms else torch.randn(N, device=dev))
    wide = [torch.randn(M, N + 3, device=dev).to(torch.bfloat16) for _ in range(2)]
    outs = []
    for x, dy in ((t[:, :N].contiguous() for t in wide), (t[:, :N] for t in wide)):
        _, _, mean, rstd = K.norm_fwd(x, w, b, None, 1e-6, rms)
        outs.append(K.norm_bwd(dy, x, w, mean, rstd, None, rms, True, True, not rms))
    assert asked[-1][1:] == asked[-2][1:] and launched[-1][1] == launched[-2][1]
    assert launched[-1][2][1] == N + 3 and launched[-2][2][1] == N
    for e, o in zip(*outs):
        assert (e is None and o is None) or torch.equal(e, o)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: 64-bit offsets only matter past 2**31 elements")
@pytest.mark.parametrize("kind", KINDS)
def test_offsets_past_2_31_elements(kind):
    """M * N > 2**31: the last rows, addressed with 64-bit offsets, are bit-identical to the same rows
    normalised on their own (each row's result does not depend on M)."""
    N = 4096
    M = (2**31) // N + 64
    x = torch.randn(M, N, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(N, device="cuda", requires_grad=False)
    norm = (lambda t: mmfast.rms_norm(t, w)) if kind == "rms" else (lambda t: mmfast.layer_norm(t, w, None))
    tail = slice(M - 64, M)
    y = norm(x)
    gy = torch.zeros_like(y)
    gy[tail] = torch.randn_like(gy[tail])
    (dx,) = torch.autograd.grad(y, x, gy)
    x_tail = x.detach()[tail].clone().requires_grad_()
    y_tail = norm(x_tail)
    (dx_tail,) = torch.autograd.grad(y_tail, x_tail, gy[tail])
    assert torch.equal(y[tail], y_tail)
    assert torch.equal(dx[tail], dx_tail)


def test_interpreter_sm_count_is_fixed():
    """Under the interpreter no device is queried; the persistent grid sees a fixed virtual SM count."""
    if _device.interpreting():
        assert _device.sm_count(torch.device("cpu")) == _device.INTERPRETER_SM_COUNT
    else:
        assert _device.sm_count(torch.device("cuda")) == torch.cuda.get_device_properties(0).multi_processor_count


@pytest.mark.parametrize("kind", KINDS)
def test_broadcast_rows(kind, device, seed):
    """Inputs whose rows share memory (stride 0): an expanded x or residual, and the output gradient of
    a sum over rows, which autograd hands over expanded. The kernels read them in place and give what
    they give for contiguous copies, bit for bit."""
    M, N = 6, 129
    v = torch.randn(N, device=device).bfloat16()
    w = torch.randn(N, device=device, requires_grad=True)
    b = torch.randn(N, device=device, requires_grad=True) if kind == "ln" else None
    res = torch.randn(N, device=device).bfloat16()

    def run(expand):
        x = (v.expand(M, N) if expand else v.expand(M, N).contiguous()).requires_grad_(True)
        r = res.expand(M, N) if expand else res.expand(M, N).contiguous()
        w.grad = None
        if b is not None:
            b.grad = None
        y, h = (mmfast.rms_norm(x, w, 1e-6, residual=r) if kind == "rms"
                else mmfast.layer_norm(x, w, b, 1e-6, residual=r))
        gy = torch.randn(N, device=device, generator=torch.Generator(device).manual_seed(3)).bfloat16()
        y.backward(gy.expand(M, N) if expand else gy.expand(M, N).contiguous())
        return [t.detach().clone() for t in (y, h, x.grad, w.grad) + ((b.grad,) if b is not None else ())]

    for got, want in zip(run(True), run(False)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("N", [64, 16400], ids=["registers", "two-pass"])
@pytest.mark.parametrize("kind", KINDS)
def test_variance_past_fp32_range(kind, N, device):
    """A row at +-3e19, whose LayerNorm variance overflows fp32: its output and the gradients it reaches are
    NaN (they were the bias and zeros: a finite answer that hid the overflow from loss and gradient checks).
    PyTorch is no oracle for that row: its CPU kernel gives NaN for this row but the bias for a row with one
    element past about 1.8e19, or a row scaled by 1e19, and its CUDA kernels (Welford, variance inf, rstd =
    rsqrt(inf) = 0) give the bias and finite gradients for this one; so the overflowing row's NaN is stated
    here, on every device. mmfast's is NaN for every row whose variance overflows. RMSNorm's row is 0 with
    finite gradients, as PyTorch's on either device. Other rows are unaffected: PyTorch's values."""
    import torch.nn.functional as F

    x = torch.randn(3, N, device=device)
    x[1, ::2], x[1, 1::2] = 3e19, -3e19
    w = torch.randn(N, device=device)
    b = torch.randn(N, device=device) if kind == "ln" else None

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
        y = fn(*leaves)
        y.backward(torch.ones_like(y))
        return [y.detach()] + [t.grad for t in leaves]

    if kind == "ln":
        ours, torch_ = run(lambda x, w, b: mmfast.layer_norm(x, w, b, 1e-5)), run(lambda x, w, b: F.layer_norm(x, (N,), w, b, 1e-5))
        y, dx, dw, db = ours
        # the overflowing row: NaN in y and dx, and in dweight (a sum over the rows); dbias (the sum of dy) finite
        assert y[1].isnan().all() and dx[1].isnan().all() and dw.isnan().all(), [t.isnan().sum().item() for t in ours]
        assert not y[[0, 2]].isnan().any() and not dx[[0, 2]].isnan().any() and not db.isnan().any()
        torch.testing.assert_close(db, torch_[3])
    else:
        ours, torch_ = run(lambda x, w: mmfast.rms_norm(x, w, 1e-5)), run(lambda x, w: F.rms_norm(x, (N,), w, 1e-5))
        assert (ours[0][1] == 0).all()
        for got, want in zip(ours, torch_):
            assert not got.isnan().any() and torch.equal(got.isnan(), want.isnan())
    for got, want in zip(ours[:2], torch_[:2]):  # the other rows of y and dx
        torch.testing.assert_close(got[[0, 2]], want[[0, 2]], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("N", [129, 16400], ids=["registers", "two-pass"])
@pytest.mark.parametrize("kind", KINDS)
def test_row_strides_differ_between_inputs(kind, N, device):
    """x, the residual, dy and the gradient of residual_out each with its own row stride (a row slice of a
    wider buffer, or contiguous): the kernels read each with its own stride, and give what they give for
    contiguous copies, bit for bit. (A kernel that read the residual with x's stride, or dresidual_out with
    dy's, passed every test where all of them shared one layout.) The row strides keep rows 16-byte aligned,
    as the contiguous copies' are: rows off the 16-byte vectors take the CUDA backend's scalar kernels,
    which sum in another order than the vector kernels the copies take (other bits, both accurate)."""
    M = 3

    def rows_of(width):  # [M, N] with row stride ``width``
        return torch.randn(M, width, device=device).bfloat16()[:, :N]

    x0, r0, gy0, gh0 = rows_of(N + 8), torch.randn(M, N, device=device).bfloat16(), rows_of(N + 16), rows_of(N + 40)
    assert len({t.stride(0) for t in (x0, r0, gy0, gh0)}) == 4
    w = torch.randn(N, device=device, requires_grad=True)
    b = torch.randn(N, device=device, requires_grad=True) if kind == "ln" else None

    def run(strided):
        x, r, gy, gh = (t if strided else t.contiguous() for t in (x0, r0, gy0, gh0))
        x, r = x.detach().requires_grad_(), r.detach().requires_grad_()
        y, h = (mmfast.rms_norm(x, w, 1e-6, residual=r) if kind == "rms"
                else mmfast.layer_norm(x, w, b, 1e-5, residual=r))
        leaves = [x, r, w] + ([b] if b is not None else [])
        return [y.detach(), h.detach(), *torch.autograd.grad([y, h], leaves, [gy, gh])]

    for i, (got, want) in enumerate(zip(run(True), run(False))):
        assert torch.equal(got, want), f"output {i} differs"


@pytest.mark.parametrize("path", ["eager", "ops"])
def test_fp32_bias_without_weight(path, device, seed, monkeypatch):
    """LayerNorm with a float32 bias and no weight over bf16 x: dbias is reduced into float32 (the bias's
    dtype, as the op's contract says), not rounded to x's dtype and cast back by autograd."""
    if path == "ops":
        monkeypatch.setenv("MMFAST_EAGER", "ops")
    check_case(make_case("ln", (4, 5), 200, "bf16-fp32w", residual=True, weight=False, bias=True, device=device), seed)


@pytest.mark.parametrize("M,N", [(64, 1000), (4, 16400)], ids=["registers", "two-pass"])
@pytest.mark.parametrize("kind", KINDS)
def test_fp32_weights_enter_unrounded(kind, M, N, device, seed):
    """bf16 x with float32 master weights: the weight (and bias) enter the forward and dx in float32, so y
    rounds as the reference's does (almost every element identical) and dx is the float64 result rounded
    once. A kernel that rounded the weight to bf16 first stays within the accuracy rule (its extra error is
    about one unit) but changes about half the elements; the fraction identical is 1.0 when run correctly,
    and a value nearer than fp32 noise to a rounding midpoint may fall either way (the 0.99 of
    test_rounding_matches_pytorch_modules)."""
    x = torch.randn(M, N, device=device).bfloat16().requires_grad_()
    w = (1 + 0.1 * torch.randn(N, device=device)).requires_grad_()
    b = (0.1 * torch.randn(N, device=device)).requires_grad_() if kind == "ln" else None
    gy = torch.randn(M, N, device=device).bfloat16()
    if kind == "rms":
        fn = lambda x, w, b: mmfast.rms_norm(x, w, 1e-6)  # noqa: E731
        ref = lambda x, w, b: mmfast.rms_norm_reference(x, w, 1e-6)  # noqa: E731
    else:
        fn = lambda x, w, b: mmfast.layer_norm(x, w, b, 1e-5)  # noqa: E731
        ref = lambda x, w, b: mmfast.layer_norm_reference(x, w, b, 1e-5)  # noqa: E731
    y = fn(x, w, b)
    (dx,) = torch.autograd.grad(y, x, gy)
    with torch.no_grad():
        y_ref = ref(x, w, b)  # the reference's own fp32 computation, rounded as promised
    x64 = x.detach().double().requires_grad_()
    y64 = ref(x64, w.detach().double(), None if b is None else b.detach().double())
    (dx64,) = torch.autograd.grad(y64, x64, gy.double())
    for name, got, want in (("y", y, y_ref), ("dx", dx, dx64.bfloat16())):
        same = (got == want).float().mean().item()
        assert same > 0.99, f"{name}: only {same:.3f} of elements identical (seed {seed})"


@pytest.mark.parametrize("N", [768, 1000, 16400], ids=["registers", "generic", "two-pass"])
@pytest.mark.parametrize("kind", KINDS)
def test_rows_of_zeros(kind, N, device, seed):
    """A row of zeros (a padding position's hidden state): its variance is 0, so eps alone keeps rstd finite
    (1/sqrt(eps)); y is 0 for RMSNorm and the bias for LayerNorm, and the gradients are finite, as PyTorch's.
    Random rows cannot show eps's presence at fp32: it moves their rstd by about eps/2, below fp32 noise at
    these widths (the two-pass kernels, Triton's and CUDA's, with eps dropped for RMSNorm alone passed every
    other test; the register kernels' only other witness was N = 1. NaN here)."""
    import torch.nn.functional as F

    x = torch.randn(3, N, device=device)
    x[1] = 0
    w = 1 + 0.1 * torch.randn(N, device=device)
    b = 0.1 * torch.randn(N, device=device) if kind == "ln" else None
    gy = torch.randn(3, N, device=device)

    def run(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
        y = fn(*leaves)
        return [y.detach(), *torch.autograd.grad(y, leaves, gy.to(dtype))]

    if kind == "ln":
        ours = run(lambda x, w, b: mmfast.layer_norm(x, w, b, 1e-5), torch.float32)
        torch_ = [run(lambda x, w, b: F.layer_norm(x, (N,), w, b, 1e-5), dt) for dt in (torch.float32, torch.float64)]
    else:
        ours = run(lambda x, w: mmfast.rms_norm(x, w, 1e-6), torch.float32)
        torch_ = [run(lambda x, w: F.rms_norm(x, (N,), w, 1e-6), dt) for dt in (torch.float32, torch.float64)]
    assert torch.equal(ours[0][1], torch.zeros(N, device=device) if b is None else b)
    names = ["y", "dx", "dweight", "dbias"]
    for name, got, lowp, ref in zip(names, ours, *torch_):  # (finite: assert_accurate's first check)
        rows = 3 if name in ("dweight", "dbias") else 1  # (summed over the rows)
        assert_accurate(name, got, lowp, ref, ref.abs().max().item(), seed, terms=rows)


@pytest.mark.parametrize("fp32", ["weight", "bias"])
def test_weight_and_bias_in_different_dtypes(fp32, device, seed):
    """LayerNorm over bf16 x with one affine vector in float32 and the other in bf16 (the API takes each in
    x's dtype or float32): each is read in its own dtype, and each gradient comes back in its parameter's
    dtype. (The CUDA binding widens both to float32 for its kernels, which take one affine dtype; every other
    test gave both the same dtype.)"""
    case = make_case("ln", (4, 5), 768, "bf16-fp32w", residual=True, device=device)
    other = "bias" if fp32 == "weight" else "weight"
    case = dataclasses.replace(case, **{other: getattr(case, other).detach().bfloat16().requires_grad_()})
    assert case.weight.dtype != case.bias.dtype
    check_case(case, seed)


@pytest.mark.parametrize("N", [768, 1000, 16400], ids=["registers", "generic", "two-pass"])
@pytest.mark.parametrize("kind", KINDS)
def test_fp16_with_fp32_weights(kind, N, device, seed):
    """fp16 x with float32 master weights (DTYPES pairs fp32 weights with bf16 only): the weights are read
    as float32. (The CUDA kernels' dispatch has a case per pair of activation and weight dtype; one that
    read this pair's weights as fp16 passed every other test.)"""
    check_case(make_case(kind, (3, 5), N, (torch.float16, torch.float32), residual=True, device=device), seed)
