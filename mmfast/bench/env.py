"""What a benchmark record says about where it ran: device, library versions, commit."""

from __future__ import annotations

import functools
import os
import platform
import subprocess

import torch

from ..kernels._device import interpreting

CPU_BANNER = (
    "NO GPU: these are CPU timings of small sizes (mmfast runs its pure-PyTorch reference or the Triton "
    "interpreter here). They are NOT GPU performance; run on a CUDA machine for real numbers."
)


def _git(*args: str) -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@functools.lru_cache(maxsize=None)
def commit() -> str:
    """``MMFAST_COMMIT`` where set (a copy of the checkout whose git metadata is not its own: the GPU
    machine's, which scripts/gpu_check.sh gives the commit scripts/gpu_wheels.sh recorded here); else the
    checkout's commit, with ``-dirty`` when it has uncommitted changes or untracked files, only when the
    package runs from mmfast's own checkout (an install inside another project's repository would report
    that project's commit); else ``unknown (mmfast <version>)``."""
    if os.environ.get("MMFAST_COMMIT"):
        return os.environ["MMFAST_COMMIT"]
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # holds mmfast/
    top = _git("rev-parse", "--show-toplevel")
    sha = _git("rev-parse", "--short=12", "HEAD") if top and os.path.samefile(top, package_root) else None
    if sha is None:
        from .. import __version__

        return f"unknown (mmfast {__version__})"
    dirty = _git("status", "--porcelain")  # untracked files too: a new module changes what runs
    return sha + ("-dirty" if dirty else "")


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - absent or broken: report as missing
        return None


def _installed(distribution: str) -> str | None:
    """The installed version of ``distribution`` (without importing it), or None."""
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"cpu ({cpu}, {os.cpu_count()} cores)" + (" [Triton interpreter]" if interpreting() else "")


def environment(device: torch.device) -> dict:
    """Fields stamped on every record."""
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "liger_kernel": _installed("liger-kernel"),  # a provider where importable
        "commit": commit(),
    }
