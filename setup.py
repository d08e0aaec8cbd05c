"""Setuptools shim.

A plain ``pip install .`` is pure Python: the Triton kernels compile at first use, and so does the
optional CUDA C++ extension (``csrc/``, copied into the package as ``mmfast/_csrc`` so an installed
mmfast can build it). Nothing here needs nvcc unless asked:

    MMFAST_CUDA=1 pip install --no-build-isolation -e .

builds the extension ahead of time as ``mmfast._cuda_ext`` (with the torch already installed, hence
no build isolation), with the same sources and flags as the build on first use, and stores beside it
the key of the sources it was built from (``mmfast/_cuda_ext.key``): after the sources change, mmfast
passes over the stale build with a warning instead of running it.
"""

import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


class BuildPyWithCudaSources(build_py):
    """Also copies ``csrc/`` into the built package as ``mmfast/_csrc``."""

    def run(self):
        super().run()
        if not CSRC.is_dir():  # an sdist without csrc/ (MANIFEST.in grafts it) would give a wheel that cannot build it
            raise RuntimeError(f"{CSRC} is missing: the CUDA sources must ship with mmfast (MANIFEST.in: graft csrc)")
        dst = Path(self.build_lib) / "mmfast" / "_csrc"
        dst.mkdir(parents=True, exist_ok=True)
        for f in sorted(CSRC.iterdir()):
            if f.suffix in (".cu", ".cuh", ".h", ".cpp"):
                shutil.copy2(f, dst / f.name)


def _loader():
    """mmfast/kernels/cuda_ext.py, for its source list and flags (shared with the build on first use)."""
    spec = importlib.util.spec_from_file_location("_mmfast_cuda_ext_loader", ROOT / "mmfast" / "kernels" / "cuda_ext.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_build_tools() -> None:
    """pip's ``--no-build-isolation`` builds with this environment's setuptools, not pyproject.toml's build
    requirements: a fresh Python 3.10 / 3.11 venv's (65.x, no ``wheel`` package) fails the build with
    "invalid command 'bdist_wheel'". Say what to install instead."""
    import setuptools

    version = tuple(int(p) for p in setuptools.__version__.split(".")[:2] if p.isdigit())
    if version < (70, 1) and importlib.util.find_spec("wheel") is None:
        raise SystemExit(f"building mmfast needs setuptools >= 70.1 (or the wheel package); this environment has "
                         f"setuptools {setuptools.__version__}, which pip's --no-build-isolation uses: "
                         "pip install 'setuptools>=70.1' first")


_check_build_tools()

#: MMFAST_CUDA values that leave the extension out (as mmfast reads its other switches).
OFF = ("", "0", "false", "off", "no")

cmdclass = {"build_py": BuildPyWithCudaSources}
ext_modules = []
if os.environ.get("MMFAST_CUDA", "0").strip().lower() not in OFF:
    try:
        import torch
    except ModuleNotFoundError:
        raise SystemExit("MMFAST_CUDA=1 builds the CUDA C++ extension against the installed torch, which pip's "
                         "isolated build does not see: install torch first, then pip install --no-build-isolation")
    if torch.version.cuda is None:  # (torch's own error asks for CUDA_HOME, which a CPU-only build ignores)
        raise SystemExit(f"MMFAST_CUDA=1 needs a CUDA build of torch; this torch ({torch.__version__}) is CPU-only. "
                         "Install a CUDA torch, or leave MMFAST_CUDA unset: the kernels then build on first use "
                         "on a GPU machine")
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    loader = _loader()

    class BuildExtWithKey(BuildExtension):
        """Builds the extension and writes the key of its sources beside it (see the module docstring).

        Always rebuilds: setuptools skips an extension whose sources are older than its library, which
        misses changed flags (and the key written after it would then vouch for a stale build)."""

        def finalize_options(self):
            super().finalize_options()
            self.force = True

        def run(self):
            super().run()
            for ext in self.extensions:
                key_file = Path(self.get_ext_fullpath(ext.name)).with_name(loader.AOT_KEY_FILE)
                key_file.parent.mkdir(parents=True, exist_ok=True)
                key_file.write_text(loader.aot_key() + "\n")

    ext_modules.append(
        CUDAExtension(
            loader.AOT_MODULE,
            sources=[os.path.relpath(CSRC / f, ROOT) for f in loader.SOURCES],
            include_dirs=[str(CSRC)],
            depends=[os.path.relpath(CSRC / f, ROOT) for f in loader.HEADERS],
            extra_compile_args={"cxx": list(loader.CXX_FLAGS), "nvcc": list(loader.NVCC_FLAGS)},
        )
    )
    cmdclass["build_ext"] = BuildExtWithKey

setup(ext_modules=ext_modules, cmdclass=cmdclass)
