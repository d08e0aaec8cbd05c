"""Times one (case, provider) in every direction and turns the timings into records."""

from __future__ import annotations

import sys

import torch

from .norm import NormCase, build_provider
from .timing import median_ms, peak_memory_bytes

DIRECTIONS = ("fwd", "bwd", "fwd+bwd")


def _record(case: NormCase, provider: str, direction: str, ms: float | None, copy: float, peak: int | None,
            env: dict, error: str | None = None) -> dict:
    nbytes = case.bytes_moved(direction)
    gbps = None if ms is None else nbytes / (ms * 1e-3) / 1e9
    return {
        "op": case.name,
        "provider": provider,
        "direction": direction,
        "dtype": str(case.dtype).replace("torch.", ""),
        "M": case.M,
        "N": case.N,
        "ms": ms,
        "bytes": nbytes,
        "gbps": gbps,
        "frac_of_copy": None if gbps is None else gbps / copy,
        "peak_mem_bytes": peak,
        **env,
        "error": error,
    }


def _time_backward_only(case, provider, device, x, r, seeds) -> float:
    """Backward alone: one forward, then repeated ``backward(retain_graph=True)``. A compiled backward
    refuses to run twice while it donates buffers, so this direction uses a fresh provider instance
    built with donated buffers off (fwd and fwd+bwd keep the default)."""
    with torch._functorch.config.patch(donated_buffer=False):
        fn, params = build_provider(provider, case, device)
        leaves = [x] + ([r] if r is not None else []) + params
        out = fn(x, r)
        outs = list(out) if isinstance(out, tuple) else [out]
        torch.autograd.backward(outs, seeds, retain_graph=True)  # warm-up
        return median_ms(lambda: torch.autograd.backward(outs, seeds, retain_graph=True), device, grad_to_none=leaves)


def time_norm_case(case: NormCase, provider: str, device: torch.device, copy: float, env: dict,
                   directions=DIRECTIONS) -> list[dict]:
    """Records for ``provider`` on ``case``; a provider that fails gets records carrying the error."""
    try:
        fn, params = build_provider(provider, case, device)
        x = torch.randn(case.M, case.N, device=device, dtype=case.dtype, requires_grad=True)
        r = torch.randn_like(x, requires_grad=True) if case.residual else None
        leaves = [x] + ([r] if r is not None else []) + params
        seeds = [torch.randn_like(x) for _ in range(2 if case.residual else 1)]

        def forward():
            out = fn(x, r)
            return list(out) if isinstance(out, tuple) else [out]

        def fwd_bwd():
            torch.autograd.backward(forward(), seeds)

        fwd_bwd()  # warm-up: compilation, autotuning, allocator
        for t in leaves:
            t.grad = None
        peak = peak_memory_bytes(fwd_bwd, device)
        out: list[dict] = []
        for direction in directions:
            if direction == "fwd":
                ms = median_ms(forward, device)
            elif direction == "fwd+bwd":
                ms = median_ms(fwd_bwd, device, grad_to_none=leaves)
            else:
                ms = _time_backward_only(case, provider, device, x, r, seeds)
            out.append(_record(case, provider, direction, ms, copy, peak, env))
        return out
    except Exception as e:  # noqa: BLE001 - reported in the results, never hidden
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        print(f"[mmfast.bench] {provider} failed on {case.name} M={case.M} N={case.N}: {msg}", file=sys.stderr)
        return [_record(case, provider, d, None, copy, None, env, error=msg) for d in directions]
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
