"""The project's performance goals, checked against one run's records (GPU runs only).

Each goal names the records it reads; a goal whose records are missing from the run (a budget cut,
an op not selected, no Liger) says so instead of passing or failing. Kernel goals take mmfast's faster
backend per case (``mmfast-triton`` / ``mmfast-cuda``) and its fraction of the device-to-device copy
bandwidth measured in the same run (from GPU busy time where the run has it).

* norms (bf16, RMSNorm at M = 32768, every benchmarked N >= 4096): forward >= 90% of copy, backward
  >= 85%; the CUDA C++ backward at least as fast as Triton's;
* small shapes under CUDA graphs: forward+backward <= 25 us;
* model level, LayerNorm tuning (``layernorm``): mmfast >= 1.15x HF eager's tokens/s and >= 20% lower
  peak memory; ahead of Liger (``liger``) on both where it ran.
"""

from __future__ import annotations

from typing import Optional

FWD_FRAC, BWD_FRAC = 0.90, 0.85
SMALL_US = 25.0
SPEEDUP, PEAK_CUT = 1.15, 0.20
MODEL_TUNING = "layernorm"


def _mmfast(r: dict) -> bool:
    return r["provider"].startswith("mmfast-") and not r.get("error")


def _time(r: dict) -> Optional[float]:
    return r.get("gpu_ms") if r.get("gpu_ms") is not None else r.get("ms")


def _goal(goal: str, measured: str, met: Optional[bool]) -> dict:
    return {"goal": goal, "measured": measured, "met": met}


def _norm_goals(records: list[dict]) -> list[dict]:
    out = []
    rows = [r for r in records if r["op"] == "rms_norm" and r["dtype"] == "bfloat16" and r["N"] >= 4096
            and r.get("timing") != "cuda-graph" and _mmfast(r) and r.get("frac_of_copy")]
    for direction, target in (("fwd", FWD_FRAC), ("bwd", BWD_FRAC)):
        label = f"rms_norm {direction} >= {target:.0%} of copy, every N >= 4096 (bf16, M = 32768)"
        cases = sorted({r["N"] for r in rows if r["direction"] == direction})
        if not cases:
            out.append(_goal(label, "not in this run", None))
            continue
        parts, ok = [], True
        for n in cases:
            best = max((r for r in rows if r["direction"] == direction and r["N"] == n),
                       key=lambda r: r["frac_of_copy"])
            parts.append(f"N={n}: {best['frac_of_copy']:.0%} ({best['provider'].removeprefix('mmfast-')})")
            ok &= best["frac_of_copy"] >= target
        out.append(_goal(label, ", ".join(parts), ok))
    label = "CUDA C++ backward >= Triton's, every N >= 4096 (rms_norm, bf16)"
    pairs = {}
    for r in rows:
        if r["direction"] == "bwd" and _time(r) is not None:
            pairs.setdefault(r["N"], {})[r["provider"]] = _time(r)
    both = {n: p for n, p in pairs.items() if "mmfast-cuda" in p and "mmfast-triton" in p}
    if not both:
        out.append(_goal(label, "not in this run (needs both backends)", None))
    else:
        parts = [f"N={n}: {p['mmfast-triton'] / p['mmfast-cuda']:.2f}x" for n, p in sorted(both.items())]
        out.append(_goal(label, "Triton time / CUDA time: " + ", ".join(parts),
                         all(p["mmfast-cuda"] <= p["mmfast-triton"] for p in both.values())))
    return out


def _small_goals(records: list[dict]) -> list[dict]:
    rows = [r for r in records if r.get("timing") == "cuda-graph" and r["direction"] == "fwd+bwd" and _mmfast(r)
            and r.get("ms") is not None]
    label = f"small shapes, forward+backward under CUDA graphs <= {SMALL_US:g} us"
    if not rows:
        return [_goal(label, "not in this run", None)]
    best: dict[tuple, dict] = {}
    for r in rows:
        key = (r["op"], r["M"], r["N"])
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = r
    parts = [f"{op} [{m}, {n}]: {r['ms'] * 1e3:.1f} us" for (op, m, n), r in sorted(best.items())]
    return [_goal(label, ", ".join(parts), all(r["ms"] * 1e3 <= SMALL_US for r in best.values()))]


def _model_goals(records: list[dict]) -> list[dict]:
    rows = {r["provider"]: r for r in records if r.get("direction") == "train-step"
            and r.get("tuning") == MODEL_TUNING and not r.get("error")}
    ours, hf, liger = rows.get("mmfast"), rows.get("hf-eager"), rows.get("liger")
    out = []
    label = f"{MODEL_TUNING} step: >= {SPEEDUP}x HF eager's tokens/s, >= {PEAK_CUT:.0%} lower peak memory"
    if ours is None or hf is None or not ours.get("peak_mem_bytes") or not hf.get("peak_mem_bytes"):
        out.append(_goal(label, "not in this run", None))
    else:
        speed = ours["tokens_per_s"] / hf["tokens_per_s"]
        cut = 1 - ours["peak_mem_bytes"] / hf["peak_mem_bytes"]
        out.append(_goal(label, f"{speed:.2f}x tokens/s, peak {ours['peak_mem_bytes'] / 2**30:.2f} vs "
                                f"{hf['peak_mem_bytes'] / 2**30:.2f} GiB ({-cut:+.0%})",
                         speed >= SPEEDUP and cut >= PEAK_CUT))
    label = f"{MODEL_TUNING} step: ahead of Liger (tokens/s and peak memory)"
    if ours is None or liger is None or not liger.get("peak_mem_bytes"):
        out.append(_goal(label, "not in this run (Liger not importable or not run)", None))
    else:
        speed = ours["tokens_per_s"] / liger["tokens_per_s"]
        out.append(_goal(label, f"{speed:.2f}x Liger's tokens/s, peak {ours['peak_mem_bytes'] / 2**30:.2f} vs "
                                f"{liger['peak_mem_bytes'] / 2**30:.2f} GiB",
                         speed > 1 and ours["peak_mem_bytes"] < liger["peak_mem_bytes"]))
    return out


def evaluate(records: list[dict]) -> list[dict]:
    """``[{goal, measured, met}]``; ``met`` is None where the run lacks the records."""
    return _norm_goals(records) + _small_goals(records) + _model_goals(records)


def goal_rows(records: list[dict]) -> list[list[str]]:
    mark = {True: "met", False: "NOT met", None: "-"}
    return [[g["goal"], g["measured"], mark[g["met"]]] for g in evaluate(records)]


GOAL_HEAD = ["goal", "measured", "status"]


def goal_lines(records: list[dict]) -> list[str]:
    """The goals as text lines, ``[status] goal: measured`` (the bench's output and this module's CLI)."""
    return [f"[{status:^7}] {goal}: {measured}" for goal, measured, status in goal_rows(records)]


def main(argv: list[str] | None = None) -> int:
    """``python -m mmfast.bench.goals RESULTS.json [...]``: the goals table over the records of one or
    more runs together (a kernel run and a model run made as separate processes, say). Exit status 0
    when every goal with records is met, 1 otherwise."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m mmfast.bench.goals", description=main.__doc__)
    p.add_argument("results", nargs="+", help="results.json files written by python -m mmfast.bench")
    args = p.parse_args(argv)
    records: list[dict] = []
    for path in args.results:
        with open(path) as f:
            data = json.load(f)
        if not data.get("meta", {}).get("gpu"):
            p.error(f"{path}: not a GPU run; the goals are GPU goals")
        records += data["records"]
    print("\n".join(goal_lines(records)))
    return 1 if any(g["met"] is False for g in evaluate(records)) else 0


if __name__ == "__main__":
    raise SystemExit(main())
