"""Benchmark output: a printed table per op and ``results.json``."""

from __future__ import annotations

import json
import os
from collections import defaultdict


def _ms(v) -> str:
    return "error" if v is None else f"{v:.4f}" if v < 1 else f"{v:.3f}"


def table(records: list[dict]) -> str:
    """One block per (op, M, N): a row per provider with each direction's time and % of copy bandwidth."""
    groups: dict[tuple, dict[str, dict[str, dict]]] = defaultdict(lambda: defaultdict(dict))
    directions: list[str] = []
    for r in records:
        groups[(r["op"], r["dtype"], r["M"], r["N"])][r["provider"]][r["direction"]] = r
        if r["direction"] not in directions:
            directions.append(r["direction"])
    lines = []
    for (op, dtype, M, N), by_provider in groups.items():
        lines.append(f"\n{op}  {dtype}  M={M} N={N}")
        head = f"  {'provider':<18}" + "".join(f"{d + ' ms':>14}{'%copy':>7}" for d in directions)
        lines.append(head)
        for provider, by_dir in by_provider.items():
            row = f"  {provider:<18}"
            for d in directions:
                r = by_dir.get(d)
                frac = r and r["frac_of_copy"]
                row += f"{_ms(r['ms']) if r else '-':>14}" + (f"{100 * frac:>6.0f}%" if frac else f"{'':>7}")
            errors = {r["error"] for r in by_dir.values() if r.get("error")}
            if errors:
                row += "   " + "; ".join(sorted(errors))
            lines.append(row)
    return "\n".join(lines)


def write_json(path: str, meta: dict, records: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=1)
