"""The project's performance goals, checked against one run's records (GPU runs only).

Each goal names the records it reads; a goal whose records are missing from the run (a budget cut,
an op not selected, no Liger) says so instead of passing or failing. Kernel goals take mmfast's faster
backend per case (``mmfast-triton`` / ``mmfast-cuda``) and its fraction of the device-to-device copy
bandwidth measured in the same run (from GPU busy time where the run has it).

* norms (bf16, RMSNorm at M = 32768, N = 4096, 5120 and 8192: the suite's widths >= 4096): forward
  >= 90% of copy, backward >= 85%; the CUDA C++ backward at least as fast as Triton's. Every one of
  those widths must be in the run: a goal judged on some of them says which are missing, unmet
  only if a measured one misses it;
* the small shape under CUDA graphs (RMSNorm [512, 4096]): forward+backward <= 25 us;
* model level, LayerNorm tuning (``layernorm``): mmfast >= 1.15x HF eager's tokens/s and >= 20% lower
  peak memory; ahead of Liger (``liger``) on both where it ran, by more than 1% on each (closer is a
  tie). Not judged on a ``--quick`` run, whose model is a smoke-test size.
"""

from __future__ import annotations

from typing import Optional

FWD_FRAC, BWD_FRAC = 0.90, 0.85
GOAL_M, GOAL_NS = 32768, (4096, 5120, 8192)
SMALL_US, SMALL_CASE = 25.0, ("rms_norm", 512, 4096)
SPEEDUP, PEAK_CUT = 1.15, 0.20
AHEAD = 0.01  # ahead of Liger: by more than this fraction on tokens/s and on peak memory
MODEL_TUNING = "layernorm"


def of_run(records: list[dict], quick: bool, run: Optional[str] = None) -> list[dict]:
    """``records`` tagged with their run's ``--quick`` flag (a quick run's model step is a smoke run, not
    judged) and, for goals over several runs, the run they came from (model steps pair within one run)."""
    return [{**r, "_quick": bool(quick), **({"_run": run} if run is not None else {})} for r in records]


def _mmfast(r: dict) -> bool:
    return r["provider"].startswith("mmfast-") and not r.get("error")


def _time(r: dict) -> Optional[float]:
    return r.get("gpu_ms") if r.get("gpu_ms") is not None else r.get("ms")


def _goal(goal: str, measured: str, met: Optional[bool]) -> dict:
    return {"goal": goal, "measured": measured, "met": met}


def _partial(parts: list[str], missing: list[int], ok: bool) -> tuple[str, Optional[bool]]:
    """What a goal over GOAL_NS measured, and its verdict: unmet if a measured width misses it; not
    judged (None) when widths are missing and the measured ones meet it."""
    if missing:
        parts = parts + [f"N={', '.join(map(str, missing))} not in this run"]
    return ", ".join(parts), (False if not ok else None if missing else True)


def _norm_goals(records: list[dict]) -> list[dict]:
    out = []
    rows = [r for r in records if r["op"] == "rms_norm" and r["dtype"] == "bfloat16" and r["M"] == GOAL_M
            and r["N"] in GOAL_NS and r.get("timing") != "cuda-graph" and _mmfast(r) and r.get("frac_of_copy")]
    widths = ", ".join(map(str, GOAL_NS))
    for direction, target in (("fwd", FWD_FRAC), ("bwd", BWD_FRAC)):
        label = f"rms_norm {direction} >= {target:.0%} of copy at N = {widths} (bf16, M = {GOAL_M})"
        parts, ok, missing = [], True, []
        for n in GOAL_NS:
            found = [r for r in rows if r["direction"] == direction and r["N"] == n]
            if not found:
                missing.append(n)
                continue
            best = max(found, key=lambda r: r["frac_of_copy"])
            parts.append(f"N={n}: {best['frac_of_copy']:.0%} ({best['provider'].removeprefix('mmfast-')})")
            ok &= best["frac_of_copy"] >= target
        out.append(_goal(label, *_partial(parts, missing, ok)) if parts else _goal(label, "not in this run", None))
    label = f"CUDA C++ backward >= Triton's at N = {widths} (rms_norm, bf16, M = {GOAL_M})"
    pairs: dict[int, dict] = {}
    for r in rows:
        if r["direction"] == "bwd" and _time(r) is not None:
            pairs.setdefault(r["N"], {})[r["provider"]] = _time(r)
    both = {n: p for n, p in pairs.items() if "mmfast-cuda" in p and "mmfast-triton" in p}
    # a record that says which backend ran must name its provider's; one that does not (runs before the
    # records said) cannot show it: a bench defect once ran Triton's backward in the mmfast-cuda rows
    pinned = ("mmfast-cuda", "mmfast-triton")  # (not mmfast-auto, which names no backend)
    wrong = sorted((r["N"], r["provider"], r.get("backends")) for r in rows
                   if r["direction"] == "bwd" and r["N"] in both and r["provider"] in pinned
                   and r.get("backends") != r["provider"].removeprefix("mmfast-"))
    if not both:
        out.append(_goal(label, "not in this run (needs both backends)", None))
    elif wrong:
        def ran(backends):
            return "not recorded" if backends is None else f"ran {backends or 'nothing of mmfast'}"

        out.append(_goal(label, "unverified: the records do not show the pinned backend ran the backward: "
                         + ", ".join(f"N={n} {p} ({ran(b)})" for n, p, b in sorted(set(wrong))), None))
    else:
        parts = [f"N={n}: {p['mmfast-triton'] / p['mmfast-cuda']:.2f}x" for n, p in sorted(both.items())]
        measured, met = _partial(parts, [n for n in GOAL_NS if n not in both],
                                 all(p["mmfast-cuda"] <= p["mmfast-triton"] for p in both.values()))
        out.append(_goal(label, "Triton time / CUDA time: " + measured, met))
    return out


def _small_goals(records: list[dict]) -> list[dict]:
    op, m, n = SMALL_CASE
    rows = [r for r in records if r.get("timing") == "cuda-graph" and r["direction"] == "fwd+bwd" and _mmfast(r)
            and r.get("ms") is not None and (r["op"], r["M"], r["N"], r["dtype"]) == (op, m, n, "bfloat16")]
    label = f"{op} [{m}, {n}] forward+backward under CUDA graphs <= {SMALL_US:g} us (bf16)"
    if not rows:
        return [_goal(label, "not in this run", None)]
    best = min(rows, key=lambda r: r["ms"])
    return [_goal(label, f"{best['ms'] * 1e3:.1f} us ({best['provider'].removeprefix('mmfast-')})",
                  best["ms"] * 1e3 <= SMALL_US)]


def _model_goals(records: list[dict]) -> list[dict]:
    """Each provider's step is compared with HF eager's (and Liger's) of the same configuration (tokens per
    step, width, LLM layers) and the same run: a step at another batch size is another workload."""
    configs: dict[tuple, dict[str, dict]] = {}
    quick = False
    for r in records:
        if r.get("direction") == "train-step" and r.get("tuning") == MODEL_TUNING and not r.get("error"):
            if r.get("_quick"):  # (the run's meta says so: results.json's meta.quick)
                quick = True
                continue
            key = (r.get("_run"), r["M"], r["N"], r.get("llm_layers"))
            configs.setdefault(key, {})[r["provider"]] = r

    def compared(other: str, label: str, absent: str, measure) -> dict:
        """The goal over every configuration with both mmfast's step and ``other``'s; ``measure(ours, theirs)``
        gives (text, met)."""
        paired = [c for c in configs.values() if c.get("mmfast", {}).get("peak_mem_bytes")
                  and c.get(other, {}).get("peak_mem_bytes")]
        if not paired:
            return _goal(label, "not judged: a --quick run's model is a smoke-test size" if quick else absent, None)
        results = [measure(c["mmfast"], c[other]) for c in paired]
        runs = {c["mmfast"].get("_run") for c in paired}
        where = [(f" (M={c['mmfast']['M']}" + (f", {c['mmfast'].get('_run')}" if len(runs) > 1 else "") + ")")
                 if len(paired) > 1 else "" for c in paired]
        return _goal(label, "; ".join(text + w for (text, _), w in zip(results, where)), all(m for _, m in results))

    def gib(r: dict) -> str:
        return f"{r['peak_mem_bytes'] / 2**30:.2f}"

    def against_hf(ours: dict, hf: dict) -> tuple[str, bool]:
        speed = ours["tokens_per_s"] / hf["tokens_per_s"]
        cut = 1 - ours["peak_mem_bytes"] / hf["peak_mem_bytes"]
        return (f"{speed:.2f}x tokens/s, peak {gib(ours)} vs {gib(hf)} GiB ({-cut:+.0%})",
                speed >= SPEEDUP and cut >= PEAK_CUT)

    def against_liger(ours: dict, liger: dict) -> tuple[str, bool]:
        speed = ours["tokens_per_s"] / liger["tokens_per_s"]
        peak = ours["peak_mem_bytes"] / liger["peak_mem_bytes"]
        tie = [what for what, close in (("tokens/s", abs(speed - 1) <= AHEAD), ("peak", abs(peak - 1) <= AHEAD))
               if close]
        return (f"{speed:.2f}x Liger's tokens/s, peak {gib(ours)} vs {gib(liger)} GiB ({peak - 1:+.1%})"
                + (f"; a tie on {' and '.join(tie)} (within {AHEAD:.0%})" if tie else ""),
                speed > 1 + AHEAD and peak < 1 - AHEAD)

    return [compared("hf-eager", f"{MODEL_TUNING} step: >= {SPEEDUP}x HF eager's tokens/s, >= {PEAK_CUT:.0%} "
                     "lower peak memory", "not in this run", against_hf),
            compared("liger", f"{MODEL_TUNING} step: ahead of Liger (tokens/s and peak memory)",
                     "not in this run (Liger not importable or not run)", against_liger)]


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
    p.add_argument("results", nargs="+", help="results.json files written by python -m mmfast.bench (or the "
                                              "records.partial.<pid>-<ns>.jsonl a killed run left)")
    args = p.parse_args(argv)
    records: list[dict] = []
    gpus: dict[str, str] = {}
    for path in args.results:
        try:
            with open(path) as f:
                if path.endswith(".jsonl"):  # its meta's line, then a line per record
                    lines = [json.loads(line) for line in f if line.strip()]
                    data = {"meta": (lines[0] if lines and isinstance(lines[0], dict) else {}).get("meta"),
                            "records": lines[1:]}
                else:
                    data = json.load(f)
        except OSError as e:
            p.error(f"{path}: cannot read it ({e.strerror or e})")
        except ValueError as e:
            p.error(f"{path}: not JSON ({e}); pass a results.json written by python -m mmfast.bench")
        if not isinstance(data, dict) or not isinstance(data.get("records"), list):
            p.error(f"{path}: not a results.json of python -m mmfast.bench (no records list)")
        meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
        if not meta.get("gpu"):
            p.error(f"{path}: not a GPU run; the goals are GPU goals")
        gpus[path] = meta.get("device") or "unknown device"
        # model steps pair within one run; a --quick run's model is not judged
        records += of_run(data["records"], meta.get("quick"), run=path)
    if len(set(gpus.values())) > 1:
        p.error("the runs were made on different GPUs, and a goal compares records of one device: "
                + "; ".join(f"{k}: {v}" for k, v in gpus.items()))
    print("\n".join(goal_lines(records)))
    return 1 if any(g["met"] is False for g in evaluate(records)) else 0


if __name__ == "__main__":
    raise SystemExit(main())
