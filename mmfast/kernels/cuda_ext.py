"""The CUDA C++ backend's loader: finds the ``csrc/`` extension, builds it on first use, loads it.

Where the extension comes from, in order:

1. ``mmfast._cuda_ext``, built ahead of time by ``MMFAST_CUDA=1 pip install --no-build-isolation -e .``,
   when it was built from the sources mmfast holds now (``setup.py`` stores :func:`aot_key` beside it; a
   stale build is passed over with a warning);
2. a build on first use with ``torch.utils.cpp_extension`` and ninja into a cache directory
   (``$MMFAST_CACHE_DIR``, default ``~/.cache/mmfast``), one subdirectory per combination of source
   hash, torch, CUDA and Python versions and target GPU architectures, reused by every later process.
   A finished build (``built.ok`` naming its key) is imported without the lock and without writing, so a
   read-only or another user's cache works.

Builds are serialised by an OS file lock on the cache directory, so concurrent processes (the ranks
of a DDP job) build once and the others load the result; the lock dies with its holder, so a killed
build never blocks a later import. Each build runs in a directory of its own process and its library
is moved into place when it is complete, so compilers left running by a killed build cannot touch the
next one's files. A failed build is recorded, and processes that started before it failed (the other
ranks of the job) take its reason instead of compiling again. A process waits at most
``$MMFAST_CUDA_BUILD_TIMEOUT`` seconds (default 1800) for another's build. Local ranks other than 0 give
rank 0 a head start before they try. Where the filesystem has no ``flock`` (some network mounts),
builds go on unserialised: each in its own directory, the last one's library moved into place.

Nothing here raises: :func:`load` returns whether the extension is usable and :func:`unavailable_reason`
says why not (no CUDA device, a CPU-only torch, no nvcc, no ninja, a compile error, a lock timeout).
The backend layer (:mod:`mmfast.ops.backend`) turns that into one warning and the Triton kernels.

:func:`norm_fwd` / :func:`norm_bwd` have the signatures of :mod:`mmfast.kernels.norm`'s launchers, and
:func:`adapter_fwd` / :func:`adapter_bwd` those of :mod:`mmfast.kernels.adapter`'s.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import struct
import sys
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

try:  # POSIX only; elsewhere builds are not serialised across processes
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

#: Module name of the ahead-of-time build (setup.py with MMFAST_CUDA=1).
AOT_MODULE = "mmfast._cuda_ext"
#: File beside the ahead-of-time build holding the :func:`aot_key` it was built from (written by setup.py).
AOT_KEY_FILE = "_cuda_ext.key"
#: Module name of the build on first use, and its library's file name in the build directory.
JIT_NAME = "mmfast_cuda_ext"
LIBRARY = f"{JIT_NAME}.so"
#: Translation units, compiled in this order; headers are hashed too.
SOURCES = ("binding.cpp", "norm_fwd.cu", "norm_bwd.cu", "adapter.cu")
HEADERS = ("norm.h", "norm_common.cuh", "adapter.h")
#: Extra nvcc flags (no fast-math: the kernels round like PyTorch).
NVCC_FLAGS = ("-O3", "-lineinfo", "--split-compile=0")
CXX_FLAGS = ("-O3",)

CACHE_ENV = "MMFAST_CACHE_DIR"
TIMEOUT_ENV = "MMFAST_CUDA_BUILD_TIMEOUT"
#: ``MMFAST_CUDA_BUILD=0``: no build on first use (a finished build or the ahead-of-time one still loads):
#: for the processes after a build that failed (scripts/gpu_check.sh), which would each try again.
BUILD_ENV = "MMFAST_CUDA_BUILD"
DEFAULT_TIMEOUT_S = 1800.0
#: Seconds a local rank other than 0 waits for rank 0 to start (or finish) the build.
RANK0_HEAD_START_S = 30.0

#: When this process loaded this module: a recorded build failure after it belongs to this job's run.
_PROCESS_START = time.time()

_state_lock = threading.Lock()
_loaded: bool | None = None  # None: not tried yet
_reason: str | None = None
_origin: str | None = None  # "aot" or the build directory

#: How many rows deep the CUDA C++ backward stages x and dy through shared memory (``stages`` of
#: ``NormBwdParams`` in csrc/norm.h), per (norm, N, "16bit" | "fp32"): entries come only from a committed
#: GPU run of ``benchmarks/tune_norm.py --backend cuda``; absent means 0, the register kernel.
BWD_STAGES: dict[tuple[str, int, str], int] = {}
#: Overrides BWD_STAGES for every shape (the tuner and the tests set it): 0, or 2..MAX_BWD_STAGES.
STAGES_ENV = "MMFAST_CUDA_BWD_STAGES"
MAX_BWD_STAGES = 4  # kMaxBwdStages in csrc/norm.h
#: The CUDA C++ adapter kernels keep a row tile's hidden activations per expert in registers: at most this
#: many hidden channels and experts (kAdapterMaxHidden / kAdapterMaxExperts in csrc/adapter.h).
ADAPTER_MAX_HIDDEN = 8
ADAPTER_MAX_EXPERTS = 2


# ---------------------------------------------------------------------------------------------
# sources and cache
# ---------------------------------------------------------------------------------------------


def source_dir() -> Path:
    """The directory holding the CUDA sources: the copy inside an installed wheel, else the repository's ``csrc``."""
    here = Path(__file__).resolve().parent.parent  # the mmfast package
    for candidate in (here / "_csrc", here.parent / "csrc"):
        if all((candidate / f).is_file() for f in SOURCES + HEADERS):
            return candidate
    raise FileNotFoundError(f"the CUDA sources ({', '.join(SOURCES)}) are neither in {here / '_csrc'} nor in {here.parent / 'csrc'}")


def source_hash() -> str:
    h = hashlib.sha256()
    src = source_dir()
    for name in SOURCES + HEADERS:
        h.update(name.encode())
        h.update((src / name).read_bytes())
    return h.hexdigest()


def aot_key() -> str:
    """What the ahead-of-time build must have been built from: the sources and the compiler flags."""
    h = hashlib.sha256()
    for part in (source_hash(), " ".join(NVCC_FLAGS + CXX_FLAGS)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _target_archs() -> str:
    """The GPU architectures a build targets: ``$TORCH_CUDA_ARCH_LIST``, else (as torch's build helper
    does) those of the visible devices."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    if archs or torch.version.cuda is None or not torch.cuda.is_available():
        return archs
    return "visible:" + ";".join(sorted({"%d.%d" % torch.cuda.get_device_capability(i)
                                         for i in range(torch.cuda.device_count())}))


def build_key() -> str:
    """Names the build directory: sources, compiler flags, torch, CUDA and Python versions, target GPU
    architectures (processes that see different GPU models build apart instead of rebuilding each other's)."""
    h = hashlib.sha256()
    for part in (source_hash(), " ".join(NVCC_FLAGS + CXX_FLAGS), torch.__version__, str(torch.version.cuda),
                 sys.implementation.cache_tag, _target_archs()):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def cache_root() -> Path:
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "mmfast"


def build_dir() -> Path:
    return cache_root() / f"cuda-{build_key()}"


def build_timeout() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        return float(raw) if raw.strip() else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None


# ---------------------------------------------------------------------------------------------
# the lock
# ---------------------------------------------------------------------------------------------


class LockTimeout(TimeoutError):
    pass


#: flock errors that mean "this filesystem has no such locks", not "someone holds it".
_NO_FLOCK = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL}


def _open_lock_file(path: Path) -> int:
    try:
        return os.open(path, os.O_CREAT | os.O_RDWR, 0o666)
    except PermissionError:  # another user's cache: flock works on a descriptor opened for reading
        return os.open(path, os.O_RDONLY)


@contextlib.contextmanager
def build_lock(directory: Path, timeout: float):
    """Exclusive OS lock on ``directory/build.lock``, waited for at most ``timeout`` seconds. Yields
    ``SimpleNamespace(os_lock=...)``: False where the filesystem has no ``flock`` (the block then runs
    unserialised).

    ``flock`` locks belong to the open file: the kernel drops them when the holder exits, however it
    exits, so a lock file left behind by a killed build is free for the next process.
    """
    directory.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover - Windows
        yield SimpleNamespace(os_lock=False)
        return
    fd = _open_lock_file(directory / "build.lock")
    no_flock = False
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockTimeout(
                        f"another process has held the build lock {directory / 'build.lock'} for over {timeout:.0f} s "
                        f"(raise {TIMEOUT_ENV} if its build is just slow)"
                    ) from None
                time.sleep(0.2)
            except OSError as exc:
                if exc.errno not in _NO_FLOCK:
                    raise
                no_flock = True
                break
        if no_flock:  # (outside the handler: the block's own errors are not chained to the flock error)
            yield SimpleNamespace(os_lock=False)
            return
        try:
            yield SimpleNamespace(os_lock=True)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def lock_is_held(directory: Path) -> bool:
    """Whether some process holds ``directory``'s build lock right now."""
    if fcntl is None or not (directory / "build.lock").exists():  # pragma: no cover - Windows
        return False
    fd = _open_lock_file(directory / "build.lock")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # no flock on this filesystem: nobody can hold it
        return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _local_rank() -> int:
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def wait_for_rank0(directory: Path, head_start: float = RANK0_HEAD_START_S) -> None:
    """On local ranks other than 0: give rank 0 up to ``head_start`` s to take the build lock or finish."""
    if _local_rank() == 0:
        return
    deadline = time.monotonic() + head_start
    while time.monotonic() < deadline:
        if (directory / "built.ok").exists() or lock_is_held(directory):
            return
        time.sleep(0.2)


# ---------------------------------------------------------------------------------------------
# building and loading
# ---------------------------------------------------------------------------------------------


def runtime_missing() -> str | None:
    """None when CUDA C++ kernels could run here (a CUDA torch, a visible device), else why not."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    return None


def prerequisites() -> str | None:
    """None when a build can be attempted here, else why not."""
    why = runtime_missing()
    if why is not None:
        return why
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    nvcc = Path(home, "bin", "nvcc") if home else None
    if nvcc is None or not nvcc.exists():
        return "nvcc was not found (install the CUDA toolkit or set CUDA_HOME)"
    if not cpp_extension.is_ninja_available():
        return "ninja was not found (pip install ninja)"
    return None


def _built(directory: Path) -> bool:
    """Whether ``directory`` holds a finished build of the current :func:`build_key`."""
    try:
        return (directory / "built.ok").read_text().strip() == build_key() and (directory / LIBRARY).is_file()
    except OSError:
        return False


def _import_built(directory: Path):
    """Import the finished build in ``directory`` (reads only)."""
    spec = importlib.util.spec_from_file_location(JIT_NAME, directory / LIBRARY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildFailedElsewhere(RuntimeError):
    """Another process of this run (a rank beside this one) failed to build these sources moments ago."""


def _job() -> str:
    """What the processes of one run share, and no other run: the launcher's run id (torchrun's; its
    static rendezvous calls every run "none"), the SLURM job step and the rendezvous address, whichever
    are set; else, in a process group, the parent process (ranks from ``torch.multiprocessing.spawn``);
    else this process alone (a notebook kernel shares its parent with the server's other kernels)."""
    env = os.environ
    parts = []
    if env.get("TORCHELASTIC_RUN_ID", "none") != "none":
        parts.append(f"torchelastic={env['TORCHELASTIC_RUN_ID']}")
    if env.get("SLURM_JOB_ID"):
        parts.append(f"slurm={env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', '')}")
    if env.get("MASTER_PORT"):
        parts.append(f"rendezvous={env.get('MASTER_ADDR', '')}:{env['MASTER_PORT']}")
    if parts:
        return " ".join(parts)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return f"parent={os.getppid()}"
    return f"process={os.getpid()}"


def _recorded_failure(directory: Path) -> str | None:
    """The reason a build of the current key failed, when that happened in this run (a process of the same
    job, after this one started); another job's failure (a transient one: nvcc killed for memory) is not
    taken as this one's, so this process builds again."""
    try:
        rec = json.loads((directory / "build.failed").read_text())
    except (OSError, ValueError):
        return None
    if rec.get("key") == build_key() and rec.get("job") == _job() and float(rec.get("time", 0)) >= _PROCESS_START:
        return str(rec.get("reason"))
    return None


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_dead_builds(directory: Path) -> None:
    """Build directories of processes that are gone (a killed build's; compilers it left running only
    ever write there)."""
    for d in directory.glob("tmp-*"):
        try:
            pid = int(d.name.split("-")[1])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(d, ignore_errors=True)


def _build(directory: Path):
    from torch.utils import cpp_extension

    if _built(directory):  # finished: no lock, nothing written
        return _import_built(directory)
    src = source_dir()
    timeout = build_timeout()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except PermissionError as exc:
        raise PermissionError(f"cannot create the build cache {directory} ({exc.strerror}); set {CACHE_ENV} to a "
                              "writable directory") from None
    wait_for_rank0(directory)
    with build_lock(directory, timeout) as lock:
        if _built(directory):  # built by the process this one waited for
            return _import_built(directory)
        failed = _recorded_failure(directory)
        if failed is not None:
            raise BuildFailedElsewhere(f"another process's build of these sources failed moments ago: {failed}")
        if lock.os_lock:
            _remove_dead_builds(directory)
        work = directory / f"tmp-{os.getpid()}-{time.monotonic_ns()}"
        try:
            work.mkdir()
        except PermissionError as exc:
            raise PermissionError(f"cannot write the build cache {directory} ({exc.strerror}); set {CACHE_ENV} to a "
                                  "writable directory") from None
        print(f"mmfast: building the CUDA C++ kernels in {directory} (first use; a minute or two)", file=sys.stderr)
        try:
            module = cpp_extension.load(
                name=JIT_NAME,
                sources=[str(src / f) for f in SOURCES],
                extra_cflags=list(CXX_FLAGS),
                extra_cuda_cflags=list(NVCC_FLAGS),
                extra_include_paths=[str(src)],
                build_directory=str(work),
                verbose=os.environ.get("MMFAST_CUDA_VERBOSE", "0") not in ("", "0"),
                is_python_module=True,
            )
        except Exception as exc:
            _write_atomically(directory / "build.failed",
                              json.dumps({"key": build_key(), "job": _job(), "time": time.time(),
                                          "reason": _short(exc)}))
            shutil.rmtree(work, ignore_errors=True)
            raise
        os.replace(work / LIBRARY, directory / LIBRARY)  # complete, in one step (this process keeps its mapping)
        _write_atomically(directory / "built.ok", build_key() + "\n")
        (directory / "build.failed").unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    return module


def _short(exc: BaseException) -> str:
    """The lines of a build error worth reading: the compiler's error lines, else the last few."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() and "ninja: build stopped" not in line]
    picked = (errors or lines)[-3:]
    return f"{type(exc).__name__}: " + " | ".join(picked) if picked else type(exc).__name__


def load() -> bool:
    """Make ``torch.ops.mmfast_cuda`` usable (import the ahead-of-time build, or build on first use).

    Returns whether it is; tried once per process, the answer (and :func:`unavailable_reason`) is kept.
    """
    global _loaded, _reason, _origin
    if _loaded is not None:
        return _loaded
    with _state_lock:
        if _loaded is not None:
            return _loaded
        aot = _aot_problem()
        if aot == "":
            try:
                importlib.import_module(AOT_MODULE)
                _loaded, _origin = True, "aot"
                return True
            except Exception as exc:  # an AOT build that does not load (ABI mismatch, undefined symbol, ...)
                _loaded, _reason = False, f"the ahead-of-time build {AOT_MODULE} failed to load ({_short(exc)})"
                return False
        if aot is not None:
            warnings.warn(f"mmfast: {aot}; building the CUDA C++ kernels on first use instead", RuntimeWarning)
        why = runtime_missing()
        if why is not None:
            _loaded, _reason = False, why
            return False
        directory = None
        try:
            directory = build_dir()
            if not _built(directory):  # a finished build needs no compiler (a shared cache, a machine without nvcc)
                why = (f"{BUILD_ENV}=0: no build on first use, and {directory} holds no finished one"
                       if os.environ.get(BUILD_ENV, "1").strip().lower() in ("0", "false", "off", "no") else
                       prerequisites())
                if why is not None:
                    _loaded, _reason = False, why
                    return False
            _build(directory)
        except Exception as exc:
            where = f"the build in {directory}" if directory is not None else "the build on first use"
            _loaded, _reason = False, f"{where} failed ({_short(exc)})"
            return False
        _loaded, _origin = True, str(directory)
        return True


def _aot_problem() -> str | None:
    """``""`` when the ahead-of-time build is there and matches the sources, None when there is none, else
    why it is passed over."""
    try:
        spec = importlib.util.find_spec(AOT_MODULE)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    key_file = Path(spec.origin).with_name(AOT_KEY_FILE)
    try:
        built_from = key_file.read_text().strip()
    except OSError:
        built_from = None
    try:
        current = aot_key()
    except OSError as exc:  # no sources to compare with (a wheel without them): trust the build
        return "" if built_from else f"the ahead-of-time build {spec.origin} has no {AOT_KEY_FILE} ({exc})"
    if built_from != current:
        return (f"the ahead-of-time build {spec.origin} was built from other CUDA sources than mmfast holds now "
                f"({'no ' + AOT_KEY_FILE if built_from is None else 'key ' + built_from + ', sources ' + current}; "
                "MMFAST_CUDA=1 pip install --no-build-isolation -e . rebuilds it)")
    return ""


def unavailable_reason() -> str | None:
    """Why the extension cannot be used (after :func:`load` has been tried), else None."""
    return None if load() else _reason


def origin() -> str | None:
    """``"aot"`` or the build directory the loaded extension came from."""
    return _origin if load() else None


def _reset_for_tests() -> None:
    global _loaded, _reason, _origin
    with _state_lock:
        _loaded = _reason = _origin = None


# ---------------------------------------------------------------------------------------------
# launchers with the signatures of mmfast.kernels.norm
# ---------------------------------------------------------------------------------------------


def _none_if_empty(t: torch.Tensor, present: bool) -> torch.Tensor | None:
    return t if present else None


def norm_fwd(x, weight, bias, residual, eps, rms):
    """See :func:`mmfast.kernels.norm.norm_fwd`."""
    weight = None if weight is None else weight.contiguous()  # the kernels read affine vectors densely
    bias = None if bias is None else bias.contiguous()
    y, h, mean, rstd = torch.ops.mmfast_cuda.norm_fwd(x, weight, bias, residual, float(eps), rms)
    return y, _none_if_empty(h, residual is not None), _none_if_empty(mean, not rms), rstd


def _check_stages(stages, source: str) -> int:
    if isinstance(stages, bool) or not isinstance(stages, int) or not (stages == 0 or 2 <= stages <= MAX_BWD_STAGES):
        raise ValueError(f"{source}: backward stages must be 0 or 2..{MAX_BWD_STAGES}, got {stages!r}")
    return stages


@functools.lru_cache(maxsize=8)
def _env_stages(value: str) -> int:
    try:
        stages = int(value)
    except ValueError:
        stages = value
    return _check_stages(stages, STAGES_ENV)


def bwd_stages(rms: bool, N: int, dtype: torch.dtype) -> int:
    """Shared-memory stages of the CUDA C++ backward for this shape: $MMFAST_CUDA_BWD_STAGES, else BWD_STAGES, else 0."""
    env = os.environ.get(STAGES_ENV)
    if env:
        return _env_stages(env)
    return BWD_STAGES.get(("rms" if rms else "ln", N, "fp32" if dtype == torch.float32 else "16bit"), 0)


def norm_bwd(dy, x, weight, mean, rstd, dresidual_out, rms, need_dx, need_dw, need_db, dw_dtype=None, db_dtype=None,
             stages=None):
    """See :func:`mmfast.kernels.norm.norm_bwd`; ``stages``: see :func:`bwd_stages` (None: that choice)."""
    stages = bwd_stages(rms, x.shape[-1], x.dtype) if stages is None else _check_stages(stages, "stages")
    if need_dw and weight is None:
        raise ValueError("need_dw requires a weight")
    if need_dw and dw_dtype is None:
        dw_dtype = weight.dtype
    if need_db and db_dtype is None:
        db_dtype = dw_dtype or x.dtype
    weight = None if weight is None else weight.contiguous()  # and the statistics, one float per row
    mean = None if rms or mean is None else mean.contiguous()
    dx, dw, db = torch.ops.mmfast_cuda.norm_bwd(
        dy, x, weight, mean, rstd.contiguous(), dresidual_out, rms, need_dx, need_dw, need_db, dw_dtype, db_dtype,
        stages
    )
    return _none_if_empty(dx, need_dx), _none_if_empty(dw, need_dw), _none_if_empty(db, need_db)


def norm_path(x, weight, bias, residual, rms, backward=False, stages=None) -> str:
    """Which CUDA kernel runs these inputs (``special-4096``, ``special-4096-staged3``, ``register-v8-t128``,
    ``wide-v1``, ...); ``stages`` as for :func:`norm_bwd`."""
    stages = bwd_stages(rms, x.shape[-1], x.dtype) if stages is None else _check_stages(stages, "stages")
    return torch.ops.mmfast_cuda.norm_path(x, weight, bias, residual, rms, backward, stages)


# ---------------------------------------------------------------------------------------------
# the MMA adapter, with the signatures of mmfast.kernels.adapter
# ---------------------------------------------------------------------------------------------


def adapter_unsupported(R: int, E: int, p_drop: float = 0.0) -> str | None:
    """Why the CUDA C++ adapter kernels do not take ``R`` hidden channels, ``E`` experts and dropout
    ``p_drop``, else None (the rest of ``adapter_supported`` in csrc/adapter.cu, groups and token
    counts, is what every backend requires and the op checks first)."""
    if not (1 <= R <= ADAPTER_MAX_HIDDEN and 1 <= E <= ADAPTER_MAX_EXPERTS):
        return (f"the CUDA C++ adapter kernels take 1 to {ADAPTER_MAX_HIDDEN} hidden channels and 1 to "
                f"{ADAPTER_MAX_EXPERTS} experts (got {R} and {E})")
    if struct.unpack("f", struct.pack("f", p_drop))[0] >= 1.0:  # p as the kernels see it (fp32)
        return f"the CUDA C++ adapter kernels take dropout below 1 in float32 (got {p_drop!r})"
    return None


def adapter_fwd(x2, S, down_w, down_b, up_w, up_b, mix, scale, groups, p_drop, seed):
    """See :func:`mmfast.kernels.adapter.adapter_fwd`."""
    if x2.shape[0] == 0:  # no tokens (S may be 0): nothing to launch
        return torch.empty_like(x2), x2.new_empty((0, down_w.shape[0]), dtype=torch.float32)
    return torch.ops.mmfast_cuda.adapter_fwd(x2, down_w, down_b, up_w, up_b, mix, float(scale), groups,
                                             float(p_drop), seed if p_drop > 0 else None, S)


def adapter_bwd(dy2, x2, z, S, down_w, up_w, up_b, mix, scale, groups, p_drop, seed, need_dx, need_dw, need_dmix):
    """See :func:`mmfast.kernels.adapter.adapter_bwd` (weight gradients in fp32; d mix always computed)."""
    if x2.shape[0] == 0:  # no tokens (S may be 0): zero gradients, nothing to launch
        grads = [torch.zeros_like(t, dtype=torch.float32) for t in (down_w, down_w[:, 0], up_w, up_b)]
        return (torch.empty_like(x2) if need_dx else None, *(grads if need_dw else [None] * 4),
                torch.zeros_like(mix) if need_dmix else None)
    dx, dA, da, dU, dc, dmix = torch.ops.mmfast_cuda.adapter_bwd(
        dy2, x2, z.contiguous(), down_w, up_w, up_b, mix, float(scale), groups, float(p_drop),
        seed if p_drop > 0 else None, S, need_dx, need_dw)
    grads = (dA, da, dU, dc) if need_dw else (None,) * 4
    return _none_if_empty(dx, need_dx), *grads, _none_if_empty(dmix, need_dmix)


def adapter_keep_mask(seed: torch.Tensor, M: int, R: int, p_drop: float) -> torch.Tensor:
    """The boolean [M, R] keep mask the CUDA C++ adapter kernels draw for ``seed`` (the Triton kernels' mask)."""
    return torch.ops.mmfast_cuda.adapter_keep_mask(seed, M, R, float(p_drop))


def adapter_path(x2, down_w, up_w, groups, backward=False) -> str:
    """Vector widths the adapter kernels use on rows like ``x2`` (``v8``; backward ``v8+v2``: rows kernel +
    column kernel)."""
    return torch.ops.mmfast_cuda.adapter_path(x2, down_w, up_w, groups, backward)
