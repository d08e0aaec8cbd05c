"""The measured choice between the CUDA C++ and the Triton kernels, per GPU model.

``MMFAST_BACKEND=auto`` runs the CUDA C++ kernels only where a table says they were faster on this GPU
model; without a table it runs Triton. Nothing is guessed: a table is written from one benchmark run
by ``python -m mmfast.bench --ops rms_norm,layer_norm,mma_adapter --backend-table FILE`` (both backends timed side by side,
each row naming device, versions and commit), and tables shipped with mmfast live in
``mmfast/ops/backend_tables/``. ``$MMFAST_BACKEND_TABLE`` names a table file that replaces them.

Format (JSON)::

    {"format": 1, "device": "NVIDIA H100 80GB HBM3", "torch": "...", "triton": "...", "commit": "...",
     "source": "benchmarks/results/<run>/results.json",
     "entries": [{"op": "rms_norm", "direction": "fwd", "dtype": "bfloat16", "M": 32768, "N": 4096,
                  "residual": false, "cuda_ms": 0.17, "triton_ms": 0.19, "winner": "cuda"}, ...]}

A shape class is (op, direction, dtype, residual) and the nearest benchmarked N (in log scale; the adapter's N
is its width D) within the range of N the table measured for that class. A width outside that range, or a
class the table has no entry for (the residual variant where only the plain one was timed), runs Triton:
the table says nothing about it.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import Iterable

import torch

FORMAT = 1
TABLE_ENV = "MMFAST_BACKEND_TABLE"
TABLE_DIR = Path(__file__).resolve().parent / "backend_tables"
OPS = ("rms_norm", "layer_norm", "mma_adapter")
DIRECTIONS = ("fwd", "bwd")
WINNERS = ("cuda", "triton")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def validate(table: object, where: str = "table") -> dict:
    """``table`` if it is a well-formed backend table, else ValueError naming what is wrong."""
    if not isinstance(table, dict):
        raise ValueError(f"{where}: a backend table is a JSON object")
    if table.get("format") != FORMAT:
        raise ValueError(f"{where}: format must be {FORMAT}, got {table.get('format')!r}")
    if not isinstance(table.get("device"), str) or not table["device"]:
        raise ValueError(f"{where}: 'device' must name the GPU model")
    entries = table.get("entries")
    if not isinstance(entries, list):
        raise ValueError(f"{where}: 'entries' must be a list")
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise ValueError(f"{where}: entries[{i}] must be an object")
        if e.get("op") not in OPS or e.get("direction") not in DIRECTIONS or e.get("dtype") not in DTYPES:
            raise ValueError(f"{where}: entries[{i}] needs op in {OPS}, direction in {DIRECTIONS}, dtype in {tuple(DTYPES)}")
        if not isinstance(e.get("N"), int) or e["N"] < 1:
            raise ValueError(f"{where}: entries[{i}]['N'] must be a positive integer")
        if e.get("winner") not in WINNERS:
            raise ValueError(f"{where}: entries[{i}]['winner'] must be one of {WINNERS}")
        if not isinstance(e.get("residual", False), bool):
            raise ValueError(f"{where}: entries[{i}]['residual'] must be true or false")
    return table


@functools.lru_cache(maxsize=None)
def load_tables() -> tuple[dict, ...]:
    """Every table in effect: the file ``$MMFAST_BACKEND_TABLE`` names, else those shipped with mmfast."""
    override = os.environ.get(TABLE_ENV)
    paths = [Path(override)] if override else sorted(TABLE_DIR.glob("*.json"))
    tables = []
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"backend table {path}: cannot be read ({exc})") from None
        tables.append(validate(data, str(path)))
    return tuple(tables)


def table_for(device_name: str) -> dict | None:
    for table in load_tables():
        if table["device"] == device_name:
            return table
    return None


def winner_from(table: dict | None, key) -> str:
    """``"cuda"`` or ``"triton"`` for ``key`` (a :class:`mmfast.ops.backend.KernelKey`) from ``table``."""
    if table is None:
        return "triton"
    dtype = next((name for name, dt in DTYPES.items() if dt == key.dtype), None)
    residual = bool(getattr(key, "residual", False))
    rows = [e for e in table["entries"] if e["op"] == key.op and e["direction"] == key.direction
            and e["dtype"] == dtype and e.get("residual", False) == residual]
    if not rows or not min(e["N"] for e in rows) <= key.N <= max(e["N"] for e in rows):
        return "triton"  # nothing measured for this class or this far out: no guess
    best = min(rows, key=lambda e: (abs(math.log2(e["N"]) - math.log2(max(key.N, 1))), e["N"]))
    return best["winner"]


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


@functools.lru_cache(maxsize=4096)
def _winner(device_name: str, key) -> str:
    return winner_from(table_for(device_name), key)


def table_winner(device: torch.device, key) -> str:
    """The measured winner for ``key`` on ``device``'s GPU model (``"triton"`` with no table)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _winner(_device_name(index), key)


def clear_cache() -> None:
    """Forget loaded tables (after changing ``$MMFAST_BACKEND_TABLE`` or the table files)."""
    load_tables.cache_clear()
    _winner.cache_clear()


#: How much faster (fraction) the CUDA C++ kernels must be for a table to choose them.
CUDA_MARGIN = 0.02


def build_table(records: Iterable[dict], device: str, meta: dict | None = None) -> dict:
    """A table from benchmark records (``mmfast.bench`` rows): for each (op, direction, dtype, residual, N)
    timed by both ``mmfast-cuda`` and ``mmfast-triton``, the faster one at the largest M. A record whose
    ``backends`` (what the bench counted running) is not its provider's backend alone is left out.

    Times are the GPU's busy time (``gpu_ms``) where the records have it, so that a slow host does not
    pick the winner; CUDA C++ wins only when it is more than ``CUDA_MARGIN`` faster (else the portable
    Triton kernels stay)."""
    best: dict[tuple, dict] = {}
    for r in records:
        # the bench names the residual variant "<op>+residual" (a record may also say residual=True)
        op, plus, variant = str(r.get("op")).partition("+")
        if op not in OPS or (plus and variant != "residual") or r.get("direction") not in DIRECTIONS:
            continue
        residual = bool(plus) or bool(r.get("residual"))
        t = r.get("gpu_ms") if r.get("gpu_ms") is not None else r.get("ms")
        if r.get("provider") not in ("mmfast-cuda", "mmfast-triton") or t is None:
            continue
        pinned = r["provider"].removeprefix("mmfast-")
        if r.get("backends", pinned) != pinned:  # the record says another backend ran
            continue
        k = (op, r["direction"], r["dtype"], residual, int(r["N"]), int(r["M"]))
        best.setdefault(k, {})[r["provider"]] = float(t)
    largest_m: dict[tuple, int] = {}
    for (*cls, m), times in best.items():
        if len(times) == 2:
            largest_m[tuple(cls)] = max(m, largest_m.get(tuple(cls), 0))
    entries = []
    for (op, direction, dtype, residual, n), m in sorted(largest_m.items()):
        times = best[(op, direction, dtype, residual, n, m)]
        cuda_ms, triton_ms = times["mmfast-cuda"], times["mmfast-triton"]
        entries.append({"op": op, "direction": direction, "dtype": dtype, "M": m, "N": n, "residual": residual,
                        "cuda_ms": cuda_ms, "triton_ms": triton_ms,
                        "winner": "cuda" if cuda_ms < triton_ms * (1 - CUDA_MARGIN) else "triton"})
    table = {"format": FORMAT, "device": device, **(meta or {}), "entries": entries}
    return validate(table)
