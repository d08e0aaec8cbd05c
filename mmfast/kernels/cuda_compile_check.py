"""Compile the CUDA C++ kernels without a GPU: ``python -m mmfast.kernels.cuda_compile_check``.

Every ``.cu`` in the CUDA sources compiles on its own with the machine's nvcc for ``--arch``
(default ``sm_90a``, i.e. ``-gencode=arch=compute_90a,code=sm_90a``), with the flags torch's extension
builds add (no implicit half/bfloat16 conversions, ...) and ``-Xptxas -v``; registers,
stack and spills are reported per kernel family (worst instance) and every instance that spills is
listed. The torch binding (``binding.cpp``) is compiled (-O0) with the host compiler against the
installed torch's headers (a CPU-only torch lacks one generated CUDA header; an empty stand-in is used),
and every ``mmfast::`` symbol an object file needs must be defined in one of them (``nm``): a signature
that drifted between ``norm.h``, the kernels and the binding fails here, not at the GPU's link.

Exit status 1 on any compile error (or on spills with ``--no-spills``), 2 when nvcc is missing.
"""

from __future__ import annotations

import argparse
import inspect
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .cuda_ext import NVCC_FLAGS, SOURCES, source_dir

_ENTRY = re.compile(
    r"Compiling entry function '(?P<name>\S+)' for '(?P<arch>\S+)'\n"
    r"ptxas info\s+: Function properties for \S+\n"
    r"\s+(?P<stack>\d+) bytes stack frame, (?P<st>\d+) bytes spill stores, (?P<ld>\d+) bytes spill loads\n"
    r"ptxas info\s+: Used (?P<regs>\d+) registers"
)


@dataclass
class KernelUse:
    name: str  # demangled where c++filt exists
    regs: int
    stack: int
    spill_stores: int
    spill_loads: int

    @property
    def family(self) -> str:
        m = re.search(r"(\w+)\s*[<(]", self.name)
        return m.group(1) if m else self.name[:48]

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


def find_nvcc() -> str | None:
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home and Path(home, "bin", "nvcc").exists():
        return str(Path(home, "bin", "nvcc"))
    return shutil.which("nvcc")


def toolkit_include() -> Path | None:
    """The CUDA toolkit's include directory (the one with cuda_runtime.h)."""
    import os

    from torch.utils import cpp_extension

    nvcc = find_nvcc()
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME,
                  str(Path(nvcc).resolve().parent.parent) if nvcc else None, "/usr/local/cuda"]
    for c in candidates:
        if c and Path(c, "include", "cuda_runtime.h").exists():
            return Path(c, "include")
    return None


def _demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if tool is None or not names:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    lines = out.stdout.splitlines()
    return lines if out.returncode == 0 and len(lines) == len(names) else names


def parse_ptxas(text: str) -> list[KernelUse]:
    found = [m.groupdict() for m in _ENTRY.finditer(text)]
    names = _demangle([f["name"] for f in found])
    return [KernelUse(n, int(f["regs"]), int(f["stack"]), int(f["st"]), int(f["ld"])) for n, f in zip(names, found)]


def compile_cu(nvcc: str, path: Path, arch: str, out_dir: Path) -> tuple[int, str, float]:
    from torch.utils import cpp_extension

    cc = arch.removeprefix("sm_")
    torch_flags = list(getattr(cpp_extension, "COMMON_NVCC_FLAGS", []))  # what torch's own builds add
    cmd = [nvcc, "-std=c++17", *torch_flags, *NVCC_FLAGS, f"-gencode=arch=compute_{cc},code=sm_{cc}", "-Xptxas", "-v",
           "-I", str(path.parent), "-c", str(path), "-o", str(out_dir / (path.stem + ".o"))]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr, time.time() - start


def torch_cxx_flags() -> list[str]:
    """Host C++ flags of code built against the installed torch, as its own extension builds (the GPU's
    JIT build of the binding) use them: their C++ standard (C++17 on torch 2.11, C++20 from 2.13 on), its
    C++ ABI, and torch's and Python's headers."""
    import torch
    from torch.utils import cpp_extension

    stds = Counter(re.findall(r"-std=c\+\+\d+", inspect.getsource(cpp_extension)))
    std = stds.most_common(1)[0][0] if stds else "-std=c++17"
    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    return [std, f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", *(f"-I{p}" for p in includes)]


def check_binding(path: Path, out_dir: Path) -> tuple[int, str]:
    """Compile the torch binding against the installed torch's headers into ``out_dir``/binding.o."""
    import torch

    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        return 0, "no host C++ compiler: binding not checked"
    includes = []
    with tempfile.TemporaryDirectory() as stub:
        generated = Path(torch.__file__).parent / "include" / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
        if not generated.exists():  # CPU-only torch
            Path(stub, "c10", "cuda", "impl").mkdir(parents=True)
            Path(stub, "c10", "cuda", "impl", "cuda_cmake_macros.h").write_text("#pragma once\n")
            includes.append(stub)
        cuda_include = toolkit_include()
        if cuda_include is not None:
            includes.append(str(cuda_include))
        includes.append(str(path.parent))
        cmd = [cxx, *torch_cxx_flags(), "-O0", "-c", "-DTORCH_EXTENSION_NAME=mmfast_cuda_ext", str(path),
               "-o", str(out_dir / (path.stem + ".o"))]
        cmd += [f"-I{p}" for p in includes]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    errors = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines() if "error" in line)
    return proc.returncode, errors


def _nm(nm: str, obj: Path, which: str) -> set[str]:
    out = subprocess.run([nm, "-C", f"--{which}-only", str(obj)], capture_output=True, text=True, check=True).stdout
    # "<address> T name(args)" for defined, "U name(args)" for undefined symbols
    return {line.split(maxsplit=2 if which == "defined" else 1)[-1] for line in out.splitlines() if line.strip()}


def unresolved_symbols(objects: list[Path]) -> list[str] | None:
    """The ``mmfast::`` symbols some object needs and none defines; None when ``nm`` is missing."""
    nm = shutil.which("nm")
    if nm is None:
        return None
    defined = set().union(*(_nm(nm, o, "defined") for o in objects))
    needed = set().union(*(_nm(nm, o, "undefined") for o in objects))
    return sorted(n for n in needed - defined if n.startswith("mmfast::"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmfast.kernels.cuda_compile_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="sm_90a", help="target (default sm_90a)")
    p.add_argument("--no-spills", action="store_true", help="fail when any kernel spills")
    p.add_argument("--jobs", type=int, default=0, help="parallel nvcc processes (default: one per source)")
    args = p.parse_args(argv)
    nvcc = find_nvcc()
    if nvcc is None:
        print("cuda_compile_check: nvcc not found (set CUDA_HOME or put nvcc on PATH)", file=sys.stderr)
        return 2
    src = source_dir()
    cu_files = [src / f for f in SOURCES if f.endswith(".cu")]
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    failures: list[str] = []
    uses: list[KernelUse] = []
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(tmp)
        with ThreadPoolExecutor(args.jobs or len(cu_files)) as pool:
            results = list(pool.map(lambda f: (f, *compile_cu(nvcc, f, args.arch, out_dir)), cu_files))
        for f, rc, log, secs in results:
            kernels = parse_ptxas(log)
            uses += kernels
            print(f"{f.name}: {'ok' if rc == 0 else 'FAILED'} in {secs:.0f} s, {len(kernels)} kernels for {args.arch}")
            if rc != 0:
                failures.append(f.name)
                print("\n".join(line for line in log.splitlines() if "error" in line.lower()) or log[-4000:])
        rc, errors = check_binding(src / "binding.cpp", out_dir)
        print(f"binding.cpp: {'ok' if rc == 0 else 'FAILED'} (compiled against torch's headers)")
        if rc != 0:
            failures.append("binding.cpp")
            print(errors)
        objects = sorted(out_dir.glob("*.o"))
        if not failures and len(objects) == len(cu_files) + 1:
            missing = unresolved_symbols(objects)
            if missing is None:
                print("symbols: not checked (no nm)")
            elif missing:
                failures.append("symbols")
                print("symbols: FAILED, needed but defined nowhere:\n  " + "\n  ".join(missing))
            else:
                print("symbols: ok (every mmfast:: symbol an object needs is defined)")
    worst: dict[str, KernelUse] = {}
    for u in uses:
        if u.family not in worst or u.regs > worst[u.family].regs:
            worst[u.family] = u
    print(f"{version}; {len(uses)} kernels in {time.time() - start:.0f} s")
    for fam, u in sorted(worst.items()):
        print(f"  {fam:<24} max regs {u.regs:>4}  stack {u.stack:>4}  ({u.name[:110]})")
    spilling = [u for u in uses if u.spills]
    for u in spilling:
        print(f"SPILLS: {u.name[:160]}: regs {u.regs}, stores {u.spill_stores} B, loads {u.spill_loads} B")
    print(f"{len(spilling)} of {len(uses)} kernels spill")
    return 1 if failures or (args.no_spills and spilling) else 0


if __name__ == "__main__":
    sys.exit(main())
