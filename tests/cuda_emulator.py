"""The CUDA C++ kernels of ``csrc/`` (the norms and the adapter) run on the CPU through the emulator in ``cuda_emu/``.

``build()`` compiles the kernels' ``.cu`` files (``KERNELS``) with the host compiler against the CUDA
toolkit's headers (nothing of CUDA runs or links), plus the emulator and a C harness, into a shared
library cached by the hash of every source. The functions below do what ``csrc/binding.cpp`` does for
the GPU (allocate outputs and the fp32 partial-sum workspaces, map dtypes, sum the partials) on CPU
tensors, and check around every call what a GPU run cannot show cheaply:

* every buffer (input, output, workspace) ends at a page the emulator guards: a read or write past its
  end faults at once; before it lie at least 64 bytes of NaN, and strided rows have NaN padding, so a read
  there reaches the outputs as NaN, and a write there changes bytes that must come back untouched;
* outputs start as NaN (an element the kernel never wrote fails the finite check); inputs must come back
  bit-identical;
* an emulator fault (a barrier not reached by every thread, a deadlock, cp.async copies in flight at
  exit, ...) raises ``EmulatorFault`` with the emulator's message.

``register_cpu_ops()`` goes one layer up: it builds ``csrc/binding.cpp`` itself for CPU tensors
(``build_binding``, ``cuda_emu/binding_emu.cpp``) and loads it, so the ops layer's ``cuda`` backend runs
the binding's own C++ over the emulated kernels. What those ops allocate (outputs, workspaces) comes from
guarded NaN-filled buffers too; their inputs are the caller's tensors, unguarded, and nothing checks that
inputs come back unchanged (the kernel tests, ``test_cuda_emulated.py`` and ``test_cuda_adapter_emulated.py``,
check all of the above).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from mmfast.kernels.cuda_compile_check import toolkit_include, torch_cxx_flags
from mmfast.kernels.cuda_ext import source_dir

HERE = Path(__file__).resolve().parent / "cuda_emu"
KERNELS = ("norm_fwd.cu", "norm_bwd.cu", "adapter.cu")
CXX_FLAGS = ("-std=c++17", "-O1", "-fPIC", "-w")
# -Bsymbolic: the kernels' calls to cudaGetLastError & co. bind to the emulator's definitions even in a
# process where a CUDA build of torch has loaded the real CUDA runtime first (a GPU machine).
LINK_FLAGS = ("-shared", "-Wl,-Bsymbolic")
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
GUARD = 64  # bytes of margin at least before every buffer (the emulator's alloc_fenced)
FILL = 0xFF  # NaN in float32, float16 and bfloat16 alike


class EmulatorFault(RuntimeError):
    """The emulator found a fault in a kernel (or a launch failed)."""


def unavailable_reason() -> str | None:
    if shutil.which("g++") is None:
        return "no g++ to compile the emulated kernels"
    if toolkit_include() is None:
        return "no CUDA toolkit headers (cuda_runtime.h) to compile the kernels against"
    return None


def _key() -> str:
    h = hashlib.sha256()
    src = source_dir()
    files = [src / f for f in sorted(os.listdir(src)) if f.endswith((".cu", ".cuh", ".h"))]
    files += [HERE / f for f in sorted(os.listdir(HERE)) if f.endswith((".cpp", ".h"))]
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    h.update(" ".join(CXX_FLAGS + LINK_FLAGS).encode())
    h.update(str(toolkit_include()).encode())
    return h.hexdigest()[:16]


def build() -> Path:
    """The emulated kernels' shared library (built once per source hash)."""
    out_dir = Path(tempfile.gettempdir()) / f"mmfast-cuda-emu-{_key()}"
    lib = out_dir / "libmmfast_emu.so"
    if lib.exists():
        return lib
    work = Path(tempfile.mkdtemp(prefix="mmfast-cuda-emu-build-"))
    inc = ["-I", str(HERE), "-I", str(source_dir()), "-I", str(toolkit_include())]
    forced = ["-include", str(HERE / "cuda_emu.h")]
    jobs = [[*CXX_FLAGS, "-x", "c++", *forced, *inc, "-c", str(source_dir() / k), "-o", str(work / (k + ".o"))]
            for k in KERNELS]
    jobs += [[*CXX_FLAGS, *inc, "-c", str(HERE / "cuda_emu.cpp"), "-o", str(work / "cuda_emu.o")],
             *([*CXX_FLAGS, *forced, *inc, "-c", str(HERE / f), "-o", str(work / (f + ".o"))]
               for f in ("harness.cpp", "selftest.cpp"))]

    def compile_one(args):
        r = subprocess.run(["g++", *args], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"compiling {args[-3]} for the emulator failed:\n{r.stderr[-4000:]}")

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        list(pool.map(compile_one, jobs))
    tmp = work / "libmmfast_emu.so"
    # a SONAME of its own: the binding's library (build_binding) needs exactly this emulator, and the
    # loader then reuses the copy already loaded even if a concurrent build has replaced the file since
    subprocess.run(["g++", *LINK_FLAGS, f"-Wl,-soname,libmmfast_emu-{_key()}.so", "-o", str(tmp),
                    *map(str, sorted(work.glob("*.o")))], check=True, capture_output=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, lib)  # atomic: a concurrent build leaves one complete library
    shutil.rmtree(work, ignore_errors=True)
    return lib


_LIB: ctypes.CDLL | None = None
P, I64, I, F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_BWD = [P, P, P, P, P, P, P, P, P, I64, I64, I64, I64, I64, I, I, I, I, I, I, I]
_ADAPTER_SHAPE = [I64, I64, I64, I, I, I, F, F, F, I]  # M, S, D, R, E, G, scale, p_drop, keep_scale, act
_ADAPTER_FWD = [P, I64, P, P, P, P, P, P, P, P] + _ADAPTER_SHAPE
_ADAPTER_BWD = [P, I64, P, I64] + [P] * 13 + _ADAPTER_SHAPE + [I, I]


def lib() -> ctypes.CDLL:
    global _LIB
    if _LIB is None:
        L = ctypes.CDLL(str(build()))
        L.emu_norm_fwd.argtypes = [P] * 8 + [I64] * 4 + [I, I, F, I]
        L.emu_norm_fwd_path.argtypes = [P] * 6 + [I64] * 4 + [I, I, I]
        L.emu_norm_fwd_path.restype = ctypes.c_char_p
        L.emu_norm_bwd.argtypes = _BWD
        L.emu_norm_bwd_num_partials.argtypes = _BWD
        L.emu_norm_bwd_num_partials.restype = I64
        L.emu_norm_bwd_path.argtypes = _BWD
        L.emu_norm_bwd_path.restype = ctypes.c_char_p
        L.emu_norm_sum_partials.argtypes = [P, I64, I64, P, I]
        L.emu_take_fault.restype = ctypes.c_char_p
        L.emu_error_string.restype = ctypes.c_char_p
        L.emu_device_props.argtypes = [I, ctypes.POINTER(I), ctypes.POINTER(I)]
        L.emu_selftest.argtypes = [I, P, P]
        L.emu_alloc_fenced.argtypes = [I64, I]
        L.emu_alloc_fenced.restype = P
        L.emu_fenced_offset.argtypes = [P]
        L.emu_fenced_offset.restype = I64
        L.emu_free_fenced.argtypes = [P]
        L.emu_set_copy_mode.argtypes = [I]
        L.emu_adapter_fwd.argtypes = _ADAPTER_FWD
        L.emu_adapter_fwd_path.argtypes = _ADAPTER_FWD
        L.emu_adapter_fwd_path.restype = ctypes.c_char_p
        for name in ("emu_adapter_bwd", "emu_adapter_bwd_num_partials", "emu_adapter_bwd_path"):
            getattr(L, name).argtypes = _ADAPTER_BWD
        L.emu_adapter_bwd_num_partials.restype = I64
        L.emu_adapter_bwd_path.restype = ctypes.c_char_p
        L.emu_adapter_keep_mask.argtypes = [P, I64, I, F, P]
        L.emu_adapter_limits.argtypes = [ctypes.POINTER(I), ctypes.POINTER(I)]
        _LIB = L
    return _LIB


def set_copy_mode(eager: bool) -> None:
    """cp.async copies land at the wait that retires them (False) or at issue (True)."""
    lib().emu_set_copy_mode(int(eager))


def select_device(dev: int) -> None:
    """0: 3 SMs with an H100's shared memory; 1: 2 SMs with 64 KiB to opt into; 2: 132 SMs."""
    if not lib().emu_select_device(dev):
        raise ValueError(f"no emulated device {dev}")


def device_props(dev: int) -> tuple[int, int]:
    """(SM count, dynamic shared memory a block may opt into) of emulated device ``dev``."""
    sms, optin = I(), I()
    if not lib().emu_device_props(dev, ctypes.byref(sms), ctypes.byref(optin)):
        raise ValueError(f"no emulated device {dev}")
    return sms.value, optin.value


def selftest(which: int, out: torch.Tensor, src: torch.Tensor | None = None) -> str:
    """Run self-test kernel ``which`` (tests/cuda_emu/selftest.cpp); returns the fault ("" when none)."""
    try:
        _check(lib().emu_selftest(which, out.data_ptr(), src.data_ptr() if src is not None else None), "selftest")
    except EmulatorFault as e:
        return str(e)
    return ""


def _check(err: int, what: str) -> None:
    fault = lib().emu_take_fault().decode()
    if err != 0 or fault:
        raise EmulatorFault(f"{what}: {lib().emu_error_string(err).decode()} {fault}".strip())


# ---- guarded buffers ----------------------------------------------------------------------------------

class Guarded:
    """``view`` lies in memory that ends less than ``align`` bytes before a page the emulator guards (an
    access to it during a launch is an ``EmulatorFault``), after at least GUARD bytes of margin; all of it
    starts as FILL. ``intact()`` says whether everything around ``view`` is still FILL. ``offset``
    (elements) moves the view's start off ``align``. Vector-loaded buffers need ``align=16``; the
    per-row statistics are read one float at a time, so theirs end right at the page."""

    def __init__(self, numel_or_shape, dtype: torch.dtype, row_stride: int | None = None, offset: int = 0,
                 align: int = 16):
        shape = tuple(numel_or_shape) if isinstance(numel_or_shape, (tuple, list, torch.Size)) else (numel_or_shape,)
        esize = torch.empty((), dtype=dtype).element_size()
        if len(shape) == 2 and row_stride is not None:
            span = (shape[0] - 1) * row_stride + shape[1] if shape[0] > 0 else 0
            strides = (row_stride, 1)
        else:
            span = 1
            for s in shape:
                span *= s
            strides = None
        body = (offset + span) * esize
        self._data = lib().emu_alloc_fenced(body, align)
        if not self._data:
            raise MemoryError("emulator: no memory for a fenced buffer")
        head = lib().emu_fenced_offset(self._data)
        assert head >= GUARD
        total = head + (body + align - 1) // align * align
        raw = (ctypes.c_uint8 * total).from_address(self._data - head)
        self._bytes = torch.frombuffer(raw, dtype=torch.uint8)
        # tensors over the mapping keep `raw` alive (not this object): it is unmapped after the last of them
        weakref.finalize(raw, lib().emu_free_fenced, self._data)
        self.buf = self._bytes.view(dtype) if total % esize == 0 else self._bytes[: total // esize * esize].view(dtype)
        self.pad = head // esize + offset
        flat = self.buf[self.pad:self.pad + span]
        self.view = flat.view(shape) if strides is None else flat.as_strided(shape, strides)
        self._lo, self._hi = self.pad * esize, (self.pad + span) * esize

    def intact(self) -> bool:
        b = self._bytes
        return bool((b[: self._lo] == FILL).all() and (b[self._hi:] == FILL).all())

    def ptr(self) -> int:
        return self.view.data_ptr()


def _input(t: torch.Tensor | None, row_stride: int | None = None, offset: int = 0, align: int = 16) -> Guarded | None:
    """A guarded copy of t (rows ``row_stride`` apart when given, the padding NaN; ``offset`` elements past
    16-byte alignment)."""
    if t is None:
        return None
    g = Guarded(t.shape, t.dtype, row_stride=row_stride if t.dim() == 2 else None, offset=offset, align=align)
    g.view.copy_(t)
    return g


def _rows(t: torch.Tensor | None, width: int, pad: int, offset: int = 0) -> Guarded | None:
    """A guarded copy of the rows t: ``width + pad`` elements apart and ``offset`` elements past 16-byte
    alignment."""
    if t is None:
        return None
    return _input(t, width + pad, offset)


def _snapshot(inputs) -> list:
    return [(g, g.buf.clone()) for g in inputs if g is not None]


def _inputs_unchanged(what: str, snapshot: list) -> None:
    assert all(torch.equal(g.buf.view(torch.uint8), before.view(torch.uint8)) for g, before in snapshot), \
        f"{what} changed an input"


def _outputs_ok(what: str, outs: dict[str, Guarded]) -> None:
    bad = [name for name, g in outs.items() if g is not None and not g.intact()]
    if bad:
        raise EmulatorFault(f"{what} wrote outside {', '.join(bad)}")


def _stride(t: torch.Tensor | None) -> int:
    """The row stride the kernels are given for rows t (csrc/binding.cpp's row_stride): one row's is its
    width; 0 for no tensor."""
    if t is None:
        return 0
    return t.stride(0) if t.size(0) > 1 else t.size(1)


def _row_stride(t: Guarded | None) -> int:
    return _stride(None if t is None else t.view)


def _p(g: Guarded | None) -> int | None:
    return None if g is None else g.ptr()


# ---- the ops (what csrc/binding.cpp does on a GPU) -----------------------------------------------------

def _affine(weight, bias, x):
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        weight, bias = weight.float(), bias.float()
    wdt = weight.dtype if weight is not None else (bias.dtype if bias is not None else x.dtype)
    return weight, bias, wdt


def norm_fwd(x, weight, bias, residual, eps: float, rms: bool, pad: int = 0, offset: int = 0,
             res_pad: int | None = None, w_offset: int = 0):
    """(y, residual_out or None, mean or None, rstd) of 2-D ``x``; input rows are ``N + pad`` apart (the
    residual's ``N + res_pad`` when given), x starts ``offset`` elements past 16-byte alignment (a view such
    as ``big[:, 1:]``), and weight and bias ``w_offset`` elements."""
    M, N = x.shape
    weight, bias, wdt = _affine(weight, bias, x)
    xs, rs = _rows(x, N, pad, offset), _rows(residual, N, pad if res_pad is None else res_pad)
    ws, bs = _input(weight, offset=w_offset), _input(bias, offset=w_offset)
    y = Guarded((M, N), x.dtype)
    h = Guarded((M, N), x.dtype) if residual is not None else None
    mean = Guarded(M, torch.float32, align=4) if not rms else None
    rstd = Guarded(M, torch.float32, align=4)
    before = _snapshot((xs, rs, ws, bs))
    err = lib().emu_norm_fwd(_p(xs), _p(rs), _p(ws), _p(bs), y.ptr(), _p(h), _p(mean), rstd.ptr(), M, N,
                             _row_stride(xs), _row_stride(rs), DTYPE_CODE[x.dtype], DTYPE_CODE[wdt], eps, int(rms))
    _check(err, "norm_fwd")
    _outputs_ok("norm_fwd", {"y": y, "residual_out": h, "mean": mean, "rstd": rstd})
    _inputs_unchanged("norm_fwd", before)
    return (y.view.clone(), h.view.clone() if h is not None else None, mean.view.clone() if mean is not None else None,
            rstd.view.clone())


def fwd_path(x, weight, bias, residual, rms: bool, pad: int = 0, offset: int = 0, res_pad: int | None = None,
             w_offset: int = 0) -> str:
    M, N = x.shape
    weight, bias, wdt = _affine(weight, bias, x)
    g = [_input(x, N + pad, offset), _input(residual, N + (pad if res_pad is None else res_pad)),
         _input(weight, offset=w_offset), _input(bias, offset=w_offset)]
    out = Guarded((M, N), x.dtype)
    return lib().emu_norm_fwd_path(_p(g[0]), _p(g[1]), _p(g[2]), _p(g[3]), out.ptr(), out.ptr() if residual is not None
                                   else None, M, N, _row_stride(g[0]), _row_stride(g[1]), DTYPE_CODE[x.dtype],
                                   DTYPE_CODE[wdt], int(rms)).decode()


def _bwd_args(dy, x, w, mean, rstd, dres, dx, dwp, dbp, M, N, act, wdt, rms, need, stages):
    return (_p(dy), _p(x), _p(w), _p(mean), _p(rstd), _p(dres), _p(dx), _p(dwp), _p(dbp), M, N, _row_stride(dy),
            _row_stride(x), _row_stride(dres), DTYPE_CODE[act], DTYPE_CODE[wdt], int(rms), int(need[0]), int(need[1]),
            int(need[2]), stages)


def norm_bwd(dy, x, weight, mean, rstd, dres, rms: bool, need_dx=True, need_dw=True, need_db=False, stages: int = 0,
             dw_dtype=None, db_dtype=None, pad: int = 0, offset: int = 0, res_pad: int | None = None,
             w_offset: int = 0):
    """(dx, dweight, dbias, path) like mmfast_cuda::norm_bwd; input rows are ``N + pad`` apart (dres's
    ``N + res_pad`` when given), x starts ``offset`` elements past 16-byte alignment, and the weight
    ``w_offset`` elements."""
    M, N = x.shape
    need_dw = need_dw and weight is not None
    wdt = weight.dtype if weight is not None else x.dtype
    g_dy, g_x = _rows(dy, N, pad), _rows(x, N, pad, offset)
    g_dres = _rows(dres if need_dx else None, N, pad if res_pad is None else res_pad)
    g_w, g_mean, g_rstd = _input(weight, offset=w_offset), _input(mean, align=4), _input(rstd, align=4)
    need = (need_dx, need_dw, need_db)
    dx = Guarded((M, N), x.dtype) if need_dx else None
    probe = _bwd_args(g_dy, g_x, g_w, g_mean, g_rstd, g_dres, dx, None, None, M, N, x.dtype, wdt, rms, need, stages)
    path = lib().emu_norm_bwd_path(*probe).decode()
    P_ = lib().emu_norm_bwd_num_partials(*probe)
    if P_ < 0:
        raise EmulatorFault("norm_bwd_num_partials refused the parameters")
    dwp = Guarded((P_, N), torch.float32) if need_dw else None
    dbp = Guarded((P_, N), torch.float32) if need_db else None
    before = _snapshot((g_dy, g_x, g_dres, g_w, g_mean, g_rstd))
    if M > 0:
        err = lib().emu_norm_bwd(*_bwd_args(g_dy, g_x, g_w, g_mean, g_rstd, g_dres, dx, dwp, dbp, M, N, x.dtype, wdt,
                                            rms, need, stages))
        _check(err, f"norm_bwd ({path})")
    _outputs_ok("norm_bwd", {"dx": dx, "dw_partial": dwp, "db_partial": dbp})
    _inputs_unchanged("norm_bwd", before)

    def total(part, dtype):
        out = Guarded(N, dtype)
        _check(lib().emu_norm_sum_partials(_p(part), P_, N, out.ptr(), DTYPE_CODE[dtype]), "norm_sum_partials")
        _outputs_ok("norm_sum_partials", {"out": out})
        return out.view.clone()

    dw_dtype = dw_dtype or wdt  # the defaults of mmfast.kernels.cuda_ext.norm_bwd
    dw = total(dwp, dw_dtype) if need_dw else None
    db = total(dbp, db_dtype or (dw_dtype if need_dw else x.dtype)) if need_db else None
    return (dx.view.clone() if dx is not None else None), dw, db, path


# ---- the adapter (what csrc/binding.cpp does on a GPU) ---------------------------------------------------

def sum_partials(part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """norm_sum_partials of a [P, N] fp32 workspace (a guarded copy, consumed as on the GPU) into a new
    ``dtype`` vector."""
    P_, N = part.shape
    g = _input(part.float())
    out = Guarded(N, dtype)
    _check(lib().emu_norm_sum_partials(g.ptr(), P_, N, out.ptr(), DTYPE_CODE[dtype]), "norm_sum_partials")
    _outputs_ok("norm_sum_partials", {"out": out})
    assert g.intact(), "norm_sum_partials wrote outside its workspace"
    return out.view.clone()


def adapter_limits() -> tuple[int, int]:
    """(most hidden channels, most experts) the CUDA C++ adapter kernels take (csrc/adapter.h)."""
    hidden, experts = I(), I()
    lib().emu_adapter_limits(ctypes.byref(hidden), ctypes.byref(experts))
    return hidden.value, experts.value


def _fp32(t: torch.Tensor | None) -> Guarded | None:
    """A guarded fp32 copy, read one element at a time: it ends right at the guard page."""
    return None if t is None else _input(t.float().contiguous(), align=4)


def _seed(seed: torch.Tensor | None, p_drop: float) -> Guarded | None:
    return _input(seed.reshape(1), align=8) if p_drop > 0 else None


def _shape(M, S, D, R, E, groups, scale, p_drop, dtype):
    keep_scale = 1.0 / (1.0 - p_drop) if p_drop > 0 else 1.0  # in double, rounded once (as the binding does)
    return (M, S, D, R, E, groups, float(scale), float(p_drop), keep_scale, DTYPE_CODE[dtype])


def adapter_fwd(x, S, down_w, down_b, up_w, up_b, mix, scale, groups, p_drop, seed, pad: int = 0, offset: int = 0):
    """(y, z, path) of rows x [M, D] like mmfast_cuda::adapter_fwd; input rows are ``D + pad`` apart, and x
    starts ``offset`` elements past 16-byte alignment."""
    M, D = x.shape
    R, E = down_w.shape[0], up_w.shape[0]
    g_x = _rows(x, D, pad, offset)
    g_w = [_fp32(t) for t in (down_w, down_b, up_w, up_b, mix)]
    g_seed = _seed(seed, p_drop)
    y = Guarded((M, D), x.dtype)
    z = Guarded((M, R), torch.float32, align=4)
    args = (_p(g_x), _row_stride(g_x), *(_p(g) for g in g_w), _p(g_seed), y.ptr(), z.ptr(),
            *_shape(M, S, D, R, E, groups, scale, p_drop, x.dtype))
    path = lib().emu_adapter_fwd_path(*args).decode()
    before = _snapshot((g_x, *g_w, g_seed))
    _check(lib().emu_adapter_fwd(*args), f"adapter_fwd ({path})")
    _outputs_ok("adapter_fwd", {"y": y, "z": z})
    _inputs_unchanged("adapter_fwd", before)
    return y.view.clone(), z.view.clone(), path


def adapter_bwd(dy, x, z, S, down_w, up_w, up_b, mix, scale, groups, p_drop, seed, need_dx=True, need_dw=True,
                pad: int = 0, offset: int = 0):
    """(dx, d_down_w, d_down_b, d_up_w, d_up_b, d_mix, path) like mmfast_cuda::adapter_bwd (fp32 weight
    gradients, None where not requested); input rows are ``D + pad`` apart, x starts ``offset`` elements
    past 16-byte alignment."""
    M, D = x.shape
    R, E, RG = down_w.shape[0], up_w.shape[0], up_w.shape[2]
    B = mix.shape[0]
    g_dy, g_x = _rows(dy, D, pad), _rows(x, D, pad, offset)
    g_z = _fp32(z)
    g_w = [_fp32(t) for t in (down_w, up_w, up_b, mix)]
    g_seed = _seed(seed, p_drop)
    f32 = lambda *shape: Guarded(shape, torch.float32, align=4)  # noqa: E731
    dx = Guarded((M, D), x.dtype) if need_dx else None
    dz, dmix_rows = f32(M, R), f32(M, E)
    zd = f32(M, R) if need_dw and p_drop > 0 else None
    shape = _shape(M, S, D, R, E, groups, scale, p_drop, x.dtype)

    def args(parts):
        return (_p(g_dy), _row_stride(g_dy), _p(g_x), _row_stride(g_x), _p(g_z), *(_p(g) for g in g_w), _p(g_seed),
                _p(dx), dz.ptr(), _p(zd), dmix_rows.ptr(), *(_p(t) for t in parts), *shape, int(need_dx),
                int(need_dw))

    probe = args((None, None, None))
    path = lib().emu_adapter_bwd_path(*probe).decode()
    P_ = lib().emu_adapter_bwd_num_partials(*probe)
    if P_ < 0:
        raise EmulatorFault("adapter_bwd_num_partials refused the parameters")
    parts = [f32(P_, n) for n in (R * D, E * D * RG, E * D)] if need_dw else [None, None, None]
    before = _snapshot((g_dy, g_x, g_z, *g_w, g_seed))
    _check(lib().emu_adapter_bwd(*args(parts)), f"adapter_bwd ({path})")
    _outputs_ok("adapter_bwd", {"dx": dx, "dz": dz, "zd": zd, "dmix_rows": dmix_rows,
                                **{f"partial{i}": t for i, t in enumerate(parts)}})
    _inputs_unchanged("adapter_bwd", before)

    def total(part, shape):
        n = part.view.shape[1]
        out = Guarded(n, torch.float32, align=4)
        _check(lib().emu_norm_sum_partials(part.ptr(), P_, n, out.ptr(), DTYPE_CODE[torch.float32]), "sum_partials")
        _outputs_ok("sum_partials", {"out": out})
        return out.view.clone().view(shape)

    grads = [None] * 4
    if need_dw:
        grads = [total(parts[0], (R, D)), dz.view.sum(0), total(parts[1], (E, D, RG)), total(parts[2], (E, D))]
    dmix = dmix_rows.view.view(B, S, E).sum(1)
    return (dx.view.clone() if dx is not None else None), *grads, dmix, path


def adapter_keep_mask(seed: torch.Tensor, M: int, R: int, p_drop: float) -> torch.Tensor:
    """The boolean [M, R] dropout keep mask the CUDA C++ adapter kernels draw for ``seed``."""
    g_seed = _input(seed.reshape(1), align=8)
    out = Guarded((M, R), torch.int8, align=1)
    _check(lib().emu_adapter_keep_mask(g_seed.ptr(), M, R, float(p_drop), out.ptr()), "adapter_keep_mask")
    _outputs_ok("adapter_keep_mask", {"mask": out})
    return out.view.clone().bool()


# ---- the binding's ops on CPU tensors ----------------------------------------------------------------------

BINDING_FLAGS = ("-O0", "-fPIC", "-w")


def _torch_link_flags() -> list[str]:
    from torch.utils import cpp_extension

    lib_dir = cpp_extension.library_paths()[0]
    return [f"-L{lib_dir}", "-lc10", "-ltorch_cpu", "-ltorch", f"-Wl,-rpath,{lib_dir}"]


def build_binding() -> Path:
    """``csrc/binding.cpp`` built for CPU tensors over the emulated kernels (``cuda_emu/binding_emu.cpp``),
    linked to ``build()``'s library so that both share one emulator (device choice, faults)."""
    emu = build()
    compile_flags, link_flags = torch_cxx_flags(), _torch_link_flags()
    h = hashlib.sha256(emu.parent.name.encode())
    for f in (source_dir() / "binding.cpp", HERE / "binding_emu.cpp", *sorted((HERE / "torch_shim").rglob("*.h"))):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    h.update(" ".join((*BINDING_FLAGS, *compile_flags, *link_flags, torch.__version__)).encode())
    h.update(subprocess.run(["g++", "--version"], capture_output=True, text=True).stdout.encode())
    out_dir = Path(tempfile.gettempdir()) / f"mmfast-cuda-emu-binding-{h.hexdigest()[:16]}"
    out = out_dir / "libmmfast_binding_emu.so"
    if out.exists():
        return out
    work = Path(tempfile.mkdtemp(prefix="mmfast-cuda-emu-binding-build-"))
    # the shim directory first: its c10/cuda headers stand in for torch's
    inc = ["-I", str(HERE / "torch_shim"), "-I", str(source_dir()), "-I", str(toolkit_include())]
    obj, tmp = work / "binding_emu.o", work / out.name
    for args in ([*BINDING_FLAGS, *inc, *compile_flags, "-DTORCH_EXTENSION_NAME=mmfast_cuda_emu", "-c",
                  str(HERE / "binding_emu.cpp"), "-o", str(obj)],
                 ["-shared", "-o", str(tmp), str(obj), f"-L{emu.parent}", f"-l:{emu.name}",
                  f"-Wl,-rpath,{emu.parent}", *link_flags]):
        r = subprocess.run(["g++", *args], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"building csrc/binding.cpp for the emulator failed:\n{r.stderr[-4000:]}")
    # a CUDA runtime call the binding makes that binding_emu.cpp does not send to the emulator would bind
    # to the real runtime where a CUDA build of torch has loaded it
    nm = subprocess.run(["nm", "-D", "--undefined-only", str(tmp)], capture_output=True, text=True, check=True)
    cuda = sorted({line.split()[-1] for line in nm.stdout.splitlines() if line.split()[-1].startswith("cuda")})
    if cuda:
        raise RuntimeError(f"csrc/binding.cpp calls CUDA runtime functions binding_emu.cpp does not redirect: {cuda}")
    out_dir.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)  # atomic, as in build()
    shutil.rmtree(work, ignore_errors=True)
    return out


_BINDING: ctypes.CDLL | None = None
_BINDING_ERROR: Exception | None = None  # a failed build fails every later call at once, not after a rebuild


def register_cpu_ops() -> None:
    """Load ``csrc/binding.cpp`` built for CPU tensors (``build_binding``): its ops (``torch.ops.mmfast_cuda.*``,
    the binding's own schemas, argument checks, allocations and partial sums) then run the emulated kernels,
    and the ``cuda`` backend's whole path from the ops layer down runs on a machine without a GPU. Only where
    the real extension has not defined the namespace (a CPU build of torch never loads it)."""
    global _BINDING, _BINDING_ERROR
    if _BINDING is not None:
        return
    if _BINDING_ERROR is not None:
        raise RuntimeError(f"the emulated binding failed to build earlier: {_BINDING_ERROR}")
    if torch.cuda.is_available():
        raise RuntimeError("the emulated mmfast_cuda ops are for machines without a GPU")
    try:
        torch.ops.mmfast_cuda.norm_fwd
    except (AttributeError, RuntimeError):
        pass
    else:
        raise RuntimeError("the real mmfast_cuda extension is loaded: its ops cannot be emulated in this process")
    lib()  # the emulator the binding links to, loaded first from the same file
    try:
        path = build_binding()
    except Exception as e:
        _BINDING_ERROR = e
        raise
    torch.ops.load_library(str(path))
    binding = ctypes.CDLL(str(path))
    binding.emu_take_ran_paths.restype = ctypes.c_char_p
    _BINDING = binding


def take_ran_paths() -> list[str]:
    """The kernel paths the binding's ops launched since the last call, oldest first
    (``"norm_bwd:special-4096-staged3"``, ``"adapter_bwd:v8+v2"``)."""
    if _BINDING is None:
        return []
    return [line for line in _BINDING.emu_take_ran_paths().decode().split("\n") if line]
