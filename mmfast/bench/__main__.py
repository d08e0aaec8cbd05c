"""``python -m mmfast.bench``: mmfast beside the alternatives a user would pick.

With a GPU: the norm sizes well above the L2 (RMSNorm at M = 32768, N in {1024, 4096, 5120, 8192};
LayerNorm at CLIP widths with M = 64*577) in bf16. Without one: small CPU sizes, labelled as what they
are (CPU timings, not GPU performance). Prints a table and writes ``results.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from .env import environment
from .norm import NormCase, providers
from .report import table, write_json
from .runner import DIRECTIONS, time_norm_case
from .timing import copy_gbps

CPU_BANNER = (
    "NO GPU: these are CPU timings of small sizes (mmfast runs its pure-PyTorch reference or the Triton "
    "interpreter here). They are NOT GPU performance; run on a CUDA machine for real numbers."
)


def default_cases(device: torch.device, quick: bool) -> list[NormCase]:
    bf16 = torch.bfloat16
    if quick:
        return [NormCase("rms_norm", 64, 256, torch.float32), NormCase("layer_norm", 64, 256, torch.float32)]
    if device.type != "cuda":
        return [
            NormCase("rms_norm", 2048, 1024, torch.float32),
            NormCase("rms_norm", 512, 4096, torch.float32),
            NormCase("layer_norm", 2048, 768, torch.float32),
        ]
    clip_m = 64 * 577
    return [NormCase("rms_norm", 32768, n, bf16) for n in (1024, 4096, 5120, 8192)] + [
        NormCase("layer_norm", clip_m, n, bf16) for n in (768, 1024, 1280)
    ]


def _progress(total: int):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc="mmfast.bench", unit="run", file=sys.stderr)
    except ImportError:
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmfast.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-results", help="output directory (default: %(default)s)")
    p.add_argument("--ops", default="rms_norm,layer_norm", help="comma-separated ops (default: %(default)s)")
    p.add_argument("--providers", default=None, help="comma-separated providers (default: all available)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, a smoke run (seconds)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ops = set(args.ops.split(","))
    cases = [c for c in default_cases(device, args.quick) if c.op in ops]
    names = providers(device)
    if args.providers:
        wanted = args.providers.split(",")
        unknown = set(wanted) - set(names)
        if unknown:
            p.error(f"unknown providers {sorted(unknown)}; available: {names}")
        names = [n for n in names if n in wanted]
    if device.type != "cuda":
        print(CPU_BANNER, file=sys.stderr)

    env = environment(device)
    copy = copy_gbps(device, (1 << 30) if device.type == "cuda" else (1 << 26))
    records: list[dict] = []
    bar = _progress(len(cases) * len(names))
    for case in cases:
        for name in names:
            if bar is not None:
                bar.set_postfix_str(f"{case.name} N={case.N} {name}")
            records += time_norm_case(case, name, device, copy, env)
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()

    meta = {**env, "copy_gbps": copy, "gpu": device.type == "cuda", "directions": list(DIRECTIONS)}
    if device.type != "cuda":
        meta["note"] = CPU_BANNER
    print(f"\n{env['device']} | torch {env['torch']} | triton {env['triton']} | commit {env['commit']}")
    print(f"device-to-device copy: {copy:.1f} GB/s (read + write); %copy = achieved GB/s / that")
    print(table(records))
    if device.type != "cuda":
        print("\n" + CPU_BANNER)
    path = os.path.join(args.out, "results.json")
    write_json(path, meta, records)
    print(f"\nwrote {path}")
    return 1 if any(r["error"] for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
