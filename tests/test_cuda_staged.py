"""The CUDA C++ backward's shared-memory staging (``stages`` in csrc/norm.h, ``MMFAST_CUDA_BWD_STAGES``).

On CPU: how the number of stages is chosen and validated, and the staged dx bit-identical to the register
kernel's through cuda_ext and the binding's op (csrc/binding.cpp built for CPU) over the emulated kernels (their whole staged matrix
is in test_cuda_emulated.py). On a GPU: every special width, dtype pair,
residual and stage count against the float64 reference (accuracy.py) with enough rows that each block
walks more rows than it has stages, the path name saying that the staged kernel ran, and dx bit-identical
to the register kernel's (the per-row arithmetic is the same; dweight's partial rows may be grouped
differently, so it is held to the float64 reference instead).
"""

import pytest
import torch

import backend_params
from mmfast.kernels import _device, cuda_ext
from norm_cases import DTYPES, check_case, make_case, staged_fits, staged_rows

GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not GPU, reason="the CUDA C++ kernels run on a GPU only")
SPECIAL = [768, 1024, 1280, 4096, 5120, 8192]


def on_gpu(values: list) -> list:
    """The full parameter list on a GPU; on CPU one value, so that a GPU-only test shows as one skip."""
    return values if GPU else values[:1]


def test_stage_choice_env_then_table_then_zero(monkeypatch):
    monkeypatch.delenv(cuda_ext.STAGES_ENV, raising=False)
    monkeypatch.setattr(cuda_ext, "BWD_STAGES", {("rms", 4096, "16bit"): 3})
    assert cuda_ext.bwd_stages(True, 4096, torch.bfloat16) == 3
    assert cuda_ext.bwd_stages(True, 4096, torch.float16) == 3
    assert cuda_ext.bwd_stages(True, 4096, torch.float32) == 0
    assert cuda_ext.bwd_stages(False, 4096, torch.bfloat16) == 0
    monkeypatch.setenv(cuda_ext.STAGES_ENV, "2")
    assert cuda_ext.bwd_stages(True, 4096, torch.bfloat16) == 2
    assert cuda_ext.bwd_stages(False, 77, torch.float32) == 2


@pytest.mark.parametrize("bad", ["1", "5", "-2", "two", "2.5"])
def test_bad_stage_counts_are_errors(monkeypatch, bad):
    monkeypatch.setenv(cuda_ext.STAGES_ENV, bad)
    with pytest.raises(ValueError, match=cuda_ext.STAGES_ENV):
        cuda_ext.bwd_stages(True, 4096, torch.bfloat16)
    monkeypatch.delenv(cuda_ext.STAGES_ENV)
    with pytest.raises(ValueError, match="stages"):
        cuda_ext._check_stages(True, "stages")


def _fits(N: int, dtype: torch.dtype, stages: int, bufs: int) -> bool:
    return staged_fits(N, dtype, stages, bufs, torch.cuda.get_device_properties(0).shared_memory_per_block_optin)


def _rows(N: int, dtype: torch.dtype) -> int:
    return staged_rows(N, dtype, _device.sm_count(torch.device("cuda")))


@pytest.fixture
def cuda_backend(monkeypatch):
    backend_params.select("cuda", monkeypatch)


@needs_gpu
@pytest.mark.parametrize("stages", on_gpu([2, 3, 4]))
@pytest.mark.parametrize("residual", on_gpu([False, True]), ids=["plain", "residual"][: 2 if GPU else 1])
@pytest.mark.parametrize("N", on_gpu(SPECIAL))
@pytest.mark.parametrize("dtypes", on_gpu(list(DTYPES)))
@pytest.mark.parametrize("kind", on_gpu(["rms", "ln"]))
def test_staged_backward(kind, dtypes, N, residual, stages, cuda_backend, monkeypatch, seed):
    monkeypatch.setenv(cuda_ext.STAGES_ENV, str(stages))
    dtype = DTYPES[dtypes][0]
    case = make_case(kind, (_rows(N, dtype),), N, dtypes, residual=residual, device="cuda")
    path = cuda_ext.norm_path(case.x.detach(), case.weight, case.bias, case.residual, kind == "rms", backward=True)
    if _fits(N, dtype, stages, 3 if residual else 2):
        assert path == f"special-{N}-staged{stages}"
    else:
        assert path == f"special-{N}", "a staging that does not fit in shared memory runs the register kernel"
    check_case(case, seed)


@needs_gpu
@pytest.mark.parametrize("M", on_gpu([0, 1, 3, 1000]))
@pytest.mark.parametrize("kind", on_gpu(["rms", "ln"]))
def test_staged_backward_few_rows_and_parameter_grads_only(kind, M, cuda_backend, monkeypatch, seed):
    """Fewer rows than stages (empty copy groups), and a backward that wants dweight/dbias but no dx."""
    monkeypatch.setenv(cuda_ext.STAGES_ENV, "4")
    check_case(make_case(kind, (M,), 4096, "bf16-fp32w", residual=True, device="cuda"), seed)
    case = make_case(kind, (M,), 4096, "bf16-fp32w", device="cuda")
    case.x = case.x.detach()
    check_case(case, seed)


@pytest.fixture
def staged_device(monkeypatch):
    """(device, SM count, shared memory a block may opt into) for the staged kernels: the GPU on the cuda
    backend, or without one the CPU on emulated-cuda (backend_params.py), the emulated 3-SM device."""
    if GPU:
        backend_params.select("cuda", monkeypatch)
        optin = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
        return "cuda", _device.sm_count(torch.device("cuda")), optin
    import cuda_emulator

    backend_params.select("emulated-cuda", monkeypatch)
    cuda_emulator.select_device(0)
    return "cpu", *cuda_emulator.device_props(0)


@pytest.mark.parametrize("N", SPECIAL if GPU else [1024, 4096])
@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_staged_dx_is_bit_identical_to_the_register_kernel(kind, N, staged_device):
    """Through cuda_ext and the binding's op (its ``stages`` argument), on a GPU or the emulator."""
    device, sms, optin = staged_device
    M = staged_rows(N, torch.bfloat16, sms)
    g = torch.Generator(device=device).manual_seed(N)
    x = torch.randn(M, N, device=device, generator=g).bfloat16()
    dy = torch.randn(M, N, device=device, generator=g).bfloat16()
    dres = torch.randn(M, N, device=device, generator=g).bfloat16()
    w = 1 + 0.1 * torch.randn(N, device=device, generator=g)
    b = None if kind == "rms" else 0.1 * torch.randn(N, device=device, generator=g)
    rms = kind == "rms"
    _, _, mean, rstd = cuda_ext.norm_fwd(x, w, b, None, 1e-6, rms)
    expect = {s: f"special-{N}" + (f"-staged{s}" if s and staged_fits(N, torch.bfloat16, s, 3, optin) else "")
              for s in (0, 2, 3)}
    if device == "cpu":
        import cuda_emulator

        cuda_emulator.take_ran_paths()
    outs = {s: cuda_ext.norm_bwd(dy, x, w, mean, rstd, dres, rms, True, True, not rms, stages=s) for s in (0, 2, 3)}
    if device == "cpu":  # the kernels that ran (on a GPU, the path the binding reports for these tensors)
        assert cuda_emulator.take_ran_paths() == [f"norm_bwd:{expect[s]}" for s in (0, 2, 3)]
    for s in (2, 3):
        assert cuda_ext.norm_path(x, w, b, dres, rms, backward=True, stages=s) == expect[s]
        assert torch.equal(outs[s][0], outs[0][0]), f"dx of {s} stages differs from the register kernel's"
