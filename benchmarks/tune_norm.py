"""Time alternative launches of the Triton norm kernels (and the CUDA C++ backward's staging) on a GPU.

    python benchmarks/tune_norm.py [--out DIR] [--quick] [--directions bwd,fwd]
    python benchmarks/tune_norm.py --backend cuda [--out DIR] [--quick]
    TRITON_INTERPRET=1 python benchmarks/tune_norm.py --smoke   # CPU: checks the script, times nothing real

For each benchmarked width (RMSNorm at M = 32768, LayerNorm at CLIP widths, M = 64 * 577; bf16
activations and weights, as in the kernel suite) and each candidate ``NormTune`` of the register path
(rows per tile, warps; for the backward also persistent programs per SM, prefetch of the next tile,
and whether the weight row stays in registers): the GPU busy time of the op's forward or backward
(profiler kernel intervals, so host speed does not enter; the backward includes the dweight/dbias
finalize), its GB/s from the kernel suite's byte model and the fraction of a device-to-device copy
measured in the same run. Every candidate's outputs are compared with the current choice's.

Why these candidates: the backward keeps x, dy, the weight row and the dweight (and dbias) partial
sums of its tile in registers. At N >= 4096 that allows one to three resident programs per SM (the
sm_90 compile check reports 80-128 registers a thread in bf16), so each SM has one to three rows of loads in
flight, short of what HBM needs at full speed. Prefetching the next tile, re-reading the weight row
from L1, more warps per row (fewer registers per thread) and more rows per tile each change that
balance; which wins is measured here, not guessed.

``--backend cuda`` times the CUDA C++ backward with 0 (rows loaded straight into registers) and 2-4 rows
of shared-memory staging per row slot (csrc/norm_bwd.cu, ``norm_bwd_staged_kernel``): the same question
for the hand-written kernel, whose register kernel holds x and dy from load to store.

Writes tune_norm.json (tune_norm_cuda.json; device, versions, commit, every timing, the best per
direction, norm and width) and prints the table and the ``TUNED`` (``BWD_STAGES``) entries the best
choices would make; an entry enters ``TUNED`` in mmfast/kernels/norm.py (``BWD_STAGES`` in
mmfast/kernels/cuda_ext.py) only from a committed run.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os

import torch

from mmfast.bench.cases import NormCase
from mmfast.bench.env import environment
from mmfast.bench.timing import copy_gbps, gpu_busy_ms, median_ms
from mmfast.bench.tuning import outputs_close
from mmfast.kernels import _device
from mmfast.kernels import norm as K

CLIP_M = 64 * 577
SHAPES = {  # (kind, M, N): the kernel suite's norm cases; the first four carry issue 5's goals
    "goals": [("rms", 32768, 4096), ("rms", 32768, 5120), ("rms", 32768, 8192), ("ln", CLIP_M, 1024)],
    "rest": [("rms", 32768, 1024), ("ln", CLIP_M, 768), ("ln", CLIP_M, 1280)],
    "smoke": [("rms", 37, 1024), ("ln", 37, 768)],
}


def _per_thread(block_m: int, N: int, warps: int) -> int:
    return block_m * _device.next_pow2(N) // (32 * warps)


def candidates(direction: str, N: int, quick: bool = False) -> list[K.NormTune]:
    """Register-path launches tried at width N: at least 4 elements a thread (8-byte accesses or wider)
    and at most 64 (beyond that the tile alone needs more registers than a thread has)."""
    out = []
    rows = (1, 2) if quick else (1, 2, 4)
    for bm, w in itertools.product(rows, (4, 8, 16, 32)):
        if bm * _device.next_pow2(N) > (K.MAX_FUSED_N_BWD if direction == "bwd" else K.MAX_FUSED_N_FWD):
            continue
        if not 4 <= _per_thread(bm, N, w) <= 64:
            continue
        if direction == "fwd":
            out.append(K.NormTune(bm, w))
            continue
        for per_sm, prefetch, keep_w in itertools.product((1, 2) if quick else (1, 2, 4), (False, True), (True, False)):
            out.append(K.NormTune(bm, w, per_sm, prefetch, keep_w))
    return out


def _inputs(kind: str, M: int, N: int, device):
    g = torch.Generator(device=device).manual_seed(0)
    bf16 = torch.bfloat16
    x = torch.randn(M, N, device=device, generator=g).to(bf16)
    w = (1 + 0.1 * torch.randn(N, device=device, generator=g)).to(bf16)
    b = (0.1 * torch.randn(N, device=device, generator=g)).to(bf16) if kind == "ln" else None
    dy = torch.randn(M, N, device=device, generator=g).to(bf16)
    return x, w, b, dy


def _call(direction: str, kind: str, ins):
    x, w, b, dy = ins
    rms = kind == "rms"
    if direction == "fwd":
        return lambda: K.norm_fwd(x, w, b, None, 1e-6, rms)[:1]
    _, _, mean, rstd = K.norm_fwd(x, w, b, None, 1e-6, rms)
    return lambda: K.norm_bwd(dy, x, w, mean, rstd, None, rms, True, True, not rms)


def _current(direction: str, kind: str, M: int, N: int, dev) -> K.NormTune:
    if direction == "fwd":
        c = K.fwd_launch(M, N, kind == "rms", torch.bfloat16)
        return K.NormTune(c.block_m, c.num_warps)
    c = K.bwd_launch(M, N, dev, kind == "rms", torch.bfloat16)
    # a committed entry's programs per SM, else 0: the launcher's own count (up to 32 warps' worth, no more than
    # an SM holds of the compiled kernel)
    tuned = K._tuned("bwd", kind == "rms", N, torch.bfloat16)
    return K.NormTune(c.block_m, c.num_warps, tuned.per_sm if tuned else 0, c.prefetch, c.keep_w)


class TritonLaunches:
    """Candidates: NormTune launches of the Triton register path; applied through K.TUNED."""

    name = "triton"

    def candidates(self, direction, N, quick):
        return candidates(direction, N, quick)

    def current(self, direction, kind, M, N, dev):
        return _current(direction, kind, M, N, dev)

    def __init__(self):
        self._kept = {}  # the entries there were before this run (a committed TUNED entry)

    def run(self, direction, kind, ins, key, cfg):
        self._kept.setdefault(key, K.TUNED.get(key))
        K.TUNED[key] = cfg
        return _call(direction, kind, ins)

    def reset(self, key):
        kept = self._kept.pop(key, None)
        if kept is None:
            K.TUNED.pop(key, None)
        else:
            K.TUNED[key] = kept

    def describe(self, cfg):
        return dataclasses.asdict(cfg)

    def entry(self, key, c):
        return f"    {tuple(key)!r}: NormTune({c['block_m']}, {c['num_warps']}, {c['per_sm']}, {c['prefetch']}, {c['keep_w']}),"


class CudaStages:
    """Candidates: shared-memory stages of the CUDA C++ backward (0: the register kernel), passed per call."""

    name = "cuda"

    def candidates(self, direction, N, quick):
        return [0, 2, 3, 4]

    def current(self, direction, kind, M, N, dev):
        from mmfast.kernels import cuda_ext

        return cuda_ext.bwd_stages(kind == "rms", N, torch.bfloat16)

    def run(self, direction, kind, ins, key, stages):
        from mmfast.kernels import cuda_ext

        x, w, b, dy = ins
        rms = kind == "rms"
        _, _, mean, rstd = cuda_ext.norm_fwd(x, w, b, None, 1e-6, rms)
        return lambda: cuda_ext.norm_bwd(dy, x, w, mean, rstd, None, rms, True, True, not rms, stages=stages)

    def reset(self, key):
        pass

    def describe(self, stages):
        return {"stages": stages}

    def entry(self, key, c):
        return f"    {(key[1], key[2], key[3])!r}: {c['stages']},"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-results")
    p.add_argument("--quick", action="store_true", help="fewer candidates, the goal widths only")
    p.add_argument("--directions", default="bwd,fwd", help="Triton: bwd and/or fwd; the CUDA C++ knob is bwd only")
    p.add_argument("--backend", choices=["triton", "cuda"], default="triton",
                   help="triton: NormTune launches (TUNED in mmfast/kernels/norm.py); cuda: the CUDA C++ backward's "
                        "shared-memory stages (BWD_STAGES in mmfast/kernels/cuda_ext.py)")
    p.add_argument("--smoke", action="store_true",
                   help="CPU, through the Triton interpreter: tiny shapes, a few candidates, wall time; checks "
                        "that the script runs, says nothing of GPU performance")
    args = p.parse_args(argv)
    tuner = TritonLaunches() if args.backend == "triton" else CudaStages()
    directions = args.directions.split(",")
    if not directions or set(directions) - {"bwd", "fwd"}:
        p.error(f"--directions {args.directions!r}: a comma-separated subset of bwd,fwd")
    if args.backend == "cuda":
        from mmfast.kernels import cuda_ext

        if args.smoke or not torch.cuda.is_available():
            raise SystemExit("--backend cuda times the CUDA C++ kernels: it needs a GPU (no --smoke)")
        if not cuda_ext.load():
            raise SystemExit(f"--backend cuda: the CUDA C++ kernels are unavailable: {cuda_ext.unavailable_reason()}")
        directions = ["bwd"]
    if args.smoke:
        if not _device.interpreting():
            raise SystemExit("--smoke runs the kernels through the Triton interpreter: set TRITON_INTERPRET=1")
        dev, shapes = torch.device("cpu"), SHAPES["smoke"]
        copy = copy_gbps(dev, 1 << 22)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("tune_norm.py times GPU kernels; no GPU is visible (--smoke checks the script on CPU)")
        dev = torch.device("cuda")
        copy = copy_gbps(dev, 1 << 30)
        shapes = SHAPES["goals"] + ([] if args.quick else SHAPES["rest"])
    os.makedirs(args.out, exist_ok=True)
    records, best = [], {}
    # (smoke: wall time of the Triton interpreter on the CPU, named so, and no suggested entries from it)
    T, unit = ("interpreter_ms", "CPU interpreter ms") if args.smoke else ("gpu_ms", "GPU busy ms")
    for direction in directions:
        for kind, M, N in shapes:
            key = (direction, kind, N, "16bit")
            case = NormCase("rms_norm" if kind == "rms" else "layer_norm", M, N, torch.bfloat16)
            nbytes = case.bytes_moved(direction)
            ins = _inputs(kind, M, N, dev)
            current = tuner.current(direction, kind, M, N, dev)
            ref = tuner.run(direction, kind, ins, key, current)()
            tried = [c for c in tuner.candidates(direction, N, args.quick or args.smoke) if c != current]
            for cfg in [current] + (tried[:2] if args.smoke else tried):
                rec = dict(direction=direction, kind=kind, M=M, N=N, backend=tuner.name, config=tuner.describe(cfg),
                           current=cfg == current)
                try:
                    fn = tuner.run(direction, kind, ins, key, cfg)
                    rec["ok"] = outputs_close(fn(), ref)
                    rec[T] = median_ms(fn, dev, rep_ms=1) if args.smoke else gpu_busy_ms(fn, dev, iters=20)
                    rec["gbps"] = nbytes / (rec[T] * 1e-3) / 1e9
                    rec["frac_of_copy"] = rec["gbps"] / copy
                except Exception as e:  # noqa: BLE001 - an unlaunchable choice is a result too
                    rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                records.append(rec)
                print(f"{direction} {kind} N={N:5d} {rec['config']} " +
                      (f"{rec[T]:.4f} ms {rec['frac_of_copy']:.0%} of copy{'' if rec['ok'] else '  MISMATCH'}"
                       if T in rec else rec["error"]), flush=True)
            tuner.reset(key)
            good = [r for r in records if r["direction"] == direction and r["kind"] == kind and r["N"] == N and r.get("ok")]
            if good:
                top = min(good, key=lambda r: r[T])
                cur = next((r for r in good if r["current"]), None)
                best[f"{direction}/{kind}/N={N}"] = {
                    "key": list(key), "config": top["config"], T: top[T], "frac_of_copy": top["frac_of_copy"],
                    "current_ms": cur[T] if cur else None, "current_frac": cur["frac_of_copy"] if cur else None}
    out = dict(environment(dev), smoke=args.smoke, backend=tuner.name, copy_gbps=copy, shapes=shapes, records=records,
               best=best)
    with open(os.path.join(args.out, f"tune_norm{'' if tuner.name == 'triton' else '_cuda'}.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(f"\ndevice-to-device copy: {copy:.0f} GB/s")
    print(f"best per direction, norm and width ({unit}, fraction of copy; current choice in brackets):")
    for name, b in best.items():
        cur = "?" if b["current_ms"] is None else f"{b['current_ms']:.4f} ms {b['current_frac']:.0%}"
        print(f"  {name:18s} {b[T]:.4f} ms {b['frac_of_copy']:.0%}  [{cur}]  {b['config']}")
    if args.smoke:
        print("\n(smoke run: interpreter timings on the CPU say nothing of the GPU; no entries suggested)")
        return
    where = "TUNED (mmfast/kernels/norm.py)" if tuner.name == "triton" else "BWD_STAGES (mmfast/kernels/cuda_ext.py)"
    print(f"\n{where} entries for choices at least 3% faster than the current one:")
    for b in best.values():
        if b["current_ms"] is not None and b[T] < 0.97 * b["current_ms"]:
            print(tuner.entry(b["key"], b["config"]))


if __name__ == "__main__":
    main()
