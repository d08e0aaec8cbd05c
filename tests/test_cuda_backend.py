"""The CUDA C++ backend on a machine without a GPU: its sources compile for sm_90a, and the logic that
builds, loads, locks, falls back and chooses between backends behaves as documented.

The kernels' numerics are tested by the whole norm matrix in test_norm.py, which runs once per backend
(``cuda`` included) natively on a GPU machine.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import types
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

import mmfast
from mmfast.kernels import cuda_ext
from mmfast.ops import backend, backend_table
from mmfast.ops.backend import KernelKey, resolve_backend

ROOT = Path(__file__).resolve().parent.parent
NO_GPU = not torch.cuda.is_available()


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """A loader that has not tried yet, building into a private cache; restored afterwards."""
    monkeypatch.setenv(cuda_ext.CACHE_ENV, str(tmp_path / "cache"))
    cuda_ext._reset_for_tests()
    backend._warned.clear()
    yield cuda_ext
    cuda_ext._reset_for_tests()
    backend._warned.clear()


@pytest.fixture
def clean_tables(monkeypatch):
    backend_table.clear_cache()
    yield
    backend_table.clear_cache()


# ---------------------------------------------------------------------------------------------
# compile check
# ---------------------------------------------------------------------------------------------


def test_cuda_sources_compile_for_sm90a():
    """Every .cu compiles with the machine's nvcc for sm_90a; binding.cpp compiles against torch's headers,
    and every mmfast:: symbol the objects need is defined. Spills are reported in the output, not failed."""
    from mmfast.kernels.cuda_compile_check import find_nvcc

    if find_nvcc() is None:
        pytest.skip("no nvcc on this machine (CI machines have one)")
    out = subprocess.run([sys.executable, "-m", "mmfast.kernels.cuda_compile_check", "--arch", "sm_90a"],
                         capture_output=True, text=True, timeout=1200)
    print(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    for f in ("norm_fwd.cu: ok", "norm_bwd.cu: ok", "binding.cpp: ok", "symbols: ok"):
        assert f in out.stdout
    for family in ("norm_fwd_reg_kernel", "norm_fwd_wide_kernel", "norm_bwd_reg_kernel", "norm_bwd_staged_kernel",
                   "norm_bwd_wide_kernel",
                   "sum_partials_kernel"):
        assert family in out.stdout


def test_compile_check_fails_on_a_compile_error(tmp_path, monkeypatch):
    from mmfast.kernels import cuda_compile_check as cc

    nvcc = cc.find_nvcc()
    if nvcc is None:
        pytest.skip("no nvcc on this machine (CI machines have one)")
    bad = tmp_path / "bad.cu"
    bad.write_text("__global__ void k(float* p) { p[0] = not_declared; }\n")
    rc, log, _ = cc.compile_cu(nvcc, bad, "sm_90a", tmp_path)
    assert rc != 0 and "not_declared" in log


def test_symbol_check_finds_a_drifted_signature(tmp_path):
    """A declaration the binding calls and a definition with another signature compile apart, and only the
    link would fail: the symbol check names it."""
    import shutil

    from mmfast.kernels.cuda_compile_check import unresolved_symbols

    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None or shutil.which("nm") is None:
        pytest.skip("needs a host C++ compiler and nm")
    (tmp_path / "caller.cpp").write_text("namespace mmfast { int f(int); int g(); }\n"
                                         "int call() { return mmfast::f(1) + mmfast::g(); }\n")
    (tmp_path / "callee.cpp").write_text("namespace mmfast { int f(long x) { return int(x); } int g() { return 0; } }\n")
    objs = []
    for name in ("caller", "callee"):
        subprocess.run([cxx, "-c", str(tmp_path / f"{name}.cpp"), "-o", str(tmp_path / f"{name}.o")], check=True)
        objs.append(tmp_path / f"{name}.o")
    assert unresolved_symbols(objs) == ["mmfast::f(int)"]
    (tmp_path / "callee.cpp").write_text("namespace mmfast { int f(int x) { return x; } int g() { return 0; } }\n")
    subprocess.run([cxx, "-c", str(tmp_path / "callee.cpp"), "-o", str(tmp_path / "callee.o")], check=True)
    assert unresolved_symbols(objs) == []


def test_ptxas_report_is_parsed():
    from mmfast.kernels.cuda_compile_check import parse_ptxas

    log = textwrap.dedent("""\
        ptxas info    : Compiling entry function '_Z1kPf' for 'sm_90a'
        ptxas info    : Function properties for _Z1kPf
            16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
        ptxas info    : Used 40 registers, used 0 barriers
        """)
    (use,) = parse_ptxas(log)
    assert (use.regs, use.stack, use.spill_stores, use.spill_loads) == (40, 16, 8, 4) and use.spills
    assert use.family == "k"


# main() with stand-ins for the toolchain (no nvcc needed): an nvcc script that records its arguments, writes
# the ptxas report it is given and fails where told; the binding's host compile and the nm check stood in for.
_FAKE_NVCC = '''\
#!{python}
import json, pathlib, sys
args = sys.argv[1:]
if args == ["--version"]:
    print("Cuda compilation tools, release 13.0, V13.0.0")
    sys.exit(0)
spec = json.loads(pathlib.Path({spec!r}).read_text())
with open({calls!r}, "a") as f:
    f.write(json.dumps(args) + "\\n")
src = pathlib.Path(args[args.index("-c") + 1])
sys.stderr.write(spec["logs"].get(src.name, ""))
if src.name in spec["failing"]:
    sys.stderr.write(f"{{src}}(3): error: identifier \\"oops\\" is undefined\\n")
    sys.exit(2)
pathlib.Path(args[args.index("-o") + 1]).write_bytes(b"")
'''


def _ptxas_entry(mangled, regs, stack=0, stores=0, loads=0):
    """One kernel's report as ptxas -v (CUDA 13) prints it."""
    extra = f", {stack} bytes cumulative stack size" if stack else ""
    return (f"ptxas info    : Compiling entry function '{mangled}' for 'sm_90a'\n"
            f"ptxas info    : Function properties for {mangled}\n"
            f"    {stack} bytes stack frame, {stores} bytes spill stores, {loads} bytes spill loads\n"
            f"ptxas info    : Used {regs} registers, used 1 barriers{extra}, 64 bytes smem\n"
            f"ptxas info    : Compile time = 1.234 ms\n")


def _run_cuda_check(tmp_path, monkeypatch, capsys, argv=(), failing=(), logs=None, binding_rc=0, missing=()):
    from mmfast.kernels import cuda_compile_check as cc

    spec, calls = tmp_path / "spec.json", tmp_path / "calls.jsonl"
    spec.write_text(json.dumps({"failing": list(failing), "logs": logs or {}}))
    calls.unlink(missing_ok=True)
    nvcc = tmp_path / "nvcc"
    nvcc.write_text(_FAKE_NVCC.format(python=sys.executable, spec=str(spec), calls=str(calls)))
    nvcc.chmod(0o755)
    monkeypatch.setattr(cc, "find_nvcc", lambda: str(nvcc))

    def binding(path, out_dir):
        (out_dir / (path.stem + ".o")).write_bytes(b"")
        return binding_rc, "binding.cpp:7: error: 'oops' was not declared in this scope" if binding_rc else ""

    monkeypatch.setattr(cc, "check_binding", binding)
    monkeypatch.setattr(cc, "unresolved_symbols", lambda objects: list(missing))
    capsys.readouterr()
    rc = cc.main(list(argv))
    out = capsys.readouterr().out
    return rc, out, [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []


def test_compile_check_compiles_every_cu_for_sm90a_by_default(tmp_path, monkeypatch, capsys):
    """No --arch (how scripts/gpu_check.sh runs it): every .cu of the sources is compiled, each for sm_90a
    exactly (sm_90 would not compile wgmma/TMA code), with ptxas' report on, and with the flags torch's
    extension build adds (a source relying on implicit half conversions must fail here, as it fails there)."""
    from torch.utils import cpp_extension

    rc, out, calls = _run_cuda_check(tmp_path, monkeypatch, capsys)
    assert rc == 0, out
    compiled = sorted(Path(c[c.index("-c") + 1]).name for c in calls)
    assert compiled == sorted(p.name for p in cuda_ext.source_dir().glob("*.cu"))
    for c in calls:
        assert [a for a in c if "arch" in a or a.startswith("-gencode")] == ["-gencode=arch=compute_90a,code=sm_90a"]
        assert "-v" in c and c[c.index("-v") - 1] == "-Xptxas"
        assert set(cpp_extension.COMMON_NVCC_FLAGS) <= set(c) and set(cuda_ext.NVCC_FLAGS) <= set(c)
    assert "binding.cpp: ok" in out and "symbols: ok" in out


@pytest.mark.parametrize("broken", [*(f for f in cuda_ext.SOURCES), "symbols"])
def test_compile_check_fails_when_any_part_fails(broken, tmp_path, monkeypatch, capsys):
    """A source nvcc rejects, a binding the host compiler rejects, or a symbol defined nowhere: exit 1, the
    part named FAILED, and the compiler's error shown; the other parts still report ok."""
    rc, out, _ = _run_cuda_check(tmp_path, monkeypatch, capsys, failing=(broken,),
                                 binding_rc=int(broken == "binding.cpp"),
                                 missing=("mmfast::norm_fwd(int)",) if broken == "symbols" else ())
    assert rc == 1, out
    assert f"{broken}: FAILED" in out
    if broken.endswith(".cu"):
        assert 'identifier "oops" is undefined' in out
    for other in cuda_ext.SOURCES:
        if other != broken:
            assert f"{other}: ok" in out
    if broken == "symbols":
        assert "mmfast::norm_fwd(int)" in out


def test_compile_check_reports_spills(tmp_path, monkeypatch, capsys):
    """ptxas' report as CUDA 13 prints it: a kernel that only stores to spill (24 B) and one that only loads
    are listed as spilling, the family's worst register count is the one reported; exit 0, but 1 with
    --no-spills; without spills --no-spills passes."""
    logs = {"norm_fwd.cu": "ptxas info    : 0 bytes gmem\n" + _ptxas_entry("_Z8kernel_aPf", 64, 24, 24, 0)
            + _ptxas_entry("_Z8kernel_aPi", 96),
            "norm_bwd.cu": _ptxas_entry("_Z8kernel_bPf", 40, 8, 0, 8) + _ptxas_entry("_Z8kernel_cPf", 30)}
    rc, out, _ = _run_cuda_check(tmp_path, monkeypatch, capsys, logs=logs)
    assert rc == 0, out
    spills = [line for line in out.splitlines() if line.startswith("SPILLS:")]
    assert len(spills) == 2 and "2 of 4 kernels spill" in out, out
    assert "kernel_a" in spills[0] and "stores 24 B, loads 0 B" in spills[0]
    assert "kernel_b" in spills[1] and "stores 0 B, loads 8 B" in spills[1]
    (family_a,) = [line.split() for line in out.splitlines() if line.split()[:1] == ["kernel_a"]]
    assert family_a[1:4] == ["max", "regs", "96"], out
    assert _run_cuda_check(tmp_path, monkeypatch, capsys, ["--no-spills"], logs=logs)[0] == 1
    no_spills = {"norm_fwd.cu": _ptxas_entry("_Z8kernel_aPi", 96)}
    assert _run_cuda_check(tmp_path, monkeypatch, capsys, ["--no-spills"], logs=no_spills)[0] == 0


# ---------------------------------------------------------------------------------------------
# loading and falling back
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not NO_GPU, reason="checks what a machine without a GPU reports")
def test_load_without_gpu_says_why(fresh_loader):
    assert fresh_loader.load() is False
    reason = fresh_loader.unavailable_reason()
    assert "CPU-only" in reason or "no CUDA device" in reason
    assert fresh_loader.load() is False  # tried once, answer kept


def test_prerequisites_name_what_is_missing(monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    assert "nvcc" in cuda_ext.prerequisites()
    fake_home = Path(__file__).parent  # no bin/nvcc in it
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(fake_home))
    assert "nvcc" in cuda_ext.prerequisites()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA device" in cuda_ext.prerequisites()
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "CPU-only" in cuda_ext.prerequisites()


def test_ninja_missing_is_named(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    assert "ninja" in cuda_ext.prerequisites()


def test_failed_build_is_reported_and_falls_back_to_triton(fresh_loader, monkeypatch, tmp_path):
    """A real nvcc run on a source that does not compile: load() says so with the compiler's error, and a
    forced ``cuda`` backend warns once and runs Triton."""
    from mmfast.kernels.cuda_compile_check import find_nvcc
    from torch.utils import cpp_extension

    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("no nvcc on this machine (CI machines have one)")
    src = tmp_path / "src"
    src.mkdir()
    (src / "broken.cu").write_text('#include "broken.h"\n__global__ void k(int* p) { p[0] = undefined_name; }\n')
    (src / "broken.h").write_text("#pragma once\n")
    monkeypatch.setattr(fresh_loader, "SOURCES", ("broken.cu",))
    monkeypatch.setattr(fresh_loader, "HEADERS", ("broken.h",))
    monkeypatch.setattr(fresh_loader, "source_dir", lambda: src)
    monkeypatch.setattr(fresh_loader, "prerequisites", lambda: None)
    monkeypatch.setattr(fresh_loader, "runtime_missing", lambda: None)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(Path(nvcc).resolve().parent.parent))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")

    assert fresh_loader.load() is False
    reason = fresh_loader.unavailable_reason()
    assert "failed" in reason and "undefined_name" in reason

    monkeypatch.setenv("MMFAST_BACKEND", "cuda")
    key = KernelKey("rms_norm", "fwd", torch.bfloat16, 4096)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert resolve_backend(torch.device("cuda"), key) == "triton"
        assert resolve_backend(torch.device("cuda"), key) == "triton"
    msgs = [str(w.message) for w in seen if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "undefined_name" in msgs[0] and "Triton" in msgs[0]


def test_forced_cuda_on_cpu_tensors_warns_once_and_still_computes(fresh_loader, monkeypatch, seed):
    monkeypatch.setenv("MMFAST_BACKEND", "cuda")
    x = torch.randn(3, 64, requires_grad=True)
    w = torch.randn(64, requires_grad=True)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        y1 = mmfast.rms_norm(x, w)
        y1.sum().backward()
        y2 = mmfast.rms_norm(x, w)
    msgs = [str(w.message) for w in seen if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1, msgs
    assert "MMFAST_BACKEND=cuda" in msgs[0] and "run CUDA tensors, not cpu tensors" in msgs[0], msgs
    ref = mmfast.ops.norm.rms_norm_reference(x.detach().double(), w.detach().double())
    torch.testing.assert_close(y2.double(), ref, rtol=1e-5, atol=1e-5)


def test_ops_without_cuda_kernels_ignore_forced_cuda(monkeypatch, fresh_loader):
    """Ops with no CUDA C++ implementation (the activations, the loss) resolve without a key: under
    MMFAST_BACKEND=cuda they run as auto would, no warning."""
    monkeypatch.setenv("MMFAST_BACKEND", "cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_backend(torch.device("cpu")) in ("reference", "triton")
        assert resolve_backend(torch.device("cuda")) == "triton"


def test_forced_cuda_never_runs_the_activations_as_cuda(monkeypatch, fresh_loader):
    """The activations call resolve_backend with their own key and ``has_cuda=False``: where the CUDA C++
    kernels could run (here: said to), MMFAST_BACKEND=cuda must not choose "cuda" for them (they have none;
    the op then ran its PyTorch reference while backends_used said cuda), nor warn on CPU tensors."""
    monkeypatch.setenv("MMFAST_BACKEND", "cuda")
    g, u = torch.randn(5, 48, dtype=torch.float64).float(), torch.randn(5, 48, dtype=torch.float64).float()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no "CUDA C++ kernels cannot run" warning for ops that have none)
        with mmfast.backends_used() as used:
            h, q = mmfast.swiglu(g, u), mmfast.quick_gelu(g)
    assert {use.op for use in used} == {"swiglu", "quick_gelu"}
    assert all(use.backend != "cuda" for use in used), used
    monkeypatch.setattr(backend, "cuda_can_run", lambda device: None)  # as on a GPU with the extension loaded
    for op in ("swiglu", "quick_gelu"):
        assert resolve_backend(torch.device("cpu"), KernelKey(op, "fwd", torch.float32, 48), has_cuda=False) != "cuda"
    gd, ud = g.double(), u.double()
    torch.testing.assert_close(h.double(), torch.nn.functional.silu(gd) * ud, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q.double(), gd * torch.sigmoid(1.702 * gd), rtol=1e-5, atol=1e-6)


def test_adapter_too_large_for_cuda_runs_triton_with_one_warning(monkeypatch, fresh_loader):
    """The CUDA C++ adapter kernels take up to ADAPTER_MAX_HIDDEN hidden channels and ADAPTER_MAX_EXPERTS
    experts; where the CUDA C++ backend is chosen for a larger adapter, Triton runs it and says so once."""
    from mmfast.kernels import cuda_ext
    from mmfast.ops.adapter import _backend

    monkeypatch.setenv("MMFAST_BACKEND", "cuda")
    monkeypatch.setattr(backend, "cuda_can_run", lambda device: None)
    # a GPU tensor as _backend sees it (device, dtype, shape): this machine may have none
    x = types.SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16, shape=(2, 3, 64))
    w = lambda R, E: (torch.empty(R, 64, device="meta"), torch.empty(E, 64, R // 2, device="meta"))  # noqa: E731
    H, Ex = cuda_ext.ADAPTER_MAX_HIDDEN, cuda_ext.ADAPTER_MAX_EXPERTS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend(x, *w(H, Ex), 0.1, "fwd") == "cuda"
        assert _backend(x, *w(2, 1), 0.0, "bwd") == "cuda"
    # one warning per kind of reason: adapters of other sizes do not warn again (one did per size)
    for R, E, p, warns in ((2 * H, Ex, 0.0, True), (H, Ex + 1, 0.0, False), (0, Ex, 0.0, False),
                           (H, Ex, 1 - 2**-30, True)):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            assert _backend(x, *w(R, E), p, "fwd") == "triton"
            assert _backend(x, *w(R, E), p, "bwd") == "triton"
        msgs = [str(m.message) for m in seen]
        assert len(msgs) == warns, (R, E, p, msgs)
        assert all("MMFAST_BACKEND=cuda, but the CUDA C++ kernels cannot run: the CUDA C++ adapter kernels take" in m
                   for m in msgs)
    # chosen by a backend table (auto), not asked for: Triton without a word
    monkeypatch.setenv("MMFAST_BACKEND", "auto")
    monkeypatch.setattr(backend_table, "table_winner", lambda device, key: "cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend(x, *w(H, Ex), 0.0, "fwd") == "cuda"
        assert _backend(x, *w(2 * H, Ex), 0.0, "fwd") == "triton"


def test_adapter_entries_in_the_backend_table(monkeypatch, tmp_path, fresh_loader, clean_tables):
    """Benchmark records of the adapter make table entries, and auto follows them per direction."""
    recs = [{"op": "mma_adapter", "provider": p, "direction": d, "dtype": "bfloat16", "M": 8192, "N": 4096,
             "gpu_ms": ms, "ms": ms}
            for p, d, ms in (("mmfast-cuda", "fwd", 0.5), ("mmfast-triton", "fwd", 1.0),
                             ("mmfast-cuda", "bwd", 1.0), ("mmfast-triton", "bwd", 0.5))]
    table = backend_table.build_table(recs, "Test GPU")
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv(backend_table.TABLE_ENV, str(path))
    monkeypatch.setattr(backend_table, "_device_name", lambda index: "Test GPU")
    monkeypatch.setattr(backend, "cuda_can_run", lambda device: None)
    cuda = torch.device("cuda", 0)
    assert resolve_backend(cuda, KernelKey("mma_adapter", "fwd", torch.bfloat16, 4096)) == "cuda"
    assert resolve_backend(cuda, KernelKey("mma_adapter", "bwd", torch.bfloat16, 4096)) == "triton"


# ---------------------------------------------------------------------------------------------
# the build lock
# ---------------------------------------------------------------------------------------------

HOLDER = textwrap.dedent("""\
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("held", flush=True)
    time.sleep(600)
    """)


@pytest.mark.skipif(cuda_ext.fcntl is None, reason="POSIX file locks")
def test_lock_waits_times_out_and_survives_a_killed_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "build.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert cuda_ext.lock_is_held(tmp_path)
        start = time.monotonic()
        with pytest.raises(cuda_ext.LockTimeout, match="MMFAST_CUDA_BUILD_TIMEOUT"):
            with cuda_ext.build_lock(tmp_path, timeout=0.5):
                pass
        assert 0.4 < time.monotonic() - start < 5
    finally:
        holder.send_signal(signal.SIGKILL)  # a build killed mid-way
        holder.wait()
    assert (tmp_path / "build.lock").exists()  # the file stays behind ...
    start = time.monotonic()
    with cuda_ext.build_lock(tmp_path, timeout=5):  # ... but the lock died with its holder
        assert cuda_ext.lock_is_held(tmp_path)
    assert time.monotonic() - start < 1
    assert not cuda_ext.lock_is_held(tmp_path)


def _fake_build(calls, directory, fail=None):
    """A stand-in for cpp_extension.load: checks the lock is held and writes a library into its directory."""
    def fake_load(**kwargs):
        assert cuda_ext.lock_is_held(directory)
        calls.append(kwargs)
        if fail:
            raise RuntimeError(fail)
        Path(kwargs["build_directory"], cuda_ext.LIBRARY).write_text("library")
        return object()

    return fake_load


def test_build_runs_apart_and_moves_a_complete_library_in(fresh_loader, monkeypatch, tmp_path):
    """The build runs in a directory of its own process (compilers a killed build left running write only
    into theirs), and its library is moved into place once complete; then success is marked."""
    from torch.utils import cpp_extension

    directory = tmp_path / "build"
    directory.mkdir()
    calls = []
    monkeypatch.setattr(cpp_extension, "load", _fake_build(calls, directory))
    cuda_ext._build(directory)
    assert (directory / "built.ok").read_text().strip() == cuda_ext.build_key()
    assert (directory / cuda_ext.LIBRARY).read_text() == "library"
    (kw,) = calls
    work = Path(kw["build_directory"])
    assert work.parent == directory and work.name.startswith(f"tmp-{os.getpid()}-") and not work.exists()
    assert kw["name"] == cuda_ext.JIT_NAME
    assert [Path(s).name for s in kw["sources"]] == list(cuda_ext.SOURCES)
    assert "--use_fast_math" not in kw["extra_cuda_cflags"]


def test_a_finished_build_is_imported_without_lock_or_writes(fresh_loader, monkeypatch, tmp_path):
    """A cache holding a finished build of this key (a read-only one, another user's) is imported as it
    is: no lock file opened, nothing compiled or written (the lock's O_RDWR open failed on such caches,
    and the reason said the build failed)."""
    from torch.utils import cpp_extension

    directory = tmp_path / "build"
    directory.mkdir()
    (directory / cuda_ext.LIBRARY).write_text("library")
    (directory / "built.ok").write_text(cuda_ext.build_key() + "\n")
    imported = []
    monkeypatch.setattr(cuda_ext, "_import_built", lambda d: imported.append(d) or "module")
    monkeypatch.setattr(cuda_ext, "build_lock", lambda *a: pytest.fail("took the lock"))
    monkeypatch.setattr(cpp_extension, "load", lambda **k: pytest.fail("compiled"))
    assert cuda_ext._build(directory) == "module" and imported == [directory]
    assert sorted(p.name for p in directory.iterdir()) == ["built.ok", cuda_ext.LIBRARY]
    # another key's build there is not taken
    (directory / "built.ok").write_text("0123456789abcdef\n")
    assert not cuda_ext._built(directory)
    # nor a marker of this key without its library
    (directory / "built.ok").write_text(cuda_ext.build_key() + "\n")
    (directory / cuda_ext.LIBRARY).unlink()
    assert not cuda_ext._built(directory)


def test_a_finished_build_needs_no_compiler(fresh_loader, monkeypatch, tmp_path):
    """A machine that can run the kernels but has no nvcc (a shared cache built elsewhere) loads a finished
    build; without one, the missing compiler is the reason."""
    monkeypatch.setattr(fresh_loader, "runtime_missing", lambda: None)
    monkeypatch.setattr(fresh_loader, "prerequisites", lambda: "nvcc was not found")
    monkeypatch.setattr(fresh_loader, "_import_built", lambda d: "module")
    assert fresh_loader.load() is False and "nvcc" in fresh_loader.unavailable_reason()
    fresh_loader._reset_for_tests()
    directory = fresh_loader.build_dir()
    directory.mkdir(parents=True)
    (directory / fresh_loader.LIBRARY).write_text("library")
    (directory / "built.ok").write_text(fresh_loader.build_key() + "\n")
    assert fresh_loader.load() is True and fresh_loader.origin() == str(directory)


@pytest.mark.parametrize("off", ["0", "false", " OFF ", "no"])
def test_no_build_on_first_use_when_turned_off(fresh_loader, monkeypatch, tmp_path, off):
    """MMFAST_CUDA_BUILD=0 (scripts/gpu_check.sh sets it once a build failed in its run): no build, the
    variable named as the reason; a finished build still loads. Every later process tried the build again
    (a minute of nvcc each) before its benchmark's budget began."""
    from torch.utils import cpp_extension

    monkeypatch.setattr(fresh_loader, "runtime_missing", lambda: None)
    monkeypatch.setattr(fresh_loader, "prerequisites", lambda: None)
    build = fresh_loader._build
    monkeypatch.setattr(fresh_loader, "_build", lambda d: pytest.fail("built"))
    monkeypatch.setenv("MMFAST_CUDA_BUILD", off)
    assert fresh_loader.load() is False and "MMFAST_CUDA_BUILD=0" in fresh_loader.unavailable_reason()
    # a finished build loads all the same
    fresh_loader._reset_for_tests()
    monkeypatch.setattr(fresh_loader, "_build", build)
    monkeypatch.setattr(cpp_extension, "load", lambda **k: pytest.fail("compiled"))
    monkeypatch.setattr(fresh_loader, "_import_built", lambda d: "module")
    directory = fresh_loader.build_dir()
    directory.mkdir(parents=True)
    (directory / fresh_loader.LIBRARY).write_text("library")
    (directory / "built.ok").write_text(fresh_loader.build_key() + "\n")
    assert fresh_loader.load() is True and fresh_loader.origin() == str(directory)


def test_a_failed_load_is_not_tried_again(fresh_loader, monkeypatch):
    """load() tries once per process: after a failed build, the next op call (each asks unavailable_reason)
    neither compiles again (minutes of nvcc per call) nor changes its answer."""
    monkeypatch.setattr(fresh_loader, "runtime_missing", lambda: None)
    monkeypatch.setattr(fresh_loader, "prerequisites", lambda: None)
    builds = []

    def failing(directory):
        builds.append(directory)
        raise RuntimeError("error: identifier undefined_name is undefined")

    monkeypatch.setattr(fresh_loader, "_build", failing)
    assert fresh_loader.load() is False
    monkeypatch.setattr(fresh_loader, "_build", lambda d: builds.append(d) or "module")  # would work now
    assert fresh_loader.load() is False and "undefined_name" in fresh_loader.unavailable_reason()
    assert fresh_loader.origin() is None and len(builds) == 1


@pytest.mark.skipif(cuda_ext.fcntl is None, reason="POSIX file locks")
def test_load_waits_for_anothers_build_as_long_as_the_variable_says(fresh_loader, monkeypatch):
    """MMFAST_CUDA_BUILD_TIMEOUT bounds the wait for another process's build lock: then load() says so
    (the lock timeout, naming the variable) and the Triton kernels run; it neither compiles nor waits on."""
    from torch.utils import cpp_extension

    monkeypatch.setattr(fresh_loader, "runtime_missing", lambda: None)
    monkeypatch.setattr(fresh_loader, "prerequisites", lambda: None)
    monkeypatch.setattr(cpp_extension, "load", lambda **k: pytest.fail("compiled under another's lock"))
    monkeypatch.setenv(cuda_ext.TIMEOUT_ENV, "0.5")
    directory = fresh_loader.build_dir()
    directory.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.replace("600", "20"), str(directory / "build.lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        assert fresh_loader.load() is False
        assert 0.4 < time.monotonic() - start < 5
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    reason = fresh_loader.unavailable_reason()
    assert "LockTimeout" in reason and cuda_ext.TIMEOUT_ENV in reason, reason


def test_a_build_finished_while_waiting_for_the_lock_is_imported(fresh_loader, monkeypatch, tmp_path):
    """A process that waited for the lock while another built (the other ranks of a job) imports that build
    when it gets the lock; it does not compile again (minutes each, one rank after another)."""
    import contextlib

    from torch.utils import cpp_extension

    directory = tmp_path / "build"
    real_lock = cuda_ext.build_lock

    @contextlib.contextmanager
    def lock_after_anothers_build(d, timeout):
        with real_lock(d, timeout) as lock:  # the holder it waited for finished meanwhile
            (d / cuda_ext.LIBRARY).write_text("theirs")
            (d / "built.ok").write_text(cuda_ext.build_key() + "\n")
            yield lock

    imported = []
    monkeypatch.setattr(cuda_ext, "build_lock", lock_after_anothers_build)
    monkeypatch.setattr(cuda_ext, "_import_built", lambda d: imported.append(d) or "module")
    monkeypatch.setattr(cpp_extension, "load", lambda **k: pytest.fail("compiled again"))
    assert cuda_ext._build(directory) == "module" and imported == [directory]
    assert (directory / cuda_ext.LIBRARY).read_text() == "theirs"


def test_a_build_gives_rank0_its_head_start_before_taking_the_lock(fresh_loader, monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    directory = tmp_path / "build"
    events = []
    monkeypatch.setattr(cuda_ext, "wait_for_rank0", lambda d: events.append(("head start", cuda_ext.lock_is_held(d))))
    fake = _fake_build([], directory)
    monkeypatch.setattr(cpp_extension, "load", lambda **k: events.append("compile") or fake(**k))
    cuda_ext._build(directory)
    assert events == [("head start", False), "compile"]


def test_build_errors_are_cut_to_the_compilers_lines():
    """The reason quotes the last compiler error lines (not ninja's closing line), else the last lines."""
    out = "\n".join(["[1/2] nvcc -c a.cu", "a.cu(1): error: first", "a.cu(2): error: second", "a.cu(3): warning: w",
                     "a.cu(4): error: third", "a.cu(5): error: last",
                     "ninja: build stopped: cannot make progress due to previous errors.", ""])
    assert cuda_ext._short(RuntimeError(out)) == ("RuntimeError: a.cu(2): error: second | a.cu(4): error: third | "
                                                  "a.cu(5): error: last")
    assert cuda_ext._short(OSError("one\ntwo\n\nthree\nfour")) == "OSError: two | three | four"
    assert cuda_ext._short(RuntimeError("")) == "RuntimeError"


def test_a_lock_file_without_write_access_still_locks(monkeypatch, tmp_path):
    """Another user's lock file (0644, not writable here) is opened for reading, which flock takes."""
    real_open = os.open

    def no_write(path, flags, *a):
        if str(path).endswith("build.lock") and flags & os.O_RDWR:
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *a)

    (tmp_path / "build.lock").write_text("")
    monkeypatch.setattr(os, "open", no_write)
    with cuda_ext.build_lock(tmp_path, timeout=1) as lock:
        assert lock.os_lock and cuda_ext.lock_is_held(tmp_path)


def test_no_flock_on_the_filesystem_builds_unserialised(monkeypatch, tmp_path):
    """A mount without flock (ENOSYS / ENOLCK / EOPNOTSUPP) is not a failed build: the block runs without
    the OS lock (each build has its own directory, the library moves in atomically)."""
    import errno

    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with cuda_ext.build_lock(tmp_path, timeout=1) as lock:
        assert lock.os_lock is False
    assert not cuda_ext.lock_is_held(tmp_path)


def test_a_failed_build_is_not_repeated_by_the_other_ranks(fresh_loader, monkeypatch, tmp_path):
    """The ranks of a job that fail to build must not compile again one after another: a failure recorded
    by a process of the same job after this process started is taken with its reason; another job's (a
    transient failure in an unrelated run while this process was idle) and one from before this process
    (an earlier run, since fixed) are built again."""
    from torch.utils import cpp_extension

    for var in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "MASTER_ADDR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's static rendezvous: the same in every run
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv(cuda_ext.TIMEOUT_ENV, "2")  # (a lock left held fails the next build in seconds)
    directory = tmp_path / "build"
    calls = []
    monkeypatch.setattr(cpp_extension, "load", _fake_build(calls, directory, fail="error: undefined_name"))
    with pytest.raises(RuntimeError, match="undefined_name"):
        cuda_ext._build(directory)
    assert len(calls) == 1 and not list(directory.glob("tmp-*"))
    assert not cuda_ext.lock_is_held(directory)  # a failed build lets go of the lock
    with pytest.raises(cuda_ext.BuildFailedElsewhere, match="undefined_name"):
        cuda_ext._build(directory)  # another rank of the same run
    assert len(calls) == 1
    for other_job in ({"MASTER_PORT": "29501"}, {"TORCHELASTIC_RUN_ID": "another"}, {"MASTER_PORT": None}):
        with monkeypatch.context() as job:  # (no launcher at all: a process of its own, a notebook kernel)
            for var, value in other_job.items():
                if value is None:
                    job.delenv(var)
                else:
                    job.setenv(var, value)
            with pytest.raises(RuntimeError, match="undefined_name") as failed:
                cuda_ext._build(directory)  # compiled again (and failed again: the sources are still broken)
            assert not isinstance(failed.value, cuda_ext.BuildFailedElsewhere)
    assert len(calls) == 4
    with monkeypatch.context() as job:  # two steps of one SLURM job (srun ... & srun ...) are two runs
        job.setenv("SLURM_JOB_ID", "7")
        for step in ("0", "1"):
            job.setenv("SLURM_STEP_ID", step)
            with pytest.raises(RuntimeError, match="undefined_name") as failed:
                cuda_ext._build(directory)
            assert not isinstance(failed.value, cuda_ext.BuildFailedElsewhere)
    assert len(calls) == 6
    with pytest.raises(RuntimeError, match="undefined_name"):  # recorded by this job again ...
        cuda_ext._build(directory)
    assert len(calls) == 7 and json.loads((directory / "build.failed").read_text())["job"] == cuda_ext._job()
    monkeypatch.setattr(cuda_ext, "_PROCESS_START", time.time() + 1)  # ... and a process of it started after that
    monkeypatch.setattr(cpp_extension, "load", _fake_build(calls, directory))
    cuda_ext._build(directory)
    assert len(calls) == 8 and cuda_ext._built(directory) and not (directory / "build.failed").exists()


def test_a_dead_builds_directory_is_removed(fresh_loader, monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    directory = tmp_path / "build"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (directory / f"tmp-{dead.pid}-1").mkdir(parents=True)
    (directory / f"tmp-{os.getppid()}-1").mkdir()  # a live process's build: left alone
    others = 2**22 + 7  # (above any pid_max) a live process of another user's: signals refused, left alone too
    (directory / f"tmp-{others}-1").mkdir()
    real_kill = os.kill

    def kill(pid, sig):
        if pid == others:
            raise PermissionError(1, "Operation not permitted")
        return real_kill(pid, sig)

    monkeypatch.setattr(os, "kill", kill)
    monkeypatch.setattr(cpp_extension, "load", _fake_build([], directory))
    cuda_ext._build(directory)
    assert sorted(p.name for p in directory.glob("tmp-*")) == sorted([f"tmp-{others}-1", f"tmp-{os.getppid()}-1"])


def test_load_says_why_when_the_cache_cannot_be_named(fresh_loader, monkeypatch):
    """A failure naming the build directory (no sources in an installed package, no home directory) is a
    reason and the Triton fallback, not an exception from every op call."""
    monkeypatch.setattr(fresh_loader, "prerequisites", lambda: None)
    monkeypatch.setattr(fresh_loader, "runtime_missing", lambda: None)

    def no_sources():
        raise FileNotFoundError("the CUDA sources are neither in A nor in B")

    monkeypatch.setattr(fresh_loader, "source_dir", no_sources)
    assert fresh_loader.load() is False
    assert "neither in A nor in B" in fresh_loader.unavailable_reason()


def test_build_key_follows_the_visible_gpus(monkeypatch):
    """Without TORCH_CUDA_ARCH_LIST a build targets the visible GPUs' architectures: processes that see
    different GPU models build apart instead of recompiling each other's build."""
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (9, 0))
    hopper = cuda_ext.build_key()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (8, 0))
    assert cuda_ext.build_key() != hopper
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    listed = cuda_ext.build_key()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (9, 0))
    assert cuda_ext.build_key() == listed  # the list, when set, is what is built


@pytest.fixture
def fake_aot(monkeypatch, tmp_path):
    """A stand-in ahead-of-time module (a Python file) with an optional key file beside it."""
    (tmp_path / "fake_aot_ext.py").write_text("import os\nif os.environ.get('FAKE_AOT_BROKEN'):\n"
                                               "    raise ImportError('undefined symbol: _ZN3c10')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cuda_ext, "AOT_MODULE", "fake_aot_ext")
    sys.modules.pop("fake_aot_ext", None)
    yield tmp_path / cuda_ext.AOT_KEY_FILE
    sys.modules.pop("fake_aot_ext", None)


def test_an_aot_build_of_the_current_sources_is_loaded(fresh_loader, fake_aot):
    fake_aot.write_text(cuda_ext.aot_key() + "\n")
    assert fresh_loader.load() is True and fresh_loader.origin() == "aot"


@pytest.mark.parametrize("key", [None, "0123456789abcdef"])
def test_a_stale_aot_build_is_passed_over_with_a_warning(fresh_loader, fake_aot, monkeypatch, key):
    """An ahead-of-time build left from other sources (an editable install after csrc/ changed) is not
    run: a warning says so and the build on first use is tried (it was imported without a check)."""
    if key:
        fake_aot.write_text(key + "\n")
    tried = []
    monkeypatch.setattr(fresh_loader, "runtime_missing", lambda: tried.append(1) or "no CUDA device is visible")
    with pytest.warns(RuntimeWarning, match="built from other CUDA sources"):
        assert fresh_loader.load() is False
    assert tried and "fake_aot_ext" not in sys.modules


def test_an_aot_build_that_fails_to_import_says_why(fresh_loader, fake_aot, monkeypatch):
    """An ImportError from inside the extension (an undefined symbol: built against another torch) is a
    reason, not taken for "no ahead-of-time build"."""
    fake_aot.write_text(cuda_ext.aot_key() + "\n")
    monkeypatch.setenv("FAKE_AOT_BROKEN", "1")
    assert fresh_loader.load() is False
    assert "failed to load" in fresh_loader.unavailable_reason() and "undefined symbol" in fresh_loader.unavailable_reason()
    monkeypatch.delenv("FAKE_AOT_BROKEN")  # it would import now: the answer is kept, it is not imported again
    assert fresh_loader.load() is False and "undefined symbol" in fresh_loader.unavailable_reason()
    assert "fake_aot_ext" not in sys.modules


@pytest.mark.parametrize("key", [None, "0123456789abcdef"])
def test_an_aot_build_without_sources_to_compare_is_trusted_by_its_key(fresh_loader, fake_aot, monkeypatch, key):
    """No CUDA sources to hash (an install without them): an AOT build with a key file is loaded; one
    without is passed over with a warning."""
    if key:
        fake_aot.write_text(key + "\n")

    def no_sources():
        raise FileNotFoundError("the CUDA sources are neither in A nor in B")

    monkeypatch.setattr(fresh_loader, "source_dir", no_sources)
    monkeypatch.setattr(fresh_loader, "runtime_missing", lambda: "no CUDA device is visible")
    if key:
        assert fresh_loader.load() is True and fresh_loader.origin() == "aot"
    else:
        with pytest.warns(RuntimeWarning, match=f"has no {cuda_ext.AOT_KEY_FILE}"):
            assert fresh_loader.load() is False
        assert "fake_aot_ext" not in sys.modules


def test_a_namespace_package_is_no_aot_build(fresh_loader, fake_aot, monkeypatch):
    """A directory named like the AOT module (a namespace package: no file) is no build; load() says why
    the build on first use cannot run instead of raising from every op call."""
    monkeypatch.setattr(cuda_ext, "AOT_MODULE", "ns_aot_ext")
    (fake_aot.parent / "ns_aot_ext").mkdir()
    monkeypatch.setattr(fresh_loader, "runtime_missing", lambda: "no CUDA device is visible")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fresh_loader.load() is False
    assert fresh_loader.unavailable_reason() == "no CUDA device is visible"


def test_other_local_ranks_give_rank0_a_head_start(monkeypatch, tmp_path):
    for rank0 in ("0", "", "not-a-number"):  # (a variable set empty or to nonsense: no launcher's rank)
        monkeypatch.setenv("LOCAL_RANK", rank0)
        start = time.monotonic()
        cuda_ext.wait_for_rank0(tmp_path, head_start=5)
        assert time.monotonic() - start < 0.5  # rank 0 never waits
    monkeypatch.setenv("LOCAL_RANK", "1")
    start = time.monotonic()
    cuda_ext.wait_for_rank0(tmp_path, head_start=0.5)
    assert 0.4 < time.monotonic() - start < 5  # nobody started: waits out the head start, then builds itself
    if cuda_ext.fcntl is not None:
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "build.lock")], stdout=subprocess.PIPE,
                                  text=True)
        try:
            assert holder.stdout.readline().strip() == "held"
            start = time.monotonic()
            cuda_ext.wait_for_rank0(tmp_path, head_start=5)
            assert time.monotonic() - start < 2  # rank 0 is building: wait in the lock, not out the head start
        finally:
            holder.send_signal(signal.SIGKILL)
            holder.wait()
    (tmp_path / "built.ok").write_text("x")
    start = time.monotonic()
    cuda_ext.wait_for_rank0(tmp_path, head_start=5)
    assert time.monotonic() - start < 0.5  # already built


def test_build_key_follows_sources_and_versions(monkeypatch, tmp_path):
    """A change to any input of a build (a source, a header, a flag, torch, CUDA, Python) names another
    build directory, and the sources and flags another AOT key: an old build is never taken for it."""
    import shutil

    key, aot = cuda_ext.build_key(), cuda_ext.aot_key()
    assert key == cuda_ext.build_key() and len(key) == 16
    src = tmp_path / "src"
    shutil.copytree(cuda_ext.source_dir(), src)
    monkeypatch.setattr(cuda_ext, "source_dir", lambda: src)
    assert (cuda_ext.build_key(), cuda_ext.aot_key()) == (key, aot)  # the same sources elsewhere
    keys = {}
    for f in (cuda_ext.SOURCES[-1], cuda_ext.HEADERS[-1]):
        original = (src / f).read_bytes()
        (src / f).write_bytes(original + b"\n// edited\n")
        keys[f] = (cuda_ext.build_key(), cuda_ext.aot_key())
        (src / f).write_bytes(original)
    for flags in ("NVCC_FLAGS", "CXX_FLAGS"):
        with monkeypatch.context() as m:
            m.setattr(cuda_ext, flags, getattr(cuda_ext, flags) + ("-DMMFAST_OTHER",))
            keys[flags] = (cuda_ext.build_key(), cuda_ext.aot_key())
    for obj, attr, value in ((torch, "__version__", "0.0.0-other"), (torch.version, "cuda", "99.9"),
                             (sys.implementation, "cache_tag", "cpython-99")):
        with monkeypatch.context() as m:
            m.setattr(obj, attr, value)
            keys[attr] = (cuda_ext.build_key(), cuda_ext.aot_key())  # (an AOT build: its sources and flags only)
    assert (cuda_ext.build_key(), cuda_ext.aot_key()) == (key, aot)
    for what, (k, a) in keys.items():
        assert k != key, what
        assert (a != aot) == (what not in ("__version__", "cuda", "cache_tag")), what
    assert len({k for k, _ in keys.values()}) == len(keys)
    monkeypatch.setenv(cuda_ext.CACHE_ENV, str(tmp_path))
    assert cuda_ext.build_dir().parent == tmp_path
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv(cuda_ext.CACHE_ENV, "~/cache")
    assert cuda_ext.build_dir().parent == tmp_path / "home" / "cache"
    monkeypatch.delenv(cuda_ext.CACHE_ENV)
    assert cuda_ext.build_dir().parent == tmp_path / "home" / ".cache" / "mmfast"


def test_bad_timeout_is_an_error(monkeypatch):
    monkeypatch.setenv(cuda_ext.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="MMFAST_CUDA_BUILD_TIMEOUT"):
        cuda_ext.build_timeout()


# ---------------------------------------------------------------------------------------------
# packaging
# ---------------------------------------------------------------------------------------------


def test_wheel_carries_the_cuda_sources(tmp_path):
    """A non-editable install can build on first use: the wheel holds csrc/ as mmfast/_csrc."""
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "MMFAST_CUDA": "0"})
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("mmfast-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in cuda_ext.SOURCES + cuda_ext.HEADERS:
        assert f"mmfast/_csrc/{f}" in names
    assert not any(n.endswith(".so") for n in names)  # pure Python unless MMFAST_CUDA=1


def test_the_version_is_one():
    """The version is written twice, in pyproject.toml (what pip records) and mmfast.__version__."""
    import re

    import mmfast

    declared = re.search(r'^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text(), re.M)
    assert declared and declared.group(1) == mmfast.__version__


def test_source_dir_prefers_the_packaged_copy(tmp_path, monkeypatch):
    assert cuda_ext.source_dir() == ROOT / "csrc"
    pkg = tmp_path / "mmfast"
    (pkg / "kernels").mkdir(parents=True)
    (pkg / "_csrc").mkdir()
    for f in cuda_ext.SOURCES + cuda_ext.HEADERS:
        (pkg / "_csrc" / f).write_text("")
    monkeypatch.setattr(cuda_ext, "__file__", str(pkg / "kernels" / "cuda_ext.py"))
    assert cuda_ext.source_dir() == pkg / "_csrc"


def test_aot_build_is_opt_in():
    """setup.py describes the extension only with MMFAST_CUDA=1, from the loader's sources and flags."""
    probe = textwrap.dedent("""\
        import os, sys, setuptools
        import torch, torch.utils.cpp_extension as ce
        torch.version.cuda = torch.version.cuda or "13.0"  # a CPU-only torch: stood in for, nothing is built
        ce.CUDA_HOME = ce.CUDA_HOME or "/usr/local/cuda"  # (and it knows no toolkit)
        seen = {}
        setuptools.setup = lambda **kw: seen.update(kw)
        for value in sys.argv[1:]:  # (one process: setup.py reads the switch each time it runs)
            os.environ["MMFAST_CUDA"] = value
            seen.clear()
            sys.argv = ["setup.py"]
            exec(compile(open("setup.py").read(), "setup.py", "exec"), {"__name__": "__main__", "__file__": os.path.abspath("setup.py")})
            print(repr(value), [(e.name, e.sources) for e in seen["ext_modules"]], sorted(seen["cmdclass"]))
        """)
    offs = ("0", "false", "OFF", "no", "")  # as mmfast reads its other switches ("false" built it)
    out = subprocess.run([sys.executable, "-c", probe, *offs, "1"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == len(offs) + 1, out.stdout
    for off, line in zip(offs, lines):
        assert line == f"{off!r} [] ['build_py']", line
    aot = lines[-1]
    assert aot.startswith("'1' ") and "mmfast._cuda_ext" in aot and "csrc/norm_bwd.cu" in aot and "build_ext" in aot


@pytest.mark.parametrize("torch_is", ["cpu-only", "missing"])
def test_aot_build_without_a_cuda_torch_says_why(torch_is):
    """MMFAST_CUDA=1 with a CPU-only torch failed with torch's "CUDA_HOME environment variable is not set"
    (which setting it does not change: a CPU-only build ignores it), and in pip's isolated build with "No
    module named 'torch'"; both say what is wrong now."""
    probe = textwrap.dedent("""\
        import os, sys
        if sys.argv[1] == "missing":
            sys.modules["torch"] = None
        else:
            import torch
            torch.version.cuda = None
        sys.argv = ["setup.py"]
        exec(compile(open("setup.py").read(), "setup.py", "exec"), {"__name__": "__main__", "__file__": os.path.abspath("setup.py")})
        """)
    out = subprocess.run([sys.executable, "-c", probe, torch_is], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "MMFAST_CUDA": "1"})
    assert out.returncode != 0
    assert ("is CPU-only" if torch_is == "cpu-only" else "--no-build-isolation") in out.stderr, out.stderr


@pytest.mark.parametrize("tools", ["setuptools-65", "setuptools-65-with-wheel", "setuptools-70.1"])
def test_a_build_with_the_environments_old_setuptools_says_what_to_install(tools):
    """pip's --no-build-isolation builds with the environment's setuptools: a fresh Python 3.10 / 3.11 venv's
    (65.5, no wheel package) failed with "invalid command 'bdist_wheel'". setup.py says to install
    setuptools >= 70.1 first; with the wheel package, or setuptools 70.1, it goes on."""
    probe = textwrap.dedent("""\
        import importlib.util, os, sys, setuptools
        tools = sys.argv[1]
        setuptools.__version__ = "70.1.0" if tools == "setuptools-70.1" else "65.5.0"
        find = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: (find("os") if tools.endswith("with-wheel") else None) \
            if name == "wheel" else find(name, *a)
        setuptools.setup = lambda **kw: print("setup called")
        sys.argv = ["setup.py"]
        exec(compile(open("setup.py").read(), "setup.py", "exec"), {"__name__": "__main__", "__file__": os.path.abspath("setup.py")})
        """)
    out = subprocess.run([sys.executable, "-c", probe, tools], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "MMFAST_CUDA": "0"})
    if tools == "setuptools-65":
        assert out.returncode != 0 and "pip install 'setuptools>=70.1' first" in out.stderr, out.stderr
    else:
        assert out.returncode == 0 and out.stdout.strip() == "setup called", out.stderr


def test_aot_build_stores_the_key_of_its_sources(tmp_path):
    """setup.py's build_ext writes aot_key() beside the extension it built (compiling stubbed out here),
    which the loader compares with the sources before it imports the build."""
    probe = textwrap.dedent(f"""\
        import os, sys, setuptools
        import torch, torch.utils.cpp_extension as ce
        torch.version.cuda = torch.version.cuda or "13.0"
        ce.CUDA_HOME = ce.CUDA_HOME or "/usr/local/cuda"
        seen = {{}}
        setuptools.setup = lambda **kw: seen.update(kw)
        sys.argv = ["setup.py"]
        exec(compile(open("setup.py").read(), "setup.py", "exec"), {{"__name__": "__main__", "__file__": os.path.abspath("setup.py")}})
        ce.BuildExtension.run = lambda self: None  # no compiling
        from setuptools import Distribution
        cmd = seen["cmdclass"]["build_ext"](Distribution({{"ext_modules": seen["ext_modules"]}}))
        cmd.initialize_options(); cmd.build_lib = {str(tmp_path)!r}; cmd.finalize_options(); cmd.run()
        print("force", cmd.force, "depends", sorted(os.path.basename(d) for d in seen["ext_modules"][0].depends))
        """)
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "MMFAST_CUDA": "1"})
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "mmfast" / cuda_ext.AOT_KEY_FILE).read_text().strip() == cuda_ext.aot_key()
    # never skipped as up to date (changed flags or headers would leave a stale library under a new key)
    assert f"force True depends {sorted(cuda_ext.HEADERS)}" in out.stdout


def test_sdist_carries_the_cuda_sources(tmp_path):
    """A wheel built from the sdist must be able to build on first use: the sdist holds csrc/ (it had
    none, and the wheel made from it silently had no mmfast/_csrc)."""
    import shutil
    import tarfile

    src = tmp_path / "src"  # a copy: the sdist writes its egg-info beside setup.py (the wheel test builds in ROOT)
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", ".venv*", "tests",
                                                             "benchmarks", ".mmfast-cache", ".whl", "__pycache__"))
    out = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path)], cwd=src,
                         capture_output=True, text=True, timeout=600, env={**os.environ, "MMFAST_CUDA": "0"})
    assert out.returncode == 0, out.stderr
    (sdist,) = tmp_path.glob("mmfast-*.tar.gz")
    names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    for f in cuda_ext.SOURCES + cuda_ext.HEADERS:
        assert f"csrc/{f}" in names


# ---------------------------------------------------------------------------------------------
# the backend table
# ---------------------------------------------------------------------------------------------


def _table(entries, device="Test GPU"):
    return {"format": 1, "device": device, "entries": entries}


def _entry(op, direction, dtype, N, winner):
    return {"op": op, "direction": direction, "dtype": dtype, "N": N, "winner": winner}


def test_table_lookup_uses_the_nearest_benchmarked_width_within_its_range():
    """Inside the range of widths a class was timed at, the nearest one (log scale) decides; outside it,
    or for a class the table never timed (the residual variant, another dtype), Triton: the table says
    nothing there (it extrapolated from the nearest end before)."""
    t = _table([_entry("rms_norm", "bwd", "bfloat16", 1024, "triton"), _entry("rms_norm", "bwd", "bfloat16", 8192, "cuda")])
    win = lambda N, op="rms_norm", d="bwd", dt=torch.bfloat16, res=False: backend_table.winner_from(  # noqa: E731
        t, KernelKey(op, d, dt, N, res))
    assert win(1024) == "triton" and win(2000) == "triton"
    assert win(4096) == "cuda" and win(8192) == "cuda"
    assert win(700) == "triton" and win(65536) == "triton" and win(8193) == "triton"  # outside: no guess
    assert win(4096, d="fwd") == "triton"  # no entry for the class: Triton
    assert win(4096, op="layer_norm") == "triton"
    assert win(4096, dt=torch.float16) == "triton"
    assert win(8192, res=True) == "triton"  # only the plain variant was timed
    t["entries"].append({**_entry("rms_norm", "bwd", "bfloat16", 8192, "cuda"), "residual": True})
    assert win(8192, res=True) == "cuda"
    assert backend_table.winner_from(None, KernelKey("rms_norm", "bwd", torch.bfloat16, 4096)) == "triton"
    # equally near two timed widths (log scale): the smaller one decides, whatever the entries' order
    two = [_entry("rms_norm", "bwd", "bfloat16", 1024, "triton"), _entry("rms_norm", "bwd", "bfloat16", 4096, "cuda")]
    for entries in (two, two[::-1]):
        for n, want in ((2048, "triton"), (2049, "cuda")):
            assert backend_table.winner_from(_table(entries), KernelKey("rms_norm", "bwd", torch.bfloat16, n)) == want


@pytest.mark.parametrize("bad,match", [
    ({"format": 2, "device": "x", "entries": []}, "format"),
    ({"format": 1, "entries": []}, "device"),
    ({"format": 1, "device": "x", "entries": [{"op": "softmax", "direction": "fwd", "dtype": "bfloat16", "N": 8, "winner": "cuda"}]}, "op"),
    ({"format": 1, "device": "x", "entries": [_entry("rms_norm", "fwd", "bfloat16", 0, "cuda")]}, "N"),
    ({"format": 1, "device": "x", "entries": [_entry("rms_norm", "fwd", "bfloat16", 8, "fastest")]}, "winner"),
    # a string where a bool belongs: the entry would never match a call (Triton, without a word)
    ({"format": 1, "device": "x",
      "entries": [{**_entry("rms_norm", "fwd", "bfloat16", 8, "cuda"), "residual": "true"}]}, "residual"),
])
def test_malformed_tables_are_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        backend_table.validate(bad)


def test_table_from_benchmark_records():
    recs = []
    for provider, ms in (("mmfast-cuda", 1.0), ("mmfast-triton", 2.0)):
        for M in (512, 32768):
            recs.append({"op": "rms_norm", "direction": "bwd", "dtype": "bfloat16", "M": M, "N": 4096, "residual": False,
                         "provider": provider, "ms": ms if M == 32768 else 3.0 - ms})
        recs.append({"op": "rms_norm", "direction": "bwd", "dtype": "bfloat16", "M": 32768, "N": 4096, "residual": True,
                     "provider": provider, "ms": 9.0 - ms})
    recs.append({"op": "rms_norm", "direction": "fwd", "dtype": "bfloat16", "M": 32768, "N": 4096, "residual": False,
                 "provider": "mmfast-triton", "ms": 1.0})  # only one backend timed: no entry
    recs.append({"op": "rms_norm", "direction": "fwd+bwd", "dtype": "bfloat16", "M": 32768, "N": 4096, "residual": False,
                 "provider": "mmfast-cuda", "ms": 1.0})
    t = backend_table.build_table(recs, "Test GPU", {"commit": "abc"})
    assert t["commit"] == "abc" and t["device"] == "Test GPU"
    plain, res = t["entries"]  # the residual variant is a class of its own
    assert (plain["direction"], plain["M"], plain["N"], plain["residual"], plain["winner"], plain["cuda_ms"],
            plain["triton_ms"]) == ("bwd", 32768, 4096, False, "cuda", 1.0, 2.0)
    assert (res["residual"], res["winner"], res["cuda_ms"], res["triton_ms"]) == (True, "triton", 8.0, 7.0)


def test_table_from_the_bench_own_records():
    """The records the bench writes (mmfast.bench.runner.record): the residual variant is the op
    "rms_norm+residual", which the table takes as rms_norm's residual class (it dropped those records, so
    the residual variant had no entry)."""
    from mmfast.bench.cases import NormCase
    from mmfast.bench.runner import record

    recs = []
    for residual in (False, True):
        case = NormCase("rms_norm", 32768, 4096, torch.bfloat16, residual=residual)
        for provider, gpu_ms in (("mmfast-cuda", 1.0), ("mmfast-triton", 2.0 if residual else 0.5)):
            recs.append(record(case, provider, "bwd", gpu_ms + 0.1, 3000.0, None, {"cuda": "13.0"}, gpu_ms=gpu_ms))
    entries = backend_table.build_table(recs, "Test GPU")["entries"]
    assert [(e["op"], e["residual"], e["winner"]) for e in entries] == [("rms_norm", False, "triton"),
                                                                         ("rms_norm", True, "cuda")]
    t = _table(entries)
    assert backend_table.winner_from(t, KernelKey("rms_norm", "bwd", torch.bfloat16, 4096, True)) == "cuda"
    assert backend_table.winner_from(t, KernelKey("rms_norm", "bwd", torch.bfloat16, 4096, False)) == "triton"


def test_table_uses_gpu_time_and_a_margin():
    """GPU busy time decides where recorded (the wall time of a host-bound call says nothing of the
    kernels); CUDA C++ must beat Triton by more than the margin."""
    def rec(provider, direction, ms, gpu_ms):
        return {"op": "layer_norm", "direction": direction, "dtype": "bfloat16", "M": 36928, "N": 1024,
                "residual": False, "provider": provider, "ms": ms, "gpu_ms": gpu_ms}

    recs = [rec("mmfast-cuda", "fwd", 0.5, 0.030), rec("mmfast-triton", "fwd", 0.2, 0.040),  # host noise vs kernels
            rec("mmfast-cuda", "bwd", 0.1, 0.0995), rec("mmfast-triton", "bwd", 0.1, 0.1)]  # within the margin
    winners = {e["direction"]: (e["winner"], e["cuda_ms"]) for e in backend_table.build_table(recs, "G")["entries"]}
    assert winners == {"fwd": ("cuda", 0.030), "bwd": ("triton", 0.0995)}
    # a record that says another backend ran its calls (a pin that did not hold) decides nothing
    recs[0]["backends"] = "triton"
    recs[2]["backends"] = "cuda+triton"
    assert backend_table.build_table(recs, "G")["entries"] == []


def test_auto_consults_the_table_for_the_device(monkeypatch, tmp_path, fresh_loader, clean_tables):
    """auto + a table that prefers CUDA C++ for the class: the extension is tried; when it cannot run,
    one warning and Triton. Classes the table gives to Triton never try to build anything."""
    import json

    path = tmp_path / "table.json"
    path.write_text(json.dumps(_table([_entry("layer_norm", "fwd", "float16", 1024, "cuda"),
                                       _entry("layer_norm", "bwd", "float16", 1024, "triton")])))
    monkeypatch.setenv(backend_table.TABLE_ENV, str(path))
    monkeypatch.setattr(backend_table, "_device_name", lambda index: "Test GPU")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    tried = []
    monkeypatch.setattr(backend, "cuda_can_run", lambda device: tried.append(device) or "it is a test")
    monkeypatch.setenv("MMFAST_BACKEND", "auto")
    cuda = torch.device("cuda", 0)
    assert resolve_backend(cuda, KernelKey("layer_norm", "bwd", torch.float16, 1024)) == "triton"
    assert tried == []
    with pytest.warns(RuntimeWarning, match="backend table prefers the CUDA C\\+\\+ kernels.*it is a test"):
        assert resolve_backend(cuda, KernelKey("layer_norm", "fwd", torch.float16, 1024)) == "triton"
    assert len(tried) == 1
    monkeypatch.setattr(backend, "cuda_can_run", lambda device: None)
    assert resolve_backend(cuda, KernelKey("layer_norm", "fwd", torch.float16, 1024)) == "cuda"
    monkeypatch.setattr(backend_table, "_device_name", lambda index: "Another GPU")
    backend_table.clear_cache()
    assert resolve_backend(cuda, KernelKey("layer_norm", "fwd", torch.float16, 1024)) == "triton"  # no table for it


def test_the_table_the_variable_names_replaces_the_shipped_ones(monkeypatch, tmp_path, clean_tables):
    """``$MMFAST_BACKEND_TABLE`` replaces the shipped tables (it did not, and a shipped table of this GPU still
    chose CUDA C++ where the user's table, for another GPU or measured anew, said nothing)."""
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "gpu.json").write_text(json.dumps(_table([_entry("rms_norm", "fwd", "bfloat16", 1024, "cuda")])))
    monkeypatch.setattr(backend_table, "TABLE_DIR", shipped)
    monkeypatch.delenv(backend_table.TABLE_ENV, raising=False)
    backend_table.clear_cache()
    key = KernelKey("rms_norm", "fwd", torch.bfloat16, 1024)
    assert backend_table.winner_from(backend_table.table_for("Test GPU"), key) == "cuda"
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps(_table([_entry("layer_norm", "fwd", "bfloat16", 1024, "cuda")], device="Other GPU")))
    monkeypatch.setenv(backend_table.TABLE_ENV, str(mine))
    backend_table.clear_cache()
    assert [t["device"] for t in backend_table.load_tables()] == ["Other GPU"]
    assert backend_table.table_for("Test GPU") is None


def test_shipped_tables_are_valid(clean_tables, monkeypatch):
    monkeypatch.delenv(backend_table.TABLE_ENV, raising=False)
    for table in backend_table.load_tables():
        assert table["entries"], "a shipped table with no entries"


def test_unknown_backend_names_the_choices(monkeypatch):
    monkeypatch.setenv("MMFAST_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="auto, cuda, triton, reference"):
        backend.requested_backend()
    for value, meant in ((" Reference ", "reference"), ("TRITON", "triton"), ("", "auto"), ("  ", "auto")):
        monkeypatch.setenv("MMFAST_BACKEND", value)  # case and surrounding spaces do not matter; empty is unset
        assert backend.requested_backend() == meant, value


def test_the_warning_says_how_the_cuda_backend_was_asked_for(monkeypatch):
    """Under ``use_backend("cuda")`` with the variable unset, the fallback warning named MMFAST_BACKEND=cuda,
    which the user never set."""
    monkeypatch.delenv("MMFAST_BACKEND", raising=False)
    backend._warned.clear()
    with mmfast.use_backend("cuda"), pytest.warns(
            RuntimeWarning, match=r"mmfast: use_backend\('cuda'\), but the CUDA C\+\+ kernels cannot run"):
        mmfast.rms_norm(torch.randn(4, 64), torch.ones(64))
