"""Host (CPU) time per norm call on a GPU, at a shape small enough that the kernels take a few
microseconds: what is measured is the Python / dispatch / launch cost each provider adds per call.

    python benchmarks/host_overhead.py [--out DIR]

Prints a table (microseconds per call: forward, forward+backward), writes host_overhead.json and a
cProfile listing of the slowest mmfast path to DIR. GPU only.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import time

import torch

from mmfast.bench import norm as norm_bench
from mmfast.bench.cases import NormCase
from mmfast.bench.env import environment
from mmfast.ops.backend import EAGER_ENV


def host_us(fn, n: int = 2000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="bench-results")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("host_overhead.py measures launch costs on a GPU; none is visible")
    dev = torch.device("cuda")
    os.makedirs(args.out, exist_ok=True)
    rows = []
    profiles = {}
    for op in ("rms_norm", "layer_norm"):
        case = NormCase(op, 64, 1024, torch.bfloat16)
        for prov in norm_bench.providers(dev):
            for eager in ([None] if not prov.startswith("mmfast-") else ["", "ops"]):
                if eager is not None:
                    os.environ[EAGER_ENV] = eager
                fn, params = norm_bench.build_provider(prov, case, dev)
                x = torch.randn(case.M, case.N, device=dev, dtype=case.dtype, requires_grad=True)
                dy = torch.randn_like(x)

                def fwd():
                    return fn(x, None)

                def fwd_bwd():
                    with norm_bench.provider_backend(prov):  # the backward runs on the provider's backend too
                        torch.autograd.backward(fn(x, None), dy)
                    x.grad = None
                    for q in params:
                        q.grad = None

                name = prov + ("" if eager is None else (" (custom ops)" if eager == "ops" else " (eager fast path)"))
                try:
                    rows.append({"op": op, "provider": name, "fwd_us": host_us(fwd), "fwd+bwd_us": host_us(fwd_bwd)})
                except Exception as e:  # noqa: BLE001 - reported, not hidden
                    rows.append({"op": op, "provider": name, "error": f"{type(e).__name__}: {e}"[:200]})
                if prov.startswith("mmfast-") and op == "rms_norm":
                    prof = cProfile.Profile()
                    prof.enable()
                    for _ in range(500):
                        fwd_bwd()
                    prof.disable()
                    s = io.StringIO()
                    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
                    profiles[name] = s.getvalue()
                os.environ.pop(EAGER_ENV, None)
    env = environment(dev)
    print(f"{env['device']} | torch {env['torch']} | triton {env['triton']} | commit {env['commit']}")
    print(f"host microseconds per call, M=64 N=1024 bf16 (kernels take a few us)\n{'op':11} {'provider':38} {'fwd':>8} {'fwd+bwd':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['op']:11} {r['provider']:38} {r['error']}")
        else:
            print(f"{r['op']:11} {r['provider']:38} {r['fwd_us']:8.1f} {r['fwd+bwd_us']:8.1f}")
    with open(os.path.join(args.out, "host_overhead.json"), "w") as f:
        json.dump({"meta": env, "shape": [64, 1024], "dtype": "bfloat16", "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "host_overhead_profile.txt"), "w") as f:
        for name, text in profiles.items():
            f.write(f"==== {name}: 500 x forward+backward ====\n{text}\n")


if __name__ == "__main__":
    main()
