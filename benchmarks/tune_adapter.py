"""Time alternative tile shapes of the MMA adapter's three Triton kernels on a GPU.

    python benchmarks/tune_adapter.py [--out DIR] [--quick] [--shapes llama,clip]

For each kernel (``fwd``, ``rows``, ``cols``; mmfast/kernels/adapter.py) and each candidate
``AdapterLaunch`` (rows per tile, column chunk, warps, pipeline stages; programs per SM for the
column kernel), the others held at their current choice: GPU busy time (profiler kernel intervals,
so host speed does not enter) of the adapter forward (``fwd``) or backward (``rows``, ``cols``) at the
benchmark's shapes, bf16 activations, fp32 adapter weights. Every candidate's outputs are compared
with the current choice's first (a tile shape must not change results beyond rounding order).
Writes tune_adapter.json (device, versions, commit, every timing, the best per kernel and shape) and
prints the table; a choice enters ``TUNED`` in mmfast/kernels/adapter.py only from a committed run.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os

import torch

from mmfast.bench.env import environment
from mmfast.bench.timing import gpu_busy_ms
from mmfast.bench.tuning import outputs_close
from mmfast.kernels import adapter as K

SHAPES = {"llama": (64, 512, 4096), "clip": (64, 577, 1024)}  # (B, S, D): the kernel suite's adapter cases


def candidates(kernel: str, quick: bool = False) -> list[K.AdapterLaunch]:
    """Tile shapes tried for ``kernel`` (16-bit activations); about 2 s each on a GPU (compile + timing)."""
    block_m = (16, 32, 64)
    block_d = (64, 128)
    warps = (4, 8)
    stages = (1, 2, 3) if not quick else (2, 3)
    per_sm = (2, 4, 8) if kernel == "cols" else (4,)
    out = [K.AdapterLaunch(m, d, w, s, p) for m, d, w, s, p in itertools.product(block_m, block_d, warps, stages, per_sm)
           if w == 8 or m * d <= 4096]  # 4 warps on 64 x 128 spill in the column kernel (sm_90 compile check)
    if quick:
        out = [c for c in out if c.block_m != 64]
    return out


def _inputs(B, S, D, device, R=8, G=2, E=2):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(B * S, D, device=device, generator=g).to(torch.bfloat16)
    down_w = torch.randn(R, D, device=device, generator=g) * D ** -0.5
    down_b = torch.randn(R, device=device, generator=g) * 0.1
    up_w = torch.randn(E, D, R // G, device=device, generator=g) * 0.02
    up_b = torch.randn(E, D, device=device, generator=g) * 0.02
    mix = torch.softmax(torch.randn(B, E, device=device, generator=g), -1)
    seed = torch.tensor([1234], dtype=torch.int64, device=device)
    dy = torch.randn(B * S, D, device=device, generator=g).to(torch.bfloat16)
    return x, down_w, down_b, up_w, up_b, mix, seed, dy


def _call(kernel, S, G, ins):
    x, down_w, down_b, up_w, up_b, mix, seed, dy = ins
    if kernel == "fwd":
        return lambda: K.adapter_fwd(x, S, down_w, down_b, up_w, up_b, mix, 1.0, G, 0.1, seed)
    _, z = K.adapter_fwd(x, S, down_w, down_b, up_w, up_b, mix, 1.0, G, 0.1, seed)
    return lambda: K.adapter_bwd(dy, x, z, S, down_w, up_w, up_b, mix, 1.0, G, 0.1, seed, True, True, True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-results")
    p.add_argument("--quick", action="store_true", help="fewer candidates")
    p.add_argument("--shapes", default="llama", help="comma-separated, from " + ", ".join(SHAPES))
    args = p.parse_args()
    unknown = set(args.shapes.split(",")) - set(SHAPES)
    if unknown:
        p.error(f"--shapes: unknown {sorted(unknown)}; choose from {', '.join(SHAPES)}")
    if not torch.cuda.is_available():
        raise SystemExit("tune_adapter.py times GPU kernels; no GPU is visible")
    dev = torch.device("cuda")
    os.makedirs(args.out, exist_ok=True)
    records, best = [], {}
    shapes = [SHAPES[name] for name in args.shapes.split(",")]
    for (B, S, D), kernel in itertools.product(shapes, K.KERNELS):
        ins = _inputs(B, S, D, dev)
        current = K.launch_config(torch.bfloat16, kernel)
        ref = _call(kernel, S, 2, ins)()
        kept = K.TUNED.get(("16bit", kernel))  # a committed entry: back in place after this shape
        for cfg in [current] + [c for c in candidates(kernel, args.quick) if c != current]:
            K.TUNED[("16bit", kernel)] = cfg
            rec = dict(kernel=kernel, B=B, S=S, D=D, config=dataclasses.asdict(cfg), current=cfg == current)
            try:
                fn = _call(kernel, S, 2, ins)
                rec["ok"] = outputs_close(fn(), ref)
                rec["gpu_ms"] = gpu_busy_ms(fn, dev, iters=20)
            except Exception as e:  # noqa: BLE001 - an unlaunchable shape is a result too
                rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            records.append(rec)
            print(f"{kernel:5s} D={D:5d} {rec['config']} " +
                  (f"{rec['gpu_ms']:.4f} ms{'' if rec['ok'] else '  MISMATCH'}" if "gpu_ms" in rec else rec["error"]),
                  flush=True)
        if kept is None:
            K.TUNED.pop(("16bit", kernel), None)
        else:
            K.TUNED[("16bit", kernel)] = kept
        good = [r for r in records if r["kernel"] == kernel and r["D"] == D and r.get("ok")]
        if good:
            top = min(good, key=lambda r: r["gpu_ms"])
            cur = next(r for r in good if r["current"]) if any(r["current"] for r in good) else None
            best[f"{kernel}@D={D}"] = dict(config=top["config"], gpu_ms=top["gpu_ms"],
                                           current_ms=cur["gpu_ms"] if cur else None)
    out = dict(environment(dev), shapes=shapes, records=records, best=best)
    with open(os.path.join(args.out, "tune_adapter.json"), "w") as f:
        json.dump(out, f, indent=1)
    print("\nbest per kernel and shape (GPU busy ms; current choice in brackets):")
    for key, b in best.items():
        cur = "?" if b["current_ms"] is None else f"{b['current_ms']:.4f}"
        print(f"  {key:14s} {b['gpu_ms']:.4f} ms [{cur}]  {b['config']}")


if __name__ == "__main__":
    main()
