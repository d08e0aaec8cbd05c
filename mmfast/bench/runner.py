"""Times one (case, provider) in every direction and turns the timings into records."""

from __future__ import annotations

import contextlib
import multiprocessing
import sys
import traceback
from concurrent.futures import ProcessPoolExecutor
from typing import Callable

import torch

from . import adapter as adapter_bench
from . import norm as norm_bench
from . import activation as activation_bench
from .cases import DIRECTIONS, AdapterCase, NormCase, QuickGELUCase, SwiGLUCase
from ..ops.backend import backends_used
from .timing import gpu_busy_ms, median_ms, median_ms_graph, peak_memory_bytes


def record(case, provider: str, direction: str, ms: float | None, copy: float | None, peak: int | None,
           env: dict, error: str | None = None, gpu_ms: float | None = None, **extra) -> dict:
    """One timing. ``ms``: wall time per call (what eager code waits); ``gpu_ms``: the GPU's busy time
    per call (kernels only, host gaps left out; GPU runs). GB/s and the fraction of copy bandwidth
    come from ``gpu_ms`` when there is one, else from ``ms``."""
    nbytes = case.bytes_moved(direction) if hasattr(case, "bytes_moved") else None
    basis = gpu_ms if gpu_ms is not None else ms
    gbps = None if basis is None or nbytes is None else nbytes / (basis * 1e-3) / 1e9
    graphs = bool(getattr(case, "graphs", False) and env.get("cuda"))
    # no fraction of copy for a CUDA-graph replay: its few megabytes (read from memory: the timer flushes the
    # L2 before each replay) take microseconds, which the kernels' start and ramp set, not bandwidth, so a
    # fraction of the copy timed far above the L2 says nothing of them; nor on the CPU, whose small cases stay
    # in its caches (they read above 100% of the copy there)
    cached = graphs or not env.get("cuda")
    return {
        "op": case.name,
        "provider": provider,
        "direction": direction,
        "dtype": str(case.dtype).replace("torch.", ""),
        "M": case.M,
        "N": case.N,
        "ms": ms,
        "gpu_ms": gpu_ms,
        "bytes": nbytes,
        "gbps": gbps,
        "frac_of_copy": None if gbps is None or not copy or cached else gbps / copy,
        "peak_mem_bytes": peak,
        "timing": "cuda-graph" if graphs else "direct",
        **env,
        **extra,
        "error": error,
    }


def _setup(case, provider: str, device: torch.device):
    """(fn, leaves, inputs, seeds): fn(*inputs) returns the outputs backward is seeded with."""
    if isinstance(case, NormCase):
        fn, params = norm_bench.build_provider(provider, case, device)
        x = torch.randn(case.M, case.N, device=device, dtype=case.dtype, requires_grad=True)
        r = torch.randn_like(x, requires_grad=True) if case.residual else None
        leaves = [x] + ([r] if r is not None else []) + params
        return fn, leaves, (x, r), [torch.randn_like(x) for _ in range(2 if case.residual else 1)]
    if isinstance(case, AdapterCase):
        fn, params = adapter_bench.build_provider(provider, case, device)
        x, route = adapter_bench.make_inputs(case, device)
        return fn, [x] + params, (x, route), [torch.randn_like(x)]
    if isinstance(case, (SwiGLUCase, QuickGELUCase)):
        fn, params = activation_bench.build_provider(provider, case, device)
        inputs = activation_bench.make_inputs(case, device)
        return fn, list(inputs) + params, inputs, [torch.randn_like(inputs[0])]
    raise TypeError(type(case).__name__)


def _backward(outs, seeds, leaves, retain_graph: bool = False) -> None:
    """The backward a case times: the gradients of every leaf, returned, not accumulated into ``.grad``.
    Where one gradient tensor goes to two leaves (x and the residual of ``x + r``: the sum's gradient is
    both), accumulating would copy it for the second leaf: a full extra read and write that no
    provider's kernels do and the byte model rightly leaves out."""
    torch.autograd.grad(outs, leaves, seeds, retain_graph=retain_graph, allow_unused=True)


def _outputs(fn, inputs) -> list[torch.Tensor]:
    out = fn(*inputs)
    return list(out) if isinstance(out, tuple) else [out]


def _timer(case, device: torch.device) -> Callable:
    if getattr(case, "graphs", False) and device.type == "cuda":
        return median_ms_graph
    return median_ms


def timed_call(case, provider: str, device: torch.device, direction: str, stream=None):
    """``(call, leaves)``: one warmed-up call of ``direction`` for ``provider`` on ``case``.

    Backward alone is one forward, then repeated ``backward(retain_graph=True)``; a compiled backward
    refuses to run twice while it donates buffers, so that direction is built (and compiled afresh)
    with donated buffers off. ``stream``: the CUDA stream the inputs and that forward are made on (the
    stream a CUDA-graph capture of the backward must use)."""
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        return _timed_call(case, provider, device, direction)


def _timed_call(case, provider: str, device: torch.device, direction: str):
    if direction == "bwd":
        # Compiled code is cached per function, not per module instance: without a reset this instance
        # would reuse the artifact another instance compiled with donated buffers.
        torch._dynamo.reset()
        with torch._functorch.config.patch(donated_buffer=False):
            fn, leaves, inputs, seeds = _setup(case, provider, device)
            outs = _outputs(fn, inputs)

            def call():
                with norm_bench.provider_backend(provider):
                    _backward(outs, seeds, leaves, retain_graph=True)

            call()
        return call, leaves
    fn, leaves, inputs, seeds = _setup(case, provider, device)
    if direction == "fwd":
        def call():
            with norm_bench.provider_backend(provider):
                return _outputs(fn, inputs)
    elif direction == "fwd+bwd":
        def call():
            with norm_bench.provider_backend(provider):
                _backward(_outputs(fn, inputs), seeds, leaves)
    else:
        raise ValueError(direction)
    call()
    return call, leaves


#: The order a CUDA-graph case times its directions in: the backward alone, whose capture is the most
#: delicate, last (a failed capture can leave the process's CUDA state broken for what follows).
GRAPH_ORDER = ("fwd", "fwd+bwd", "bwd")


def _failure(e: BaseException, provider: str, case, direction: str | None = None) -> str:
    msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    what = f"{case.name} M={case.M} N={case.N}" + (f" {direction}" if direction else "")
    print(f"[mmfast.bench] {provider} failed on {what}: {msg}", file=sys.stderr)
    traceback.print_exc(file=sys.stderr)  # the whole story, for the log
    return msg


def _backends(used: dict, direction: str) -> str:
    """``"cuda"``, ``"triton"``, ``"cuda+triton"``...: the backends that ran mmfast's op calls of
    ``direction`` (fwd, bwd, or both for fwd+bwd) among the ``backends_used`` counts."""
    wanted = ("fwd", "bwd") if direction == "fwd+bwd" else (direction,)
    return "+".join(sorted({u.backend for u in used if u.direction in wanted}))


def time_case(case, provider: str, device: torch.device, copy: float | None, env: dict,
              directions=DIRECTIONS) -> list[dict]:
    """Records for ``provider`` on ``case``; a provider that fails gets records carrying the error (a
    direction that fails, that direction's record alone)."""
    graphs = getattr(case, "graphs", False) and device.type == "cuda"
    try:
        # one stream for the case's inputs, warm-ups and captures (see timed_call)
        stream = torch.cuda.Stream(device) if graphs else None
        fn, leaves, inputs, seeds = _setup(case, provider, device)

        def forward():
            with norm_bench.provider_backend(provider):
                return _outputs(fn, inputs)

        def fwd_bwd():
            with norm_bench.provider_backend(provider):
                _backward(_outputs(fn, inputs), seeds, leaves)

        with backends_used() as used:  # warm-up: compilation, autotuning, allocator
            fwd_bwd()
        ran = {d: _backends(used, d) for d in DIRECTIONS} if provider.startswith("mmfast") else {}
        for t in leaves:
            t.grad = None
        peak = peak_memory_bytes(fwd_bwd, device)
    except Exception as e:  # noqa: BLE001 - reported in the results, never hidden
        msg = _failure(e, provider, case)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return [record(case, provider, d, None, copy, None, env, error=msg) for d in directions]
    timer = _timer(case, device)
    out: dict[str, dict] = {}
    order = [d for d in GRAPH_ORDER if d in directions] + [d for d in directions if d not in GRAPH_ORDER] \
        if graphs else list(directions)
    try:
        for direction in order:
            try:
                if direction == "fwd":
                    call, grads = forward, ()
                elif direction == "fwd+bwd":
                    call, grads = fwd_bwd, leaves
                else:  # a separate instance (see timed_call)
                    call, grads = timed_call(case, provider, device, "bwd", stream=stream)
                ms = timer(call, device, grad_to_none=grads, **({"stream": stream} if graphs else {}))
            except Exception as e:  # noqa: BLE001 - this direction's record carries it
                msg = _failure(e, provider, case, direction)
                out[direction] = record(case, provider, direction, None, copy, peak, env, error=msg)
                continue
            # a CUDA-graph replay has no host gaps: its wall time is already the GPU time
            gpu_ms, gpu_error = None, None
            if not graphs:
                try:
                    gpu_ms = gpu_busy_ms(call, device, grad_to_none=grads)
                except Exception as e:  # noqa: BLE001 - the wall time stands; the reason is recorded and said
                    gpu_error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                    print(f"[mmfast.bench] no GPU time for {provider} on {case.name} {direction}: {gpu_error}",
                          file=sys.stderr)
            extra = {"gpu_error": gpu_error} if gpu_error else {}
            if direction in ran:  # what ran mmfast's ops in this direction (a pinned backend, checked)
                extra["backends"] = ran[direction]
            out[direction] = record(case, provider, direction, ms, copy, peak, env, gpu_ms=gpu_ms, **extra)
        return [out[d] for d in directions]
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _time_cases(cases: list, provider: str, device: str, copy: float | None, env: dict) -> list[dict]:
    dev = torch.device(device)
    if dev.type == "cuda":  # a spawned process starts on cuda:0; the timers use the current device
        torch.cuda.set_device(dev)  # (indexed: time_cases_isolated names the index)
    return [r for case in cases for r in time_case(case, provider, dev, copy, env)]


def time_cases_isolated(cases: list, provider: str, device: torch.device, copy: float | None, env: dict) -> list[dict]:
    """:func:`time_case` of ``provider`` on each of ``cases``, in a fresh (spawned) process: whatever a
    failed CUDA-graph capture leaves behind stays there. A process that dies gives error records."""
    if device.type == "cuda" and device.index is None:  # the child's current device is cuda:0, not ours
        device = torch.device("cuda", torch.cuda.current_device())
    try:
        pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        try:
            return pool.submit(_time_cases, cases, provider, str(device), copy, env).result()
        except BaseException:
            # Ctrl-C / SIGTERM: stop the child now (leaving the pool's block would wait for it to finish,
            # and a scheduler's kill could come before the parent wrote what it had)
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.terminate()
            raise
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
    except Exception as e:  # noqa: BLE001 - reported in the results, never hidden
        msg = f"the benchmark process died: {type(e).__name__}: {e}".splitlines()[0][:300]
        print(f"[mmfast.bench] {provider}: {msg}", file=sys.stderr)
        return [record(c, provider, d, None, copy, None, env, error=msg) for c in cases for d in DIRECTIONS]
