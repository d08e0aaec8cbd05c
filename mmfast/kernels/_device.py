"""Device facts the launch heuristics need, safe under the Triton interpreter.

The interpreter runs kernels on CPU tensors and cannot answer device queries, so every lookup here
has an interpreter answer that is a fixed, small constant: it keeps interpreted runs fast and makes
the persistent-grid code paths (several programs, several rows each) run in tests exactly as they do
on a GPU.
"""

from __future__ import annotations

import functools
import os

import torch

# Virtual multiprocessor count used under the Triton interpreter.
INTERPRETER_SM_COUNT = 2

#: Every launch's compile options beyond the launcher's own: fused multiply-adds on, as Triton's default was
#: for every GPU run so far; Triton 3.9 warns at a launch that leaves it to the default, which 3.10 turns off.
COMPILE_OPTIONS = {"enable_fp_fusion": True}


@functools.lru_cache(maxsize=None)
def interpreting() -> bool:
    """True when Triton kernels run through the interpreter (``TRITON_INTERPRET=1``).

    Read once per process: Triton makes the same choice once, when it decorates each kernel at import
    (a later change of the variable does not turn compiled kernels into interpreted ones), and the host
    code asks on every launch."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes", "y")  # Triton's getenv_bool


def version_problem(triton_version: str, numpy_version: str) -> str | None:
    """A known breakage of the Triton interpreter with these versions, or None. Triton 3.6's interpreter
    converts a one-element numpy array with ``int()``, which numpy 2.4 refuses (3.7 and later squeeze
    it first): every kernel that indexes with a loaded value fails."""
    from packaging.version import Version

    if Version(triton_version).release[:2] < (3, 7) and Version(numpy_version).release[:2] >= (2, 4):
        return (f"Triton {triton_version}'s interpreter fails under numpy {numpy_version} (it needs numpy < 2.4, "
                "or Triton >= 3.7)")
    return None


@functools.lru_cache(maxsize=None)
def interpreter_problem() -> str | None:
    """:func:`version_problem` of the installed Triton and numpy (the interpreter runs on numpy)."""
    import triton

    try:
        import numpy
    except ImportError:
        return "numpy is not installed (the Triton interpreter runs on it; pip install numpy)"

    return version_problem(triton.__version__, numpy.__version__)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launch arithmetic on the host (``triton.cdiv`` is a constexpr function wrapper
    that costs microseconds a call there)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (n >= 1), on the host (see :func:`cdiv`)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming-multiprocessor count of ``device`` (a fixed constant under the interpreter)."""
    if interpreting() or device.type != "cuda":
        return INTERPRETER_SM_COUNT
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_sm_count(index)


def on_tensor_device(launcher):
    """Run a Triton launcher on the device of its first tensor argument. Triton launches on the current
    device and its stream; a model split over GPUs (``device_map="auto"``) calls layers on ``cuda:1``
    while ``cuda:0`` is current, where the kernel would run on the wrong device's stream (unordered with
    the work that made its inputs) or fail to reach the pointers. The CUDA C++ ops guard the same way."""

    @functools.wraps(launcher)
    def run(*args, **kwargs):
        t = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if t is not None and t.is_cuda and t.device.index != torch.cuda.current_device():
            with torch.cuda.device(t.device.index):
                return launcher(*args, **kwargs)
        return launcher(*args, **kwargs)

    run.on_tensor_device = True
    return run


@functools.lru_cache(maxsize=None)
def _sm_limits(index: int) -> tuple[int, int, int]:
    p = torch.cuda.get_device_properties(index)
    return p.regs_per_multiprocessor, p.max_threads_per_multi_processor, p.shared_memory_per_multiprocessor


def resident_blocks(regs_per_thread: int, num_warps: int, shared: int, regs_per_sm: int, threads_per_sm: int,
                    shared_per_sm: int) -> int:
    """Blocks of a kernel one SM holds at once, by CUDA's occupancy rules for sm_80 and later (those of
    its occupancy calculator): registers are allocated per warp, in units of 256, from four equal
    partitions of the register file; a block takes its shared memory plus 1 KB, in units of 128 B; an
    SM holds at most 16 blocks (32 on sm_80/90, but no mmfast launch has fewer than 4 warps, so the
    threads bound is met first)."""
    per_warp = -(-regs_per_thread * 32 // 256) * 256
    warps_by_regs = (regs_per_sm // 4 // per_warp) * 4 if per_warp else 64
    by_shared = shared_per_sm // (-(-(shared + 1024) // 128) * 128)
    return max(0, min(warps_by_regs // num_warps, threads_per_sm // (32 * num_warps), by_shared, 16))


#: Resident programs per SM of a compiled specialization, by (kernel, device index, specialization).
_RESIDENT: dict[tuple, int] = {}


def _specialization(arg):
    """What Triton's JIT compiles ``arg`` by: a tensor's dtype and whether its address is 16-byte aligned; an
    int's divisibility by 16 and whether it is 1; not a float's value; a constant (or a dtype standing in
    for a tensor, as ``warmup`` takes) as it is."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if isinstance(arg, bool) or not isinstance(arg, (int, float)):
        return arg
    if isinstance(arg, float):
        return float
    return arg % 16 == 0, arg == 1


def resident_per_sm(kernel, device: torch.device, args: tuple, kwargs: dict) -> int | None:
    """How many programs of ``kernel`` (a Triton JIT function) one SM of ``device`` holds at once, compiled for
    ``args`` and ``kwargs`` as their launch compiles it (``warmup``: compiled, or found compiled, and
    loaded, not run; the launch after it finds it in Triton's cache). Cached by what Triton specializes
    the compile on (:func:`_specialization` of each argument, the keyword arguments), so two launches that
    compile differently (a width that divides by 16 and one that does not, a row view off 16 bytes) are
    asked about separately. None under the interpreter or off CUDA (no compiled code), and where a Triton
    compile hook answered for the compile.

    A persistent grid sized past this runs its last programs in a second, partly empty wave."""
    if interpreting() or device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (kernel, index, tuple(map(_specialization, args)), tuple(kwargs.items()))
    hit = _RESIDENT.get(key)
    if hit is None:
        compiled = kernel.warmup(*args, grid=(1,), **kwargs)
        if compiled is None or not hasattr(compiled, "_init_handles"):
            return None
        compiled._init_handles()
        meta = compiled.metadata
        hit = _RESIDENT[key] = resident_blocks(compiled.n_regs, meta.num_warps, meta.shared, *_sm_limits(index))
    return hit
