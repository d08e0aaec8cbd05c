"""Benchmark output: a table per op (printed and in ``summary.md``), ``results.json``, ``results.csv``
and PNG plots (GB/s against N per provider for the kernels; bars for the model-level step)."""

from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict

from .cases import KERNEL_OPS

KERNEL_DIRECTIONS = ("fwd", "bwd", "fwd+bwd")


def _ms(v) -> str:
    return "error" if v is None else f"{v:.4f}" if v < 1 else f"{v:.3f}"


def _is_model(r: dict) -> bool:
    return r["direction"] == "train-step"


def _case_order(key: tuple) -> tuple:
    """The report's order of kernel cases (a run times them in another: one case of every op first)."""
    op, dtype, M, N, timing = key
    base = op.split("+")[0]
    rank = KERNEL_OPS.index(base) if base in KERNEL_OPS else len(KERNEL_OPS)
    return timing != "direct", rank, op, str(dtype), M, N


def _kernel_groups(records):
    groups: dict[tuple, dict[str, dict[str, dict]]] = defaultdict(lambda: defaultdict(dict))
    for r in records:
        if not _is_model(r):
            groups[(r["op"], r["dtype"], r["M"], r["N"], r.get("timing", "direct"))][r["provider"]][r["direction"]] = r
    return {k: groups[k] for k in sorted(groups, key=_case_order)}


def _has_gpu_time(records: list[dict]) -> bool:
    return any(r.get("gpu_ms") is not None for r in records)


def kernel_head(records: list[dict]) -> list[str]:
    """Column names: per direction wall ms (+ GPU ms on a GPU) and %copy."""
    head = ["provider"]
    for d in KERNEL_DIRECTIONS:
        head += [f"{d} ms"] + (["GPU ms"] if _has_gpu_time(records) else []) + ["%copy"]
    return head + ["error"]


def kernel_rows(records: list[dict]) -> list[tuple[tuple, list[list[str]]]]:
    """Per (op, dtype, M, N, timing): rows of [provider, then per direction: wall ms, (GPU ms,) %copy;
    error]. %copy comes from the GPU time where there is one."""
    with_gpu = _has_gpu_time(records)
    out = []
    for key, by_provider in _kernel_groups(records).items():
        rows = []
        for provider, by_dir in by_provider.items():
            row = [provider]
            for d in KERNEL_DIRECTIONS:
                r = by_dir.get(d)
                row.append(_ms(r["ms"]) if r else "-")
                if with_gpu:
                    row.append("" if not r or r.get("gpu_ms") is None else _ms(r["gpu_ms"]))
                frac = r and r.get("frac_of_copy")
                row.append(f"{100 * frac:.0f}%" if frac else "")
            errors = sorted({r["error"] for r in by_dir.values() if r.get("error")})
            row.append("; ".join(errors))
            rows.append(row)
        out.append((key, rows))
    return out


def model_rows(records: list[dict]) -> list[list[str]]:
    rows = []
    for r in records:
        if _is_model(r):
            peak, saved = r.get("peak_mem_bytes"), r.get("saved_bytes")
            parts = {k[len("saved_bytes_"):]: v for k, v in r.items() if k.startswith("saved_bytes_")}
            host = r.get("host_ms")
            rows.append([r["op"], r["provider"], r["dtype"], str(r["M"]), _ms(r["ms"]),
                         "" if host is None else _ms(host),
                         "" if r.get("tokens_per_s") is None else f"{r['tokens_per_s']:.0f}",
                         "" if peak is None else f"{peak / 2**30:.2f}",
                         "" if saved is None else _mib(saved),
                         " ".join(f"{k} {_mib(v)}" for k, v in parts.items() if v),
                         str(r.get("trainable", "")), r.get("backends") or "", r.get("error") or ""])
    return rows


MODEL_HEAD = ["case", "provider", "dtype", "tokens/step", "ms/step", "host ms", "tokens/s", "peak GiB", "saved MiB",
              "saved MiB by part", "trainable", "mmfast backends", "error"]
MODEL_NOTE = ("mmfast backends: what ran each mmfast op in a warm-up step (mmfast.backends_used). "
              "saved MiB: bytes autograd keeps for backward in one step (activations; weights, gradients and "
              "optimizer state excluded), by the part of the model that saved them; counted the same way on "
              "CPU and GPU; not counted under torch.compile (the *-compile providers). peak GiB: CUDA's peak allocated over the timed steps (GPU only). host ms: how long the "
              "Python side took to issue the step (GPU only). Far below ms/step: the GPU was the bottleneck. "
              "Close to it: either the host was (Python and launch overhead) or the step syncs with the GPU "
              "(mmfast's fused loss does, once, to find the labelled rows); a profile tells which.")


def _mib(nbytes: int) -> str:
    mib = nbytes / 2**20
    return f"{mib:.0f}" if mib >= 100 else f"{mib:.1f}" if mib >= 1 else f"{mib:.3f}"


GPU_TIME_NOTE = ("ms: wall time per call, CUDA events with the L2 flushed (what eager code waits, host included); "
                 "GPU ms: the GPU's busy time per call from the profiler (kernels only); %copy from GPU ms")


def table(records: list[dict]) -> str:
    lines = []
    head = kernel_head(records)
    if _has_gpu_time(records):
        lines.append(GPU_TIME_NOTE)
    for (op, dtype, M, N, timing), rows in kernel_rows(records):
        lines.append(f"\n{op}  {dtype}  M={M} N={N}" + ("  (CUDA-graph replays)" if timing == "cuda-graph" else ""))
        widths = [max(len(head[i]), *(len(r[i]) for r in rows)) for i in range(len(head) - 1)]
        fmt = lambda cells: "  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
        lines.append(fmt(head[:-1]))
        lines += [fmt(r[:-1]) + (f"   {r[-1]}" if r[-1] else "") for r in rows]
    mrows = model_rows(records)
    if mrows:
        lines.append("\nmodel level: one training step (forward, loss, backward, AdamW)")
        widths = [max(len(MODEL_HEAD[i]), *(len(r[i]) for r in mrows)) for i in range(len(MODEL_HEAD) - 1)]
        lines.append("  " + "  ".join(h.ljust(w) for h, w in zip(MODEL_HEAD, widths)))
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) + (f"   {r[-1]}" if r[-1] else "")
                  for r in mrows]
    return "\n".join(lines)


def _md_cell(text: str) -> str:
    """A table cell: a '|' in an error message would end the cell, a newline the row."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + \
        ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]


def write_summary_md(path: str, meta: dict, records: list[dict], plots: list[str]) -> None:
    lines = ["# mmfast benchmark", ""]
    lines.append(f"- device: {meta['device']}")
    lines.append(f"- torch {meta['torch']}, triton {meta['triton']}, transformers {meta.get('transformers')}, "
                 f"CUDA {meta.get('cuda')}")
    lines.append(f"- commit: {meta['commit']}")
    if meta.get("copy_gbps"):
        lines.append(f"- device-to-device copy in this run: {meta['copy_gbps']:.1f} GB/s (bytes read + written); "
                     "%copy = achieved GB/s from each op's byte model / that")
    if meta.get("note"):
        lines += ["", f"**{meta['note']}**"]
    if meta.get("interrupted"):
        lines += ["", f"**Interrupted ({meta['interrupted']}): the records below are those measured before it.**"]
    if meta.get("not_run"):
        lines += ["", f"**Not run ({meta.get('not_run_reason', 'not started')}): {len(meta['not_run'])} runs**, "
                  "absent from every table below: " + "; ".join(meta["not_run"])]
    if _has_gpu_time(records):
        lines += ["", GPU_TIME_NOTE + "."]
    for (op, dtype, M, N, timing), rows in kernel_rows(records):
        suffix = " (CUDA-graph replays)" if timing == "cuda-graph" else ""
        lines += ["", f"## {op}, {dtype}, M={M}, N={N}{suffix}", ""] + _md_table(kernel_head(records), rows)
    mrows = model_rows(records)
    if mrows:
        lines += ["", "## Model level: one training step", "", MODEL_NOTE, ""] + _md_table(MODEL_HEAD, mrows)
    if meta.get("gpu"):
        from .goals import GOAL_HEAD, goal_rows, of_run

        lines += ["", "## Goals", "", "Checked from this run's records (mmfast/bench/goals.py); '-': the run has "
                  "no records for that goal.", ""] + _md_table(
                      GOAL_HEAD, goal_rows(of_run(records, meta.get("quick"))))
    if plots:
        lines += ["", "## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def no_nan(value):
    """NaN and infinities as null: JSON has no such numbers (Python writes NaN, which strict readers refuse)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: no_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [no_nan(v) for v in value]
    return value


def write_json(path: str, meta: dict, records: list[dict]) -> None:
    with open(path, "w") as f:
        json.dump(no_nan({"meta": meta, "records": records}), f, indent=1, allow_nan=False)


#: the columns every record has (runner.record's), the header of a run without records
CSV_COLUMNS = ("op", "provider", "direction", "dtype", "M", "N", "ms", "gpu_ms", "bytes", "gbps", "frac_of_copy",
               "peak_mem_bytes", "timing", "device", "torch", "triton", "transformers", "cuda", "liger_kernel", "commit",
               "error")


def write_csv(path: str, records: list[dict], note: str = "") -> None:
    """One row per record; ``note`` (a CPU run's label) goes into a ``note`` column of every row, so that
    a row copied out of the file still says what it is."""
    if note:
        records = [{**r, "note": note} for r in records]
    # a run that measured nothing still gets the header (and its note column): an empty file said nothing
    keys: list[str] = [*CSV_COLUMNS, *(["note"] if note else [])] if not records else []
    for r in records:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(records)


def write_plots(out_dir: str, meta: dict, records: list[dict]) -> list[str]:
    """PNG plots; returns their paths ([] when matplotlib is missing, which is said on stderr)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        import sys

        print("[mmfast.bench] matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return []
    title_note = "" if meta.get("gpu") else "  [CPU: not GPU performance]"
    paths = []
    by_op: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if not _is_model(r) and r.get("timing") != "cuda-graph" and r.get("gbps"):
            by_op[(r["op"], r["dtype"])].append(r)
    for (op, dtype), rs in by_op.items():
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
        for ax, d in zip(axes, KERNEL_DIRECTIONS):
            series: dict[str, list] = defaultdict(list)
            for r in rs:
                if r["direction"] == d:
                    series[r["provider"]].append((r["N"], r["gbps"]))
            for provider, pts in sorted(series.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider)
            if meta.get("copy_gbps"):
                ax.axhline(meta["copy_gbps"], color="gray", linestyle="--", linewidth=1, label="d2d copy")
            ax.set_title(d)
            ax.set_xlabel("N")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("GB/s (byte model" + (", GPU time)" if _has_gpu_time(rs) else ")"))
        axes[-1].legend(fontsize=8)
        fig.suptitle(f"{op} ({dtype}), {meta['device']}{title_note}", fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{op.replace('+', '_')}_{dtype}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    model = [r for r in records if _is_model(r) and r.get("tokens_per_s")]
    if model:
        def gib(key):  # NaN, so no bar, where a record has no value (peak on CPU, saved under compile)
            return lambda r: r[key] / 2**30 if r.get(key) is not None else math.nan

        panels = [("tokens / s", lambda r: r["tokens_per_s"])]
        if any(r.get("peak_mem_bytes") for r in model):  # not measured on CPU
            panels.append(("peak GiB", gib("peak_mem_bytes")))
        if any(r.get("saved_bytes") for r in model):
            panels.append(("saved for backward, GiB", gib("saved_bytes")))
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels) + 1, 4.2), squeeze=False)
        axes = list(axes[0])
        cases = sorted({r["op"] for r in model})
        provs = sorted({r["provider"] for r in model})
        width = 0.8 / len(provs)
        for i, prov in enumerate(provs):
            xs = [j + i * width for j in range(len(cases))]
            for ax, (_, value) in zip(axes, panels):
                ax.bar(xs, [next((value(r) for r in model if r["op"] == c and r["provider"] == prov), math.nan)
                            for c in cases], width, label=prov)
        for ax, (label, _) in zip(axes, panels):
            ax.set_xticks([j + width * (len(provs) - 1) / 2 for j in range(len(cases))])
            ax.set_xticklabels([c.split("[")[-1].rstrip("]") for c in cases])
            ax.set_ylabel(label)
            ax.grid(alpha=0.3, axis="y")
        axes[0].legend(fontsize=8)
        fig.suptitle(f"LLaVA-shaped training step, {meta['device']}{title_note}", fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, "model_train_step.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
